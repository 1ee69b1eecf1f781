"""`core.checkpoint` on a cluster: checkpoints as content-addressed blobs on
the chief's node, written into a staging directory the node hands out,
packed when the block ends, copied to a second node.

A sharded checkpoint (`store_path(shard=True)`, `upload(shard=True)`) is
one checkpoint written by every process of the trial, as Determined's: the
chief opens it and tells everyone its storage id; each process writes its own
files into a directory of its own; when the block ends the processes check
that no two wrote the same file and that their metadata agree, and the files
come to the chief's staging directory (copied there by the processes on the
chief's node, sent through the collectives in chunks by the others) before
the chief commits it. Every process of the trial must enter the block."""

import contextlib
import enum
import json
import os
import pathlib
import shutil
import tempfile

from resolute import _values

# The file a checkpoint's metadata is written to, inside the checkpoint (as
# Determined's storage managers do).
METADATA_FILE = "metadata.json"
# Largest piece of a shard's file sent to the chief in one collective, in
# bytes: big enough to keep the round trips few, small against the
# collectives' frame limit and the chief's memory (it holds one piece per
# process at once).
SHARD_CHUNK_BYTES = 16 << 20


class DownloadMode(enum.Enum):
    """How the processes of a node share a checkpoint download: the local
    chief asks the node and tells the others (every process of the node must
    call `restore_path`/`download` together), or each asks on its own."""

    LocalWorkersShareDownload = "LOCAL_WORKERS_SHARE_DOWNLOAD"
    NoSharedDownload = "NO_SHARED_DOWNLOAD"


def write_metadata(path, metadata):
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        json.dump(_values.plain(metadata), f, indent=2, sort_keys=True)


def files_under(root):
    """The files under `root`, as sorted paths relative to it (strings with `/`)."""
    root = pathlib.Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def copy_tree(src, dst, selector=None):
    """Copies the files under `src` into `dst` (which exists); with
    `selector`, only those whose relative path it accepts."""
    src = pathlib.Path(src)
    for rel in files_under(src):
        if selector is not None and not selector(rel):
            continue
        target = pathlib.Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)


def merge_metadata(per_rank):
    """One metadata dict from every process's (in rank order); a key two
    processes gave different values is an error, naming both ranks."""
    merged, owner = {}, {}
    for rank, metadata in enumerate(per_rank):
        for key, value in (metadata or {}).items():
            if key in merged and merged[key] != value:
                raise ValueError(
                    "sharded checkpoint: metadata key {!r} is {!r} on rank {} but {!r} on rank {}".format(
                        key, merged[key], owner[key], value, rank
                    )
                )
            merged.setdefault(key, value)
            owner.setdefault(key, rank)
    return merged


def file_conflicts(per_rank):
    """The first file two processes both wrote, as a message (None: none)."""
    seen = {}
    for rank, names in enumerate(per_rank):
        for name in names:
            if name == METADATA_FILE:
                return "rank {} wrote {} (the checkpoint's metadata goes in store_path's metadata)".format(
                    rank, METADATA_FILE
                )
            if name in seen:
                return "sharded checkpoint: ranks {} and {} both wrote {!r}".format(seen[name], rank, name)
            seen[name] = rank
    return None


def _chunks(root):
    """`(relative path, offset, bytes)` pieces of every file under `root`."""
    root = pathlib.Path(root)
    for rel in files_under(root):
        with open(root / rel, "rb") as f:
            offset = 0
            while True:
                data = f.read(SHARD_CHUNK_BYTES)
                if data or offset == 0:
                    yield rel, offset, data
                if len(data) < SHARD_CHUNK_BYTES:
                    break
                offset += len(data)


def _write_chunk(staging, rel, offset, data):
    target = pathlib.Path(staging) / rel
    # A piece names a path inside the checkpoint: never one outside it.
    if ".." in pathlib.PurePosixPath(rel).parts or pathlib.PurePosixPath(rel).is_absolute():
        raise ValueError("a shard named the file {!r}, outside the checkpoint".format(rel))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)


