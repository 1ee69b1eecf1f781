"""The PyTorchTrial training loop, on the Core API: train batch after batch,
stop at each period's end to report training metrics and progress, validate,
checkpoint (per `checkpoint_policy`) and look for a preemption; at the end of
each searcher length validate, checkpoint and ask the searcher whether to go
on. Resumes from a checkpoint where it left off (batches, epochs, the data
position, models, optimizers, schedulers, random state, callbacks).

Torch stays behind the context (`det.pytorch.PyTorchTrialContext`): what the
loop needs from it is a handful of underscore methods (train/eval mode,
device moves, the data loaders' batches, state dicts), so the loop runs, and
is tested, without torch."""

import json
import logging

from resolute import _values
from resolute._harness import units
from resolute._harness.trial import Reducer, overrides, reduce

logger = logging.getLogger("determined.pytorch")

# The file of a checkpoint that holds the loop's own progress.
TRIAL_STATE_FILE = "trial_state.json"
# The files that hold the models' and optimizers' state, newest layout first
# (Determined's checkpoints have used both).
STATE_DICT_FILES = ("state_dict.pth", "determined/state_dict.pth")


class ShouldExit(Exception):
    """Stop training: checkpoint (unless told not to) and return."""

    def __init__(self, skip_exit_checkpoint=False):
        super().__init__("should exit")
        self.skip_exit_checkpoint = skip_exit_checkpoint


class Lengths:
    """How long to train: the first length in the searcher's unit, and how to
    ask for the next one when it is reached (None: train `first` and stop)."""

    def __init__(self, first, unit, global_batch_size=None, following=None, cap=None):
        self.units = int(first)
        self.unit = unit
        self.global_batch_size = global_batch_size
        self.following = following
        # An explicit fit(max_length=...) that the searcher's lengths must not pass.
        self.cap = cap

    def current(self):
        length = units.TrainUnit._from_searcher_unit(self.units, self.unit, self.global_batch_size)
        if self.cap is not None and type(self.cap) is type(length) and self.cap.value < length.value:
            return self.cap
        return length

    def advance(self):
        """Asks the searcher for the next length; False when there is none."""
        if self.following is None:
            return False
        if self.cap is not None and self.current() == self.cap:
            return False
        nxt = self.following(self.units)
        if not nxt or int(nxt) <= self.units:
            return False
        self.units = int(nxt)
        return True


def numbers(metrics, where):
    """A metrics dict (tensors, numpy values or numbers) as plain values; a
    bare tensor is the loss, as Determined reads it."""
    if not isinstance(metrics, dict):
        if hasattr(metrics, "item"):
            metrics = {"loss": metrics}
        else:
            raise TypeError("{} must return a dict of metric name to value, not {}".format(where, type(metrics).__name__))
    return _values.metrics(metrics)


def average(batches):
    """The per-key mean of numeric values over a list of metric dicts; a key
    without numbers keeps its last value."""
    out = {}
    keys = []
    for m in batches:
        keys.extend(k for k in m if k not in keys)
    for k in keys:
        vals = [m[k] for m in batches if k in m]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[k] = sum(nums) / len(nums) if nums else vals[-1]
    return out


