"""What a COCO-train-sized annotation set costs dapft: start-up and memory.

Generates (once, into --work) a COCO-format training split of COCO train2017's size: 118,287 small
JPEG images (distinct files; their sizes in the JSON), about 7.3 boxes an image (Poisson), COCO's
80 categories with their ids, a polygon of 24 points for each object as COCO's files carry, and a
500-image validation split. Then, each in a fresh process, the time and the process's peak resident
memory (VmHWM) of:

1. Reading the training file: `json.load` (the standard parser), `orjson.loads` (when installed)
   and dapft's reader (`dapft.data.coco_file.read_coco_file`: the file as the columns dapft keeps).
2. The training split as a run reads it (dapft.data.splits.load_split, dapft.data.loader.CocoDetection and
   BatchLoader, augmented and prepared in 2 workers, batches of 16), until each worker has read at
   least 10,000 items: the main process's peak, and each worker's unique (private) memory after
   about 1,200 items and at the end (Linux: /proc/PID/smaps_rollup). A worker forked with the
   annotation set as Python objects copies every page whose reference counts it touches.
3. `dapft finetune --max-steps 1` of a tiny RT-DETR with COCO's labels on the split, twice: the
   first start decodes every image once (the image check), the second finds its verdicts cached.
   Wall time of the whole command (its one step and an evaluation of 8 images are a second) and
   its main process's peak.

    python scripts/bench_coco_scale.py --json runs/coco-scale.json        # about 5 minutes, 2 cores
    python scripts/bench_coco_scale.py --images 20000 --json small.json    # a quicker look
    python scripts/bench_coco_scale.py --images 200 --per-worker 100 --work /tmp/c   # a smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np


def generate(root: Path, images: int, seed: int = 0) -> Path:
    """The COCO layout under root (kept: generated once per size)."""
    done = root / f"done-{images}"
    if done.exists():
        return root
    from PIL import Image

    from dapft.data.coco_names import detr_id2label

    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": n, "supercategory": "thing"} for i, n in detr_id2label().items() if n != "N/A"]
    cat_ids = np.array([c["id"] for c in cats])
    sizes = [(40, 30), (32, 32), (48, 36), (30, 40)]
    templates = {}
    for s in sizes:  # a few distinct small photos' bytes per size, written under every name
        for k in range(8):
            path = root / "template.jpg"
            root.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (s[1], s[0], 3), dtype=np.uint8)).save(path, quality=90)
            templates.setdefault(s, []).append(path.read_bytes())
    for split, count in (("train2017", images), ("val2017", 500)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        data = {"info": {"description": "generated, COCO-sized"}, "licenses": [], "categories": cats,
                "images": [], "annotations": []}
        for i in range(1, count + 1):
            w, h = sizes[i % len(sizes)]
            name = f"{i:012d}.jpg"
            (folder / name).write_bytes(templates[(w, h)][i % 8])
            data["images"].append({"id": i, "file_name": name, "width": w, "height": h, "license": 1,
                                   "date_captured": "2013-11-14 11:18:45"})
            for _ in range(rng.poisson(7.3)):
                bw, bh = rng.uniform(2, w), rng.uniform(2, h)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                angles = np.sort(rng.uniform(0, 2 * np.pi, 24))
                poly = np.stack([x + bw / 2 * (1 + np.cos(angles)), y + bh / 2 * (1 + np.sin(angles))], 1)
                data["annotations"].append({
                    "id": len(data["annotations"]) + 1, "image_id": i, "category_id": int(rng.choice(cat_ids)),
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": round(bw * bh * 0.7, 2),
                    "iscrowd": 0, "segmentation": [np.round(poly.reshape(-1), 2).tolist()]})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (root / "template.jpg").unlink(missing_ok=True)
    done.touch()
    return root


def run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


PEAK = 'int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024'

READ = """
import json, sys, time
t0 = time.perf_counter()
if {how!r} == "json.load":
    with open({path!r}) as f:
        data = json.load(f)
elif {how!r} == "orjson.loads":
    import orjson
    with open({path!r}, "rb") as f:
        data = orjson.loads(f.read())
else:
    from pathlib import Path
    from dapft.data.coco_file import read_coco_file
    data = read_coco_file(Path({path!r}))
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mb": {peak}}}))
"""

# The CLI as `python -m dapft` runs it, with the main process's peak written when it exits
# (forked data-loader workers leave through os._exit and write nothing).
FINETUNE = """
import atexit, os, sys
main = os.getpid()
atexit.register(lambda: os.getpid() == main and open({out!r}, "w").write(str({peak})))
sys.argv = ["dapft", *{args!r}]
from dapft.cli import run
run()
"""

WORKERS = """
import json, os, time
from transformers import AutoImageProcessor
from dapft.data.labels import LabelMap; from dapft.data.splits import load_split, resolve_split
from dapft.data.loader import BatchLoader, CocoDetection

