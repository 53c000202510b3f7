"""The paper's fine-tuning claim, measured on the bundled tiny detectors and the shapes dataset, with
`dapft sweep` (the library function behind it).

    python scripts/reproduce.py --work runs/repro                 # everything, CPU
    python scripts/reproduce.py --work runs/repro --seeds 3 --no-sigma
    python scripts/reproduce.py --model dapft/tiny-rtdetr-shapes --matchers original --no-sigma

For each bundled detector, from the same weights, with the paper's schedule (the checkpoint's own
recipe: its pre-training rate / 10, / 100 in the last epoch, 10% of its pre-training epochs):
1. the control and Table 2: loss `original` against `dap` with each matcher mode (constant,
   momentum, original), every one for seeds 0..N-1, paired by seed, 100 training images scored too;
2. `dap+original` (DAP added to the model's own loss) against both, with the original matcher;
3. Figure 3b: `dap` over sigma 0.01, 0.02, 0.05, 0.1 (seeds 0..2).
Runs are resumable (finished ones are skipped, an interrupted one resumes). Prints the sweeps'
tables and writes them to WORK/tables.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dapft.config import FinetuneConfig  # noqa: E402
from dapft.models import BUNDLED_DIR, bundled_models  # noqa: E402
from dapft.shapes import make_shapes_dataset  # noqa: E402
from dapft.sweep import sweep  # noqa: E402


def main() -> None:
    from dapft.runtime import quiet_transformers

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/repro")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--matchers", default="constant,momentum,original")
    ap.add_argument("--no-sigma", action="store_true", help="skip the sigma sweep (Figure 3b)")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--model", action="append", help="a bundled model (dapft/...); default: every one")
    args = ap.parse_args()
    work = Path(args.work)
    sections = []
    for model in args.model or bundled_models():
        tag = model.split("/", 1)[1]
        meta = json.loads((BUNDLED_DIR / tag / "bundled.json").read_text())
        data = work / "shapes"
        if not (data / "annotations" / "instances_val2017.json").exists():
            d = meta["data"]
            make_shapes_dataset(data, train_images=d["train_images"], val_images=d["val_images"],
                                image_size=d["image_size"], seed=d["seed"])
        base = FinetuneConfig(model=model, data=str(data), device="cpu", progress=False,
                              num_workers=args.num_workers, train_eval_images=100)
        seeds = list(range(args.seeds))
        grids = {"ab": {"loss": ["original", "dap"], "matcher": args.matchers.split(","), "seed": seeds},
                 "plus": {"loss": ["original", "dap", "dap+original"], "matcher": ["original"], "seed": seeds}}
        if not args.no_sigma:
            grids["sigma"] = {"sigma": [0.01, 0.02, 0.05, 0.1], "seed": [0, 1, 2]}
        for name, grid in grids.items():
            out = work / tag / name
            sweep(dataclasses.replace(base, output=str(out), loss="dap"), grid)
            sections += [f"## {model} ({meta['family']}): {name}", "", (out / "sweep.md").read_text(), ""]
    text = "\n".join(sections)
    print(text)
    (work / "tables.md").write_text(text)


if __name__ == "__main__":
    main()
