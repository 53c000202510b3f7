"""`dapft demo`: the whole story offline in a few CPU minutes: generate data, evaluate a bundled
tiny detector, fine-tune it with DAP, evaluate again, and write the before/after report."""

from __future__ import annotations

from pathlib import Path

from dapft.config import check_choices
from dapft.engine import FinetuneConfig, finetune
from dapft.runtime import console
from dapft.shapes import make_shapes_dataset

DEFAULT_MODEL = "dapft/tiny-rtdetr-shapes"
# The paper's schedule for the bundled detectors is 12 epochs (10% of their 200 from scratch, at most
# 12): several minutes on 2 CPU cores. The demo shows the whole story in a third of that.
DEMO_EPOCHS = 4


def demo(output: str | Path = "runs/demo", *, model: str = DEFAULT_MODEL, train_images: int = 400,
         val_images: int = 200, epochs: int | None = DEMO_EPOCHS, seed: int = 1, num_workers: int | None = None, progress: bool = True,
         loss: str = "dap") -> dict:
    """Fresh shapes data (seed 1: images the bundled detectors never saw, same distribution), then a
    DAP fine-tune with the paper's rates from the detector's recipe, DEMO_EPOCHS long (epochs=None:
    the recipe's 10% of the original training)."""
    out = Path(output)
    data, run = out / "data", out / "run"
    cfg = FinetuneConfig(model=model, data=str(data), output=str(run), loss=loss, epochs=epochs, seed=seed,
                         device="cpu", num_workers=num_workers, progress=progress,
                         resume=(run / "checkpoint-last").exists())
    check_choices(cfg)  # a bad count is refused before the data is made, not after
    if not (data / "annotations" / "instances_val2017.json").exists():
        console.print(f"generating shapes data (seed {seed}) in {data}", markup=False)
        make_shapes_dataset(data, train_images=train_images, val_images=val_images, seed=seed)
    return finetune(cfg)