def uss(pid):  # unique (private) memory, MB
    fields = dict(l.split(":", 1) for l in open(f"/proc/{{pid}}/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024

split = load_split(resolve_split({root!r}, "train"), check=False)
processor = AutoImageProcessor.from_pretrained({model!r})
mapping = LabelMap.build(split.categories, {{int(k): v for k, v in json.load(open({model!r} + "/config.json"))["id2label"].items()}})
loader = BatchLoader(CocoDetection(split, mapping), processor, batch_size=16, train=True, num_workers=2)
workers, early, early_items, read = None, None, 0, 0
for batch in loader:
    read += len(batch["image_ids"])
    if workers is None:
        workers = [w.pid for w in loader.loader._iterator._workers]
    if early is None and read >= min(2400, {per_worker}):
        early, early_items = [uss(p) for p in workers], read
    if read >= 2 * {per_worker}:
        break
late = [uss(p) for p in workers]
print(json.dumps({{"items_read": read, "worker_uss_mb_at_1200": early, "early_items": early_items,
                  "worker_uss_mb_at_end": late,
                  "main_peak_rss_mb": int(next(l for l in open("/proc/self/status")
                                              if l.startswith("VmHWM")).split()[1]) / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--work", default="runs/coco-scale", help="Where the generated set is kept.")
    ap.add_argument("--json", help="Write the numbers here too.")
    ap.add_argument("--per-worker", type=int, default=10_000, help="Items each worker reads.")
    args = ap.parse_args()

    from dapft.data.coco_names import detr_id2label
    from dapft.modeling.tiny import save_tiny_checkpoint

    root = Path(args.work) / f"coco-{args.images}"
    t0 = time.perf_counter()
    generate(root, args.images)
    train = root / "annotations" / "instances_train2017.json"
    out = {"images": args.images, "annotation_file_mb": round(train.stat().st_size / 2**20, 1),
           "generate_seconds": round(time.perf_counter() - t0, 1)}
    readers = ["json.load", "dapft"] + (["orjson.loads"] if importlib.util.find_spec("orjson") else [])
    out["read"] = {how: run_python(READ.format(how=how, path=str(train), peak=PEAK)) for how in readers}
    model = Path(args.work) / "tiny-rtdetr-coco"
    if not model.exists():
        save_tiny_checkpoint("rt_detr", model, {i: n for i, n in enumerate(v for v in detr_id2label().values()
                                                                           if v != "N/A")})
    out["workers"] = run_python(WORKERS.format(root=str(root), model=str(model.resolve()),
                                               per_worker=args.per_worker))
    cache = Path(args.work) / f"cache-{args.images}"
    env = {**os.environ, "DAPFT_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    out["finetune_1_step"] = {}
    for attempt in ("first", "second"):
        run = Path(args.work) / f"run-{args.images}-{attempt}"
        subprocess.run(["rm", "-rf", str(run)] + ([str(cache)] if attempt == "first" else []), check=True)
        peak_file = Path(args.work) / "peak.txt"
        argv = ["finetune", "--model", str(model), "--data", str(root), "--output", str(run), "--max-steps", "1",
                "--no-eval-before", "--max-eval-images", "8", "--batch-size", "4", "--num-workers", "2",
                "--no-progress", "--device", "cpu", "--report-to", "none", "--no-gallery"]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FINETUNE.format(out=str(peak_file), peak=PEAK,
                                                                                      args=argv))],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        out["finetune_1_step"][attempt] = {"seconds": round(time.perf_counter() - t, 1),
                                           "main_peak_rss_mb": float(peak_file.read_text())}
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def table(out: dict) -> str:
    json_load = out["read"]["json.load"]["seconds"]
    rows = [(f"read the file: {how}", f"{r['seconds']:.1f} s ({r['seconds'] / json_load:.2f}x json.load)",
             f"{r['peak_rss_mb']:.0f} MB") for how, r in out["read"].items()]
    w = out["workers"]
    rows.append((f"read {w['items_read']} items, 2 workers: main process", "", f"{w['main_peak_rss_mb']:.0f} MB"))
    rows.append((f"each worker's private memory, ~{w['early_items'] // 2:,} items", "",
                 ", ".join(f"{v:.0f} MB" for v in w["worker_uss_mb_at_1200"])))
    rows.append((f"each worker's private memory, {w['items_read'] // 2} items", "",
                 ", ".join(f"{v:.0f} MB" for v in w["worker_uss_mb_at_end"])))
    for attempt, r in out["finetune_1_step"].items():
        rows.append((f"dapft finetune --max-steps 1, {attempt} start",
                     f"{r['seconds']:.1f} s ({r['seconds'] / json_load:.2f}x json.load)", f"{r['main_peak_rss_mb']:.0f} MB"))
    lines = [f"{out['images']} images, a {out['annotation_file_mb']} MB annotation file",
             "| what | time | peak / private memory |", "|---|---:|---:|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


if __name__ == "__main__":
    main()
