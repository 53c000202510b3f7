"""Run by tests/test_distributed.py under `torchrun` (gloo, CPU), or alone as the 1-process reference.

A stand-in detector whose outputs are parameters: the DAP criterion, DistributedDataParallel and
the all-reduce of DAP's statistics are the real ones. Each process takes its share of the batch
exactly as EpochSampler shards it (every K-th image); gradients are written to OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dapft.modeling.families import FAMILIES
from dapft.objective.criterion import DAPCriterion, all_reduce_statistics
from dapft.utils.distributed import init_distributed

IMAGES, QUERIES, CLASSES = 8, 12, 4


class Outputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = torch.nn.Parameter(torch.randn(IMAGES, QUERIES, CLASSES, generator=g) * 2)
        cxcy = torch.rand(IMAGES, QUERIES, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(IMAGES, QUERIES, 2, generator=g) * 0.2 + 0.1
        self.boxes = torch.nn.Parameter(torch.cat([cxcy, wh], -1))

    def forward(self, idx):
        return self.logits[idx], self.boxes[idx].clamp(0.01, 0.99)


def targets_for(idx, model):
    g = torch.Generator().manual_seed(1)
    all_targets = []
    for i in range(IMAGES):  # ground truth near some predictions, so that there is signal
        n = 1 + i % 3
        q = torch.randperm(QUERIES, generator=g)[:n]
        jitter = (torch.rand(n, 4, generator=g) - 0.5) * 0.04
        all_targets.append({"class_labels": model.logits[i, q].detach().argmax(-1),
                            "boxes": (model.boxes[i, q].detach() + jitter).clamp(0.02, 0.98)})
    return [all_targets[i] for i in idx]


def main(out: Path, matcher: str) -> None:
    info = init_distributed("cpu")
    model = Outputs()
    net = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
    crit = DAPCriterion(FAMILIES["deformable_detr"], None, matcher=matcher, sigma=0.05, num_bins=64,
                        reduce_stats=all_reduce_statistics, dap_scale=float(info.world_size))
    idx = list(range(IMAGES))[info.rank :: info.world_size]
    logits, boxes = net(torch.tensor(idx))
    terms = crit([{"logits": logits, "pred_boxes": boxes}], targets_for(idx, model))
    terms["loss_dap"].backward()
    torch.save({"dap": float(terms["dap"]), "logits_grad": model.logits.grad, "boxes_grad": model.boxes.grad,
                "ema": crit.matcher.precision_ema.clone()}, out / f"rank{info.rank}.pt")
    if info.enabled:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "constant")
