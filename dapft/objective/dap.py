"""The Differentiable Average Precision objective (paper sec. 3, Eq. 11-12) and the AP matching
cost (Eq. 14), as pure functions on tensors.

How the objective is organised, and why:

Every quantity DAP needs from the M candidates is a *sum over candidates* of a per-candidate curve
over the N score thresholds:

    ALL[c, i]      = sum_b  tail_b(i)                          over candidates b of class c
    TP[c, a, i]    = sum_b  tail_b(i)   * [b matched, IoU_b >= alpha_a]
    HIST[c, k, i]  = sum_b  w_bk(IoU_b) * F_b(i)               over matched b

where tail_b(i) = Pr(score >= i/N) under N(s_b, sigma) (Eq. 7), F_b(i) its bin mass (Eq. 11) and
w_bk the weights that express L_int(IoU_b, i) (Eq. 6) as a combination of the interpolation anchors
y_k(i). FP = ALL - TP, precision = TP / (TP + FP), and then

    DAP = 1/(K G) sum_k sum_i y_k(i) HIST[k, i]          (Eq. 12, K IoU thresholds)

So the cost is linear in M, and only ALL touches every candidate. The other two sums touch only
the matched candidates (at most the number of ground truths). Because the statistics are sums,
processes can all-reduce them before precision is formed (`DAPStatistics`), which makes the AP an
estimate over the global batch.

ALL is computed by one of two autograd functions:
  * the histogram kernel (default): tail_b(i) is a smooth function of s_b alone, so ALL is the
    candidates' score histogram on a fine grid (linear weights, O(M)) times a precomputed kernel
    K[j, i] = tail(u_j)(i) (grid points x bins, cached), and its gradient is the upstream gradient
    times K's derivative, read off at each score by linear interpolation (O(M)). No erfc or exp per
    candidate: the work per candidate is a few adds, whatever N is.
  * the exact path (`exact=True`): one erfc per (candidate, bin), chunked so that memory stays flat;
    the reference the kernel is tested against, and what gradcheck runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Literal

import torch
from torch import Tensor

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DAPStatistics",
    "ap_matching_cost",
    "ap_per_row",
    "dap_from_statistics",
    "dap_statistics",
    "differentiable_ap",
    "interpolation_weights",
    "precision_curves",
    "soft_tail_sum",
]

# COCO's IoU thresholds, computed the way pycocotools does so that a threshold compares equal.
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(
    float(x) for x in torch.linspace(0.5, 0.95, 10, dtype=torch.float64)
)

Localization = Literal["interp", "step"]
Average = Literal["pooled", "per_class"]

# Rows of candidates handled at once by the exact chunked tail sum: bounds the working memory to
# about CHUNK x num_bins floats whatever M is.
_CHUNK = 32768

# The histogram kernel's grid (see `_kernel`): spacing sigma / _GRID_PER_SIGMA, reaching _GRID_REACH
# sigma beyond [0, 1] (farther out every tail is 0 or 1 to within Phi(-8) = 6e-16). Linear
# interpolation of Phi((s - x) / sigma) with spacing h errs by at most (h / sigma)^2 * phi(1) / 8:
# 1.8e-6 of one candidate's contribution here, and its derivative by 7.6e-6 of the largest.
# A smaller sigma needs proportionally more points: above _MAX_GRID points (sigma < ~0.002) the
# exact path is used instead.
_GRID_PER_SIGMA = 128
_GRID_REACH = 8.0
_MAX_GRID = 1 << 16


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 stays float64 (gradcheck); everything else (bf16, fp16, fp32) is computed in fp32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _thresholds(iou_thresholds, device, dtype) -> Tensor:
    values = COCO_IOU_THRESHOLDS if iou_thresholds is None else tuple(iou_thresholds)
    t = torch.as_tensor(values, device=device, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0 or not bool(((t > 0) & (t < 1)).all()):
        raise ValueError(f"iou_thresholds must be a non-empty list in (0, 1), got {values}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"iou_thresholds must be strictly increasing, got {values}")
    return t.to(dtype)


def _bin_edges(num_bins: int, like: Tensor) -> Tensor:
    return torch.arange(num_bins, device=like.device, dtype=like.dtype) / num_bins


def _tail(scores: Tensor, num_bins: int, sigma: float) -> Tensor:
    """tail_b(i) = Pr(x >= i/N) with x ~ N(s_b, sigma), for i = 0..N-1: an (M, N) tensor.

    Bin 0 extends to -inf (READING-NOTES 1), so tail(0) = 1 exactly and does not depend on s.
    """
    z = (_bin_edges(num_bins, scores)[None, :] - scores[:, None]) / (sigma * math.sqrt(2.0))
    tail = 0.5 * torch.erfc(z)
    return torch.cat([torch.ones_like(tail[:, :1]), tail[:, 1:]], 1)


def _bin_mass(tail: Tensor) -> Tensor:
    """F(i/N, s) of Eq. 11 from the tails: the mass between consecutive thresholds (last bin open)."""
    return tail - torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)


def _tail_grad(scores: Tensor, num_bins: int, sigma: float) -> Tensor:
    """d tail_b(i) / d s_b: the Gaussian density at i/N (zero for bin 0, whose tail is constant)."""
    z = (_bin_edges(num_bins, scores)[None, :] - scores[:, None]) / sigma
    dtail = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))
    dtail[:, 0] = 0.0
    return dtail


class _SoftTailSum(torch.autograd.Function):
    """out[c, i] = sum over b with labels[b] == c of tail_b(i), chunked over candidates."""

    @staticmethod
    def forward(ctx, scores: Tensor, labels: Tensor, num_classes: int, num_bins: int, sigma: float):
        out = scores.new_zeros(num_classes, num_bins)
        for start in range(0, scores.numel(), _CHUNK):
            tail = _tail(scores[start : start + _CHUNK], num_bins, sigma)
            if num_classes == 1:
                out[0] += tail.sum(0)
            else:
                out.index_add_(0, labels[start : start + _CHUNK], tail)
        ctx.save_for_backward(scores, labels)
        ctx.num_bins, ctx.sigma = num_bins, sigma
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        scores, labels = ctx.saved_tensors
        grad_scores = torch.empty_like(scores)
        for start in range(0, scores.numel(), _CHUNK):
            dtail = _tail_grad(scores[start : start + _CHUNK], ctx.num_bins, ctx.sigma)
            if grad_out.shape[0] == 1:
                grad_scores[start : start + _CHUNK] = dtail @ grad_out[0]
            else:
                g = grad_out.index_select(0, labels[start : start + _CHUNK])
                grad_scores[start : start + _CHUNK] = (g * dtail).sum(1)
        return grad_scores, None, None, None, None


@dataclass(frozen=True)
class _Grid:
    """Grid points u_j = lo + j * step (j < size) and, at each, every bin's tail and its derivative."""

    lo: float
    step: float
    size: int
    tails: Tensor  # (size, N): K[j, i] = tail(u_j)(i)
    dtails: Tensor  # (size, N): d K[j, i] / d u_j

    def locate(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Each score's grid cell j and its position in it, t in [0, 1]: s ~ (1 - t) u_j + t u_{j+1}."""
        pos = (scores.detach().clamp(self.lo, self.lo + (self.size - 1) * self.step) - self.lo) / self.step
        cell = pos.floor().clamp_(max=self.size - 2)
        return cell.long(), pos - cell

    @staticmethod
    def deposit(rows: Tensor, t: Tensor, length: int) -> Tensor:
        """Located scores' histogram with linear weights: score b adds 1 - t_b at rows[b] and t_b at
        rows[b] + 1 of a (length,) histogram.

        Accumulated in float64: with millions of scores near 0 one cell can hold most of them, and a
        float32 running sum would stop counting."""
        hist = torch.zeros(length, device=rows.device, dtype=torch.float64)
        right = t.double()
        return hist.index_add_(0, rows, 1 - right).index_add_(0, rows + 1, right)

    @staticmethod
    def read(curves: Tensor, rows: Tensor, t: Tensor) -> Tensor:
        """Curves over grid points (rows of `curves`) read off at located scores by linear interpolation."""
        pairs = torch.stack([curves[:-1], curves[1:]], 1)  # one gather for both ends of each cell
        ends = pairs[rows]
        t = t.to(curves.dtype).view(-1, *([1] * (curves.ndim - 1)))
        return torch.lerp(ends[:, 0], ends[:, 1], t)


def _grid_size(sigma: float) -> int:
    return math.ceil((1.0 + 2 * _GRID_REACH * sigma) * _GRID_PER_SIGMA / sigma) + 1


@lru_cache(maxsize=16)
def _kernel(num_bins: int, sigma: float, device: torch.device, dtype: torch.dtype) -> _Grid:
    """The cached grid and kernel for (N, sigma) on a device, computed in float64 then cast."""
    size = _grid_size(sigma)
    lo, step = -_GRID_REACH * sigma, sigma / _GRID_PER_SIGMA
    u = lo + step * torch.arange(size, dtype=torch.float64)
    tails, dtails = _tail(u, num_bins, sigma), _tail_grad(u, num_bins, sigma)
    return _Grid(lo, step, size, tails.to(device, dtype), dtails.to(device, dtype))


class _KernelTailSum(torch.autograd.Function):
    """out[c, i] = sum over b with labels[b] == c of tail_b(i), by the histogram kernel."""

    @staticmethod
    def forward(ctx, scores: Tensor, labels: Tensor | None, num_classes: int, grid: _Grid):
        cell, t = grid.locate(scores)
        # Only the grid points the scores reach enter the products (probabilities never reach the
        # grid's margins beyond [0, 1]); knowing them costs one device-to-host copy of two numbers.
        lo, hi = (int(v) for v in torch.stack([cell.min(), cell.max()]).tolist()) if cell.numel() else (0, 0)
        width = hi + 2 - lo
        rows = cell - lo if labels is None else cell - lo + labels * width  # (class, grid point) rows
        hist = grid.deposit(rows, t, num_classes * width).view(num_classes, width)
        ctx.save_for_backward(rows, t)  # 12 bytes a candidate: cheaper than locating again
        ctx.grid, ctx.span, ctx.dtype = grid, slice(lo, lo + width), scores.dtype
        return hist.to(grid.tails.dtype) @ grid.tails[ctx.span]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, t = ctx.saved_tensors
        grid = ctx.grid
        # d out[c, i] / d s_b = dtail(s_b)(i): the upstream gradient through K's derivative is one
        # curve per class over the grid, read off at each score.
        slope = grad_out.to(grid.dtails.dtype) @ grid.dtails[ctx.span].T  # (C, width)
        return grid.read(slope.reshape(-1), rows, t).to(ctx.dtype), None, None, None


def soft_tail_sum(
    scores: Tensor, labels: Tensor | None = None, num_classes: int = 1, *, num_bins: int = 256,
    sigma: float = 0.05, exact: bool = False,
) -> Tensor:
    """Soft count of candidates scoring at least i/N, per class: a (num_classes, num_bins) tensor.

    Computed by the histogram kernel (module docstring): O(M) work and memory for M candidates, plus
    O(C x grid) for C classes, within about 2e-6 of the exact value for each candidate and bin.
    `exact=True`, or a sigma too small for a grid of at most 65,536 points (sigma < ~0.002), uses the
    exact chunked formula instead: O(M x N) work, memory O(M + chunk x N).
    """
    if not exact and _grid_size(sigma) <= _MAX_GRID:
        grid = _kernel(num_bins, float(sigma), scores.device, scores.dtype)
        return _KernelTailSum.apply(scores, None if labels is None else labels.long(), num_classes, grid)
    if labels is None:
        labels = torch.zeros_like(scores, dtype=torch.long)
    return _SoftTailSum.apply(scores, labels.long(), num_classes, num_bins, float(sigma))


def interpolation_weights(
    ious: Tensor, iou_thresholds: Tensor, localization: Localization = "interp"
) -> Tensor:
    """Weights w (M, K+2) such that L(IoU_b, i) = sum_k w_bk y_k(i).

    Anchors are x = (0, alpha_1..alpha_K, 1) with y_0 = 0, y_k the cumulative interpolated precision
    and y_{K+1} = 2 y_K - y_{K-1} (Eq. 6). `interp` is the piecewise-linear L_int, differentiable in
    the IoU; `step` is L of Eq. 4 (one-hot on the number of thresholds the IoU reaches, COCO's >=).
    """
    ious = ious.clamp(0.0, 1.0)
    k = iou_thresholds.numel()
    if localization == "step":
        reached = (ious[:, None] >= iou_thresholds[None, :]).sum(1)
        return torch.nn.functional.one_hot(reached, k + 2).to(ious.dtype)
    if localization != "interp":
        raise ValueError(f"localization must be 'interp' or 'step', got {localization!r}")
    anchors = torch.cat([ious.new_zeros(1), iou_thresholds, ious.new_ones(1)])
    seg = (torch.searchsorted(anchors, ious.detach().contiguous(), right=True) - 1).clamp(0, k)
    left, right = anchors[seg], anchors[seg + 1]
    t = (ious - left) / (right - left)
    w = ious.new_zeros(ious.numel(), k + 2)
    w = w.scatter(1, seg[:, None], (1 - t)[:, None])
    return w.scatter_add(1, (seg + 1)[:, None], t[:, None])


def _anchor_values(precision: Tensor) -> Tensor:
    """y_k(i) for the K+2 anchors from per-threshold precision curves (..., K, N)."""
    cum = precision.cumsum(-2)
    prev = torch.cat([torch.zeros_like(cum[..., :1, :]), cum[..., :-1, :]], -2)
    tail = 2 * cum[..., -1:, :] - prev[..., -1:, :]
    return torch.cat([torch.zeros_like(cum[..., :1, :]), cum, tail], -2)


@dataclass
class DAPStatistics:
    """The additive sufficient statistics of DAP over a set of candidates.

    Fields are sums over candidates (or ground truths), so statistics from several processes or
    several batches are combined by adding them field by field (see `dapft.utils.distributed`).
    Shapes: all_tail (C, N), tp_tail (C, K, N), hist (C, K+2, N), num_gt (C,). C is 1 when pooled.
    """

    all_tail: Tensor
    tp_tail: Tensor
    hist: Tensor
    num_gt: Tensor

    @property
    def tp(self) -> Tensor:
        """Soft true-positive count TP_alpha(i), (C, K, N)."""
        return self.tp_tail

    @property
    def fp(self) -> Tensor:
        """Soft false-positive count FP_alpha(i), (C, K, N)."""
        return (self.all_tail[:, None, :] - self.tp_tail).clamp_min(0.0)

    def map(self, fn: Callable[[Tensor], Tensor]) -> "DAPStatistics":
        return DAPStatistics(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


def dap_statistics(
    scores: Tensor,
    positive: Tensor,
    ious: Tensor,
    num_gt: Tensor | int | float,
    *,
    labels: Tensor | None = None,
    sigma: float = 0.05,
    num_bins: int = 256,
    iou_thresholds=None,
    localization: Localization = "interp",
    average: Average = "pooled",
    exact: bool = False,
) -> DAPStatistics:
    """Per-candidate work of DAP, reduced to the sums in `DAPStatistics` (see module docstring).
    `exact` selects the exact soft tail sum over all candidates (see `soft_tail_sum`)."""
    if scores.ndim != 1 or positive.shape != scores.shape or ious.shape != scores.shape:
        raise ValueError(
            "scores, positive and ious must be 1-D tensors of the same length, got "
            f"{tuple(scores.shape)}, {tuple(positive.shape)}, {tuple(ious.shape)}"
        )
    if sigma <= 0 or num_bins < 2:
        raise ValueError(f"need sigma > 0 and num_bins >= 2, got sigma={sigma}, num_bins={num_bins}")
    dtype = _compute_dtype(scores, ious)
    s, iou = scores.to(dtype), ious.to(dtype)
    positive = positive.bool()
    thresholds = _thresholds(iou_thresholds, s.device, dtype)
    k = thresholds.numel()

    num_gt = torch.as_tensor(num_gt, device=s.device, dtype=dtype)
    if average == "per_class":
        if labels is None or num_gt.ndim != 1:
            raise ValueError("average='per_class' needs labels and a 1-D num_gt indexed by class id")
        num_classes = num_gt.numel()
        cls = labels.long()
        if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}) = the length of num_gt")
    elif average == "pooled":
        num_classes, cls, num_gt = 1, None, num_gt.sum().reshape(1)
    else:
        raise ValueError(f"average must be 'pooled' or 'per_class', got {average!r}")

    all_tail = soft_tail_sum(s, cls, num_classes, num_bins=num_bins, sigma=sigma, exact=exact)

    # Matched candidates only: at most one per ground truth, so these M_pos x N terms are small.
    pos_s, pos_iou = s[positive], iou[positive]
    pos_cls = torch.zeros_like(pos_s, dtype=torch.long) if cls is None else cls[positive]
    tail = _tail(pos_s, num_bins, sigma)
    mass = _bin_mass(tail)
    reached = (pos_iou.detach()[:, None] >= thresholds[None, :]).to(dtype)  # (P, K)
    weights = interpolation_weights(pos_iou, thresholds, localization)  # (P, K+2)
    # Per-class sums as one matmul each: rows (class, threshold) x columns (bin).
    onehot = torch.nn.functional.one_hot(pos_cls, num_classes).to(dtype)  # (P, C)
    by_class = lambda w: (onehot[:, :, None] * w[:, None, :]).flatten(1)  # noqa: E731  (P, C*J)
    tp_tail = (by_class(reached).T @ tail).view(num_classes, k, num_bins)
    hist = (by_class(weights).T @ mass).view(num_classes, k + 2, num_bins)
    return DAPStatistics(all_tail=all_tail, tp_tail=tp_tail, hist=hist, num_gt=num_gt)


