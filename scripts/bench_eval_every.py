"""What an evaluation after every epoch costs a long training, and what --eval-every N saves.

    python scripts/bench_eval_every.py                     # bundled tiny RT-DETR, 3 epochs, CPU
    python scripts/bench_eval_every.py --epochs 3 --workers 2
    python scripts/bench_eval_every.py --epochs 2 --train-images 16 --val-images 8    # a smoke test

Runs `dapft finetune` (a real subprocess, default flags otherwise) on the generated shapes data the
bundled detectors are trained on (800 training, 200 validation images, batch 8: 100 steps an
epoch), evaluating after every epoch, then reads back what each part took: the epoch's steps (the
log's `step_seconds`, which include waiting for data) and each evaluation (inference and COCO
evaluation, from `eval/<epoch>/metrics.json`). Prints per epoch, then the share of a training's
wall time that evaluations take at --eval-every 1, 2, 4 and 10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dapft/tiny-rtdetr-shapes")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="--num-workers (default: dapft's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-images", type=int, default=800, help="generated shapes images (the bundled detectors')")
    ap.add_argument("--val-images", type=int, default=200)
    args = ap.parse_args()

    from dapft.data.shapes import make_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes_dataset(Path(tmp) / "shapes", train_images=args.train_images, val_images=args.val_images,
                                   image_size=192, seed=0)
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dapft", "finetune", "--model", args.model, "--data", str(data),
               "--output", str(run), "--epochs", str(args.epochs), "--eval-every", "1", "--no-eval-before",
               "--no-progress", "--device", args.device, "--loss", "original"]
        if args.workers is not None:
            cmd += ["--num-workers", str(args.workers)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        rows = []
        for epoch in range(1, args.epochs + 1):
            steps = [r["step_seconds"] for r in records if r["type"] == "step" and r["epoch"] == epoch]
            ev = json.loads((run / "eval" / f"epoch{epoch:03d}" / "metrics.json").read_text())
            rows.append((epoch, len(steps), sum(steps), ev["inference_seconds"] + ev["eval_seconds"],
                         ev["images_per_second"]))

    print(f"`dapft finetune --model {args.model}`, {args.epochs} epochs, --eval-every 1, device {args.device}; "
          f"whole command {wall:.0f} s\n")
    print(f"| epoch | steps | training s | evaluation s ({args.val_images} images) | eval images/s |")
    print("|---:|---:|---:|---:|---:|")
    for epoch, n, train_s, eval_s, ips in rows:
        print(f"| {epoch} | {n} | {train_s:.1f} | {eval_s:.1f} | {ips:.0f} |")
    train_s = statistics.median(r[2] for r in rows)
    eval_s = statistics.median(r[3] for r in rows)
    print(f"\nan evaluation costs {eval_s / train_s:.1%} of an epoch's training (medians)\n")
    print("| --eval-every | evaluations' share of the training's wall time |")
    print("|---:|---:|")
    for n in (1, 2, 4, 10):
        print(f"| {n} | {eval_s / (n * train_s + eval_s):.1%} |")


if __name__ == "__main__":
    main()
