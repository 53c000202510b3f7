"""dapft: fine-tune DETR-family detectors with the Differentiable Average Precision loss."""

from dapft.dap import (
    COCO_IOU_THRESHOLDS,
    DAPStatistics,
    ap_matching_cost,
    dap_from_statistics,
    dap_statistics,
    differentiable_ap,
    precision_curves,
)
from dapft.matcher import APCostMatcher

__version__ = "0.1.0"

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "APCostMatcher",
    "DAPStatistics",
    "ap_matching_cost",
    "dap_from_statistics",
    "dap_statistics",
    "differentiable_ap",
    "precision_curves",
]
