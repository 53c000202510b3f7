"""What a COCO evaluation produces: the types that evaluation computes and reports render (one
module both import, so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
              "AR_small", "AR_medium", "AR_large")


@dataclass
class ErrorBreakdown:
    """dapft.analysis.errors' answer to "what did it get wrong". Fractions in [0, 1], as COCO's stats."""
    dAP: dict[str, float]  # TIDE: the AP@0.5 each error type costs (Cls, Loc, Both, Dupe, Bkg, Miss; FP, FN)
    counts: dict[str, int]  # how many errors of each TIDE type
    ap50: float  # TIDE's base: AP at IoU 0.5, mean over the classes with ground truth
    ece: float  # expected calibration error of the scores
    confusion: np.ndarray  # [K+1, K+1] counts, rows ground truth, columns predicted; K is background
    category_names: list[str]
    score_threshold: float  # of the confusion matrix and the per-image counts
    per_image: dict[int, dict[str, int]]  # image id -> found / false / missed at the threshold
    seconds: float

    def to_json(self) -> dict:
        return {"dAP": self.dAP, "counts": self.counts, "AP50": self.ap50, "ECE": self.ece,
                "score_threshold": self.score_threshold, "confusion": self.confusion.tolist(),
                "confusion_names": self.category_names + ["background"],
                "per_image": {str(k): v for k, v in self.per_image.items()}, "seconds": round(self.seconds, 3)}


@dataclass
class CocoMetrics:
    stats: dict[str, float]  # COCO's 12 summary numbers, AP in [0, 1]
    per_class: dict[str, float]  # AP@[.5:.95] by category name (NaN-free: classes without GT left out)
    precision: np.ndarray  # COCOeval.eval['precision'] [T, R, K, A, M]
    category_names: list[str]
    evaluator: str
    seconds: float
    errors: ErrorBreakdown | None = None

    def to_json(self) -> dict:
        return {"stats": self.stats, "per_class_AP": self.per_class, "evaluator": self.evaluator,
                "eval_seconds": round(self.seconds, 3), **({"errors": self.errors.to_json()} if self.errors else {})}
