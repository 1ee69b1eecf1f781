"""The Core API: `init()` returns a context with `train`, `checkpoint`,
`preempt`, `distributed` and `searcher`, shaped like Determined's `det.core`
(0.38). On a Resolute trial it talks to the node that runs the trial; off a
cluster (no `RESOLUTE_REPORT_URL`) it returns the local context of
`resolute._local`, as Determined's `core.init()` does."""

import enum
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings

from resolute import _values
from resolute._checkpoint import METADATA_FILE, CheckpointContext, DownloadMode  # noqa: F401 - re-exported
from resolute._distributed import DistributedContext, DummyDistributedContext  # noqa: F401 - re-exported

logger = logging.getLogger("determined.core")

# Longest a preemption long-poll waits on the node, in seconds.
PREEMPTION_POLL_S = 60
# Longest one ask for the next operation waits on the node, in seconds.
NEXT_POLL_S = 30


class ReportError(Exception):
    """The node refused a report (status code and its reason)."""

    def __init__(self, status, reason):
        super().__init__("report refused ({}): {}".format(status, reason))
        self.status = status
        self.reason = reason


class Unit(enum.Enum):
    """The unit of a searcher's lengths (`searcher.max_length`)."""

    EPOCHS = "EPOCHS"
    RECORDS = "RECORDS"
    BATCHES = "BATCHES"


class TensorboardMode(enum.Enum):
    """Whether metrics also go to TensorBoard files (`AUTO`) or only where the
    code writes them (`MANUAL`). Resolute keeps metrics in its tracking store
    and writes no TensorBoard files in either mode."""

    AUTO = "AUTO"
    MANUAL = "MANUAL"


class _Endpoint:
    """The node-local report endpoint of this trial incarnation."""

    def __init__(self, url=None, token=None):
        self.url = (url or os.environ.get("RESOLUTE_REPORT_URL", "")).rstrip("/")
        self.token = token or os.environ.get("RESOLUTE_TOKEN", "")
        if not self.url:
            raise RuntimeError("RESOLUTE_REPORT_URL is not set: this code must run as a Resolute trial")

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
    def __init__(self, env, info):
        self.trial_id = int(env.get("RESOLUTE_TRIAL_ID", "0"))
        self.experiment_id = int(env.get("RESOLUTE_EXPERIMENT_ID", "0"))
        self.hparams = json.loads(env.get("RESOLUTE_HPARAMS", "{}"))
        self.trial_seed = int(env.get("RESOLUTE_TRIAL_SEED", "0"))
        self._trial_seed = self.trial_seed
        # The experiment's config as the node parsed it.
        self.config = info.get("config", {})
        self._config = self.config


def _info_file(env):
    path = env.get("RESOLUTE_INFO_FILE")
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class ClusterInfo:
    """What this trial is: ids, hyperparameters, seed, config and its `data`,
    slots, the gang's hosts, where to resume from."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        info = _info_file(env)
        self.trial = _TrialInfo(env, info)
        self.hparams = self.trial.hparams
        self.trial_id = self.trial.trial_id
        self.experiment_id = self.trial.experiment_id
        self.trial_seed = self.trial.trial_seed
        self.task_type = "TRIAL"
        # The config's `data` section.
        self.user_data = info.get("user_data") or {}
        self.slot_ids = list(info.get("slot_ids", [0]))
        self.gpu_uuids = list(info.get("gpu_uuids", []))
        # One host per node of the trial, the chief's first.
        self.container_addrs = list(info.get("container_addrs", ["127.0.0.1"]))
        self.container_rank = int(info.get("container_rank", env.get("GROUP_RANK", 0)))
        # A directory holding the latest checkpoint's files (restore_path accepts it).
        self.latest_checkpoint = env.get("RESOLUTE_LATEST_CHECKPOINT") or None
        target = env.get("RESOLUTE_TARGET_LENGTH")
        self.target_length = int(target) if target else None
        self.time_metric = env.get("RESOLUTE_TIME_METRIC", "batches")
        # The info file as the node wrote it (the launchers read the gang's
        # ranks from it: `first_rank`, `world_size`).
        self._raw = info


def get_cluster_info():
    """This trial's info, or None when not running as a trial."""
    if not os.environ.get("RESOLUTE_REPORT_URL"):
        return None
    return ClusterInfo()


