"""The Core API off a cluster, as Determined's `core.init()` gives it when
there is no trial to serve (a laptop, a notebook, a unit test): the same
script runs; metrics go to the log, checkpoints to a local directory, the
searcher asks for one operation of length 1, and nothing preempts it.

Checkpoints are kept under `checkpoint_storage` (a directory path) when
given, else under `$XDG_DATA_HOME/determined` (`~/.local/share/determined`),
one directory per storage id with its `metadata.json`."""

import contextlib
import json
import logging
import os
import pathlib
import shutil
import uuid

from resolute import _checkpoint, _values
from resolute import core

logger = logging.getLogger("determined.core")


def default_storage():
    """Where checkpoints go when `checkpoint_storage` names no place."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "determined"


def _storage_path(checkpoint_storage):
    if checkpoint_storage is None:
        path = default_storage()
        logger.info("no checkpoint_storage provided; storing checkpoints in %s", path)
        return path
    if isinstance(checkpoint_storage, (str, os.PathLike)):
        text = os.fspath(checkpoint_storage)
        if "://" in text:
            raise ValueError(
                "checkpoint_storage {!r}: off a cluster Resolute keeps checkpoints in a local "
                "directory; give its path".format(text)
            )
        return pathlib.Path(text)
    if isinstance(checkpoint_storage, dict):
        if checkpoint_storage.get("type") == "shared_fs" and checkpoint_storage.get("host_path"):
            base = pathlib.Path(checkpoint_storage["host_path"])
            return base / checkpoint_storage.get("storage_path", "")
        raise ValueError(
            "checkpoint_storage {!r}: off a cluster only a local directory is supported".format(checkpoint_storage)
        )
    raise TypeError("checkpoint_storage must be a string, a dictionary or None")


class LocalTrainContext:
    """Metrics to the log (`determined.core` logger, INFO)."""

    def report_training_metrics(self, steps_completed, metrics, batch_metrics=None):
        logger.info(
            "report_training_metrics(steps_completed=%s, metrics=%s)",
            steps_completed,
            json.dumps(_values.metrics(metrics), sort_keys=True),
        )

    def report_validation_metrics(self, steps_completed, metrics):
        logger.info(
            "report_validation_metrics(steps_completed=%s, metrics=%s)",
            steps_completed,
            json.dumps(_values.metrics(metrics), sort_keys=True),
        )

    def report_metrics(self, group, steps_completed, metrics):
        logger.info(
            "report_metrics(group=%s, steps_completed=%s, metrics=%s)",
            group,
            steps_completed,
            json.dumps(_values.metrics(metrics), sort_keys=True),
        )

    def report_progress(self, progress):
        logger.info("report_progress(%s)", float(progress))

    def report_early_exit(self, reason):
        logger.info("report_early_exit(%s)", getattr(reason, "name", reason))

    def get_experiment_best_validation(self):
        return None

    def set_status(self, status):
        logger.info("status: %s", status)


class LocalCheckpointContext:
    """Checkpoints as directories under one local base path. A sharded
    checkpoint of several local processes is one directory they all write
    into (as Determined's shared_fs storage): the chief names it, and writes
    the merged metadata once everyone is done."""

    def __init__(self, base, distributed):
        self._base = pathlib.Path(base)
        self._dist = distributed

    def _dir(self, storage_id):
        path = self._base / str(storage_id)
        if not path.is_dir():
            raise FileNotFoundError("no checkpoint {} in {}".format(storage_id, self._base))
        return path

    @contextlib.contextmanager
    def store_path(self, metadata=None, shard=False):
        metadata = dict(metadata or {})
        dist = self._dist
        if not shard and dist.rank != 0:
            raise RuntimeError("only the chief (rank 0) may call store_path() without shard=True")
        storage_id = str(uuid.uuid4()) if dist.rank == 0 else None
        if shard:
            storage_id = dist.broadcast(storage_id)
        path = self._base / storage_id
        path.mkdir(parents=True, exist_ok=True)
        yield path, storage_id
        if shard:
            metadata = _checkpoint.merge_metadata(dist.allgather(_values.plain(metadata)))
        if dist.rank == 0:
            _checkpoint.write_metadata(path, metadata)

    @contextlib.contextmanager
    def restore_path(self, storage_id, download_mode=None, selector=None):
        if storage_id and os.path.isdir(str(storage_id)):
            yield pathlib.Path(str(storage_id))
            return
        yield self._dir(storage_id)

    def upload(self, ckpt_dir, metadata=None, shard=False, selector=None):
        with self.store_path(metadata, shard=shard) as (path, storage_id):
            if ckpt_dir is not None:
                _checkpoint.copy_tree(ckpt_dir, path, selector)
        return storage_id

    def download(self, storage_id, ckpt_dir, download_mode=None, selector=None):
        pathlib.Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        _checkpoint.copy_tree(self._dir(storage_id), ckpt_dir, selector)

    def get_metadata(self, storage_id):
        try:
            with open(self._dir(storage_id) / _checkpoint.METADATA_FILE) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def delete(self, storage_id):
        shutil.rmtree(self._dir(storage_id))


class LocalPreemptContext:
    """Nothing preempts a local run."""

    def should_preempt(self, auto_ack=True):
        return False

    def acknowledge_preemption_signal(self):
        pass

    def close(self):
        pass


class LocalSearcherContext:
    """One operation of length 1, as Determined's off-cluster searcher."""

    def __init__(self, distributed, length=1):
        self._dist = distributed
        self._length = length

    def operations(self, searcher_mode=None, auto_ack=True):
        return core._operations(self._length, lambda _: None, None, self._dist.rank == 0)

    def acknowledge_out_of_ops(self):
        pass

    def get_configured_units(self):
        return None


def init(distributed=None, checkpoint_storage=None):
    """A context for running off a cluster."""
    distributed = distributed or core.DummyDistributedContext()
    return core.Context(
        train=LocalTrainContext(),
        checkpoint=LocalCheckpointContext(_storage_path(checkpoint_storage), distributed),
        preempt=LocalPreemptContext(),
        distributed=distributed,
        searcher=LocalSearcherContext(distributed),
        info=None,
    )
