"""What a COCO evaluation produces: the types that evaluation computes and reports render (one
module both import, so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
              "AR_small", "AR_medium", "AR_large")


@dataclass
class CocoMetrics:
    stats: dict[str, float]  # COCO's 12 summary numbers, AP in [0, 1]
    per_class: dict[str, float]  # AP@[.5:.95] by category name (NaN-free: classes without GT left out)
    precision: np.ndarray  # COCOeval.eval['precision'] [T, R, K, A, M]
    category_names: list[str]
    evaluator: str
    seconds: float

    def to_json(self) -> dict:
        return {"stats": self.stats, "per_class_AP": self.per_class, "evaluator": self.evaluator,
                "eval_seconds": round(self.seconds, 3)}
