"""Resolute's training-code client: report metrics and checkpoints to the node
that runs this trial, and learn when to stop. Standard library only.

    import resolute
    info = resolute.get_cluster_info()
    with resolute.core.init() as ctx:
        ctx.train.report_validation_metrics(steps_completed=100, metrics={"loss": 0.3})
"""

from resolute import core
from resolute.core import ClusterInfo, ReportError, get_cluster_info

__all__ = ["core", "get_cluster_info", "ClusterInfo", "ReportError"]
