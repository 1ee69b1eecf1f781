"""`python3 -m determined.exec.harness module:TrialClass`: runs a
`det.pytorch.PyTorchTrial` subclass as Determined's harness did. The node
starts it for `entrypoint: model_def:MyTrial` (under
`determined.launch.torch_distributed --trial` when the trial has several
slots). The training length, periods and checkpoint policy come from the
experiment config: the searcher's lengths (`searcher.max_length` or
`time_metric` + `max_time`), `min_validation_period`,
`min_checkpoint_period`, `scheduling_unit` (training metrics every N
batches, 100 by default), `checkpoint_policy`, `perform_initial_validation`.
"""

import importlib
import importlib.util
import logging
import os
import sys

# What `scheduling_unit` is when the config does not say (Determined's default).
SCHEDULING_UNIT_DEFAULT = 100

logger = logging.getLogger("determined")


class HarnessError(Exception):
    """The entrypoint cannot be run; the message says why and what to do."""


def trial_class_from_entrypoint(entrypoint):
    """The class `module:Class` names, imported from the model directory."""
    module_name, sep, class_name = entrypoint.partition(":")
    if not sep or not module_name or not class_name:
        raise HarnessError("entrypoint {!r}: expected module:TrialClass (for example model_def:MyTrial)".format(entrypoint))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if importlib.util.find_spec("torch") is None:
        raise HarnessError(
            "entrypoint {}: a Trial class runs on PyTorch, and torch is not importable by {} on this node; "
            "install torch there (pip install torch), or make the entrypoint a Core API script "
            "(python3 train.py)".format(entrypoint, sys.executable)
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name.split(".")[0]:
            raise HarnessError("entrypoint {}: there is no module {} in the model directory {}".format(entrypoint, module_name, os.getcwd())) from e
        raise
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise HarnessError("entrypoint {}: module {} has no class {}".format(entrypoint, module_name, class_name)) from None
    return cls


def fit_arguments(config, hparams, latest_checkpoint):
    """`Trainer.fit` keywords from the experiment config, as Determined's
    harness read them."""
    from determined import pytorch

    gbs = hparams.get("global_batch_size")

    def period(key):
        value = config.get(key)
        return pytorch.TrainUnit._from_values(**value, global_batch_size=gbs) if value else None

    return dict(
        checkpoint_period=period("min_checkpoint_period"),
        validation_period=period("min_validation_period"),
        reporting_period=pytorch.Batch(int(config.get("scheduling_unit") or SCHEDULING_UNIT_DEFAULT)),
        checkpoint_policy=config.get("checkpoint_policy", "best"),
        latest_checkpoint=latest_checkpoint,
        step_zero_validation=bool(config.get("perform_initial_validation", False)),
    )


def run(entrypoint):
    import determined as det

    info = det.get_cluster_info()
    if info is None:
        raise HarnessError("determined.exec.harness runs on a cluster (as a trial's entrypoint); off a cluster use det.pytorch.Trainer")
    cls = trial_class_from_entrypoint(entrypoint)
    from determined import pytorch

    if not (isinstance(cls, type) and issubclass(cls, pytorch.PyTorchTrial)):
        raise HarnessError("entrypoint {}: {} is not a det.pytorch.PyTorchTrial subclass".format(entrypoint, cls))
    with pytorch.init() as context:
        trial = cls(context)
        logger.info("training %s with the PyTorchTrial harness", cls.__name__)
        args = fit_arguments(info.trial.config, context.get_hparams(), info.latest_checkpoint)
        pytorch.Trainer(trial, context).fit(**args)


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: [%(process)s] %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python3 -m determined.exec.harness module:TrialClass", file=sys.stderr)
        return 2
    try:
        run(argv[0])
    except HarnessError as e:
        print("error: {}".format(e), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