def precision_curves(stats: DAPStatistics, *, interpolate: bool = True) -> Tensor:
    """Soft precision P_alpha(i) per class, threshold and bin, (C, K, N); interpolated on request.

    Interpolated precision is the running max from the lowest score threshold upwards, i.e. the best
    precision at any higher recall, as COCO does (READING-NOTES 3).
    """
    tp, fp = stats.tp, stats.fp
    total = tp + fp
    precision = torch.where(total > 0, tp / total.clamp_min(torch.finfo(tp.dtype).tiny), 0.0)
    if interpolate:
        precision = precision.cummax(-1).values
    return precision


def ap_per_row(stats: DAPStatistics, *, interpolate: bool = True) -> tuple[Tensor, Tensor]:
    """The soft AP of each row of the statistics (each class, or whatever the labels indexed), (C,),
    and the precision curves (C, K, N). A row without ground truth has AP 0 (and no gradient)."""
    precision = precision_curves(stats, interpolate=interpolate)
    anchors = _anchor_values(precision)  # (C, K+2, N)
    k = stats.tp_tail.shape[1]
    return (anchors * stats.hist).sum((1, 2)) / (k * stats.num_gt.clamp_min(1)), precision


def dap_from_statistics(
    stats: DAPStatistics, *, interpolate: bool = True, return_precision: bool = False
):
    """DAP from (possibly all-reduced) statistics: a differentiable scalar in [0, 1].

    Classes without ground truth are left out of the mean (COCO). With no ground truth at all AP is
    undefined: the result is then 1.0 with zero gradient, so that a loss 1 - DAP adds nothing.
    """
    per_class, precision = ap_per_row(stats, interpolate=interpolate)
    present = stats.num_gt > 0
    if bool(present.any()):
        dap = per_class[present].mean()
    else:
        dap = stats.hist.sum() * 0 + 1.0
    return (dap, precision) if return_precision else dap


