"""A training script written the way Determined's Core API tutorials write
them, and run unchanged: logging in `det.LOG_FORMAT`, checkpoints through
`pathlib` paths with their metadata, numpy metrics when numpy is there, the
searcher's operations loop, preemption. It counts: each batch adds the `step`
hyperparameter to `x`; the state it checkpoints is `x` and the batch.

On a Resolute trial it reports to its node; run it with `python3 train.py`
anywhere else and it runs against a local context (metrics to the log,
checkpoints under ~/.local/share/determined)."""

import logging
import pathlib
import sys
import time

import determined as det

try:
    import numpy as np
except ImportError:  # numpy is optional: plain numbers then
    np = None

logger = logging.getLogger("core-api-example")


def as_metric(value):
    """A numpy scalar where numpy is installed (what real code reports)."""
    return np.float64(value) if np is not None else float(value)


def save(directory: pathlib.Path, x: int, batch: int, trial_id: int) -> None:
    directory.joinpath("state").write_text("{},{},{}".format(x, batch, trial_id))


def load(directory, trial_id: int):
    x, batch, saved_by = (int(v) for v in pathlib.Path(directory).joinpath("state").read_text().split(","))
    # A checkpoint of another trial (a PBT exploit) gives its x, not its batch.
    return (x, batch) if saved_by == trial_id else (x, 0)


def main(core_context, info) -> int:
    trial_id = info.trial.trial_id
    step = int(info.trial.hparams["step"])
    pause_s = float(info.user_data.get("pause_s", 0.0)) if info.user_data else 0.0
    x, batch = 0, 0
    if info.latest_checkpoint is not None:
        with core_context.checkpoint.restore_path(info.latest_checkpoint) as path:
            assert isinstance(path, pathlib.Path), type(path)
            x, batch = load(path, trial_id)
        metadata = core_context.checkpoint.get_metadata(info.latest_checkpoint)
        assert metadata["steps_completed"] == batch, (metadata, batch)
        logger.info("resumed at batch %d with x=%d", batch, x)
    for op in core_context.searcher.operations():
        while batch < op.length:
            x += step
            batch += 1
            time.sleep(pause_s)
            if batch % 10 == 0:
                core_context.train.report_training_metrics(steps_completed=batch, metrics={"x": as_metric(x)})
                op.report_progress(batch)
                with core_context.checkpoint.store_path({"steps_completed": batch}) as (path, storage_id):
                    save(path, x, batch, trial_id)
                if core_context.preempt.should_preempt():
                    logger.info("preempted at batch %d", batch)
                    return 0
        core_context.train.report_validation_metrics(steps_completed=batch, metrics={"x": as_metric(x)})
        op.report_completed(x)
    logger.info("done at batch %d with x=%d", batch, x)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    info = det.get_cluster_info()
    if info is None:
        # Off a cluster: what a laptop run would use.
        info = type("Local", (), {})()
        info.trial = type("Trial", (), {"trial_id": 0, "hparams": {"step": 1}})()
        info.user_data = {}
        info.latest_checkpoint = None
    with det.core.init() as core_context:
        sys.exit(main(core_context, info))
