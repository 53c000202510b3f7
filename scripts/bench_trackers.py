"""What reporting to a tracker costs a run: the same short fine-tune of a tiny DETR with
`--report-to none`, `tensorboard`, `mlflow` (a local sqlite store) and `wandb` (offline), each
`--repeats` times in turn, in subprocesses as a user runs them. Prints the training time of each
(report.json's train_seconds: the steps, the evaluations and the checkpoints, not the start-up),
its median over the repeats and the ratio to `none`, and the whole command's time (start-up,
tracker set-up and the final upload included).

    python scripts/bench_trackers.py                    # about 8 minutes on 2 CPU cores
    python scripts/bench_trackers.py --epochs 4 --repeats 1
    python scripts/bench_trackers.py --epochs 1 --repeats 1 --trackers none,mlflow --train-images 8 --val-images 4

Trackers receive each step's metrics in batches, at most every 15 s and at every checkpoint; a step
never waits on them. Run it on an otherwise idle machine."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="epochs of 16 steps (batch 4 of 64 images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trackers", default="none,tensorboard,mlflow,wandb")
    ap.add_argument("--train-images", type=int, default=64, help="generated shapes images")
    ap.add_argument("--val-images", type=int, default=16)
    args = ap.parse_args()

    from dapft.data.shapes import CLASSES, make_shapes_dataset
    from dapft.modeling.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_shapes_dataset(root / "data", train_images=args.train_images, val_images=args.val_images, seed=0)
        model = save_tiny_checkpoint("detr", root / "tiny", dict(enumerate(CLASSES)), image_size=96)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "WANDB_MODE": "offline",
               "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        times: dict[str, list[float]] = {t: [] for t in args.trackers.split(",")}
        walls: dict[str, list[float]] = {t: [] for t in times}
        steps = 0
        for k in range(args.repeats):
            for tracker in times:  # interleaved: a slow spell of the machine hits every tracker alike
                out = root / f"{tracker}-{k}"
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "dapft", "finetune", "--model", str(model), "--data",
                                       str(data), "--output", str(out), "--epochs", str(args.epochs), "--eval-every",
                                       str(args.epochs), "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
                                       "--no-progress", "--report-to", tracker, "--no-eval-before"],
                                      capture_output=True, text=True, env=env, cwd=root)
                if proc.returncode != 0:
                    raise SystemExit(f"{tracker}: {proc.stderr[-2000:]}")
                report = json.loads((out / "report.json").read_text())
                times[tracker].append(report["train_seconds"])
                walls[tracker].append(time.perf_counter() - t0)
                steps = report["global_steps"]
                print(f"{tracker:12s} run {k + 1}: {report['train_seconds']:.1f} s training, "
                      f"{time.perf_counter() - t0:.1f} s in all", file=sys.stderr, flush=True)
    base = statistics.median(times["none"]) if "none" in times else None
    print(f"\n{steps} optimizer steps and one evaluation a run, {args.repeats} runs each\n")
    print("| --report-to | training time, each run (s) | median (s) | vs none | the command, median (s) |\n"
          "|---|---|---:|---:|---:|")
    for tracker, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:.3f}" if base else "—"
        print(f"| {tracker} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | {ratio} | "
              f"{statistics.median(walls[tracker]):.1f} |")


if __name__ == "__main__":
    main()
