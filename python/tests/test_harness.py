"""The PyTorchTrial harness's torch-free parts: lengths and periods, and the
training loop driven with a plain-Python trial (a scalar "model" fitted by
gradient steps) through a context that keeps its state in JSON. The torch
context is exercised by the cluster test that runs examples/pytorch-trial
where torch is importable.

    PYTHONPATH=python python3 -m unittest discover -s python/tests
"""

import contextlib
import json
import pathlib
import tempfile
import unittest

from resolute._distributed import DummyDistributedContext
from resolute._harness import loop, units
from resolute._harness.trial import PyTorchCallback, PyTorchTrial, Reducer


class InvalidHP(Exception):
    pass


class Train:
    def __init__(self, best=None):
        self.calls = []
        self.best = best

    def report_training_metrics(self, steps_completed, metrics, batch_metrics=None):
        self.calls.append(("training", steps_completed, dict(metrics)))

    def report_validation_metrics(self, steps_completed, metrics):
        self.calls.append(("validation", steps_completed, dict(metrics)))

    def report_progress(self, progress):
        self.calls.append(("progress", round(progress, 6)))

    def report_early_exit(self, reason):
        self.calls.append(("exit", reason))

    def get_experiment_best_validation(self):
        return self.best

    def set_status(self, status):
        pass

    def of(self, kind):
        return [c[1] for c in self.calls if c[0] == kind]


class Checkpoints:
    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.stored = []

    @contextlib.contextmanager
    def store_path(self, metadata):
        sid = "ckpt-{}".format(len(list(self.root.iterdir())))
        path = self.root / sid
        path.mkdir()
        yield path, sid
        (path / "metadata.json").write_text(json.dumps(metadata))
        self.stored.append(sid)

    @contextlib.contextmanager
    def restore_path(self, sid):
        yield self.root / sid


class Preempt:
    def __init__(self, at_batch=None):
        self.at_batch = at_batch
        self.progress = None

    def should_preempt(self):
        return self.at_batch is not None and self.progress.batches_trained >= self.at_batch


class Core:
    def __init__(self, root, best=None, preempt_at=None):
        self.train = Train(best)
        self.checkpoint = Checkpoints(root)
        self.preempt = Preempt(preempt_at)
        self.distributed = DummyDistributedContext()


class Context:
    """The loop's side of a context, torch-free: state is a dict saved as JSON."""

    def __init__(self, hparams):
        self.hparams = hparams
        self.model = {"w": 0.0}
        self.lr_steps = 0
        self.stop = False
        self._current_batch_idx = None

    def get_hparam(self, name):
        return self.hparams[name]

    def to_device(self, batch):
        return batch

    def get_stop_requested(self):
        return self.stop

    def _set_train_mode(self, training):
        self.training = training

    def _no_grad(self):
        return contextlib.nullcontext()

    def _after_batch(self, batch_idx):
        pass

    def _after_epoch(self, epoch_idx):
        self.lr_steps += 1

    def _framework(self):
        return "none"

    def _training_batches(self, data, skip):
        def batches():
            i = skip
            while True:
                yield i, data[i % len(data)]
                i += 1

        return len(data), batches()

    def _validation_loader(self, data):
        return data

    def _state_dict(self):
        return {"model": dict(self.model), "lr_steps": self.lr_steps}

    def _write_state(self, path, state):
        path.write_text(json.dumps(state))

    def _read_state(self, path):
        return json.loads(path.read_text())

    def _load_state_dict(self, state):
        self.model = dict(state["model"])
        self.lr_steps = state["lr_steps"]


class Counter(PyTorchCallback):
    def __init__(self):
        self.epochs = 0

    def on_training_epoch_end(self, epoch_idx):
        self.epochs += 1

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


class Scalar(PyTorchTrial):
    """Fits w to the mean of its data by gradient steps on (w - x)^2."""

    def __init__(self, context, invalid_at=None):
        self.context = context
        self.invalid_at = invalid_at
        self.counter = Counter()

    def build_callbacks(self):
        return {"counter": self.counter}

    def build_training_data_loader(self):
        return [1.0, 2.0, 3.0, 4.0, 5.0]  # five batches an epoch

    def build_validation_data_loader(self):
        return [2.0, 4.0]

    def train_batch(self, batch, epoch_idx, batch_idx):
        if self.invalid_at is not None and batch_idx == self.invalid_at:
            raise InvalidHP()
        m = self.context.model
        grad = 2 * (m["w"] - batch)
        m["w"] -= self.context.get_hparam("lr") * grad
        return {"loss": (m["w"] - batch) ** 2}

    def evaluate_batch(self, batch, batch_idx):
        return {"validation_loss": (self.context.model["w"] - batch) ** 2, "n": 1}

    def evaluation_reducer(self):
        return {"validation_loss": Reducer.AVG, "n": Reducer.SUM}


def run(root, length=12, unit="batches", latest=None, following=None, best=None, preempt_at=None, policy="best", trial=None, **periods):
    core = Core(root, best=best, preempt_at=preempt_at)
    context = Context({"lr": 0.1})
    trial = trial or Scalar(context)
    trial.context = context
    lp = loop.Loop(
        trial,
        context,
        core,
        loop.Lengths(length, unit, following=following),
        checkpoint_policy=policy,
        searcher_metric="validation_loss",
        latest_checkpoint=latest,
        **periods,
    )
    core.preempt.progress = lp.progress
    lp.run()
    return core, context, lp


