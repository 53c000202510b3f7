"""`DetectionLoss`, which takes the place of a model's own loss function and combines DAP with the
terms of the model's loss that the chosen configuration keeps (--loss)."""

from __future__ import annotations

import re
from typing import Callable, Literal

import torch
from torch import Tensor

from dapft.modeling.families import Family
from dapft.objective.criterion import DAPCriterion

LossConfig = Literal["dap", "original", "dap+original", "dap+box"]
LOSS_CONFIGS = ("dap", "original", "dap+original", "dap+box")


_BASE = re.compile(r"^(loss_[a-z]+)")


class DetectionLoss:
    """Stands in for `model.loss_function`: receives what the model's own loss receives, calls it
    (so kept terms are exactly the model's), and swaps its matched detection terms for DAP."""

    def __init__(self, family: Family, original: Callable, criterion: DAPCriterion | None, loss: LossConfig):
        if loss not in LOSS_CONFIGS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_CONFIGS)}, got {loss!r}")
        if loss != "original" and criterion is None:
            raise ValueError(f"loss {loss!r} needs a DAPCriterion")
        self.family, self.original, self.criterion, self.loss = family, original, criterion, loss

    def __call__(self, logits, labels, device, pred_boxes, config, *args, **kwargs):
        if self.loss == "dap":
            # Only the terms DAP keeps (denoising, encoder proposals; none for DETR-like families),
            # by the model's own loss code: its matching and scoring of every decoder layer would be
            # thrown away.
            loss_dict, aux = self.family.kept_loss(config, labels, device, *args, **kwargs)
        else:
            total, loss_dict, aux = self.original(logits, labels, device, pred_boxes, config, *args, **kwargs)
        if self.loss == "original":
            return total, loss_dict, aux
        layers = self.family.decoder_outputs(logits, pred_boxes, aux, kwargs)
        # Models compute their loss only when given labels, and group their queries only in training.
        groups = self.family.num_groups(config, training=logits.shape[1] > config.num_queries)
        dap_terms = self.criterion(layers, labels, groups)
        weights = self.family.weights(config)
        num_dec_aux = len(layers) - 1
        terms: dict[str, Tensor] = {}
        for key, value in loss_dict.items():
            base = _BASE.match(key)
            weight = weights.get(base.group(1), 0.0) if base else 0.0
            if weight == 0.0:
                continue
            kept = self.family.is_kept(key, num_dec_aux)
            box = base.group(1) in ("loss_bbox", "loss_giou")
            if kept or self.loss == "dap+original" or (self.loss == "dap+box" and box):
                terms[key] = weight * value
        loss = sum(v for k, v in dap_terms.items() if k.startswith("loss_")) + sum(terms.values(), torch.zeros((), device=device))
        return loss, {**terms, **dap_terms}, aux


def install_loss(model, family: Family, loss: LossConfig, criterion: DAPCriterion | None) -> None:
    """Make `model(pixel_values, labels=...)` compute the chosen loss configuration."""
    if hasattr(model, "_loss_function"):
        del model._loss_function  # back to the model's own
    if loss == "original":
        return
    original = model.loss_function
    model.loss_function = DetectionLoss(family, original, criterion, loss)
