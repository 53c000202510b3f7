"""Model EMA: an exponential moving average of the weights, as the RT-DETR, D-FINE, LW-DETR and
RF-DETR authors train (their released checkpoints are EMA weights), on torch's AveragedModel.

The decay ramps up over `warmup_steps` optimizer steps as in RT-DETR's ModelEMA,
decay_t = decay * (1 - exp(-t / warmup_steps)), so that the average forgets the starting weights
at first; warmup_steps = 0 is a constant decay (LW-DETR). Buffers are averaged too (BatchNorm
statistics); integer buffers follow the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup_steps = decay, int(warmup_steps)
        # The copy starts equal to the model (AveragedModel copies on its first update as well).
        self.averaged = AveragedModel(model, multi_avg_fn=self._update, use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model: what is evaluated and saved."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def decay_at(self, updates: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1 - math.exp(-updates / self.warmup_steps))

    @torch.no_grad()
    def _update(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(int(num_averaged)))

    def update(self, model: nn.Module) -> None:
        """After an optimizer step."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict, weights: dict[str, Tensor]) -> None:
        """Restore the update count and the averaged weights (saved apart, as the checkpoint's model)."""
        self.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(int(state["updates"]))