class UnitsTest(unittest.TestCase):
    def test_periods_end_where_determined_ends_them(self):
        b = [(units.Boundary.REPORT, units.Batch(4)), (units.Boundary.VALIDATE, units.Epoch(1)), (units.Boundary.CHECKPOINT, units.Batch([3, 7]))]
        got = {n: units.reached(b, n, epoch_len=5) for n in range(1, 11)}
        self.assertEqual(got[3], [units.Boundary.CHECKPOINT])
        self.assertEqual(got[4], [units.Boundary.REPORT])
        self.assertEqual(got[5], [units.Boundary.VALIDATE])
        self.assertEqual(got[8], [units.Boundary.REPORT])
        self.assertEqual(got[10], [units.Boundary.VALIDATE])
        self.assertEqual(got[6], [])

    def test_searcher_lengths_and_config_periods_convert(self):
        self.assertEqual(units.TrainUnit._from_searcher_unit(100, "batches"), units.Batch(100))
        self.assertEqual(units.TrainUnit._from_searcher_unit(3, "epochs"), units.Epoch(3))
        self.assertEqual(units.TrainUnit._from_searcher_unit(100, "records", 32), units.Batch(4))
        self.assertEqual(units.TrainUnit._from_values(records=64, global_batch_size=32), units.Batch(2))
        with self.assertRaisesRegex(ValueError, "global_batch_size"):
            units.TrainUnit._from_searcher_unit(100, "records")
        with self.assertRaisesRegex(ValueError, "not 'seconds'"):
            units.TrainUnit._from_searcher_unit(1, "seconds")
        with self.assertRaisesRegex(ValueError, "exactly one"):
            units.TrainUnit._from_values(batches=1, epochs=1)
        with self.assertRaisesRegex(ValueError, "at least 1"):
            units.Batch(0)


class LoopTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def test_reports_validates_and_checkpoints_at_their_periods(self):
        core, context, lp = run(
            self.root, length=12, reporting_period=units.Batch(4), validation_period=units.Epoch(1), checkpoint_period=units.Batch(7)
        )
        t = core.train
        self.assertEqual(t.of("training"), [4, 5, 7, 8, 10, 12])
        self.assertEqual(t.of("validation"), [5, 10, 12])
        last = [c for c in t.calls if c[0] == "validation"][-1][2]
        self.assertEqual(last["n"], 2)  # SUM over the two validation batches
        self.assertEqual((last["batches"], last["epochs"]), (12, 2))
        # best policy with no experiment best yet: every validation is the best.
        self.assertEqual(core.checkpoint.stored, ["ckpt-0", "ckpt-1", "ckpt-2", "ckpt-3"])
        self.assertEqual(context.lr_steps, 2)
        self.assertEqual(lp.trial.counter.epochs, 2)

    def test_best_policy_skips_validations_worse_than_the_experiments_best(self):
        core, _, _ = run(self.root, length=10, best=-1.0, validation_period=units.Batch(5))
        self.assertEqual(core.train.of("validation"), [5, 10])
        # Neither beat the best, so only the end-of-training checkpoint was taken.
        self.assertEqual(len(core.checkpoint.stored), 1)
        core, _, _ = run(tempfile.mkdtemp(dir=self.root), length=10, policy="none", validation_period=units.Batch(5))
        self.assertEqual(len(core.checkpoint.stored), 1)

    def test_a_resumed_run_matches_an_uninterrupted_one(self):
        whole, wctx, _ = run(tempfile.mkdtemp(dir=self.root), length=13, reporting_period=units.Batch(3))
        first, _, lp = run(self.root, length=13, preempt_at=6, reporting_period=units.Batch(3))
        self.assertEqual(first.train.of("training"), [3, 6])
        self.assertEqual(lp.progress.batches_trained, 6)
        sid = first.checkpoint.stored[-1]
        second, sctx, lp2 = run(self.root, length=13, latest=sid, reporting_period=units.Batch(3))
        self.assertEqual(second.train.of("training"), [9, 12, 13])
        self.assertEqual(sctx.model, wctx.model)
        self.assertEqual(sctx.lr_steps, wctx.lr_steps)
        self.assertEqual(lp2.trial.counter.epochs, 2)
        self.assertEqual(second.train.calls[-1], whole.train.calls[-1])

    def test_the_searcher_gives_the_next_length_until_it_gives_none(self):
        asked = []

        def following(reached):
            asked.append(reached)
            return {4: 8, 8: 12}.get(reached)

        core, _, _ = run(self.root, length=4, following=following)
        self.assertEqual(asked, [4, 8, 12])
        self.assertEqual(core.train.of("validation"), [4, 8, 12])

    def test_lengths_in_epochs_end_on_an_epochs_last_batch(self):
        core, _, lp = run(self.root, length=2, unit="epochs")
        self.assertEqual(lp.progress.batches_trained, 10)
        self.assertEqual(core.train.of("progress"), [1.0])

    def test_invalid_hyperparameters_checkpoint_and_propagate(self):
        context = Context({"lr": 0.1})
        with self.assertRaises(InvalidHP):
            run(self.root, length=10, trial=Scalar(context, invalid_at=3))
        core_stored = sorted(p.name for p in pathlib.Path(self.root).iterdir())
        self.assertEqual(core_stored, ["ckpt-0"])

    def test_a_trial_must_define_one_evaluate(self):
        class Both(Scalar):
            def evaluate_full_dataset(self, data_loader):
                return {}

        with self.assertRaisesRegex(ValueError, "exactly one of evaluate_batch"):
            run(self.root, trial=Both(Context({"lr": 0.1})))

    def test_a_missing_searcher_metric_is_named(self):
        class Other(Scalar):
            def evaluate_batch(self, batch, batch_idx):
                return {"mse": 1.0}

        with self.assertRaisesRegex(KeyError, "'validation_loss' is not among the validation metrics"):
            run(self.root, trial=Other(Context({"lr": 0.1})))


if __name__ == "__main__":
    unittest.main()
