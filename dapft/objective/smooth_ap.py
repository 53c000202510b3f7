"""Smooth-AP (Brown et al., 2020), the pairwise ranking relaxation DAP is contrasted with (paper
sec. 3.4). Kept for comparison only: it is O(M^2) in time and memory, and not sign-consistent."""

from __future__ import annotations

import torch
from torch import Tensor


def smooth_ap(scores: Tensor, positive: Tensor, *, tau: float = 0.01) -> Tensor:
    """AP with each rank replaced by a sum of sigmoids of score differences, ((s_j - s_i) / tau)."""
    positive = positive.bool()
    diff = torch.sigmoid((scores[None, :] - scores[:, None]) / tau)  # [i, j]: j ranked above i
    diff = diff * (1 - torch.eye(len(scores), dtype=diff.dtype, device=diff.device))
    rank_all = 1 + diff.sum(1)
    rank_pos = 1 + (diff * positive[None, :]).sum(1)
    return (rank_pos / rank_all)[positive].mean()
