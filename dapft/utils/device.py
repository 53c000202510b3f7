"""The device a run computes on, its mixed precision, and seeding."""

from __future__ import annotations

import random


def pick_device(name: str | None = None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def amp_dtype(precision: str, device):
    """bf16/fp16 autocast on GPU; float32 on CPU whatever is asked (CPU autocast is slow and inexact)."""
    if precision not in ("auto", "bf16", "fp16", "fp32", "float32", "no"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision in ("fp32", "float32", "no"):
        return None
    import torch

    if precision in ("auto", "bf16"):
        return torch.bfloat16 if (precision == "bf16" or torch.cuda.is_bf16_supported()) else torch.float16
    return torch.float16  # fp16


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
