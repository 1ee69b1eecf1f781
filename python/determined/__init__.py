"""A `determined` compatibility module: scripts written for Determined's Core API
(`import determined as det`, `det.core.init()`, `det.get_cluster_info()`) run
unchanged on Resolute."""

from determined import core
from resolute.core import ClusterInfo, get_cluster_info

__all__ = ["core", "get_cluster_info", "ClusterInfo"]
