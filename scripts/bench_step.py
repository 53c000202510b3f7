"""Time of one training step (forward, loss, backward) with the `dap` loss against the model's
`original` loss, for every family.

    python scripts/bench_step.py                                  # tiny models, CPU
    python scripts/bench_step.py --device cuda --real-size        # DETR-R50 and RT-DETR-R50, 800 px, bf16

Both losses are timed in the same process, alternating, on the same inputs; the table reports the
median step time of each and their ratio. Real-size models use random weights (no download): the
step time does not depend on the weights. Targets are 7 boxes an image (about COCO's mean).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dapft.criterion import DAPCriterion, install_loss
from dapft.models import family_of
from dapft.tiny import TINY_FAMILIES, tiny_model

warnings.filterwarnings("ignore")


def _targets(batch: int, num_labels: int, per_image: int, device, g: torch.Generator):
    out = []
    for _ in range(batch):
        cxcy = torch.rand(per_image, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(per_image, 2, generator=g) * 0.3 + 0.05
        out.append({"class_labels": torch.randint(0, num_labels, (per_image,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return out


def real_model(name: str):
    from transformers import AutoModelForObjectDetection, DetrConfig, RTDetrConfig

    from dapft.coco_names import contiguous_id2label, detr_id2label

    if name == "detr-r50":
        labels = detr_id2label()
        cfg = DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                         auxiliary_loss=True, id2label=labels, label2id={v: k for k, v in labels.items()})
    elif name == "rtdetr-r50":
        labels = contiguous_id2label()
        cfg = RTDetrConfig(id2label=labels, label2id={v: k for k, v in labels.items()})  # defaults: R50vd
    else:
        raise ValueError(name)
    return AutoModelForObjectDetection.from_config(cfg)


def bench(model, family, loss, x, targets, steps, amp, device):
    crit = DAPCriterion(family, model.config).to(device) if loss != "original" else None
    install_loss(model, family, loss, crit)
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(pixel_values=x, labels=targets)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-size", action="store_true", help="DETR-R50 and RT-DETR-R50 at 800 px, batch 8, bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--families", default=",".join(TINY_FAMILIES))
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    if args.real_size:
        entries = [("detr-r50", real_model("detr-r50")), ("rtdetr-r50", real_model("rtdetr-r50"))]
        batch, size, amp = 8, 800, device.type == "cuda"
    else:
        entries = [(f, tiny_model(f, {i: f"c{i}" for i in range(6)})) for f in args.families.split(",")]
        batch, size, amp = args.batch, args.image, False
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, batch {batch}, {size} px, "
          f"{'bf16 autocast' if amp else 'fp32'}, median of {args.steps} steps after 2 warm-up\n")
    print("| model | original ms | dap ms | dap / original |")
    print("|---|---:|---:|---:|")
    for label, model in entries:
        model.to(device).train()
        family = family_of(model.config)
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        targets = _targets(batch, len(model.config.id2label), 7, device, g)
        # alternate the two in chunks so that drift on a noisy machine hits both alike
        orig, dap = [], []
        for _ in range(2):
            orig += bench(model, family, "original", x, targets, args.steps // 2, amp, device)
            dap += bench(model, family, "dap", x, targets, args.steps // 2, amp, device)
        o, d = statistics.median(orig) * 1000, statistics.median(dap) * 1000
        print(f"| {label} | {o:.1f} | {d:.1f} | {d / o:.3f} |", flush=True)
        model.to("cpu")


if __name__ == "__main__":
    main()
