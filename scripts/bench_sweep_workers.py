"""Whether sweep workers divide a grid right: the same 4-run sweep (a tiny DETR, a few hundred
steps a run) made by one worker and by two workers sharing one output folder, as a user starts
them (`dapft sweep` subprocesses). Prints each arrangement's wall time, which worker made which
run (every run must be made exactly once), and whether every run's AP equals the one-thread single
worker's to the last digit.

    python scripts/bench_sweep_workers.py                 # about 5 minutes on 2 CPU cores
    python scripts/bench_sweep_workers.py --epochs 5
    python scripts/bench_sweep_workers.py --epochs 1 --train-images 8 --val-images 4    # a smoke test

Arrangements: one worker with 1 thread; two workers with 1 thread each (the same grid, started
together); one worker with 2 threads (the whole machine to one process). Run it on an otherwise
idle machine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def started(stderr: str) -> list[str]:
    return [line.split()[0] for line in stderr.splitlines() if line.startswith("seed=") and ":" not in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20, help="epochs of 16 steps (batch 4 of 64 images) a run")
    ap.add_argument("--train-images", type=int, default=64, help="generated shapes images")
    ap.add_argument("--val-images", type=int, default=16)
    args = ap.parse_args()

    from dapft.data.shapes import CLASSES, make_shapes_dataset
    from dapft.modeling.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_shapes_dataset(root / "data", train_images=args.train_images, val_images=args.val_images, seed=0)
        model = save_tiny_checkpoint("detr", root / "tiny", dict(enumerate(CLASSES)), image_size=96)
        sweep = [sys.executable, "-m", "dapft", "sweep", "--model", str(model), "--data", str(data), "--seed",
                 "0,1,2,3", "--loss", "dap", "--epochs", str(args.epochs), "--batch-size", "4", "--lr", "1e-4",
                 "--num-workers", "0", "--no-progress", "--device", "cpu", "--report-to", "none", "--no-gallery"]
        rows, aps = [], {}
        for name, workers, threads in (("1 worker, 1 thread", 1, 1), ("2 workers, 1 thread each", 2, 1),
                                       ("1 worker, 2 threads", 1, 2)):
            out = root / name.replace(" ", "-").replace(",", "")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*sweep, "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env) for _ in range(workers)]
            errs = [p.communicate()[1] for p in procs]
            wall = time.perf_counter() - t0
            if any(p.returncode for p in procs):
                raise SystemExit("\n".join(e[-2000:] for e in errs))
            made = [started(e) for e in errs]
            everything = sorted(r for m in made for r in m)
            summary = json.loads((out / "sweep.json").read_text())
            aps[name] = [r["AP"] for r in summary["runs"]]
            rows.append((name, wall, made, everything == [f"seed={s}" for s in range(4)]))
        reference = aps["1 worker, 1 thread"]
        print(f"\n4 runs of {-(-args.train_images // 4) * args.epochs} steps (tiny DETR, batch 4), each evaluated once "
              "before (shared) "
              "and after\n")
        print("| arrangement | wall time (s) | vs 1 worker, 1 thread | runs each worker made | each run once | "
              "APs equal to 1 worker, 1 thread |")
        print("|---|---:|---:|---|---|---|")
        for name, wall, made, once in rows:
            print(f"| {name} | {wall:.1f} | {wall / rows[0][1]:.2f} | "
                  + "; ".join(", ".join(m) for m in made) + f" | {'yes' if once else 'NO'} | "
                  + ("yes" if aps[name] == reference else f"no ({aps[name]} vs {reference})") + " |")


if __name__ == "__main__":
    main()