class TrainContext:
    def __init__(self, endpoint, distributed):
        self._e = endpoint
        self._dist = distributed

    def _chief_only(self, what):
        if self._dist.rank != 0:
            raise RuntimeError("only the chief (rank 0) may call {}".format(what))

    def report_training_metrics(self, steps_completed, metrics, batch_metrics=None):
        self._chief_only("report_training_metrics")
        body = {"steps_completed": int(steps_completed), "metrics": _values.metrics(metrics)}
        self._e.call("POST", "/training", body)

    def report_validation_metrics(self, steps_completed, metrics):
        self._chief_only("report_validation_metrics")
        body = {"steps_completed": int(steps_completed), "metrics": _values.metrics(metrics)}
        self._e.call("POST", "/validation", body)

    def report_metrics(self, group, steps_completed, metrics):
        """Metrics of `group`: "training" and "validation" as their own calls;
        any other name (letters, digits, `_`, `-`, `.`; 32 bytes at most) is
        kept and served beside them (`resolute trial metrics ID --group G`)."""
        if group == "training":
            return self.report_training_metrics(steps_completed, metrics)
        if group == "validation":
            return self.report_validation_metrics(steps_completed, metrics)
        self._chief_only("report_metrics")
        body = {"steps_completed": int(steps_completed), "metrics": _values.metrics(metrics)}
        self._e.call("POST", "/metrics/" + urllib.parse.quote(str(group), safe=""), body)

    def report_progress(self, progress):
        self._chief_only("report_progress")
        self._e.call("POST", "/progress", {"progress": float(progress)})

    def report_early_exit(self, reason):
        """`reason`: an EarlyExitReason, or "invalid_hyperparameters",
        "user_canceled" or "errored"."""
        names = {"INVALID_HP": "invalid_hyperparameters", "USER_REQUESTED_STOP": "user_canceled", "ERRORED": "errored"}
        reason = getattr(reason, "name", reason)
        self._e.call("POST", "/exit", {"reason": names.get(str(reason), str(reason))})

    def get_experiment_best_validation(self):
        """The best value of the searcher's metric any trial of this
        experiment has reported so far (None before any), as the cluster's
        replicated log has it."""
        return self._e.call("GET", "/best_validation").get("best_validation")

    def set_status(self, status):
        """A line for the trial's log (Determined shows it beside the trial)."""
        print("status: {}".format(status), flush=True)


class PreemptMode(enum.Enum):
    """Who asks the node about preemption: the chief, and it tells the others
    inside `should_preempt()` (every process calls it together); the chief
    only (the others must not call it); or every process on its own."""

    WorkersAskChief = "WORKERS_ASK_CHIEF"
    ChiefOnly = "CHIEF_ONLY"
    WorkersAskMaster = "WORKERS_ASK_MASTER"


class PreemptContext:
    """`should_preempt()` turns true when the node asks this trial to checkpoint
    and stop (a searcher stop, a preemption, a draining node). A background thread
    long-polls the node."""

    def __init__(self, endpoint, distributed=None, mode=PreemptMode.WorkersAskChief):
        self._e = endpoint
        self._dist = distributed or DummyDistributedContext()
        self._mode = PreemptMode(getattr(mode, "value", mode))
        self._flag = threading.Event()
        self._stop = threading.Event()
        self._acked = False
        self._thread = None
        if self._dist.rank == 0 or self._mode == PreemptMode.WorkersAskMaster:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self):
        while not self._stop.is_set() and not self._flag.is_set():
            try:
                got = self._e.call(
                    "GET", "/preemption?timeout_s={}".format(PREEMPTION_POLL_S), timeout=PREEMPTION_POLL_S + 10
                )
                if got.get("preempt"):
                    self._flag.set()
            except Exception:  # noqa: BLE001 - the node may be restarting: retry
                self._stop.wait(1.0)

    def should_preempt(self, auto_ack=True):
        """Whether to checkpoint and exit now."""
        flag = self._flag.is_set()
        if self._dist.size > 1 and self._mode == PreemptMode.WorkersAskChief:
            flag = self._dist.broadcast(flag if self._dist.rank == 0 else None)
        elif self._dist.rank != 0 and self._mode == PreemptMode.ChiefOnly:
            raise RuntimeError("with PreemptMode.ChiefOnly only the chief may call should_preempt()")
        if flag and auto_ack and self._dist.rank == 0:
            self.acknowledge_preemption_signal()
        return bool(flag)

    def acknowledge_preemption_signal(self):
        """Tells the node the signal was seen (the trial checkpoints and exits)."""
        if self._flag.is_set() and not self._acked:
            self._acked = True
            self._e.call("POST", "/preemption/ack", {})

    def close(self):
        self._stop.set()


class SearcherMode(enum.Enum):
    WorkersAskChief = "WORKERS_ASK_CHIEF"
    ChiefOnly = "CHIEF_ONLY"


class SearcherOperation:
    """Train to `length` units of the time metric, then `report_completed`."""

    def __init__(self, train, length, is_chief=True):
        self._train = train
        self._length = length
        self._is_chief = is_chief
        self._completed = False

    @property
    def length(self):
        return self._length

    def report_progress(self, length):
        if not self._is_chief:
            raise RuntimeError("you must only call op.report_progress() from the chief worker")
        if self._completed and length != self._length:
            raise RuntimeError("you must not call op.report_progress() after op.report_completed()")
        if self._train is not None and self._length:
            self._train.report_progress(min(1.0, max(0.0, float(length) / float(self._length))))

    def report_completed(self, searcher_metric):
        """The operation is done (the searcher ranks the validation metric the
        trial reported at this length)."""
        if not self._is_chief:
            raise RuntimeError("you must only call op.report_completed() from the chief worker")
        if self._completed:
            raise RuntimeError("you may only call op.report_completed() once")
        self._completed = True


