"""What feeds the model, and what the engine adds around its step.

    python scripts/bench_pipeline.py                       # CPU: data path, loader, tiny + 384 px steps
    python scripts/bench_pipeline.py --device cuda         # + batch preparation and the 800 px bf16 step on the GPU
    python scripts/bench_pipeline.py --json out.json       # also the CPU figures as numbers
    python scripts/bench_pipeline.py --images 16 --steps 1 --workers 0,1 --tiny-only   # a smoke test

Tables (medians; ratios are within this one run):
1. Per image, one thread (as in a data-loader worker), COCO-like 640 x 480 JPEGs: decoding alone
   and a dataset item (decode + DETR's flip / random crop on the uint8 image and its boxes), both
   timed inside a real worker as it makes them for a GPU run; the checkpoint's own image processor
   (DETR's, 800 / 1333) on batches of 8 at DETR's multi-scale sizes, with their boxes (what the
   workers did before); and dapft's batch preparation (resize, normalise, pad, boxes) of the same
   batches on the device it runs on.
2. Data-loader images/s (training batches of 8, ready for the model on the device) at 0, 1, 2 and
   N workers.
3. The `dapft finetune` step (its log's `step_seconds`: waiting for data, moving it, the step,
   logging, checks) against the bare step (forward + loss + backward + clipping + optimizer, on
   one prepared batch), both in this process with the same model, loss and optimizer, with the
   default data workers (none on CPU, dapft.data.loader.default_num_workers): the bundled
   tiny RT-DETR (160 px, batch 8) and DETR-R50 (random weights) at 384 px, batch 2, on CPU; with
   --device cuda, DETR-R50 at 800 px, batch 8, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _median_ms(fn, items, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def coco_like_jpegs(root: Path, count: int) -> Path:
    """Shapes scenes at 640 x 480, saved as JPEG (quality 90), with their COCO annotations."""
    from PIL import Image

    from dapft.data.shapes import make_shapes_dataset

    src = make_shapes_dataset(root / "png", train_images=count, val_images=1, image_size=640, seed=5)
    data = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    out = root / "jpeg"
    (out / "train2017").mkdir(parents=True, exist_ok=True)
    for im in data["images"]:
        with Image.open(src / "train2017" / im["file_name"]) as pic:
            name = im["file_name"].replace(".png", ".jpg")
            pic.convert("RGB").crop((0, 0, 640, 480)).save(out / "train2017" / name, quality=90)
        im.update(file_name=name, height=480)
    anns = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        if y + h <= 480:
            anns.append(a)
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / "instances_train2017.json").write_text(json.dumps({**data, "annotations": anns}))
    return out


class _Timed(torch.utils.data.Dataset):
    """Times, inside a data-loader worker, decoding image i alone and making its dataset item."""

    def __init__(self, dataset, paths):
        self.dataset, self.paths = dataset, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from dapft.data.loader import read_image

        t0 = time.perf_counter()
        read_image(self.paths[i])
        t1 = time.perf_counter()
        self.dataset[(i, i)]
        return t1 - t0, time.perf_counter() - t1


def _in_a_worker(dataset, paths) -> tuple[float, float]:
    """Median ms of decoding and of a dataset item, as one data-loader worker makes them (one thread,
    its own RNG), twice over the images."""
    loader = torch.utils.data.DataLoader(_Timed(dataset, paths), batch_size=None, num_workers=1,
                                         sampler=list(range(len(paths))) * 2)
    times = list(loader)
    return tuple(1000 * statistics.median(t[k] for t in times) for k in (0, 1))


def data_path_table(data: Path, device: torch.device, workers: list[int]) -> dict:
    from transformers import DetrImageProcessor

    from dapft.data.labels import LabelMap
    from dapft.data.loader import (
        BatchLoader,
        CocoDetection,
        Collate,
        EpochSampler,
        TrainAugmentation,
        finish_batch,
        multi_scale_sizes,
    )
    from dapft.data.preprocess import BatchPreprocessor
    from dapft.data.splits import load_split, resolve_split

    split = load_split(resolve_split(data, "train"))
    labels = LabelMap({c["id"]: c["id"] - 1 for c in split.categories})
    processor = DetrImageProcessor()  # 800 / 1333, as the Hub's DETR and Deformable DETR checkpoints
    paths = [split.source.images / name.decode() for name in split.names]
    dataset = CocoDetection(split, labels, TrainAugmentation(640))
    decode, item = _in_a_worker(dataset, paths)
    prepare = BatchPreprocessor.from_processor(processor)
    collate = Collate(multi_scale_sizes(processor))
    batches = [collate([dataset[(i, i)] for i in range(k, k + 8)]) for k in range(0, 32, 8)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's share: before, the collator called the processor there

    def with_processor(batch):  # the same images, scale and boxes through the checkpoint's processor
        annotations = [{"image_id": i, "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 0,
                                                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
                                                        for x0, y0, x1, y1 in b.tolist()]}
                       for i, b in enumerate(batch["boxes"])]
        processor(images=batch["images"], annotations=annotations, size=batch["size"], return_tensors="pt")

    old = _median_ms(with_processor, batches, repeat=2) / 8
    torch.set_num_threads(threads)

    def prepare_one(batch):
        finish_batch(batch, prepare, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cpu":
        torch.set_num_threads(1)  # on a CPU run the workers prepare the batch
    prepare_one(batches[0])  # warm-up (kernels, allocator)
    prepare_ms = _median_ms(prepare_one, batches, repeat=3) / 8
    torch.set_num_threads(threads)
    rows = [("decode (torchvision, EXIF applied)", decode),
            ("dataset item: decode + flip/crop with boxes (as a worker makes it)", item),
            ("the checkpoint's processor on the same batches of 8, per image (before)", old),
            (f"batch preparation on {device.type} (resize, normalise, pad), per image", prepare_ms)]
    print("| per image, 1 thread | ms | x decode |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / decode:.2f} |")
    print()
    print(f"| data loader, batches of 8 ready on {device.type} | images/s |\n|---|---:|")
    for n in workers:
        sampler = EpochSampler(len(dataset), seed=0)
        loader = BatchLoader(dataset, processor, batch_size=8, train=True, num_workers=n, sampler=sampler,
                             device=device)
        it = iter(loader)
        next(it)  # workers started, first batch made
        t0, seen = time.perf_counter(), 0
        for batch in it:
            seen += len(batch["image_ids"])
        name = "0 workers (in the loop's own process)" if n == 0 else f"{n} worker{'s' if n > 1 else ''}"
        print(f"| {name} | {seen / (time.perf_counter() - t0):.1f} |", flush=True)
        del it, loader
    print()
    return {"decode_ms": decode, "item_ms": item, "processor_ms": old, "prepare_ms": prepare_ms,
            "prepare_device": device.type}


def finetune_vs_bare(model_dir: str, data: Path, out: Path, *, device: str, batch: int, steps: int, loss: str,
                     precision: str, label_map: Path | None = None, rounds: int = 2) -> tuple[float, float]:
    """Median ms of `dapft finetune` steps and of bare steps on the same objects, alternating rounds."""
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import Trainer
    from dapft.utils.device import amp_dtype

    fine, bare = [], []
    for r in range(rounds):
        run = out / f"run{r}"
        cfg = FinetuneConfig(model=model_dir, data=str(data), output=str(run), loss=loss, batch_size=batch,
                             max_steps=steps + 2, eval_before=False, max_eval_images=1, progress=False,
                             device=device, precision=precision, seed=r, label_map=str(label_map) if label_map else None)
        trainer = Trainer(cfg)
        trainer.train()
        records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        fine += [x["step_seconds"] for x in records if x["type"] == "step"][2:]
        one = next(iter(trainer.run.loaders["train"]))
        inputs = {k: one[k] for k in ("pixel_values", "pixel_mask", "labels") if k in one}
        model, optimizer, amp = trainer.run.ddp_model, trainer.run.optimizer, amp_dtype(precision, torch.device(device))
        model.train()
        for i in range(steps + 2):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
                loss_value = model(**inputs).loss
            loss_value.backward()
            torch.nn.utils.clip_grad_norm_(trainer.run.model.parameters(), trainer.cfg.clip_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:
                bare.append(time.perf_counter() - t0)
        del trainer
    return 1000 * statistics.median(fine), 1000 * statistics.median(bare)


def step_table(work: Path, device: torch.device, steps: int, tiny_only: bool = False) -> dict:
    from bench_step import _finetune_inputs, real_model

    from dapft.data.shapes import make_shapes_dataset

    shapes = make_shapes_dataset(work / "shapes192", train_images=96, val_images=2, image_size=192)
    rows = []
    for loss in ("dap", "original"):
        rows.append((f"tiny RT-DETR (bundled), 160 px, batch 8, cpu, {loss}",
                     finetune_vs_bare("dapft/tiny-rtdetr-shapes", shapes, work / f"tiny-{loss}", device="cpu",
                                      batch=8, steps=steps, loss=loss, precision="fp32")))
    if tiny_only:
        device = torch.device("cpu")  # and no real-size row
    else:
        model_dir, data, label_map = _finetune_inputs("detr-r50-384", real_model("detr-r50"), 384, work)
        rows.append(("DETR-R50, 384 px, batch 2, cpu, dap",
                     finetune_vs_bare(str(model_dir), data, work / "r50-384", device="cpu", batch=2,
                                      steps=max(3, steps // 4), loss="dap", precision="fp32", label_map=label_map)))
    if device.type == "cuda":
        model_dir, data, label_map = _finetune_inputs("detr-r50-800", real_model("detr-r50"), 800, work)
        rows.append((f"DETR-R50, 800 px, batch 8, bf16, {torch.cuda.get_device_name()}, dap",
                     finetune_vs_bare(str(model_dir), data, work / "r50-800", device="cuda", batch=8, steps=steps,
                                      loss="dap", precision="bf16", label_map=label_map)))
    print("| model | dapft finetune step ms | bare step ms | finetune / bare |\n|---|---:|---:|---:|")
    for name, (fine, bare) in rows:
        print(f"| {name} | {fine:.1f} | {bare:.1f} | {fine / bare:.3f} |", flush=True)
    tiny_fine, tiny_bare = rows[0][1]
    return {"finetune_over_bare": tiny_fine / tiny_bare, "finetune_ms": tiny_fine, "bare_ms": tiny_bare}


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # bench_step's real-size models
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="where the batch preparation (and the 800 px step) run")
    ap.add_argument("--images", type=int, default=96, help="JPEGs for the data-path figures")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (after 2 warm-up)")
    ap.add_argument("--workers", default=None, help="worker counts, e.g. 0,1,8 (default: 0, 1, 2 and the CPUs)")
    ap.add_argument("--skip-steps", action="store_true", help="only the data-path tables")
    ap.add_argument("--tiny-only", action="store_true", help="of the steps, only the bundled tiny RT-DETR's")
    ap.add_argument("--json", type=Path, help="also write the CPU figures as numbers to this file")
    args = ap.parse_args()
    from dapft.utils.console import quiet_transformers

    quiet_transformers()
    device = torch.device(args.device)
    cpus = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({0, 1, 2, cpus})
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpus} CPUs"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "") + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures = data_path_table(coco_like_jpegs(work, args.images), device, workers)
        if not args.skip_steps:
            figures.update(step_table(work, device, args.steps, args.tiny_only))
    if args.json:
        args.json.write_text(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
                                        indent=2))


if __name__ == "__main__":
    main()