def differentiable_ap(
    scores: Tensor,
    positive: Tensor,
    ious: Tensor,
    num_gt: Tensor | int | float,
    *,
    labels: Tensor | None = None,
    sigma: float = 0.05,
    num_bins: int = 256,
    iou_thresholds=None,
    interpolate: bool = True,
    localization: Localization = "interp",
    average: Average = "pooled",
    return_curves: bool = False,
    exact: bool = False,
):
    """Differentiable Average Precision (Eq. 12) of M candidate detections; loss = 1 - DAP.

    Args:
        scores: (M,) candidate scores in [0, 1], any float dtype (computed in float32, or float64).
        positive: (M,) bool, True for the candidates the matcher assigned to a ground truth.
        ious: (M,) IoU of each positive with its ground truth (ignored for the others); gradients
            flow back to the boxes through it.
        num_gt: G, the number of ground-truth boxes; with average='per_class' a 1-D tensor of counts
            indexed by class id.
        labels: (M,) class id of each candidate, needed for average='per_class'.
        sigma: standard deviation of the Gaussian that smooths each score (paper: 0.05).
        num_bins: N, the number of score thresholds i/N (paper: 256).
        iou_thresholds: IoU thresholds alpha, default COCO's 0.50:0.05:0.95.
        interpolate: use interpolated precision (paper sec. 3.6, COCO).
        localization: 'interp' (L_int, Eq. 6, for training) or 'step' (L, Eq. 4, exact AP).
        average: 'pooled' (one AP over all classes, Eq. 12) or 'per_class' (COCO's class mean).
        return_curves: also return the `DAPStatistics` (soft TP/FP curves per threshold and bin)
            and the precision curves used.
        exact: compute the soft tail sum over all candidates by the exact formula, O(M x N),
            instead of the histogram kernel, O(M) (within 2e-6 per candidate; see `soft_tail_sum`).

    Returns:
        DAP as a 0-dim tensor, or (DAP, statistics, precision) if return_curves.
    """
    stats = dap_statistics(
        scores, positive, ious, num_gt, labels=labels, sigma=sigma, num_bins=num_bins,
        iou_thresholds=iou_thresholds, localization=localization, average=average, exact=exact,
    )
    dap, precision = dap_from_statistics(stats, interpolate=interpolate, return_precision=True)
    return (dap, stats, precision) if return_curves else dap


