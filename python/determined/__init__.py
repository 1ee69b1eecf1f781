"""A `determined` compatibility module: scripts written for Determined's Core API
(`import determined as det`, `det.core.init()`, `det.get_cluster_info()`) run
unchanged on Resolute, on a cluster and off it."""

from determined import core
from resolute.core import ClusterInfo, get_cluster_info

# The log line format Determined's tutorials pass to `logging.basicConfig`.
LOG_FORMAT = "%(levelname)s: [%(process)s] %(name)s: %(message)s"


class InvalidHP(Exception):
    """Raise it from training code when the hyperparameters cannot be trained
    with: inside `with core.init()`, the trial ends as an invalid-
    hyperparameters early exit (the searcher moves on), not as an error."""

    def __init__(self, msg="InvalidHP"):
        super().__init__(msg)


__all__ = ["core", "get_cluster_info", "ClusterInfo", "InvalidHP", "LOG_FORMAT"]
