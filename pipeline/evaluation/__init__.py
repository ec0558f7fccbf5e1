"""Quality evaluation as in the DeepLab paper: confusion-matrix metrics, trimap
(boundary band) metrics, reports and the CRF parameter search (docs/evaluation.md).

Only the metric modules are imported here; Ray, torch and matplotlib are loaded
by the modules that need them (``runner``, ``stages``, ``tuning``, ``report``).
"""

from pipeline.evaluation.metrics import ConfusionMatrix, confusion_counts
from pipeline.evaluation.trimap import (
    TrimapConfusion,
    boundary_distance,
    boundary_mask,
    trimap_counts,
)

__all__ = ["ConfusionMatrix", "TrimapConfusion", "boundary_distance", "boundary_mask", "confusion_counts", "trimap_counts"]
