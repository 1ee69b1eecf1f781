"""Data loading for PyTorchTrials: `det.pytorch.DataLoader` (torch's
DataLoader arguments; the harness shards it across processes, orders each
epoch from the trial's seed and resumes mid-epoch without loading the
skipped batches) and the device moves of a batch."""

import torch
import torch.utils.data

TorchData = object  # a tensor, or a dict / list / tuple of them

# The keyword arguments det.pytorch.DataLoader keeps for torch's DataLoader.
_LOADER_KWARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
)


def to_device(data, device, warned_types=None):
    """`data` with every tensor in it (through dicts, lists and tuples) on
    `device`. `warned_types` is Determined's parameter, accepted and unused
    (other types pass through silently)."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(to_device(v, device) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device) for v in data)
    return data


class DataLoader:
    """Determined's DataLoader: give it a Dataset and torch's DataLoader
    arguments. `batch_size` is the per-process batch
    (`context.get_per_slot_batch_size()`); with `shuffle` every epoch has its
    own order, drawn from the trial's seed and the epoch's number, so a
    restarted trial sees the same batches."""

    def __init__(self, dataset, batch_size=1, shuffle=False, sampler=None, batch_sampler=None, drop_last=False, generator=None, **kwargs):
        if sampler is not None or batch_sampler is not None:
            raise ValueError(
                "det.pytorch.DataLoader orders and shards batches itself: give shuffle=True/False, "
                "not a sampler or batch_sampler (or return a torch DataLoader that shards itself)"
            )
        unknown = set(kwargs) - set(_LOADER_KWARGS)
        if unknown:
            raise TypeError("DataLoader: unknown arguments {}".format(sorted(unknown)))
        if batch_size is None or int(batch_size) < 1:
            raise ValueError("DataLoader: batch_size must be at least 1")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.kwargs = kwargs

    def batches_per_epoch(self, num_replicas=1):
        """Batches one process trains in an epoch."""
        n = len(self.dataset)
        full, rest = divmod(n, self.batch_size)
        total = full if self.drop_last or rest == 0 else full + 1
        return total // num_replicas

    def _epoch_batches(self, epoch, seed, num_replicas, rank):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((int(seed) * 1_000_003 + epoch) % (2**63))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # Every process takes every num_replicas-th batch; all get as many.
        per = len(batches) // num_replicas
        return batches[rank : per * num_replicas : num_replicas]

    def get_data_loader(self, repeat=False, skip=0, num_replicas=1, rank=0, seed=0):
        """A torch DataLoader over this process's share, from batch `skip`."""
        sampler = _BatchIndices(self, repeat, skip, num_replicas, rank, seed)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, **self.kwargs)


class _BatchIndices(torch.utils.data.Sampler):
    """The index lists of one process's batches, epoch after epoch."""

    def __init__(self, loader, repeat, skip, num_replicas, rank, seed):
        self.loader = loader
        self.repeat = repeat
        self.skip = skip
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed

    def __len__(self):
        return self.loader.batches_per_epoch(self.num_replicas)

    def __iter__(self):
        per_epoch = len(self)
        if per_epoch == 0:
            return
        epoch, offset = divmod(self.skip, per_epoch)
        while True:
            batches = self.loader._epoch_batches(epoch, self.seed, self.num_replicas, self.rank)
            for b in batches[offset:]:
                yield b
            if not self.repeat:
                return
            epoch, offset = epoch + 1, 0
