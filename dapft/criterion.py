"""The DAP criterion: per decoder layer, AP-cost matching and 1 - DAP over the batch's (query,
class) candidates; and `DetectionLoss`, which takes the place of a model's own loss function and
combines DAP with the terms of the model's loss that the chosen configuration keeps."""

from __future__ import annotations

import re
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from dapft.dap import DAPStatistics, dap_from_statistics, dap_statistics
from dapft.matcher import APCostMatcher, MatcherMode
from dapft.models import Family

LossConfig = Literal["dap", "original", "dap+original", "dap+box"]
LOSS_CONFIGS = ("dap", "original", "dap+original", "dap+box")


class DAPCriterion(nn.Module):
    """1 - DAP for each decoder layer, each with its own matching (paper sec. 3, 3.5).

    `reduce_stats` combines the statistics across processes before precision is formed (identity
    on one process); `dap_scale` undoes DistributedDataParallel's gradient averaging for the DAP
    term, whose gradient is already that of the global batch.
    """

    def __init__(self, family: Family, config, *, matcher: MatcherMode = "constant", sigma: float = 0.05,
                 num_bins: int = 256, average: str = "pooled", momentum: float = 0.99,
                 reduce_stats: Callable[[DAPStatistics], DAPStatistics] | None = None, dap_scale: float = 1.0):
        super().__init__()
        self.family, self.config = family, config
        self.sigma, self.num_bins, self.average = sigma, num_bins, average
        original = family.original_matcher(config) if matcher == "original" else None
        self.matcher = APCostMatcher(matcher, sigma=sigma, num_bins=num_bins, momentum=momentum, original=original)
        self.reduce_stats = reduce_stats or (lambda s: s)
        self.dap_scale = dap_scale

    def layer_dap(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """DAP of one decoder layer (one query group) and its precision curves."""
        scores = self.family.scores(logits)  # (B, Q, C)
        batch, queries, num_classes = scores.shape
        indices = self.matcher(scores.detach(), pred_boxes.detach(), targets, logits=logits.detach())
        device = scores.device
        b_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        q_idx = torch.cat([q for q, _ in indices]).to(device)
        gt_labels = torch.cat([t["class_labels"][g.to(t["class_labels"].device)] for t, (_, g) in zip(targets, indices)]).to(device)
        gt_boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in zip(targets, indices)]).to(device)
        matched_iou = box_iou(
            box_convert(pred_boxes[b_idx, q_idx].float(), "cxcywh", "xyxy"),
            box_convert(gt_boxes.float(), "cxcywh", "xyxy"),
        ).diagonal()
        flat_scores = scores.reshape(-1)
        pos_index = (b_idx * queries + q_idx) * num_classes + gt_labels
        positive = torch.zeros_like(flat_scores, dtype=torch.bool).index_fill_(0, pos_index, True)
        ious = torch.zeros_like(flat_scores).index_put((pos_index,), matched_iou)
        all_labels = torch.cat([t["class_labels"] for t in targets]).to(device)
        if self.average == "per_class":
            num_gt = torch.bincount(all_labels, minlength=num_classes).to(flat_scores)
            labels = torch.arange(num_classes, device=device).repeat(batch * queries)
        else:
            num_gt, labels = all_labels.numel(), None
        stats = dap_statistics(flat_scores, positive, ious, num_gt, labels=labels, sigma=self.sigma,
                               num_bins=self.num_bins, average=self.average)
        dap, precision = dap_from_statistics(self.reduce_stats(stats), return_precision=True)
        return dap, precision

    def forward(self, layers: list[dict], targets: list[dict], groups: int = 1) -> dict[str, Tensor]:
        """Loss terms 'loss_dap' (last layer) and 'loss_dap_{i}' (earlier layers), plus the DAP values."""
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            daps, precisions = [], []
            # Group DETR: each query group is its own one-to-one set, with its own AP.
            for logits, boxes in zip(layer["logits"].chunk(groups, 1), layer["pred_boxes"].chunk(groups, 1)):
                dap, precision = self.layer_dap(logits, boxes, targets)
                daps.append(dap)
                precisions.append(precision)
            dap = torch.stack(daps).mean()
            suffix = "" if last else f"_{i}"
            out[f"loss_dap{suffix}"] = self.dap_scale * (1 - dap)
            out[f"dap{suffix}"] = dap.detach()
            if last:
                self.matcher.update(torch.stack(precisions).mean(0).mean(0))
        return out


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
        if self.loss == "dap" and not self.family.keep:
            # Nothing of the model's own loss is kept (DETR-like families): skip computing it, and
            # its Hungarian matching, and list the auxiliary layers as its loss would.
            outputs_class, outputs_coord = (list(args) + [kwargs.get("outputs_class"), kwargs.get("outputs_coord")])[:2]
            aux = [] if outputs_class is None else [
                {"logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
            loss_dict = {}
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
