"""dapft: fine-tune DETR-family detectors with the Differentiable Average Precision loss.

The library's names load on first use (PEP 562), so that `import dapft` (and `dapft --help`) does
not import torch."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "COCO_IOU_THRESHOLDS": "dapft.dap",
    "DAPStatistics": "dapft.dap",
    "ap_matching_cost": "dapft.dap",
    "dap_from_statistics": "dapft.dap",
    "dap_statistics": "dapft.dap",
    "differentiable_ap": "dapft.dap",
    "precision_curves": "dapft.dap",
    "APCostMatcher": "dapft.matcher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
