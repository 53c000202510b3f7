"""The DAP criterion: per decoder layer, AP-cost matching and 1 - DAP over the batch's (query,
class) candidates; and `DetectionLoss`, which takes the place of a model's own loss function and
combines DAP with the terms of the model's loss that the chosen configuration keeps."""

from __future__ import annotations

import re
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from dapft.dap import DAPStatistics, ap_per_row, dap_statistics
from dapft.matcher import (APCostMatcher, MatcherMode, NonFiniteCostError, disagreement_with,
                           disagreement_with_top_query)
from dapft.models import Family

LossConfig = Literal["dap", "original", "dap+original", "dap+box"]
LOSS_CONFIGS = ("dap", "original", "dap+original", "dap+box")


class DAPCriterion(nn.Module):
    """1 - DAP for each decoder layer, each with its own matching (paper sec. 3, 3.5).

    Every decoder layer, and every query group of a Group DETR layer, is its own one-to-one set of
    detections with its own matching and its own AP. All of a step's sets are handled as one batch,
    each set's images standing as images of their own: one scoring, one matching cost and one copy
    of it to the host, one `dap_statistics` whose rows are (set, class) pairs, one backward. The
    result is the same as one set at a time (tests/test_criterion.py), without paying the per-call
    overhead once per layer and group.

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
        # For the disagreement diagnostic (none without the model's config: its matcher's costs).
        self.model_matcher = original or (family.original_matcher(config) if config is not None else None)
        self.reduce_stats = reduce_stats or (lambda s: s)
        self.dap_scale = dap_scale

    def set_daps(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                 num_sets: int) -> tuple[Tensor, Tensor, list]:
        """DAP of each of `num_sets` sets of detections, (num_sets,), their precision curves, and the
        matching (indices per image of every set).

        logits (num_sets * B, Q, C) and pred_boxes (num_sets * B, Q, 4): set s's image b at index
        s * B + b; `targets` are the B images' ground truths, the same for every set."""
        scores = self.family.scores(logits)  # (S*B, Q, C)
        images, queries, num_classes = scores.shape
        device = scores.device
        set_targets = targets * num_sets
        indices = self.matcher(scores.detach(), pred_boxes.detach(), set_targets, logits=logits.detach())
        img_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        q_idx = torch.cat([q for q, _ in indices]).to(device)
        matched = [(t["class_labels"][g.to(t["class_labels"].device)], t["boxes"][g.to(t["boxes"].device)])
                   for t, (_, g) in zip(set_targets, indices)]
        gt_labels = torch.cat([c for c, _ in matched]).to(device)
        gt_boxes = torch.cat([b for _, b in matched]).to(device)
        matched_iou = box_iou(
            box_convert(pred_boxes[img_idx, q_idx].float(), "cxcywh", "xyxy"),
            box_convert(gt_boxes.float(), "cxcywh", "xyxy"),
        ).diagonal()
        flat_scores = scores.reshape(-1)
        pos_index = (img_idx * queries + q_idx) * num_classes + gt_labels
        positive = torch.zeros_like(flat_scores, dtype=torch.bool).index_fill_(0, pos_index, True)
        ious = torch.zeros_like(flat_scores).index_put((pos_index,), matched_iou)
        # Rows of the statistics: one per set (pooled, Eq. 12) or per (set, class) (per_class).
        all_labels = torch.cat([t["class_labels"] for t in targets]).to(device)
        candidates_per_set = images // num_sets * queries * num_classes
        set_of = torch.arange(num_sets, device=device)
        if self.average == "per_class":
            rows = num_classes
            labels = (set_of[:, None, None] * num_classes
                      + torch.arange(num_classes, device=device)).expand(-1, candidates_per_set // num_classes, -1)
            num_gt = torch.bincount(all_labels, minlength=num_classes).to(flat_scores).repeat(num_sets)
        else:
            rows = 1
            labels = set_of[:, None].expand(-1, candidates_per_set)
            num_gt = flat_scores.new_full((num_sets,), all_labels.numel())
        stats = dap_statistics(flat_scores, positive, ious, num_gt, labels=labels.reshape(-1), sigma=self.sigma,
                               num_bins=self.num_bins, average="per_class")
        stats = self.reduce_stats(stats)
        ap, precision = ap_per_row(stats)
        # Each set's mean over its classes with ground truth (COCO); with none, DAP is 1 with no
        # gradient, as `dap_from_statistics` has it.
        present = (stats.num_gt > 0).view(num_sets, rows)
        count = present.sum(1)
        summed = (ap.view(num_sets, rows) * present).sum(1)
        daps = torch.where(count > 0, summed / count.clamp_min(1), summed * 0 + 1.0)
        return daps, precision.view(num_sets, rows, *precision.shape[1:]), indices

    def forward(self, layers: list[dict], targets: list[dict], groups: int = 1) -> dict[str, Tensor]:
        """Loss terms 'loss_dap' (last layer) and 'loss_dap_{i}' (earlier layers), plus the DAP values."""
        num_layers, batch = len(layers), len(targets)

        def as_sets(key: str) -> Tensor:  # (L, B, groups * Q, D) -> (L * groups * B, Q, D)
            stacked = torch.stack([layer[key] for layer in layers])
            q = stacked.shape[2] // groups
            return stacked.view(num_layers, batch, groups, q, -1).transpose(1, 2).reshape(-1, q, stacked.shape[-1])

        logits, boxes = as_sets("logits"), as_sets("pred_boxes")
        try:
            # Autocast would run the tail sums' and the cost's matrix products in bf16 / fp16, whose
            # 3 significant digits are coarser than the differences DAP ranks by: all in float32.
            with torch.autocast(logits.device.type, enabled=False):
                daps, precision, indices = self.set_daps(logits.float(), boxes.float(), targets, num_layers * groups)
        except NonFiniteCostError as exc:
            layer, group = divmod(exc.image // batch, groups)
            where = f"decoder layer {layer} of {num_layers}" + (f", query group {group}" if groups > 1 else "")
            raise FloatingPointError(f"the matching cost of {where} is not finite (NaN or inf in the model's "
                                     f"scores or boxes, image {exc.image % batch} of the batch)") from exc
        layer_daps = daps.view(num_layers, groups).mean(1)  # Group DETR: the mean of its groups' APs
        out: dict[str, Tensor] = {}
        for i, dap in enumerate(layer_daps):
            suffix = "" if i == num_layers - 1 else f"_{i}"
            out[f"loss_dap{suffix}"] = self.dap_scale * (1 - dap)
            out[f"dap{suffix}"] = dap.detach()
        self.matcher.update(precision[-groups:].mean((0, 1)))  # the last layer's curves (Eq. 13)
        first = (num_layers - 1) * groups * batch  # the last layer's first query group
        if self.model_matcher is not None:
            with torch.autocast(logits.device.type, enabled=False):
                out.update(self.disagreement(logits[first:first + batch].float(), boxes[first:first + batch].float(),
                                             targets, indices[first:first + batch]))
        return out

    @torch.no_grad()
    def disagreement(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict], indices: list) -> dict[str, Tensor]:
        """How one set's AP-cost matching differs from the model's own matcher ('match_vs_model') and
        from the overlapping query the model scores highest ('match_vs_top'), as fractions of ground
        truths: logged per step and summarised in the run's report."""
        same = self.matcher.mode == "original"  # then the matching is the model's own: nothing to compare
        model_indices = indices if same else self.model_matcher({"logits": logits, "pred_boxes": pred_boxes}, targets)
        scores = self.family.scores(logits)
        out = {}
        for key, (differ, total) in (
                ("match_vs_model", disagreement_with(indices, model_indices)),
                ("match_vs_top", disagreement_with_top_query(indices, scores, pred_boxes, targets))):
            if total:
                out[key] = torch.tensor(differ / total)
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
