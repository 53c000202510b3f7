"""The DAP criterion: per decoder layer (and query group), AP-cost matching and 1 - DAP over the
batch's (query, class) candidates."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from dapft.modeling.families import Family
from dapft.objective.dap import DAPStatistics, ap_per_row, dap_statistics
from dapft.objective.matcher import (
    APCostMatcher,
    MatcherMode,
    NonFiniteCostError,
    disagreement_with,
    disagreement_with_top_query,
)


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
        set_targets = targets * num_sets
        indices = self.matcher(scores.detach(), pred_boxes.detach(), set_targets, logits=logits.detach())
        positive, ious = matched_candidates(scores, pred_boxes, set_targets, indices)
        labels, num_gt, rows = statistic_rows(scores, targets, num_sets, self.average)
        stats = dap_statistics(scores.reshape(-1), positive, ious, num_gt, labels=labels, sigma=self.sigma,
                               num_bins=self.num_bins, average="per_class")
        stats = self.reduce_stats(stats)
        ap, precision = ap_per_row(stats)
        daps = mean_over_present(ap, stats.num_gt, num_sets, rows)
        return daps, precision.view(num_sets, rows, *precision.shape[1:]), indices

    def forward(self, layers: list[dict], targets: list[dict], groups: int = 1) -> dict[str, Tensor]:
        """Loss terms 'loss_dap' (last layer) and 'loss_dap_{i}' (earlier layers), plus the DAP values."""
        num_layers, batch = len(layers), len(targets)
        logits, boxes = as_sets(layers, "logits", groups), as_sets(layers, "pred_boxes", groups)
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
                out.update(disagreement(self, logits[first:first + batch].float(), boxes[first:first + batch].float(),
                                        targets, indices[first:first + batch]))
        return out


def as_sets(layers: list[dict], key: str, groups: int) -> Tensor:
    """(L, B, groups * Q, D) stacked from the layers' `key` -> (L * groups * B, Q, D): every decoder
    layer and query group a set of its own, set s's image b at s * B + b."""
    stacked = torch.stack([layer[key] for layer in layers])
    num_layers, batch, q = len(layers), stacked.shape[1], stacked.shape[2] // groups
    return stacked.view(num_layers, batch, groups, q, -1).transpose(1, 2).reshape(-1, q, stacked.shape[-1])


@torch.no_grad()
def disagreement(criterion: DAPCriterion, logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                 indices: list) -> dict[str, Tensor]:
    """How one set's AP-cost matching differs from the model's own matcher ('match_vs_model') and
    from the overlapping query the model scores highest ('match_vs_top'), as fractions of ground
    truths: logged per step and summarised in the run's report."""
    same = criterion.matcher.mode == "original"  # then the matching is the model's own: nothing to compare
    model_indices = indices if same else criterion.model_matcher({"logits": logits, "pred_boxes": pred_boxes}, targets)
    scores = criterion.family.scores(logits)
    out = {}
    for key, (differ, total) in (
            ("match_vs_model", disagreement_with(indices, model_indices)),
            ("match_vs_top", disagreement_with_top_query(indices, scores, pred_boxes, targets))):
        if total:
            out[key] = torch.tensor(differ / total)
    return out


def matched_candidates(scores: Tensor, pred_boxes: Tensor, targets: list[dict], indices: list) -> tuple[Tensor, Tensor]:
    """The flat (image, query, class) candidates of `scores` (images, Q, C) that the matching makes
    positives, and each positive's IoU with its ground truth (zero elsewhere): two (images*Q*C,)
    tensors, the statistics' `positive` and `ious`."""
    images, queries, num_classes = scores.shape
    device = scores.device
    img_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
    q_idx = torch.cat([q for q, _ in indices]).to(device)
    matched = [(t["class_labels"][g.to(t["class_labels"].device)], t["boxes"][g.to(t["boxes"].device)])
               for t, (_, g) in zip(targets, indices)]
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
    return positive, ious


def statistic_rows(scores: Tensor, targets: list[dict], num_sets: int, average: str) -> tuple[Tensor, Tensor, int]:
    """Rows of the statistics: one per set (pooled, Eq. 12) or per (set, class) (per_class). Each
    flat candidate's row, each row's ground-truth count, and the rows a set has; `targets` are one
    set's images (every set has the same)."""
    images, queries, num_classes = scores.shape
    device = scores.device
    all_labels = torch.cat([t["class_labels"] for t in targets]).to(device)
    candidates_per_set = images // num_sets * queries * num_classes
    set_of = torch.arange(num_sets, device=device)
    if average == "per_class":
        labels = (set_of[:, None, None] * num_classes
                  + torch.arange(num_classes, device=device)).expand(-1, candidates_per_set // num_classes, -1)
        num_gt = torch.bincount(all_labels, minlength=num_classes).to(scores).repeat(num_sets)
        return labels.reshape(-1), num_gt, num_classes
    labels = set_of[:, None].expand(-1, candidates_per_set)
    return labels.reshape(-1), scores.new_full((num_sets,), all_labels.numel()), 1


def mean_over_present(ap: Tensor, num_gt: Tensor, num_sets: int, rows: int) -> Tensor:
    """Each set's mean AP over its rows with ground truth (COCO's mean over the classes present);
    with none, DAP is 1 with no gradient, as `dap_from_statistics` has it."""
    present = (num_gt > 0).view(num_sets, rows)
    count = present.sum(1)
    summed = (ap.view(num_sets, rows) * present).sum(1)
    return torch.where(count > 0, summed / count.clamp_min(1), summed * 0 + 1.0)


def all_reduce_statistics(stats: DAPStatistics) -> DAPStatistics:
    """Global sums with local gradients: value = sum over processes, d value / d local = identity.

    DAP's AP is a property of the whole batch: each process reduces its candidates to the additive
    `DAPStatistics`, summed over processes before precision is formed, so that every process sees
    the AP of the global batch (G counted globally) while gradients flow only into its own
    candidates (the criterion's `reduce_stats` under torchrun)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats

    def reduce(t: torch.Tensor) -> torch.Tensor:
        total = t.detach().clone()
        dist.all_reduce(total)
        return t + (total - t.detach())

    return stats.map(reduce)
