"""`det.core`: the Core API, served by Resolute's node."""

import enum

from resolute.core import (  # noqa: F401 - re-exported names
    CheckpointContext,
    Context,
    DistributedContext,
    PreemptContext,
    ReportError,
    SearcherContext,
    SearcherOperation,
    TrainContext,
    init,
)


class EarlyExitReason(enum.Enum):
    INVALID_HP = "invalid_hyperparameters"
    USER_REQUESTED_STOP = "user_canceled"
    ERRORED = "errored"


class SearcherMode(enum.Enum):
    WorkersAskChief = "WORKERS_ASK_CHIEF"
    ChiefOnly = "CHIEF_ONLY"


class PreemptMode(enum.Enum):
    WorkersAskChief = "WORKERS_ASK_CHIEF"
    ChiefOnly = "CHIEF_ONLY"
    WorkersAskMaster = "WORKERS_ASK_MASTER"
