"""A Core API script for a multi-slot trial, in the style of Determined's
distributed tutorial: every process counts its share (rank r adds
`step * (r + 1)` per batch), `allgather` sums the shares into `x`, the chief
`broadcast`s what all must agree on, every process saves its own shard of
each checkpoint (`store_path(shard=True)`) and reads it back on resume.

Start it with `python3 -m determined.launch.torch_distributed python3
train.py` (the experiment's entrypoint); `python3 train.py` alone runs one
process against the local context."""

import logging
import os
import pathlib
import sys
import time

import determined as det

logger = logging.getLogger("core-api-distributed")


def shard_name(rank):
    return "shard-{}".format(rank)


def restore(core_context, storage_id, rank):
    """This rank's share and batch from its shard of the checkpoint."""
    with core_context.checkpoint.restore_path(storage_id) as path:
        assert isinstance(path, pathlib.Path), type(path)
        share, batch = (int(v) for v in path.joinpath(shard_name(rank)).read_text().split(","))
    return share, batch


def main(core_context, info):
    dist = core_context.distributed
    rank, size = dist.get_rank(), dist.get_size()
    step = int(info.trial.hparams["step"]) if info else 1
    pause_s = float(info.user_data.get("pause_s", 0.0)) if info and info.user_data else 0.0
    # Everyone must train the same way: the chief's word on it goes to all.
    agreed = dist.broadcast({"step": step, "size": size} if rank == 0 else None)
    assert agreed == {"step": step, "size": size}, (agreed, step, size)
    hosts = dist.allgather(os.uname().nodename)
    logger.info("rank %d of %d (local %d of %d, node %d of %d), hosts %s",
                rank, size, dist.get_local_rank(), dist.get_local_size(),
                dist.get_cross_rank(), dist.get_cross_size(), sorted(set(hosts)))
    share, batch = 0, 0
    latest = info.latest_checkpoint if info else None
    if latest is not None:
        share, batch = restore(core_context, latest, rank)
        metadata = core_context.checkpoint.get_metadata(latest)
        assert metadata["steps_completed"] == batch, (metadata, batch)
        assert metadata["world_size"] == size, metadata
        logger.info("rank %d resumed at batch %d with share %d", rank, batch, share)
    for op in core_context.searcher.operations():
        while batch < op.length:
            share += step * (rank + 1)
            batch += 1
            time.sleep(pause_s)
            if batch % 10 == 0:
                x = sum(dist.allgather(share))
                batches = dist.gather(batch)
                if rank == 0:
                    assert batches == [batch] * size, batches
                    core_context.train.report_training_metrics(steps_completed=batch, metrics={"x": x})
                    op.report_progress(batch)
                metadata = {"steps_completed": batch, "world_size": size}
                with core_context.checkpoint.store_path(metadata, shard=True) as (path, storage_id):
                    path.joinpath(shard_name(rank)).write_text("{},{}".format(share, batch))
                if core_context.preempt.should_preempt():
                    logger.info("rank %d preempted at batch %d", rank, batch)
                    return 0
        x = sum(dist.allgather(share))
        if rank == 0:
            core_context.train.report_validation_metrics(steps_completed=batch, metrics={"x": x})
            op.report_completed(x)
    logger.info("rank %d done at batch %d, x=%d", rank, batch, x)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    info = det.get_cluster_info()
    if "RANK" in os.environ:
        distributed = det.core.DistributedContext.from_torch_distributed()
    else:
        distributed = None
    with det.core.init(distributed=distributed) as core_context:
        sys.exit(main(core_context, info))