_UNITS = {"batches": Unit.BATCHES, "records": Unit.RECORDS, "epochs": Unit.EPOCHS}


def _operations(first, following, train, is_chief):
    """Determined's operations loop: each op's length, until `following`
    gives none past the last."""
    warnings.warn(
        "SearcherContext.operations() was deprecated in Determined 0.38.0; set the training "
        "length in the training code (Resolute keeps serving it)",
        FutureWarning,
        stacklevel=3,
    )
    length = first
    while True:
        op = SearcherOperation(train, length, is_chief)
        yield op
        if is_chief and not op._completed:
            raise RuntimeError("you must call op.report_completed() on each operation before requesting the next one")
        length_next = following(length)
        if not length_next or length_next <= length:
            return
        length = length_next


class SearcherContext:
    def __init__(self, train, endpoint=None, distributed=None):
        self._train = train
        self._e = endpoint
        self._dist = distributed or DummyDistributedContext()

    def _next_length(self, reached):
        """The chief asks the node whether to go on after training to `reached`
        and tells the others (Determined's WorkersAskChief)."""
        if self._dist.size < 2:
            return self._ask_next(reached)
        return self._dist.broadcast(self._ask_next(reached) if self._dist.rank == 0 else None)

    def _ask_next(self, reached):
        """The node answers once the validation reported at `reached` is in
        (the searcher may have raised the target, e.g. a promotion on arrival),
        with the new length or None."""
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

    def operations(self, searcher_mode=SearcherMode.WorkersAskChief, auto_ack=True):
        """The searcher's operations for this trial, as Determined's: train to each
        op's `length`, report the validation, `report_completed`, and the next one
        comes when the searcher has one (none: the trial is done)."""
        mode = SearcherMode(getattr(searcher_mode, "value", searcher_mode))
        if mode == SearcherMode.ChiefOnly and self._dist.rank != 0:
            raise RuntimeError("with SearcherMode.ChiefOnly only the chief may call operations()")
        target = os.environ.get("RESOLUTE_TARGET_LENGTH")
        if not target:
            raise RuntimeError(
                "the searcher gave this trial no length: set searcher.max_length (or max_time "
                "with time_metric) in the experiment config to train through operations()"
            )
        following = self._ask_next if mode == SearcherMode.ChiefOnly else self._next_length
        return _operations(int(target), following, self._train, self._dist.rank == 0)

    def acknowledge_out_of_ops(self):
        """The trial has no more operations to ask for: it ends when its
        process exits."""

    def get_configured_units(self):
        """The unit of the searcher's lengths (None: the searcher has none)."""
        if not os.environ.get("RESOLUTE_TARGET_LENGTH"):
            return None
        return _UNITS.get(os.environ.get("RESOLUTE_TIME_METRIC", "batches"), Unit.BATCHES)


class Context:
    def __init__(self, train, checkpoint, preempt, distributed, searcher, info=None):
        self.train = train
        self.checkpoint = checkpoint
        self.preempt = preempt
        self.distributed = distributed
        self.searcher = searcher
        self.info = info

    def close(self):
        self.preempt.close()
        self.distributed.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        # As Determined's: invalid hyperparameters end the trial as such, not
        # as an error.
        if exc is not None and type(exc).__name__ == "InvalidHP":
            self.train.report_early_exit("invalid_hyperparameters")
            logger.info("InvalidHP detected, converting it to exit(0)")
            raise SystemExit(0)
        return False


def _on_cluster(distributed, preempt_mode):
    info = ClusterInfo()
    if distributed is None and (len(info.container_addrs) > 1 or len(info.slot_ids) > 1):
        raise ValueError("you must provide a valid DistributedContext for a multi-slot task")
    distributed = distributed or DummyDistributedContext()
    endpoint = _Endpoint()
    train = TrainContext(endpoint, distributed)
    return Context(
        train=train,
        checkpoint=CheckpointContext(endpoint, distributed),
        preempt=PreemptContext(endpoint, distributed, preempt_mode or PreemptMode.WorkersAskChief),
        distributed=distributed,
        searcher=SearcherContext(train, endpoint, distributed),
        info=info,
    )


def init(distributed=None, checkpoint_storage=None, preempt_mode=None, tensorboard_mode=None, **_ignored):
    """The Core API context of this trial (use it as a context manager); off a
    cluster, a local one (`resolute._local`)."""
    if get_cluster_info() is None:
        from resolute import _local

        return _local.init(distributed=distributed, checkpoint_storage=checkpoint_storage)
    return _on_cluster(distributed, preempt_mode)