class Loop:
    """One trial's training, from its first (or restored) batch to the end."""

    def __init__(
        self,
        trial,
        context,
        core,
        lengths,
        validation_period=None,
        checkpoint_period=None,
        reporting_period=None,
        checkpoint_policy="best",
        searcher_metric=None,
        smaller_is_better=True,
        step_zero_validation=False,
        latest_checkpoint=None,
        test_mode=False,
    ):
        self.trial = trial
        self.context = context
        self.core = core
        self.dist = core.distributed
        self.is_chief = self.dist.rank == 0
        self.lengths = lengths
        self.validation_period = validation_period or units.period_never()
        self.checkpoint_period = checkpoint_period or units.period_never()
        self.reporting_period = reporting_period or units.Batch(100)
        if checkpoint_policy not in ("best", "all", "none"):
            raise ValueError("checkpoint_policy must be best, all or none, not {!r}".format(checkpoint_policy))
        self.checkpoint_policy = checkpoint_policy
        self.searcher_metric = searcher_metric
        self.smaller_is_better = smaller_is_better
        self.step_zero_validation = step_zero_validation
        self.latest_checkpoint = latest_checkpoint
        self.test_mode = test_mode
        self.progress = units.Progress()
        self.callbacks = {}
        self._status = None

    def _set_status(self, status):
        """Tells the node what the chief is doing, once per change."""
        if self.is_chief and status != self._status:
            self._status = status
            self.core.train.set_status(status)

    # The whole run.

    def run(self):
        self.callbacks = dict(self.trial.build_callbacks() or {})
        if self.latest_checkpoint is not None:
            self._load(self.latest_checkpoint)
        self._check_evaluate()
        self.epoch_len, self.batches = self.context._training_batches(
            self.trial.build_training_data_loader(), self.progress.batches_trained
        )
        self.validation = self.context._validation_loader(self.trial.build_validation_data_loader())
        for cb in self.callbacks.values():
            cb.on_trial_startup(self.progress.batches_trained, self.latest_checkpoint)
        try:
            self._run()
        finally:
            for cb in self.callbacks.values():
                cb.on_trial_shutdown()

    def _run(self):
        try:
            if self.step_zero_validation and self.progress.batches_trained == 0 and self.progress.last_val is None:
                self._validate()
            while True:
                self._train(self.lengths.current())
                if self.test_mode or not self._next_length():
                    break
        except ShouldExit as e:
            if not e.skip_exit_checkpoint and not self.progress.checkpoint_is_current():
                self._checkpoint(exiting=True)
        except Exception as e:
            if type(e).__name__ == "InvalidHP" and not self.progress.checkpoint_is_current():
                self._checkpoint(exiting=True)
            raise

    def _next_length(self):
        """The chief asks the searcher (every process learns the answer)."""
        more = self.lengths.advance() if self.is_chief else None
        if self.dist.size > 1:
            more, units_ = self.dist.broadcast((more, self.lengths.units))
            self.lengths.units = units_
        return more

    # Training.

    def _train(self, length):
        boundaries = [
            (units.Boundary.TRAIN, length),
            (units.Boundary.VALIDATE, self.validation_period),
            (units.Boundary.CHECKPOINT, self.checkpoint_period),
            (units.Boundary.REPORT, self.reporting_period),
        ]
        while self.progress.remaining(length) > 0:
            fired, batch_metrics = self._train_until(boundaries)
            self._report_training(batch_metrics)
            reported = False
            for kind in fired:
                if kind in (units.Boundary.TRAIN, units.Boundary.REPORT):
                    if self.is_chief and not reported:
                        self.core.train.report_progress(self.progress.fraction(length))
                        reported = True
                elif kind is units.Boundary.VALIDATE and not self.progress.validation_is_current():
                    self._validate()
                elif kind is units.Boundary.CHECKPOINT and not self.progress.checkpoint_is_current():
                    self._checkpoint(exiting=False)
                self._stop_requested()
            if self.test_mode:
                break
        if not self.progress.validation_is_current():
            self._validate()
        if not self.progress.checkpoint_is_current():
            self._checkpoint(exiting=False)

    def _train_until(self, boundaries):
        """Trains batches until a period ends; which ended, and the metrics
        of the batches trained."""
        self._set_status("training")
        self.context._set_train_mode(True)
        batch_metrics = []
        for batch_idx, batch in self.batches:
            epoch_idx, in_epoch = units.epoch_of(batch_idx, self.epoch_len)
            self.context._current_batch_idx = batch_idx
            if in_epoch == 0:
                for cb in self.callbacks.values():
                    cb.on_training_epoch_start(epoch_idx)
            batch = self.context.to_device(batch)
            out = self.trial.train_batch(batch=batch, epoch_idx=epoch_idx, batch_idx=batch_idx)
            batch_metrics.append(numbers(out, "train_batch()"))
            self.context._after_batch(batch_idx)
            self.progress.batches_trained += 1
            if in_epoch == self.epoch_len - 1:
                for cb in self.callbacks.values():
                    cb.on_training_epoch_end(epoch_idx)
                self.context._after_epoch(epoch_idx)
                self.progress.epochs_trained += 1
            fired = units.reached(boundaries, self.progress.batches_trained, self.epoch_len)
            if self.test_mode and units.Boundary.TRAIN not in fired:
                fired.insert(0, units.Boundary.TRAIN)
            if fired:
                return fired, batch_metrics
        raise RuntimeError("the training data loader ran out of batches")

    def _report_training(self, batch_metrics):
        if self.dist.size > 1:
            # The i-th batch's metrics averaged over the processes, as Determined does.
            every = self.dist.allgather(batch_metrics)
            batch_metrics = [average(list(ms)) for ms in zip(*every)]
        avg = average(batch_metrics)
        avg.setdefault("batches", self.progress.batches_trained)
        avg.setdefault("epochs", self.progress.epochs_trained)
        if self.is_chief:
            self.core.train.report_training_metrics(
                steps_completed=self.progress.batches_trained, metrics=avg, batch_metrics=batch_metrics
            )
        for cb in self.callbacks.values():
            cb.on_training_workload_end(avg_metrics=avg, batch_metrics=batch_metrics)

    def _stop_requested(self):
        if self.core.preempt.should_preempt():
            raise ShouldExit()
        if self.context.get_stop_requested():
            raise ShouldExit()

    # Validation.

    def _check_evaluate(self):
        by_batch = overrides(self.trial, "evaluate_batch")
        full = overrides(self.trial, "evaluate_full_dataset")
        if by_batch == full:
            raise ValueError("a PyTorchTrial must define exactly one of evaluate_batch() and evaluate_full_dataset()")
        self._by_batch = by_batch

    def _validate(self):
        self._set_status("validating")
        self.context._set_train_mode(False)
        for cb in self.callbacks.values():
            cb.on_validation_start()
        with self.context._no_grad():
            metrics = self._evaluate_batches() if self._by_batch else self._evaluate_full()
        self.progress.last_val = self.progress.batches_trained
        metrics.setdefault("batches", self.progress.batches_trained)
        metrics.setdefault("epochs", self.progress.epochs_trained)
        if self.lengths.unit == "records" and self.lengths.global_batch_size:
            metrics.setdefault("records", self.progress.batches_trained * int(self.lengths.global_batch_size))
        should_checkpoint = False
        if self.is_chief:
            best_before = self._best_before()
            self.core.train.report_validation_metrics(steps_completed=self.progress.batches_trained, metrics=metrics)
            logger.info("validated at batch %d: %s", self.progress.batches_trained, metrics)
            should_checkpoint = self._policy_says_checkpoint(metrics, best_before)
        for cb in self.callbacks.values():
            cb.on_validation_end(metrics)
        if self.dist.size > 1:
            should_checkpoint = self.dist.broadcast(should_checkpoint)
        if should_checkpoint:
            self._checkpoint(exiting=False)
        return metrics

    def _evaluate_batches(self):
        for cb in self.callbacks.values():
            cb.on_validation_epoch_start()
        per_batch = []
        keys = None
        for idx, batch in enumerate(self.validation):
            batch = self.context.to_device(batch)
            m = numbers(self.trial.evaluate_batch(batch=batch, batch_idx=idx), "evaluate_batch()")
            if keys is None:
                keys = sorted(m)
            elif sorted(m) != keys:
                raise ValueError("evaluate_batch() must return the same metric names for every batch: {} != {}".format(keys, sorted(m)))
            per_batch.append(m)
            if self.test_mode:
                break
        if not per_batch:
            raise RuntimeError("the validation data loader has no batches")
        for cb in self.callbacks.values():
            cb.on_validation_epoch_end(per_batch)
        every = self.dist.allgather(per_batch) if self.dist.size > 1 else [per_batch]
        flat = [m for ms in every for m in ms]
        reducer = self.trial.evaluation_reducer()
        out = {}
        for k in keys:
            r = reducer.get(k, Reducer.AVG) if isinstance(reducer, dict) else reducer
            out[k] = reduce(r, [m[k] for m in flat])
        return out

    def _evaluate_full(self):
        metrics = None
        if self.is_chief:
            metrics = numbers(self.trial.evaluate_full_dataset(data_loader=self.validation), "evaluate_full_dataset()")
        if self.dist.size > 1:
            metrics = self.dist.broadcast(metrics)
        return metrics

    def _best_before(self):
        if self.checkpoint_policy != "best" or self.searcher_metric is None:
            return None
        return self.core.train.get_experiment_best_validation()

    def _policy_says_checkpoint(self, metrics, best_before):
        if self.progress.checkpoint_is_current() or self.checkpoint_policy == "none":
            return False
        if self.checkpoint_policy == "all":
            return True
        if self.searcher_metric is None:
            return True
        if self.searcher_metric not in metrics:
            raise KeyError(
                "the searcher's metric {!r} is not among the validation metrics {} (searcher.metric "
                "in the experiment config)".format(self.searcher_metric, sorted(metrics))
            )
        now = metrics[self.searcher_metric]
        if best_before is None:
            return True
        return now < best_before if self.smaller_is_better else now > best_before

    # Checkpoints.

    def _checkpoint(self, exiting):
        self._set_status("checkpointing")
        self.progress.last_ckpt = self.progress.batches_trained
        try:
            uuid = ""
            if self.is_chief:
                metadata = {
                    "steps_completed": self.progress.batches_trained,
                    "framework": self.context._framework(),
                    "format": "pickle",
                }
                with self.core.checkpoint.store_path(metadata) as (path, storage_id):
                    self._save(path)
                uuid = getattr(self.core.checkpoint, "last_uuid", None) or storage_id
                logger.info("checkpoint %s at batch %d", uuid, self.progress.batches_trained)
            if self.dist.size > 1:
                uuid = self.dist.broadcast(uuid)
            for cb in self.callbacks.values():
                cb.on_checkpoint_upload_end(uuid=uuid)
        except Exception as e:
            if type(e).__name__ == "InvalidHP" and not exiting:
                self.core.train.report_early_exit("invalid_hyperparameters")
                raise ShouldExit(skip_exit_checkpoint=True) from e
            raise

    def _save(self, path):
        state = self.context._state_dict()
        state["callbacks"] = {name: cb.state_dict() for name, cb in self.callbacks.items()}
        for cb in self.callbacks.values():
            cb.on_checkpoint_save_start(state)
        self.context._write_state(path.joinpath(STATE_DICT_FILES[0]), state)
        trial_state = {"progress": self.progress.to_dict(), "lengths_units": self.lengths.units}
        path.joinpath(TRIAL_STATE_FILE).write_text(json.dumps(trial_state))

    def _load(self, storage_id):
        with self.core.checkpoint.restore_path(storage_id) as path:
            found = [path.joinpath(f) for f in STATE_DICT_FILES if path.joinpath(f).exists()]
            if not found:
                raise FileNotFoundError(
                    "checkpoint {} has none of {}: it was not written by a PyTorchTrial".format(storage_id, list(STATE_DICT_FILES))
                )
            state = self.context._read_state(found[0])
            for cb in self.callbacks.values():
                cb.on_checkpoint_load_start(state)
            self.context._load_state_dict(state)
            saved = state.get("callbacks", {})
            for name, cb in self.callbacks.items():
                if name in saved:
                    cb.load_state_dict(saved[name])
            trial_state = path.joinpath(TRIAL_STATE_FILE)
            if trial_state.exists():
                d = json.loads(trial_state.read_text())
                self.progress = units.Progress.from_dict(d.get("progress", {}))
                # The searcher's length reached so far (a restart asks for the next one from there).
                self.lengths.units = max(self.lengths.units, int(d.get("lengths_units", 0)))
        logger.info("restored checkpoint %s at batch %d", storage_id, self.progress.batches_trained)
