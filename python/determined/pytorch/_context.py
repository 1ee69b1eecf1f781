"""`det.pytorch.PyTorchTrialContext`: what a PyTorchTrial builds its model
with (`wrap_model`, `wrap_optimizer`, `wrap_lr_scheduler`, `backward`,
`step_optimizer`, the hyperparameters and batch sizes), and the torch side
of the harness's loop (device moves, data loaders, state dicts)."""

import logging
import os
import random

import torch
import torch.nn as nn

from determined.pytorch import _data
from determined.pytorch._lr_scheduler import LRScheduler

logger = logging.getLogger("determined.pytorch")


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _strip_module_prefix(state):
    """A state dict saved from a DistributedDataParallel wrapper (`module.`
    keys) loads into the bare model."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


class PyTorchTrialContext:
    def __init__(self, core_context, trial_seed=0, hparams=None, exp_conf=None, num_gpus=0, info=None):
        self._core = core_context
        self.distributed = core_context.distributed
        self._trial_seed = int(trial_seed or 0)
        self._hparams = dict(hparams or {})
        self._exp_conf = dict(exp_conf or {})
        self._info = info
        self.models = []
        self.optimizers = []
        self.lr_schedulers = []
        self._scalers = []
        self._current_batch_idx = None
        self._epoch_len = None
        self._stop_requested = False
        use_cuda = num_gpus > 0 and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", self.distributed.local_rank))
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)

    # What the trial asks about itself.

    def get_hparams(self):
        return dict(self._hparams)

    def get_hparam(self, name):
        if name not in self._hparams:
            raise KeyError("hyperparameter {!r} is not in the experiment's hyperparameters {}".format(name, sorted(self._hparams)))
        return self._hparams[name]

    def get_experiment_config(self):
        return self._exp_conf

    def get_data_config(self):
        return self._exp_conf.get("data", {}) or {}

    def get_trial_seed(self):
        return self._trial_seed

    def get_experiment_id(self):
        return self._info.trial.experiment_id if self._info else 0

    def get_trial_id(self):
        return self._info.trial.trial_id if self._info else 0

    def get_global_batch_size(self):
        if "global_batch_size" not in self._hparams:
            raise KeyError("a PyTorchTrial needs hyperparameters.global_batch_size in the experiment config")
        return int(self._hparams["global_batch_size"])

    def get_per_slot_batch_size(self):
        size = self.distributed.size
        gbs = self.get_global_batch_size()
        if gbs < size:
            raise ValueError("global_batch_size {} is smaller than the trial's {} slots".format(gbs, size))
        return gbs // size

    def get_enable_tensorboard_logging(self):
        return False

    def get_tensorboard_path(self):
        path = os.path.join(os.environ.get("RESOLUTE_TRIAL_DIR", os.getcwd()), "tensorboard")
        os.makedirs(path, exist_ok=True)
        return path

    def current_train_batch(self):
        return self._current_batch_idx

    def current_train_epoch(self):
        return self._current_batch_idx // self._epoch_len if self._epoch_len else 0

    def is_epoch_start(self):
        return bool(self._epoch_len) and self._current_batch_idx % self._epoch_len == 0

    def is_epoch_end(self):
        return bool(self._epoch_len) and (self._current_batch_idx + 1) % self._epoch_len == 0

    def set_stop_requested(self, stop_requested):
        """Stop at the next period's end (checkpointed) as if preempted."""
        self._stop_requested = bool(stop_requested)

    def get_stop_requested(self):
        return self._stop_requested

    # Building the model.

    def wrap_model(self, model):
        model = model.to(self.device)
        if self.distributed.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.models.append(model)
        return model

    def wrap_optimizer(self, optimizer, backward_passes_per_step=1, **_ignored):
        if int(backward_passes_per_step) != 1:
            raise ValueError("backward_passes_per_step other than 1 is not supported by Resolute's harness")
        self.optimizers.append(optimizer)
        return optimizer

    def wrap_lr_scheduler(self, lr_scheduler, step_mode, frequency=1):
        self.lr_schedulers.append(LRScheduler(lr_scheduler, step_mode, frequency))
        return lr_scheduler

    def wrap_scaler(self, scaler):
        self._scalers.append(scaler)
        return scaler

    def to_device(self, data):
        return _data.to_device(data, self.device)

    def backward(self, loss, gradient=None, retain_graph=False, create_graph=False):
        loss.backward(gradient=gradient, retain_graph=retain_graph, create_graph=create_graph)

    def step_optimizer(self, optimizer, clip_grads=None, auto_zero_grads=True, scaler=None):
        if clip_grads is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip_grads(params)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if auto_zero_grads:
            optimizer.zero_grad()
        for s in self.lr_schedulers:
            if s._step_mode is LRScheduler.StepMode.STEP_EVERY_OPTIMIZER_STEP and getattr(s.scheduler, "optimizer", None) is optimizer:
                s.step()

    # The loop's side (resolute._harness.loop).

    def _set_train_mode(self, training):
        for m in self.models:
            m.train(training)

    def _no_grad(self):
        return torch.no_grad()

    def _after_batch(self, batch_idx):
        for s in self.lr_schedulers:
            if s._step_mode is LRScheduler.StepMode.STEP_EVERY_BATCH and (batch_idx + 1) % s._frequency == 0:
                s.step()

    def _after_epoch(self, epoch_idx):
        for s in self.lr_schedulers:
            if s._step_mode is LRScheduler.StepMode.STEP_EVERY_EPOCH and (epoch_idx + 1) % s._frequency == 0:
                s.step()

    def _framework(self):
        return "torch-{}".format(torch.__version__)

    def _training_batches(self, loader, skip):
        """`(batches per epoch, iterator of (batch index, batch))` from batch `skip` on."""
        size, rank = self.distributed.size, self.distributed.rank
        if isinstance(loader, _data.DataLoader):
            epoch_len = loader.batches_per_epoch(size)
            if epoch_len < 1:
                raise ValueError("the training data loader gives this process no batches (dataset too small for the batch size and slots)")
            torch_loader = loader.get_data_loader(repeat=True, skip=skip, num_replicas=size, rank=rank, seed=self._trial_seed)
            self._epoch_len = epoch_len
            return epoch_len, enumerate(torch_loader, start=skip)
        if isinstance(loader, torch.utils.data.DataLoader):
            epoch_len = len(loader)
            if epoch_len < 1:
                raise ValueError("the training data loader has no batches")
            if size > 1:
                logger.warning("a torch DataLoader is not sharded by the harness: each process must shard its own data")
            self._epoch_len = epoch_len
            return epoch_len, _repeat(loader, skip)
        raise TypeError(
            "build_training_data_loader() must return a det.pytorch.DataLoader or a torch DataLoader, not {}".format(type(loader).__name__)
        )

    def _validation_loader(self, loader):
        if isinstance(loader, _data.DataLoader):
            return loader.get_data_loader(repeat=False, num_replicas=self.distributed.size, rank=self.distributed.rank, seed=self._trial_seed)
        return loader

    def _state_dict(self):
        state = {
            "models_state_dict": [_unwrap(m).state_dict() for m in self.models],
            "optimizers_state_dict": [o.state_dict() for o in self.optimizers],
            "lr_schedulers_state_dict": [s.state_dict() for s in self.lr_schedulers],
            "scalers_state_dict": [s.state_dict() for s in self._scalers],
            "rng_state": {
                "cpu_rng_state": torch.random.get_rng_state(),
                "random_rng_state": random.getstate(),
            },
        }
        try:
            import numpy

            state["rng_state"]["np_rng_state"] = numpy.random.get_state()
        except ImportError:
            pass
        if self.device.type == "cuda":
            state["rng_state"]["gpu_rng_state"] = torch.cuda.get_rng_state(self.device)
        return state

    def _write_state(self, path, state):
        torch.save(state, str(path))

    def _read_state(self, path):
        # Our own checkpoint: it holds random states (not only tensors).
        return torch.load(str(path), map_location=self.device, weights_only=False)

    def _load_state_dict(self, state):
        pairs = [
            ("models_state_dict", [_unwrap(m) for m in self.models]),
            ("optimizers_state_dict", self.optimizers),
            ("lr_schedulers_state_dict", self.lr_schedulers),
            ("scalers_state_dict", self._scalers),
        ]
        for key, objs in pairs:
            saved = state.get(key, [])
            if len(saved) != len(objs):
                raise ValueError(
                    "the checkpoint has {} {} but the trial wrapped {}: build the same models, optimizers and "
                    "schedulers as the trial that saved it".format(len(saved), key, len(objs))
                )
            for obj, s in zip(objs, saved):
                obj.load_state_dict(_strip_module_prefix(s) if key == "models_state_dict" else s)
        rng = state.get("rng_state", {})
        if "cpu_rng_state" in rng:
            torch.random.set_rng_state(rng["cpu_rng_state"].cpu())
        if "random_rng_state" in rng:
            random.setstate(rng["random_rng_state"])
        if "np_rng_state" in rng:
            try:
                import numpy

                numpy.random.set_state(rng["np_rng_state"])
            except ImportError:
                pass
        if "gpu_rng_state" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["gpu_rng_state"].cpu(), self.device)


def _repeat(loader, skip):
    """A torch DataLoader's batches, epoch after epoch, from batch `skip`
    (the skipped batches of the first epoch are loaded and dropped)."""
    epoch_len = len(loader)
    idx = skip - skip % epoch_len
    drop = skip % epoch_len
    while True:
        for i, batch in enumerate(loader):
            if drop and i < drop:
                continue
            yield idx + i, batch
        drop = 0
        idx += epoch_len

