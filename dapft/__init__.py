"""dapft: fine-tune DETR-family detectors with the Differentiable Average Precision loss.

The library's names load on first use (PEP 562), so that `import dapft` (and `dapft --help`) does
not import torch."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "COCO_IOU_THRESHOLDS": "dapft.objective.dap",
    "DAPStatistics": "dapft.objective.dap",
    "ap_matching_cost": "dapft.objective.dap",
    "dap_from_statistics": "dapft.objective.dap",
    "dap_statistics": "dapft.objective.dap",
    "differentiable_ap": "dapft.objective.dap",
    "precision_curves": "dapft.objective.dap",
    "APCostMatcher": "dapft.objective.matcher",
    # the library calls behind the commands
    "FinetuneConfig": "dapft.training.config",
    "Trainer": "dapft.training.trainer",
    "finetune": "dapft.training.trainer",
    "evaluate_model": "dapft.analysis.checkpoint_eval",
    "sweep": "dapft.sweeps.grid",
    "predict_images": "dapft.analysis.predict",
    "export": "dapft.modeling.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
