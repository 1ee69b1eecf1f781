"""Training lengths and periods of the PyTorchTrial harness, in Determined's
terms: `Batch(n)` and `Epoch(n)`, and when the training loop stops to report,
validate or checkpoint. No torch here: this is the part of the harness that
runs (and is tested) without it."""

import collections.abc
import enum
import math


class TrainUnit:
    """A length of training: an int (every `value` units) or a container of
    the unit counts at which something happens (`Batch([5, 30, 45])`)."""

    def __init__(self, value):
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, collections.abc.Container)):
            raise TypeError("{}: the value must be an int or a container of ints, not {!r}".format(type(self).__name__, value))
        if isinstance(value, int) and value < 1:
            raise ValueError("{}({}): the value must be at least 1".format(type(self).__name__, value))
        self.value = value

    def should_stop(self, step_num):
        """Whether a period of this unit ends at `step_num` units."""
        if isinstance(self.value, int):
            return step_num % self.value == 0
        return step_num in self.value

    @staticmethod
    def _from_searcher_unit(length, unit, global_batch_size=None):
        """The searcher's length in its time metric (`batches`, `records` or
        `epochs`) as a Batch or an Epoch; records count in global batches,
        rounded up."""
        if unit == "batches":
            return Batch(int(length))
        if unit == "epochs":
            return Epoch(int(length))
        if unit == "records":
            if not global_batch_size:
                raise ValueError("a length in records needs hyperparameters.global_batch_size")
            return Batch(max(1, math.ceil(int(length) / int(global_batch_size))))
        raise ValueError(
            "the PyTorchTrial harness counts lengths in batches, records or epochs, not {!r} "
            "(searcher.time_metric)".format(unit)
        )

    @staticmethod
    def _from_values(batches=None, records=None, epochs=None, global_batch_size=None):
        """A period from the config's `{batches: N}`, `{records: N}` or
        `{epochs: N}` (min_validation_period, min_checkpoint_period)."""
        given = [(k, v) for k, v in (("batches", batches), ("records", records), ("epochs", epochs)) if v is not None]
        if len(given) != 1:
            raise ValueError("a period needs exactly one of batches, records or epochs, got {}".format(dict(given)))
        unit, value = given[0]
        return TrainUnit._from_searcher_unit(value, unit, global_batch_size)

    def __eq__(self, other):
        return type(self) is type(other) and self.value == other.value

    def __hash__(self):
        return hash((type(self).__name__, str(self.value)))

    def __repr__(self):
        return "{}({!r})".format(type(self).__name__, self.value)


class Batch(TrainUnit):
    """A length in batches (of the global batch: one step of every process)."""


class Epoch(TrainUnit):
    """A length in epochs of the training data loader (an epoch ends on the
    last batch of the loader; partial epochs are not counted)."""


def period_never():
    """The period that never ends (Determined's `Batch(sys.maxsize)`)."""
    return Batch(2**62)


class Boundary(enum.Enum):
    """What the loop does when a period ends."""

    TRAIN = "train"
    REPORT = "report"
    VALIDATE = "validate"
    CHECKPOINT = "checkpoint"


class Progress:
    """How far training has gone: batches and whole epochs, and at which batch
    the last validation and checkpoint were taken. Saved in every checkpoint
    (`trial_state.json`)."""

    def __init__(self, batches_trained=0, epochs_trained=0, last_val=None, last_ckpt=None):
        self.batches_trained = int(batches_trained)
        self.epochs_trained = int(epochs_trained)
        self.last_val = last_val
        self.last_ckpt = last_ckpt

    def to_dict(self):
        return {
            "batches_trained": self.batches_trained,
            "epochs_trained": self.epochs_trained,
            "last_val": self.last_val,
            "last_ckpt": self.last_ckpt,
        }

    @classmethod
    def from_dict(cls, d):
        return cls(d.get("batches_trained", 0), d.get("epochs_trained", 0), d.get("last_val"), d.get("last_ckpt"))

    def remaining(self, length):
        """Units of `length` still to train."""
        if isinstance(length, Batch):
            return length.value - self.batches_trained
        if isinstance(length, Epoch):
            return length.value - self.epochs_trained
        raise TypeError("unexpected length {!r}".format(length))

    def fraction(self, length):
        """`self` as a fraction of `length`, for report_progress."""
        done = self.batches_trained if isinstance(length, Batch) else self.epochs_trained
        return min(1.0, max(0.0, done / float(length.value)))

    def validation_is_current(self):
        return self.last_val == self.batches_trained

    def checkpoint_is_current(self):
        return self.last_ckpt == self.batches_trained


def reached(boundaries, batches_trained, epoch_len):
    """The boundaries whose period ends after batch number `batches_trained`
    (1-based) of a loader of `epoch_len` batches per epoch. An Epoch period
    ends only on an epoch's last batch."""
    if epoch_len < 1:
        raise ValueError("the training data loader has no batches")
    epochs, in_epoch = divmod(batches_trained, epoch_len)
    out = []
    for kind, unit in boundaries:
        if isinstance(unit, Batch) and unit.should_stop(batches_trained):
            out.append(kind)
        elif isinstance(unit, Epoch) and in_epoch == 0 and unit.should_stop(epochs):
            out.append(kind)
    return out


def epoch_of(batch_idx, epoch_len):
    """`(epoch_idx, batch_in_epoch)` of the 0-based batch index."""
    return divmod(batch_idx, epoch_len)
