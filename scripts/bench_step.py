"""Time of one training step (forward, loss, backward) with the `dap` loss against the model's
`original` loss, for every family.

    python scripts/bench_step.py                                  # tiny models, CPU
    python scripts/bench_step.py --real-size                      # DETR-R50, RT-DETR-R50: 384 px, batch 2, CPU
    python scripts/bench_step.py --real-size --finetune           # the same, timed through `dapft finetune`
    python scripts/bench_step.py --device cuda --real-size        # 800 px, batch 8, bf16, + peak GPU memory

Both losses are timed in the same process (or, with --finetune, in runs started one after the
other), alternating, on the same inputs; the table reports the median step time of each and their
ratio, and on CUDA (bare loop) each loss's peak `torch.cuda.max_memory_allocated`. Real-size models
use random weights (no download): the step time does not depend on the weights, and they keep
COCO's label set (80 / 91 classes: DAP's candidates are queries x classes).
Targets are 7 boxes an image (about COCO's mean); --finetune uses the shapes data set (1-8 objects
an image) mapped onto COCO classes, and reads each step's own `step_seconds` from log.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dapft.modeling.families import family_of
from dapft.modeling.tiny import TINY_FAMILIES, tiny_model
from dapft.objective.criterion import DAPCriterion
from dapft.objective.detection_loss import install_loss

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

    from dapft.data.coco_names import contiguous_id2label, detr_id2label

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


def bench(model, family, loss, x, targets, steps, amp, device, matcher="original"):
    crit = DAPCriterion(family, model.config, matcher=matcher).to(device) if loss != "original" else None
    install_loss(model, family, loss, crit)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
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
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return times, peak


def finetune_step_times(model_dir, data, label_map, loss: str, args, device, out) -> list[float]:
    """Median-able step times of a real `dapft finetune` run: its log's per-step `step_seconds`."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dapft", "finetune", "--model", str(model_dir), "--data", str(data),
           "--output", str(out), "--loss", loss, "--max-steps", str(args.steps + 2), "--batch-size", str(args.batch),
           "--no-eval-before", "--max-eval-images", "1", "--num-workers", "1", "--no-progress",
           "--device", str(device), "--no-augment", "--precision", "bf16" if device.type == "cuda" else "fp32",
           "--matcher", args.matcher]
    if label_map is not None:
        cmd += ["--label-map", str(label_map)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["step_seconds"] for r in steps if r["type"] == "step"][2:]  # after 2 warm-up steps


def _finetune_inputs(label, model, image: int, work):
    """A from_pretrained directory for `model` (processor resizing to `image`), a shapes data set at
    that size, and, for COCO-labelled models, a label map sending the shapes onto COCO classes."""
    import json

    from dapft.data.shapes import CLASSES, make_shapes_dataset
    from dapft.modeling.tiny import tiny_processor

    model_dir = work / label
    model.save_pretrained(model_dir)
    family = model.config.model_type.replace("-", "_")
    tiny_processor("dab_detr" if family == "dab_detr" else family, image).save_pretrained(model_dir)
    data = work / f"shapes{image}"
    if not data.exists():
        make_shapes_dataset(data, train_images=64, val_images=2, image_size=image)
    names = {v: int(k) for k, v in model.config.id2label.items()}
    if set(CLASSES) <= set(names):
        return model_dir, data, None
    coco = ["sports ball", "tv", "kite", "frisbee", "clock", "stop sign"]  # one COCO class per shape
    label_map = work / f"{label}-labels.json"
    label_map.write_text(json.dumps({str(k + 1): names[c] for k, c in enumerate(coco)}))
    return model_dir, data, label_map


def main() -> None:
    import tempfile
    from pathlib import Path

    from dapft.data.shapes import CLASSES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-size", action="store_true",
                    help="DETR-R50 and RT-DETR-R50 (default 384 px, batch 2 on CPU; 800 px, batch 8, bf16 on CUDA)")
    ap.add_argument("--finetune", action="store_true",
                    help="time steps through `dapft finetune` runs (log.jsonl step_seconds), not a bare loop")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, help="images a step (default: 4 tiny, 2 real-size CPU, 8 CUDA)")
    ap.add_argument("--image", type=int, help="image side in pixels (default: 128 tiny, 384 CPU, 800 CUDA)")
    ap.add_argument("--families", default=",".join(TINY_FAMILIES))
    ap.add_argument("--matcher", default="original", help="DAP's matcher (finetune's default: original)")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bars would break the table
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if args.real_size:
        entries = [("detr-r50", real_model("detr-r50")), ("rtdetr-r50", real_model("rtdetr-r50"))]
        args.batch, args.image = args.batch or (8 if cuda else 2), args.image or (800 if cuda else 384)
    else:
        labels = dict(enumerate(CLASSES))
        entries = [(f, tiny_model(f, labels)) for f in args.families.split(",")]
        args.batch, args.image = args.batch or 4, args.image or 128
    amp = cuda
    name = torch.cuda.get_device_name() if cuda else "cpu"
    how = "through dapft finetune (step_seconds)" if args.finetune else "bare forward+loss+backward"
    print(f"device {device} ({name}), torch {torch.__version__}, batch {args.batch}, {args.image} px, "
          f"{'bf16 autocast' if amp else 'fp32'}, {how}, matcher {args.matcher}, median of {args.steps} steps "
          "after 2 warm-up, "
          f"{time.strftime('%Y-%m-%d')}\n")
    memory = cuda and not args.finetune  # peak GPU memory of the step, read in this process
    print("| model | original ms | dap ms | dap / original |" + (" original peak GiB | dap peak GiB |" if memory else ""))
    print("|---|---:|---:|---:|" + ("---:|---:|" if memory else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, model in entries:
            # alternate the two in chunks so that drift on a noisy machine hits both alike
            orig, dap, peaks = [], [], {"original": 0.0, "dap": 0.0}
            if args.finetune:
                model_dir, data, label_map = _finetune_inputs(label, model, args.image, work)
                for k in range(2):
                    for loss, times in (("original", orig), ("dap", dap)):
                        times += finetune_step_times(model_dir, data, label_map, loss, args, device,
                                                     work / f"{label}-{loss}-{k}")
            else:
                model.to(device).train()
                family = family_of(model.config)
                x = torch.randn(args.batch, 3, args.image, args.image, generator=g).to(device)
                targets = _targets(args.batch, len(model.config.id2label), 7, device, g)
                for _ in range(2):
                    for loss, times in (("original", orig), ("dap", dap)):
                        t, peak = bench(model, family, loss, x, targets, args.steps // 2, amp, device, args.matcher)
                        times += t
                        peaks[loss] = max(peaks[loss], peak)
                model.to("cpu")
            o, d = statistics.median(orig) * 1000, statistics.median(dap) * 1000
            mem = f" {peaks['original'] / 1024:.2f} | {peaks['dap'] / 1024:.2f} |" if memory else ""
            print(f"| {label} | {o:.1f} | {d:.1f} | {d / o:.3f} |{mem}", flush=True)


if __name__ == "__main__":
    main()
