"""`det.pytorch.init()` and `det.pytorch.Trainer(trial, context).fit(...)`:
the newer way to run a PyTorchTrial (from a script), which the
`model_def:Trial` entrypoint also goes through (`determined.exec.harness`).

On a cluster the training length comes from the searcher (the trial's
target, then each next length it gives); `fit(max_length=...)` caps it.
Off a cluster (`python3 train.py` on a laptop) `max_length` is required and
checkpoints go to a local directory, as Determined's local training mode."""

import contextlib
import logging
import os
import pathlib
import random
import warnings

import torch
import torch.distributed as dist

from resolute import core as _core
from resolute._harness import loop, units
from determined.pytorch._context import PyTorchTrialContext, _strip_module_prefix, _unwrap

logger = logging.getLogger("determined.pytorch")


def _set_random_seeds(seed):
    """The same seeds in every process (each process still sees its own
    shard of the data)."""
    random.seed(seed)
    torch.random.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % (2**32))
    except ImportError:
        pass


def _torch_distributed():
    """The process group of a multi-process trial started by torchrun or
    `determined.launch.torch_distributed` (None for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return _core.DistributedContext.from_torch_distributed()


@contextlib.contextmanager
def init(*, hparams=None, exp_conf=None, distributed=None, aggregation_frequency=1, enable_tensorboard_logging=True):
    """A PyTorchTrialContext inside the Core API's context; every Trainer
    call happens within it."""
    if int(aggregation_frequency) != 1:
        raise ValueError("aggregation_frequency other than 1 is not supported by Resolute's harness")
    info = _core.get_cluster_info()
    if info is not None:
        distributed = distributed or _torch_distributed()
        if distributed is None and (len(info.slot_ids) > 1 or len(info.container_addrs) > 1):
            raise ValueError(
                "a multi-slot PyTorchTrial must run under a launcher: use `entrypoint: model_def:Trial` "
                "(the node starts one process per slot) or `python3 -m determined.launch.torch_distributed "
                "python3 train.py`"
            )
        hparams = info.trial.hparams if hparams is None else hparams
        exp_conf = info.trial.config
        seed = info.trial.trial_seed
        _set_random_seeds(seed)
        num_gpus = len(info.gpu_uuids)
    else:
        seed = 0
        num_gpus = torch.cuda.device_count()
    with _core.init(distributed=distributed, preempt_mode=_core.PreemptMode.WorkersAskChief) as core_context:
        context = PyTorchTrialContext(
            core_context, trial_seed=seed, hparams=hparams, exp_conf=exp_conf, num_gpus=num_gpus, info=info
        )
        try:
            yield context
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


class Trainer:
    def __init__(self, trial, context):
        self._trial = trial
        self._context = context
        self._core = context._core
        self._info = _core.get_cluster_info()

    def fit(
        self,
        checkpoint_period=None,
        validation_period=None,
        max_length=None,
        reporting_period=units.Batch(100),  # noqa: B008 - immutable
        checkpoint_policy="best",
        latest_checkpoint=None,
        step_zero_validation=False,
        test_mode=False,
        profiling_enabled=False,
    ):
        """Trains to `max_length` (or the searcher's lengths), validating and
        checkpointing at the given periods and at the end."""
        if profiling_enabled:
            logger.warning("profiling is not supported by Resolute's harness; training goes on without it")
        if max_length is not None and (not isinstance(max_length, (units.Batch, units.Epoch)) or not isinstance(max_length.value, int)):
            raise TypeError("max_length must be a det.pytorch.Batch(int) or det.pytorch.Epoch(int)")
        if self._info is None:
            lengths, searcher_metric, smaller = self._local(max_length, test_mode)
            if checkpoint_policy == "best":
                logger.warning("checkpoint_policy='best' is not supported in local training mode; using 'all'")
                checkpoint_policy = "all"
        else:
            if test_mode:
                raise ValueError("test_mode is only supported in local training mode")
            lengths, searcher_metric, smaller = self._on_cluster(max_length)
            if latest_checkpoint is None and self._info.latest_checkpoint is not None:
                logger.warning(
                    "latest_checkpoint is not set: the trial starts over instead of resuming; did you mean "
                    "fit(latest_checkpoint=info.latest_checkpoint)?"
                )
        loop.Loop(
            self._trial,
            self._context,
            self._core,
            lengths,
            validation_period=validation_period,
            checkpoint_period=checkpoint_period,
            reporting_period=reporting_period,
            checkpoint_policy=checkpoint_policy,
            searcher_metric=searcher_metric,
            smaller_is_better=smaller,
            step_zero_validation=step_zero_validation,
            latest_checkpoint=latest_checkpoint,
            test_mode=test_mode,
        ).run()

    def _local(self, max_length, test_mode):
        if max_length is None:
            raise ValueError("max_length must be given in local training mode (e.g. fit(max_length=det.pytorch.Epoch(1)))")
        unit = "batches" if isinstance(max_length, units.Batch) else "epochs"
        return loop.Lengths(max_length.value, unit), None, True

    def _on_cluster(self, max_length):
        config = self._info.trial.config
        searcher = config.get("searcher", {})
        gbs = self._context.get_hparams().get("global_batch_size")
        target = self._info.target_length
        if target is None:
            if max_length is None:
                raise ValueError(
                    "the searcher gives this trial no length: set searcher.max_length (or time_metric and "
                    "max_time) in the experiment config, or pass fit(max_length=...)"
                )
            unit = "batches" if isinstance(max_length, units.Batch) else "epochs"
            lengths = loop.Lengths(max_length.value, unit)
        else:
            unit = self._info.time_metric
            following = self._core.searcher._ask_next
            lengths = loop.Lengths(target, unit, gbs, following=following, cap=max_length)
            logger.info("the searcher's length for this trial: %d %s", target, unit)
            if max_length is not None and units.TrainUnit._from_searcher_unit(searcher.get("max_time", target), unit, gbs) != max_length:
                warnings.warn(
                    "fit(max_length={!r}) differs from the searcher's max_time {} {}: training stops at "
                    "whichever comes first".format(max_length, searcher.get("max_time"), unit),
                    stacklevel=3,
                )
        return lengths, searcher.get("metric"), bool(searcher.get("smaller_is_better", True))


def load_trial_from_checkpoint_path(path, trial_class=None, trial_kwargs=None, torch_load_kwargs=None, **_ignored):
    """A trial built from a checkpoint directory (for inference): its class
    is given, the model's weights come from `state_dict.pth`."""
    if trial_class is None:
        raise ValueError("load_trial_from_checkpoint_path needs trial_class= (Resolute does not pickle the class)")
    path = pathlib.Path(path)
    found = [path / f for f in loop.STATE_DICT_FILES if (path / f).exists()]
    if not found:
        raise FileNotFoundError("{} has none of {}".format(path, list(loop.STATE_DICT_FILES)))
    with _core.init() as core_context:
        context = PyTorchTrialContext(core_context, hparams=(trial_kwargs or {}).get("hparams"))
        trial = trial_class(context)
        state = torch.load(str(found[0]), map_location=context.device, weights_only=False, **(torch_load_kwargs or {}))
        for model, saved in zip(context.models, state.get("models_state_dict", [])):
            _unwrap(model).load_state_dict(_strip_module_prefix(saved))
            model.eval()
    return trial
