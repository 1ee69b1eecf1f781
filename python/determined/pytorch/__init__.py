"""`det.pytorch`: Determined's PyTorchTrial API on Resolute. A trial class
(`class MyTrial(det.pytorch.PyTorchTrial)`) runs through
`entrypoint: model_def:MyTrial` or, in the newer style, from a script with
`det.pytorch.init()` and `det.pytorch.Trainer(trial, context).fit(...)`.

The training loop itself (`resolute._harness.loop`) needs no torch; this
package does, and says so when it is missing."""

try:
    import torch  # noqa: F401 - only asking whether it is there
except ImportError as e:  # pragma: no cover - exercised by the no-torch test
    raise ImportError(
        "det.pytorch needs PyTorch, and `import torch` failed in {} ({}): install torch "
        "into the Python that runs the trial, or use a Core API script as the "
        "entrypoint".format(__import__("sys").executable, e)
    ) from e

from resolute._harness.trial import PyTorchCallback, PyTorchTrial, Reducer
from resolute._harness.units import Batch, Epoch, TrainUnit

from determined.pytorch._data import DataLoader, TorchData, to_device
from determined.pytorch._lr_scheduler import LRScheduler
from determined.pytorch._context import PyTorchTrialContext
from determined.pytorch._trainer import Trainer, init, load_trial_from_checkpoint_path

PyTorchTrial.trial_context_class = PyTorchTrialContext

__all__ = [
    "Batch",
    "DataLoader",
    "Epoch",
    "LRScheduler",
    "PyTorchCallback",
    "PyTorchTrial",
    "PyTorchTrialContext",
    "Reducer",
    "TorchData",
    "TrainUnit",
    "Trainer",
    "init",
    "load_trial_from_checkpoint_path",
    "to_device",
]
