"""The AP-cost Hungarian matcher (paper sec. 3.5, Eq. 13-14)."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from dapft.objective.dap import COCO_IOU_THRESHOLDS, ap_matching_cost

MatcherMode = Literal["constant", "momentum", "original"]
Indices = list[tuple[Tensor, Tensor]]


class NonFiniteCostError(FloatingPointError):
    """NaN or inf in an image's matching cost: the model's scores or boxes are not finite."""

    def __init__(self, image: int):
        super().__init__(f"non-finite matching cost for image {image} of the batch")
        self.image = image


class APCostMatcher(nn.Module):
    """One-to-one assignment of queries to ground truths by the DAP matching cost.

    Modes: `constant` (MP = 1: the cost reduces to the interpolated IoU term), `momentum` (MP is an
    exponential moving average of the training batches' interpolated precision curves, Eq. 13, kept
    in the buffer `precision_ema` so that it is saved and restored with the state dict), and
    `original` (delegates to the model's own matcher, called as HF matchers are:
    `original({"logits", "pred_boxes"}, targets)`).

    Returns, like DETR's matcher, one (query_indices, target_indices) pair of int64 tensors per image.
    """

    def __init__(
        self,
        mode: MatcherMode = "constant",
        *,
        sigma: float = 0.05,
        num_bins: int = 256,
        iou_thresholds=None,
        momentum: float = 0.99,
        original: Callable[[dict, list[dict]], Indices] | None = None,
    ):
        super().__init__()
        if mode not in ("constant", "momentum", "original"):
            raise ValueError(f"matcher mode must be constant, momentum or original, got {mode!r}")
        if mode == "original" and original is None:
            raise ValueError("matcher mode 'original' needs the model's own matcher")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.mode, self.sigma, self.num_bins, self.momentum = mode, sigma, num_bins, momentum
        self.iou_thresholds = tuple(iou_thresholds or COCO_IOU_THRESHOLDS)
        self.original = original
        # Starts at MP = 1 (the constant mode) until batches have been seen.
        self.register_buffer("precision_ema", torch.ones(len(self.iou_thresholds), num_bins))

    @torch.no_grad()
    def update(self, precision: Tensor) -> None:
        """Eq. 13 with a batch's (interpolated) precision curves, (K, N) or per class (C, K, N)."""
        if self.mode != "momentum":
            return
        if precision.ndim == 3:
            precision = precision.mean(0)
        p = precision.detach().to(self.precision_ema)
        self.precision_ema.mul_(self.momentum).add_(p, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def forward(
        self,
        scores: Tensor,
        pred_boxes: Tensor,
        targets: list[dict],
        logits: Tensor | None = None,
    ) -> Indices:
        """scores (B, Q, C) as the model ranks detections; pred_boxes (B, Q, 4) normalised cxcywh;
        targets with `class_labels` (G,) and `boxes` (G, 4) normalised cxcywh, as in transformers."""
        # Under bf16 / fp16 autocast the model's outputs are half precision: match in float32, as
        # scipy's assignment needs and as the cost's small differences between queries deserve.
        scores, pred_boxes = scores.float(), pred_boxes.float()
        logits = None if logits is None else logits.float()
        with torch.autocast(scores.device.type, enabled=False):
            if self.mode == "original":
                try:
                    return self.original({"logits": logits, "pred_boxes": pred_boxes}, targets)
                except ValueError:
                    # NaN outputs fail in the model's box checks or in scipy, far from the cause and
                    # without saying which image: look only then (a check every step would wait on
                    # the device once more per step).
                    finite = torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(pred_boxes).flatten(1).all(1)
                    if not bool(finite.all()):
                        raise NonFiniteCostError(int((~finite).nonzero()[0])) from None
                    raise
            # One device-to-host copy for the whole batch (the criterion passes every decoder layer
            # and query group of a step as one batch), then one small assignment per image.
            return hungarian(self.cost(scores, pred_boxes, targets).cpu(), [len(t["boxes"]) for t in targets])

    def cost(self, scores: Tensor, pred_boxes: Tensor, targets: list[dict]) -> Tensor:
        """(sum of G, Q) costs: each ground truth's row against its own image's queries only."""
        precision = self.precision_ema if self.mode == "momentum" else None
        return ap_cost_matrix(scores, pred_boxes, targets, precision, sigma=self.sigma, num_bins=self.num_bins,
                              iou_thresholds=self.iou_thresholds)


def ap_cost_matrix(scores: Tensor, pred_boxes: Tensor, targets: list[dict], precision: Tensor | None, *,
                   sigma: float, num_bins: int, iou_thresholds) -> Tensor:
    """(sum of G, Q) AP matching costs (Eq. 14): each ground truth's row against its own image's
    queries only; `precision` the momentum estimate MP (None: MP = 1, the constant mode)."""
    batch, queries = scores.shape[:2]
    sizes = [len(t["boxes"]) for t in targets]
    device = scores.device
    if sum(sizes) == 0:
        return scores.new_zeros(0, queries)
    gt_image = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(sizes, device=device))
    gt_labels = torch.cat([t["class_labels"] for t in targets]).to(device)
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    ious = box_iou(
        box_convert(pred_boxes.flatten(0, 1).float(), "cxcywh", "xyxy"),
        box_convert(gt_boxes.float(), "cxcywh", "xyxy"),
    ).view(batch, queries, -1)
    gt_index = torch.arange(len(gt_labels), device=device)
    iou_gq = ious[gt_image, :, gt_index]
    score_gq = scores[gt_image, :, gt_labels]
    return ap_matching_cost(score_gq, iou_gq, precision, sigma=sigma, num_bins=num_bins,
                            iou_thresholds=iou_thresholds)


