"""`det.core`: the Core API, served by Resolute's node (or locally, off a
cluster)."""

import enum

from resolute.core import (  # noqa: F401 - re-exported names
    CheckpointContext,
    Context,
    DistributedContext,
    DownloadMode,
    DummyDistributedContext,
    PreemptContext,
    PreemptMode,
    ReportError,
    SearcherContext,
    SearcherMode,
    SearcherOperation,
    TensorboardMode,
    TrainContext,
    Unit,
    init,
)


class EarlyExitReason(enum.Enum):
    INVALID_HP = "invalid_hyperparameters"
    USER_REQUESTED_STOP = "user_canceled"
    ERRORED = "errored"