def ap_matching_cost(
    scores: Tensor,
    ious: Tensor,
    precision: Tensor | None = None,
    *,
    sigma: float = 0.05,
    num_bins: int = 256,
    iou_thresholds=None,
    exact: bool = False,
) -> Tensor:
    """Hungarian cost of assigning prediction b to ground truth g (Eq. 14), shape (Q, G).

    cost(b, g) = - sum_i ML_int(IoU(b, g), i) F(i/N, s_bg), with `scores[b, g]` = s_bg, b's score
    for g's class. `precision` (K, N) is the matcher's estimate MP (momentum mode); None means
    MP = 1 (constant mode), where the bin masses sum to one and the cost depends on the IoU alone.

    sum_i y_k(i) F(i/N, s) is a smooth function of s alone: with more (b, g) pairs than the histogram
    kernel has grid points it is computed on the grid and interpolated at each score (as
    `soft_tail_sum` does), unless `exact`.
    """
    dtype = _compute_dtype(scores, ious)
    s, iou = scores.to(dtype), ious.to(dtype)
    thresholds = _thresholds(iou_thresholds, s.device, dtype)
    weights = interpolation_weights(iou.reshape(-1), thresholds, "interp")  # (Q*G, K+2)
    if precision is None:
        # y_k(i) = k for every bin (y_{K+1} = K + 1) and the masses sum to one: no tails needed.
        y = torch.arange(thresholds.numel() + 2, device=s.device, dtype=dtype)
        return -(weights @ y).reshape(s.shape)
    anchors = _anchor_values(precision.to(device=s.device, dtype=dtype))  # (K+2, N)
    use_grid = not exact and _grid_size(sigma) <= min(_MAX_GRID, s.numel())
    if use_grid:
        grid = _kernel(num_bins, float(sigma), s.device, dtype)
        per_anchor = grid.read(_bin_mass(grid.tails) @ anchors.T, *grid.locate(s.reshape(-1)))  # (Q*G, K+2)
    else:
        per_anchor = _bin_mass(_tail(s.reshape(-1), num_bins, sigma)) @ anchors.T  # (Q*G, K+2)
    return -(weights * per_anchor).sum(1).reshape(s.shape)