def hungarian(cost: Tensor, sizes: list[int]) -> Indices:
    """Hungarian assignment per image of a (sum of G, Q) host cost matrix."""
    empty = torch.empty(0, dtype=torch.int64)
    indices = []
    for block in cost.split(sizes):
        if block.numel() == 0:
            indices.append((empty, empty))
            continue
        if not torch.isfinite(block).all():  # scipy would fail on it far from the cause
            raise NonFiniteCostError(len(indices))
        gt_idx, query_idx = linear_sum_assignment(block.numpy())
        order = query_idx.argsort()  # DETR's convention: sorted by query
        indices.append(
            (torch.as_tensor(query_idx[order], dtype=torch.int64), torch.as_tensor(gt_idx[order], dtype=torch.int64))
        )
    return indices


def _assigned(indices: Indices) -> list[dict[int, int]]:
    """Per image, ground-truth index -> the query assigned to it."""
    return [dict(zip(g.tolist(), q.tolist())) for q, g in indices]


def disagreement_with(indices: Indices, reference: Indices) -> tuple[int, int]:
    """(ground truths `indices` assigns to another query than `reference` does, ground truths)."""
    differ = total = 0
    for ours, theirs in zip(_assigned(indices), _assigned(reference)):
        total += len(theirs)
        differ += sum(ours.get(g) != q for g, q in theirs.items())
    return differ, total


@torch.no_grad()
def disagreement_with_top_query(indices: Indices, scores: Tensor, pred_boxes: Tensor, targets: list[dict],
                                iou_threshold: float = 0.5) -> tuple[int, int]:
    """(ground truths whose assigned query is not the best-scoring, for the ground truth's class, of
    the queries that overlap it at IoU >= iou_threshold; ground truths some query overlaps so).

    Where this is high, matching hands a ground truth to another query than the one the model ranks
    first for it, and DAP then pushes that first query down as a false positive. Computed for the
    whole batch at once, with one copy to the host (it runs every training step)."""
    sizes = [len(t["boxes"]) for t in targets]
    if sum(sizes) == 0:
        return 0, 0
    device = pred_boxes.device
    gt_image = torch.repeat_interleave(torch.arange(len(targets), device=device), torch.tensor(sizes, device=device))
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
    gt_labels = torch.cat([t["class_labels"] for t in targets]).to(device)
    queries = pred_boxes.shape[1]
    iou = box_iou(box_convert(pred_boxes.flatten(0, 1).float(), "cxcywh", "xyxy"),
                  box_convert(gt_boxes, "cxcywh", "xyxy"))  # (B * Q, G): every query against every ground truth
    iou = iou.view(len(targets), queries, -1)[gt_image, :, torch.arange(len(gt_boxes), device=device)]  # (G, Q)
    class_scores = scores[gt_image, :, gt_labels].float()  # (G, Q): each query's score for the ground truth's class
    overlapping = iou >= iou_threshold
    top = class_scores.masked_fill(~overlapping, -1.0).argmax(1)
    top, overlapped = torch.stack([top, overlapping.any(1).long()]).tolist()  # the one host copy
    assigned = [a.get(g) for a, n in zip(_assigned(indices), sizes) for g in range(n)]
    total = sum(overlapped)
    differ = sum(1 for a, t, o in zip(assigned, top, overlapped) if o and a != t)
    return differ, total
