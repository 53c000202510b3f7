"""The paper's fine-tuning claim, measured on the bundled tiny detectors and the shapes dataset.

    python scripts/reproduce.py --work runs/repro            # everything, CPU
    python scripts/reproduce.py --work runs/repro --quick    # 1 seed, no matcher/sigma ablations

For each bundled detector, from the same weights, with the paper's schedule (the checkpoint's own
recipe: its pre-training rate / 10, / 100 in the last epoch, 10% of its pre-training epochs):
(a) the original loss and (b) DAP, for seeds 0, 1, 2; on the first detector also the matcher modes
and a sigma sweep. Runs are resumable (finished ones are skipped). Prints the Markdown tables that
REPRODUCTION.md holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dapft.engine import FinetuneConfig, finetune  # noqa: E402
from dapft.models import BUNDLED_DIR, bundled_models  # noqa: E402
from dapft.shapes import make_shapes_dataset  # noqa: E402

KEYS = ("AP", "AP50", "AP75")


def run(work: Path, data: Path, model: str, name: str, **kw) -> dict:
    out = work / name
    if (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())
    cfg = FinetuneConfig(model=model, data=str(data), output=str(out), device="cpu", progress=False,
                         resume=(out / "checkpoint-last").exists(), **kw)
    return finetune(cfg)


def stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    from dapft.runtime import quiet_transformers

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/repro")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--num-workers", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work)
    seeds = [0] if args.quick else [0, 1, 2]
    lines = []
    models = bundled_models()
    for index, model in enumerate(models):
        meta = json.loads((BUNDLED_DIR / model.split("/", 1)[1] / "bundled.json").read_text())
        data = work / "shapes"
        if not (data / "annotations" / "instances_val2017.json").exists():
            d = meta["data"]
            make_shapes_dataset(data, train_images=d["train_images"], val_images=d["val_images"],
                                image_size=d["image_size"], seed=d["seed"])
        tag = model.split("/", 1)[1]
        results = {loss: [run(work, data, model, f"{tag}-{loss}-seed{s}", loss=loss, seed=s,
                              num_workers=args.num_workers) for s in seeds] for loss in ("original", "dap")}
        before = results["dap"][0]["before"]
        lines += [f"### {model} ({meta['family']}), {len(seeds)} seed(s)", "",
                  "| | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS),
                  "| before fine-tuning (r_o) | " + " | ".join(f"{100 * before[k]:.2f}" for k in KEYS) + " |"]
        for loss, label in (("original", "original loss (r_r)"), ("dap", "DAP")):
            lines.append(f"| {label} | " + " | ".join(stat([r["after"][k] for r in results[loss]]) for k in KEYS) + " |")
        deltas = [d["after"]["AP"] - o["after"]["AP"] for d, o in zip(results["dap"], results["original"])]
        best_orig = max(before["AP"], statistics.mean(r["after"]["AP"] for r in results["original"]))
        lines += ["", f"DAP - original, paired by seed: {stat(deltas)} AP; DAP - max(r_o, r_r): "
                  f"{100 * (statistics.mean(r['after']['AP'] for r in results['dap']) - best_orig):+.2f} AP.", ""]
        if index == 0 and not args.quick:
            rows = [("constant (main runs)", results["dap"][0])]
            rows += [(m, run(work, data, model, f"{tag}-dap-{m}", loss="dap", matcher=m, num_workers=args.num_workers))
                     for m in ("momentum", "original")]
            lines += ["Matcher modes (seed 0, Table 2):", "", "| matcher | AP |", "|---|---:|"]
            lines += [f"| {m} | {100 * r['after']['AP']:.2f} |" for m, r in rows]
            sig = [(0.05, results["dap"][0])] + [(s, run(work, data, model, f"{tag}-dap-sigma{s}", loss="dap", sigma=s,
                                                          num_workers=args.num_workers)) for s in (0.01, 0.02, 0.1)]
            lines += ["", "Sigma (seed 0, Figure 3b):", "", "| sigma | AP |", "|---:|---:|"]
            lines += [f"| {s} | {100 * r['after']['AP']:.2f} |" for s, r in sorted(sig)]
            lines.append("")
    print("\n".join(lines))
    (work / "tables.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
