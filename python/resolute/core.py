"""The Core API: `init()` returns a context with `train`, `checkpoint`, `preempt`,
`distributed` and `searcher`, shaped like Determined's `det.core`."""

import contextlib
import json
import os
import threading
import urllib.error
import urllib.request

# Longest a preemption long-poll waits on the node, in seconds.
PREEMPTION_POLL_S = 60


class ReportError(Exception):
    """The node refused a report (status code and its reason)."""

    def __init__(self, status, reason):
        super().__init__("report refused ({}): {}".format(status, reason))
        self.status = status
        self.reason = reason


class _Endpoint:
    """The node-local report endpoint of this trial incarnation."""

    def __init__(self, url=None, token=None):
        self.url = (url or os.environ.get("RESOLUTE_REPORT_URL", "")).rstrip("/")
        self.token = token or os.environ.get("RESOLUTE_TOKEN", "")
        if not self.url:
            raise RuntimeError(
                "RESOLUTE_REPORT_URL is not set: this code must run as a Resolute trial"
            )

    def call(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode() or "{}"
                return json.loads(text)
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read().decode()).get("error", "")
            except Exception:  # noqa: BLE001 - any unreadable body
                reason = e.reason
            raise ReportError(e.code, reason) from None


class _TrialInfo:
    def __init__(self, env):
        self.trial_id = int(env.get("RESOLUTE_TRIAL_ID", "0"))
        self.experiment_id = int(env.get("RESOLUTE_EXPERIMENT_ID", "0"))
        self.hparams = json.loads(env.get("RESOLUTE_HPARAMS", "{}"))
        self.trial_seed = int(env.get("RESOLUTE_TRIAL_SEED", "0"))
        self._trial_seed = self.trial_seed


class ClusterInfo:
    """What this trial is: hyperparameters, ids, seed, where to resume from."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.trial = _TrialInfo(env)
        self.hparams = self.trial.hparams
        self.trial_id = self.trial.trial_id
        self.experiment_id = self.trial.experiment_id
        self.trial_seed = self.trial.trial_seed
        # A directory holding the latest checkpoint's files (restore_path accepts it).
        self.latest_checkpoint = env.get("RESOLUTE_LATEST_CHECKPOINT") or None
        target = env.get("RESOLUTE_TARGET_LENGTH")
        self.target_length = int(target) if target else None
        self.time_metric = env.get("RESOLUTE_TIME_METRIC", "batches")


def get_cluster_info():
    """This trial's info, or None when not running as a trial."""
    if not os.environ.get("RESOLUTE_REPORT_URL"):
        return None
    return ClusterInfo()


class TrainContext:
    def __init__(self, endpoint):
        self._e = endpoint

    def report_training_metrics(self, steps_completed, metrics):
        self._e.call("POST", "/training", {"steps_completed": int(steps_completed), "metrics": metrics})

    def report_validation_metrics(self, steps_completed, metrics):
        self._e.call("POST", "/validation", {"steps_completed": int(steps_completed), "metrics": metrics})

    def report_progress(self, progress):
        self._e.call("POST", "/progress", {"progress": float(progress)})

    def report_early_exit(self, reason):
        """`reason`: "invalid_hyperparameters", "user_canceled" or "errored"
        (Determined's EarlyExitReason names are accepted too)."""
        names = {"INVALID_HP": "invalid_hyperparameters", "USER_REQUESTED_STOP": "user_canceled", "ERRORED": "errored"}
        reason = getattr(reason, "name", reason)
        self._e.call("POST", "/exit", {"reason": names.get(str(reason), str(reason))})


class CheckpointContext:
    def __init__(self, endpoint):
        self._e = endpoint

    @contextlib.contextmanager
    def store_path(self, metadata=None):
        """Yields `(path, storage_id)`: write the checkpoint's files under `path`;
        when the block ends the node packs them into a content-addressed blob."""
        metadata = dict(metadata or {})
        begun = self._e.call("POST", "/checkpoints", {"metadata": metadata})
        storage_id = begun["storage_id"]
        yield begun["path"], storage_id
        steps = int(metadata.get("steps_completed", 0))
        done = self._e.call(
            "POST",
            "/checkpoints/commit",
            {"storage_id": storage_id, "steps_completed": steps, "metadata": metadata},
        )
        self.last_uuid = done["uuid"]

    @contextlib.contextmanager
    def restore_path(self, storage_id):
        """Yields a directory with the checkpoint's files (read-only by intent)."""
        if storage_id and os.path.isdir(str(storage_id)):
            yield str(storage_id)
            return
        got = self._e.call("GET", "/checkpoints/" + str(storage_id))
        yield got["path"]


