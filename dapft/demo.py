"""`dapft demo`: the whole story offline in a few CPU minutes: generate data, evaluate a bundled
tiny detector, fine-tune it with DAP and, beside it, with its own loss (the control: same data,
steps and seed), evaluate both, and compare. The control is there because the change from the
evaluation before includes what the extra training alone does: on this detector our 5-seed A/B
found DAP no better than its own loss (REPRODUCTION.md), whatever one demo run shows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dapft.data.shapes import make_shapes_dataset
from dapft.sweeps.grid import sweep
from dapft.training.config import FinetuneConfig, check_choices
from dapft.utils.console import console

DEFAULT_MODEL = "dapft/tiny-rtdetr-shapes"
# The paper's schedule for the bundled detectors is 12 epochs (10% of their 200 from scratch, at most
# 12): several minutes on 2 CPU cores for each arm. The demo shows the story in a fraction of that.
DEMO_EPOCHS = 4
# What a paired 5-seed sweep found on each bundled detector (DAP minus its own loss, AP points, 95%
# interval; REPRODUCTION.md): the number one demo run cannot give.
MEASURED = {"dapft/tiny-rtdetr-shapes": "+0.11 AP [-0.09, +0.32]",
            "dapft/tiny-deformable-detr-shapes": "+0.50 AP [+0.24, +0.76]"}


def demo(output: str | Path = "runs/demo", *, model: str = DEFAULT_MODEL, train_images: int = 200,
         val_images: int = 200, epochs: int | None = DEMO_EPOCHS, seed: int = 1, num_workers: int | None = None,
         progress: bool = True, loss: str = "dap") -> dict:
    """Fresh shapes data (seed 1: images the bundled detectors never saw, same distribution), then a
    two-run sweep under OUTPUT/sweep: `loss` and the model's own loss (`original`), with the paper's
    rates from the detector's recipe, DEMO_EPOCHS long (epochs=None: the recipe's 10% of the
    original training). Returns the sweep's summary (sweep.json)."""
    out = Path(output)
    data = out / "data"
    base = FinetuneConfig(model=model, data=str(data), output=str(out / "sweep"), epochs=epochs, seed=seed,
                          device="cpu", num_workers=num_workers, progress=progress)
    for arm in ("original", loss):  # a bad count or loss is refused before the data is made, not after
        check_choices(dataclasses.replace(base, loss=arm))
    if not (data / "annotations" / "instances_val2017.json").exists():
        console.print(f"generating shapes data (seed {seed}) in {data}", markup=False)
        make_shapes_dataset(data, train_images=train_images, val_images=val_images, seed=seed)
    return sweep(base, {"loss": ["original", loss]})


def comparison(summary: dict, model: str, output: str | Path) -> tuple[dict, str]:
    """The demo's table rows (before, the control, DAP) and what they say, in words."""
    after = {r["loss"]: r for r in summary["runs"]}
    failed = [r["run"] for r in summary["runs"] if r.get("failed")]
    if failed:
        raise RuntimeError(f"the demo's {', '.join(failed)} failed; {Path(output) / 'sweep' / 'sweep.md'} has the error")
    dap = next(loss for loss in after if loss != "original")
    before = summary["before"]
    rows = {"before": before, "after its own loss (control)": after["original"], f"after {dap}": after[dap]}
    gain, control = after[dap]["AP"] - before["AP"], after["original"]["AP"] - before["AP"]
    measured = f" (on this detector: {MEASURED[model]} over 5 seeds, REPRODUCTION.md)" if model in MEASURED else ""
    text = (f"{dap} {100 * gain:+.2f} AP from before, its own loss {100 * control:+.2f}: {dap} minus the control "
            f"{100 * (gain - control):+.2f} on one seed. The change from before includes what the extra training "
            f"alone does (the control's change), and one seed decides nothing: a paired sweep over seeds does, "
            f"dapft sweep --model {model} --data "
            f"{Path(output) / 'data'} --loss original,{dap} --seed 0,1,2,3,4{measured}. "
            f"Summary: {Path(output) / 'sweep' / 'sweep.md'}")
    return rows, text
