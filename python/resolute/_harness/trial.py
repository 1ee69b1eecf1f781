"""The classes a user's PyTorchTrial code subclasses or names: `PyTorchTrial`,
`PyTorchCallback` and `Reducer`, with Determined's method names and
signatures. Nothing here imports torch; `det.pytorch` re-exports them."""

import enum


class Reducer(enum.Enum):
    """How `evaluate_batch`'s per-batch values become one validation metric
    (over every batch of every process)."""

    AVG = "avg"
    SUM = "sum"
    MAX = "max"
    MIN = "min"


def reduce(reducer, values):
    """`values` reduced with `reducer`."""
    if not values:
        raise ValueError("no values to reduce")
    if reducer is Reducer.AVG:
        return sum(values) / len(values)
    if reducer is Reducer.SUM:
        return sum(values)
    if reducer is Reducer.MAX:
        return max(values)
    if reducer is Reducer.MIN:
        return min(values)
    raise TypeError(
        "evaluation_reducer(): {!r} is not a det.pytorch.Reducer (custom MetricReducers "
        "are not supported by Resolute's harness)".format(reducer)
    )


class PyTorchCallback:
    """Hooks into the training loop; return them from `build_callbacks()`.
    `state_dict()`/`load_state_dict()` ride in every checkpoint."""

    def on_trial_startup(self, first_batch_idx, checkpoint_uuid):
        pass

    def on_trial_shutdown(self):
        pass

    def on_training_epoch_start(self, epoch_idx):
        pass

    def on_training_epoch_end(self, epoch_idx):
        pass

    def on_training_workload_end(self, avg_metrics, batch_metrics):
        pass

    def on_validation_start(self):
        pass

    def on_validation_epoch_start(self):
        pass

    def on_validation_epoch_end(self, outputs):
        pass

    def on_validation_end(self, metrics):
        pass

    def on_checkpoint_save_start(self, checkpoint):
        pass

    def on_checkpoint_load_start(self, checkpoint):
        pass

    def on_checkpoint_upload_end(self, uuid):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


class PyTorchTrial:
    """Subclass it: `__init__(self, context)` builds the model and optimizer
    through `context.wrap_model`/`wrap_optimizer`; the harness calls
    `build_training_data_loader`, `build_validation_data_loader`,
    `train_batch` and `evaluate_batch` (or `evaluate_full_dataset`)."""

    trial_context_class = None  # set by det.pytorch (the torch-backed context)

    def __init__(self, context):
        self.context = context

    def train_batch(self, batch, epoch_idx, batch_idx):
        """Trains one batch; returns a dict of metrics (tensors or numbers)."""
        raise NotImplementedError("a PyTorchTrial must define train_batch(batch, epoch_idx, batch_idx)")

    def build_training_data_loader(self):
        raise NotImplementedError("a PyTorchTrial must define build_training_data_loader()")

    def build_validation_data_loader(self):
        raise NotImplementedError("a PyTorchTrial must define build_validation_data_loader()")

    def build_callbacks(self):
        return {}

    def evaluate_batch(self, batch, batch_idx):
        """Validates one batch; returns a dict of metrics. Define it or
        `evaluate_full_dataset`, not both."""
        raise NotImplementedError

    def evaluation_reducer(self):
        """A Reducer for every metric, or a dict of metric name to Reducer."""
        return Reducer.AVG

    def evaluate_full_dataset(self, data_loader):
        raise NotImplementedError

    def get_batch_length(self, batch):
        """Records in `batch` (its first dimension)."""
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = next(iter(batch.values()))
        return len(batch)


def overrides(trial, name):
    """Whether the trial's class defines `name` itself (not the base's)."""
    return getattr(type(trial), name) is not getattr(PyTorchTrial, name)
