"""Which families export to ONNX, how close the file is to PyTorch, and what it costs on a CPU.

For the two bundled detectors and a tiny model of every family (built from its config, then fitted
for --fit-steps steps of its own loss on 16 generated shapes images, so that its queries do not all
score alike), on --val-images generated shapes validation images:

1. `dapft export` with its defaults; a family refused for its sizes is exported again with
   --image-size at the size its processor gives these images; a family that cannot be exported at
   all is listed with the line that refuses it.
2. The largest difference of the logits and of the boxes between ONNX Runtime and PyTorch, on the
   export's check batch (export.json).
3. COCO AP of `dapft eval` through the file and through the checkpoint, on the same images.
4. CPU latency of one image at the export's size: ONNX Runtime against PyTorch eager
   (torch.no_grad), the median of --repeats runs of each, alternating, in this process.

    python scripts/bench_export.py                                   # every family, ~5 minutes on 2 cores
    python scripts/bench_export.py --families rt_detr,detr --fit-steps 2 --val-images 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUNDLED = ("dapft/tiny-rtdetr-shapes", "dapft/tiny-deformable-detr-shapes")


def fitted(family: str, path: Path, data: Path, steps: int) -> Path:
    """A tiny model of `family`, trained `steps` steps with its own loss on the first 16 images."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.shapes import CLASSES
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.tiny import save_tiny_checkpoint

    save_tiny_checkpoint(family, path, dict(enumerate(CLASSES)), image_size=128)
    model = AutoModelForObjectDetection.from_pretrained(path).train()
    split = load_split(resolve_split(data, "train"), max_images=16, progress=False)
    labels = LabelMap({c["id"]: c["id"] - 1 for c in split.categories})
    loader = BatchLoader(CocoDetection(split, labels), AutoImageProcessor.from_pretrained(path), batch_size=8,
                         train=False, num_workers=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = list(loader)
    for step in range(steps):
        batch = batches[step % len(batches)]
        inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask") if k in batch}
        optimizer.zero_grad()
        model(**inputs, labels=batch["labels"]).loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path


def latency(detector, onnx, size: tuple[int, int], repeats: int) -> tuple[float, float]:
    """Median ms of one image through PyTorch eager and through ONNX Runtime, alternating."""
    x = {"pixel_values": torch.rand(1, 3, *size), "pixel_mask": torch.ones(1, *size, dtype=torch.long)}
    torch_ms, onnx_ms = [], []
    with torch.no_grad():
        detector(**x), onnx(**x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            detector(**x)
            torch_ms.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            onnx(**x)
            onnx_ms.append(1000 * (time.perf_counter() - t0))
    return statistics.median(torch_ms), statistics.median(onnx_ms)


def measure(name: str, checkpoint: str, data: Path, work: Path, repeats: int) -> dict:
    from dapft.analysis.checkpoint_eval import evaluate_model
    from dapft.modeling.export import ExportError, OnnxDetector, export
    from dapft.modeling.loading import load_detector

    row = {"model": name}
    out = work / name.replace("/", "-")
    try:
        try:
            result = export(checkpoint, out, log=lambda *a, **k: None)
        except ExportError as exc:
            if "--image-size" not in str(exc):
                raise
            row["note"] = "fixed size (its graph keeps feature map sizes)"
            result = export(checkpoint, out, image_size=_processed_size(checkpoint, data), log=lambda *a, **k: None)
    except ExportError as exc:
        return {**row, "exports": False, "refused": str(exc)}
    row.update(exports=True, size=result.image_size, logits=result.max_diff_logits, boxes=result.max_diff_boxes)
    aps = {}
    for kind, model in (("torch", checkpoint), ("onnx", str(result.file))):
        metrics = evaluate_model(model, str(data), output=work / f"eval-{out.name}-{kind}", batch_size=8,
                                 num_workers=0, progress=False, report_to="none", gallery=False, device="cpu")
        aps[kind] = metrics["stats"]["AP"]
    row.update(ap_torch=aps["torch"], ap_onnx=aps["onnx"])
    detector = load_detector(checkpoint, log=lambda *a: None)[0].eval()
    size = result.image_size or _processed_size(checkpoint, data)
    row["torch_ms"], row["onnx_ms"] = latency(detector, OnnxDetector(result.file), size, repeats)
    return row


def _processed_size(checkpoint: str, data: Path) -> tuple[int, int]:
    """The size the checkpoint's processor gives the data's (square) validation images."""
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.loading import load_detector

    _, processor, _ = load_detector(checkpoint, log=lambda *a: None)
    split = load_split(resolve_split(data, "val"), max_images=1, progress=False)
    batch = next(iter(BatchLoader(CocoDetection(split, LabelMap({c["id"]: c["id"] - 1 for c in split.categories})),
                                  processor, batch_size=1, train=False, num_workers=0)))
    return tuple(int(s) for s in batch["pixel_values"].shape[2:])


def main() -> None:
    from dapft.data.shapes import make_shapes_dataset
    from dapft.modeling.tiny import TINY_FAMILIES
    from dapft.utils.console import quiet_transformers

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(TINY_FAMILIES), help="tiny families to build, fit and export")
    ap.add_argument("--bundled", action=argparse.BooleanOptionalAction, default=True, help="the bundled detectors too")
    ap.add_argument("--fit-steps", type=int, default=60)
    ap.add_argument("--val-images", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_shapes_dataset(work / "shapes", train_images=16, val_images=args.val_images, seed=1)
        models = [(name, name) for name in BUNDLED] if args.bundled else []
        for family in [f for f in args.families.split(",") if f]:
            models.append((f"tiny {family}", str(fitted(family, work / f"tiny-{family}", data, args.fit_steps))))
        for name, checkpoint in models:
            rows.append(measure(name, checkpoint, data, work, args.repeats))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.val_images} validation images, tiny "
          f"models fitted {args.fit_steps} steps, latency: one image, median of {args.repeats}, CPU "
          f"({torch.get_num_threads()} threads)\n")
    print("| model | exports | size | max diff logits | max diff boxes | AP PyTorch | AP ONNX | CPU ms PyTorch | "
          "CPU ms ONNX Runtime | ONNX / PyTorch |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["exports"]:
            print(f"| {r['model']} | no: {r['refused']} | | | | | | | | |")
            continue
        size = "x".join(map(str, r["size"])) if r["size"] else "any"
        print(f"| {r['model']} | yes{' (' + r['note'] + ')' if r.get('note') else ''} | {size} | {r['logits']:.1e} | "
              f"{r['boxes']:.1e} | {100 * r['ap_torch']:.2f} | {100 * r['ap_onnx']:.2f} | {r['torch_ms']:.1f} | "
              f"{r['onnx_ms']:.1f} | {r['onnx_ms'] / r['torch_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=list))


if __name__ == "__main__":
    main()