class CheckpointContext:
    """Checkpoints of a trial on a cluster (`core.checkpoint`)."""

    def __init__(self, endpoint, distributed):
        self._e = endpoint
        self._dist = distributed
        self.last_uuid = None

    def _begin(self, metadata):
        begun = self._e.call("POST", "/checkpoints", {"metadata": _values.plain(metadata)})
        return begun["storage_id"], pathlib.Path(begun["path"])

    def _commit(self, storage_id, path, metadata):
        write_metadata(path, metadata)
        steps = int(metadata.get("steps_completed", 0))
        done = self._e.call(
            "POST",
            "/checkpoints/commit",
            {"storage_id": storage_id, "steps_completed": steps, "metadata": _values.plain(metadata)},
        )
        return done["uuid"]

    @contextlib.contextmanager
    def store_path(self, metadata=None, shard=False):
        """Yields `(path, storage_id)`: write the checkpoint's files under `path`
        (a `pathlib.Path`); when the block ends the node packs them, with
        `metadata` in `metadata.json`, into a content-addressed blob. Without
        `shard` only the chief calls it; with `shard` every process does."""
        metadata = dict(metadata or {})
        if shard and self._dist.size > 1:
            with self._store_sharded(metadata) as got:
                yield got
            return
        if self._dist.rank != 0:
            raise RuntimeError("only the chief (rank 0) may call store_path() without shard=True")
        storage_id, path = self._begin(metadata)
        yield path, storage_id
        self.last_uuid = self._commit(storage_id, path, metadata)

    @contextlib.contextmanager
    def _store_sharded(self, metadata):
        dist = self._dist
        opened = None
        if dist.rank == 0:
            try:
                storage_id, staging = self._begin(metadata)
                opened = (storage_id, str(staging))
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                opened = e
        opened = dist.broadcast(opened)
        if isinstance(opened, Exception):
            raise opened
        storage_id, staging = opened[0], pathlib.Path(opened[1])
        own = staging if dist.rank == 0 else pathlib.Path(tempfile.mkdtemp(prefix="resolute-shard-"))
        try:
            yield own, storage_id
            self.last_uuid = self._gather_shards(storage_id, staging, own, metadata)
        finally:
            if own != staging:
                shutil.rmtree(own, ignore_errors=True)

    def _gather_shards(self, storage_id, staging, own, metadata):
        dist = self._dist
        gathered = dist.gather((files_under(own), _values.plain(metadata)))
        verdict = None
        if dist.rank == 0:
            try:
                problem = file_conflicts([names for names, _ in gathered])
                if problem is not None:
                    raise ValueError(problem)
                metadata = merge_metadata([m for _, m in gathered])
                verdict = ("ok", metadata)
            except ValueError as e:
                verdict = ("error", str(e))
        verdict = dist.broadcast(verdict)
        if verdict[0] == "error":
            raise ValueError(verdict[1])
        metadata = verdict[1]
        # The processes on the chief's node copy; the others send.
        if dist.rank != 0 and dist.cross_rank == 0:
            copy_tree(own, staging)
        pieces = _chunks(own) if dist.cross_rank != 0 else iter(())
        while True:
            sent = dist.gather(next(pieces, None))
            more = None
            if dist.rank == 0:
                for piece in sent[1:]:
                    if piece is not None:
                        _write_chunk(staging, *piece)
                more = any(piece is not None for piece in sent)
            if not dist.broadcast(more):
                break
        uuid = None
        if dist.rank == 0:
            try:
                uuid = self._commit(storage_id, staging, metadata)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                uuid = e
        uuid = dist.broadcast(uuid)
        if isinstance(uuid, Exception):
            raise uuid
        return uuid

    def _ask_node(self, storage_id):
        got = self._e.call("GET", "/checkpoints/" + str(storage_id))
        return pathlib.Path(got["path"])

    @contextlib.contextmanager
    def restore_path(self, storage_id, download_mode=DownloadMode.LocalWorkersShareDownload, selector=None):
        """Yields a `pathlib.Path` holding the checkpoint's files (read them;
        do not change them): this trial's own checkpoints or the one it
        started from."""
        if storage_id and os.path.isdir(str(storage_id)):
            yield pathlib.Path(str(storage_id))
            return
        dist = self._dist
        if download_mode != DownloadMode.LocalWorkersShareDownload or dist.local_size < 2:
            yield self._ask_node(storage_id)
            return
        got = None
        if dist.local_rank == 0:
            try:
                got = str(self._ask_node(storage_id))
            except Exception as e:  # noqa: BLE001 - the node's other ranks must hear of it
                got = e
        got = dist.broadcast_local(got)
        if isinstance(got, Exception):
            raise got
        yield pathlib.Path(got)

    def upload(self, ckpt_dir, metadata=None, shard=False, selector=None):
        """Saves the files under `ckpt_dir` (those `selector` accepts) as a
        checkpoint; returns its id."""
        with self.store_path(metadata, shard=shard) as (path, _):
            if ckpt_dir is not None:
                copy_tree(ckpt_dir, path, selector)
        return self.last_uuid

    def download(self, storage_id, ckpt_dir, download_mode=DownloadMode.LocalWorkersShareDownload, selector=None):
        """Copies a checkpoint's files (those `selector` accepts) into `ckpt_dir`."""
        pathlib.Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        with self.restore_path(storage_id, download_mode) as path:
            copy_tree(path, ckpt_dir, selector)

    def get_metadata(self, storage_id):
        """The metadata the checkpoint was saved with."""
        with self.restore_path(storage_id, DownloadMode.NoSharedDownload) as path:
            try:
                with open(path / METADATA_FILE) as f:
                    return json.load(f)
            except FileNotFoundError:
                return {}

    def delete(self, storage_id):
        """Checkpoints leave the cluster through the experiment's checkpoint
        policy (`checkpoint_storage.save_*`) or `resolute experiment delete`,
        as one log entry every holder applies, never one at a time."""
        raise NotImplementedError(
            "checkpoint {}: a trial does not delete checkpoints on Resolute; the experiment's "
            "checkpoint_storage policy (save_trial_best, save_trial_latest, save_experiment_best) "
            "decides what stays when it ends".format(storage_id)
        )