class PreemptContext:
    """`should_preempt()` turns true when the node asks this trial to checkpoint
    and stop (a searcher stop, a preemption, a draining node). A background thread
    long-polls the node."""

    def __init__(self, endpoint):
        self._e = endpoint
        self._flag = threading.Event()
        self._stop = threading.Event()
        self._acked = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set() and not self._flag.is_set():
            try:
                got = self._e.call("GET", "/preemption?timeout_s={}".format(PREEMPTION_POLL_S), timeout=PREEMPTION_POLL_S + 10)
                if got.get("preempt"):
                    self._flag.set()
            except Exception:  # noqa: BLE001 - the node may be restarting: retry
                self._stop.wait(1.0)

    def should_preempt(self, auto_ack=True):
        if self._flag.is_set() and auto_ack and not self._acked:
            self._acked = True
            self._e.call("POST", "/preemption/ack", {})
        return self._flag.is_set()

    def close(self):
        self._stop.set()


class DistributedContext:
    """Ranks, from the torchrun variables the node sets (one process: rank 0 of 1)."""

    def __init__(self, rank=None, size=None, local_rank=None, local_size=None, cross_rank=None, cross_size=None):
        env = os.environ
        self.rank = int(env.get("RANK", 0)) if rank is None else rank
        self.size = int(env.get("WORLD_SIZE", 1)) if size is None else size
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        self.local_size = int(env.get("LOCAL_WORLD_SIZE", 1)) if local_size is None else local_size
        self.cross_rank = int(env.get("GROUP_RANK", 0)) if cross_rank is None else cross_rank
        self.cross_size = cross_size if cross_size is not None else max(1, self.size // max(1, self.local_size))

    def get_rank(self):
        return self.rank

    def get_size(self):
        return self.size

    def get_local_rank(self):
        return self.local_rank

    @classmethod
    def from_torch_distributed(cls, chief_ip=None):
        return cls()


class SearcherOperation:
    """Train to `length` units of the time metric, then report completion."""

    def __init__(self, train, length):
        self._train = train
        self.length = length
        self.completed = False

    def report_progress(self, length):
        if self.length:
            self._train.report_progress(min(1.0, max(0.0, float(length) / float(self.length))))

    def report_completed(self, searcher_metric):
        self.completed = True


# Longest one ask for the next operation waits on the node, in seconds.
NEXT_POLL_S = 30


class SearcherContext:
    def __init__(self, train, endpoint=None):
        self._train = train
        self._e = endpoint

    def _next_length(self, reached):
        """Asks the node whether to go on after training to `reached`: it answers
        once the validation reported there is in (the searcher may have raised the
        target, e.g. a promotion on arrival), with the new length or None."""
        if self._e is None:
            return None
        while True:
            got = self._e.call(
                "GET",
                "/searcher/next?steps={}&timeout_s={}".format(int(reached), NEXT_POLL_S),
                timeout=NEXT_POLL_S + 10,
            )
            if not got.get("pending"):
                return got.get("length")

    def operations(self, searcher_mode=None, auto_ack=True):
        """The searcher's operations for this trial, as Determined's: train to each
        op's `length`, report the validation, `report_completed`, and the next one
        comes when the searcher has one (none: the trial is done)."""
        target = os.environ.get("RESOLUTE_TARGET_LENGTH")
        length = int(target) if target else 0
        while True:
            op = SearcherOperation(self._train, length)
            yield op
            if not length:
                return
            following = self._next_length(length)
            if not following or following <= length:
                return
            length = following


class Context:
    def __init__(self, endpoint, distributed=None):
        self.train = TrainContext(endpoint)
        self.checkpoint = CheckpointContext(endpoint)
        self.preempt = PreemptContext(endpoint)
        self.distributed = distributed or DistributedContext()
        self.searcher = SearcherContext(self.train, endpoint)
        self.info = ClusterInfo()

    def close(self):
        self.preempt.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def init(distributed=None, **_ignored):
    """The Core API context of this trial (use it as a context manager)."""
    return Context(_Endpoint(), distributed=distributed)
