"""The paper's fine-tuning claim, measured on the bundled tiny detectors (each trained from scratch
with its own loss to a plateau) and the shapes data they were trained on, with `dapft sweep` (the
library function behind it).

    OMP_NUM_THREADS=1 python scripts/reproduce.py --model dapft/tiny-rtdetr-shapes
    OMP_NUM_THREADS=1 python scripts/reproduce.py --model dapft/tiny-deformable-detr-shapes
    python scripts/reproduce.py --seeds 2 --grid loss                  # a quicker look, every model
    python scripts/reproduce.py --quick --seeds 1 --grid loss --model dapft/tiny-rtdetr-shapes --work /tmp/r

From the same weights, with the paper's schedule relative to how each detector was trained (the
checkpoint's `dapft_recipe.yaml`: its rate / 10, / 100 in the last epoch, 10% of its epochs, at most
12), no model EMA in any arm, the last evaluation's AP reported, 100 training images scored too:
- `loss`: the control the paper lacked. The model's own loss against `dap` and `dap+original`
  (the model's own matcher), seeds 0..N-1, paired by seed. Every model.
- `matcher` (the paper's Table 2): `dap` with the constant, momentum and original matchers against
  the original loss, 3 seeds. The Deformable DETR (the paper's baseline for it).
- `sigma` (Figure 3b): `dap` at sigma 0.01, 0.05, 0.1 against the original loss, 3 seeds. The
  Deformable DETR.
A model's grids share one directory, so a run two grids name alike (the original loss, seed 0, in
all three) runs once. Runs are resumable: the same command again keeps finished runs and resumes an
interrupted one. Each grid's table and plot go to WORK/<model>/<grid>.md and .png (each sweep
rewrites sweep.md); all of them are printed and written to WORK/tables.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dapft.data.shapes import make_shapes_dataset  # noqa: E402
from dapft.modeling.loading import BUNDLED_DIR, bundled_models  # noqa: E402
from dapft.sweeps.grid import sweep  # noqa: E402
from dapft.training.config import FinetuneConfig  # noqa: E402
from dapft.utils.signals import TrainingInterrupted  # noqa: E402

GRIDS = {  # seeds: None takes --seeds
    "loss": ({"loss": ["original", "dap", "dap+original"], "matcher": ["original"]}, None),
    "matcher": ({"loss": ["original", "dap"], "matcher": ["constant", "momentum", "original"]}, 3),
    "sigma": ({"loss": ["original", "dap"], "matcher": ["original"], "sigma": [0.01, 0.05, 0.1]}, 3),
}
# Which grids each bundled detector gets (issue #22's plan); a model not named gets `loss`.
PLAN = {"tiny-deformable-detr-shapes": ["loss", "matcher", "sigma"]}


def main() -> None:
    from dapft.utils.console import quiet_transformers

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/repro")
    ap.add_argument("--model", action="append", help="A bundled model (dapft/...); default: every one.")
    ap.add_argument("--grid", action="append", choices=sorted(GRIDS), help="Default: the model's plan.")
    ap.add_argument("--seeds", type=int, default=5, help="Seeds of the `loss` grid (the others take 3 at most).")
    ap.add_argument("--eval-every", type=int, default=5, help="Only the last evaluation is compared.")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--max-steps", type=int, help="Cut every run short (a smoke test of the script).")
    ap.add_argument("--quick", action="store_true",
                    help="A smoke test of the script: 16 training and 8 validation images generated (not the "
                         "detector's own data), 8 of each scored, one step a run.")
    args = ap.parse_args()
    work = Path(args.work)
    sections = []
    for model in args.model or bundled_models():
        tag = model.split("/", 1)[1]
        meta = json.loads((BUNDLED_DIR / tag / "bundled.json").read_text())
        d = {**meta["data"], **({"train_images": 16, "val_images": 8} if args.quick else {})}
        data = work / (f"shapes-{d['seed']}" + ("-quick" if args.quick else ""))
        if not (data / "annotations" / "instances_val2017.json").exists():  # the detector's own training data
            make_shapes_dataset(data, train_images=d["train_images"], val_images=d["val_images"],
                                image_size=d["image_size"], seed=d["seed"])
        base = FinetuneConfig(model=model, data=str(data), output=str(work / tag), loss="dap", device="cpu",
                              ema=False, eval_every=args.eval_every, train_eval_images=8 if args.quick else 100,
                              save_every=100, num_workers=args.num_workers, progress=False,
                              max_steps=1 if args.quick else args.max_steps)
        for name in args.grid or PLAN.get(tag, ["loss"]):
            grid, seeds = GRIDS[name]
            try:
                sweep(base, {**grid, "seed": list(range(min(seeds or args.seeds, args.seeds)))})
            except TrainingInterrupted as stopped:  # Ctrl-C / SIGTERM: the interrupted run's checkpoint is saved
                print(f"{stopped} (for this script: rerun it as it was)", file=sys.stderr)
                sys.exit(stopped.exit_code)
            shutil.copyfile(work / tag / "sweep.png", work / tag / f"{name}.png")
            table = (work / tag / "sweep.md").read_text().replace("(sweep.png)", f"({name}.png)")
            (work / tag / f"{name}.md").write_text(table)
            sections += [f"## {model} ({meta['family']}): {name}", "", (work / tag / f"{name}.md").read_text(), ""]
    text = "\n".join(sections)
    print(text)
    (work / "tables.md").write_text(text)


if __name__ == "__main__":
    main()
