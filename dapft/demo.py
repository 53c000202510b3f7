"""`dapft demo`: the whole story offline in a few CPU minutes: generate data, evaluate a bundled
tiny detector, fine-tune it with DAP, evaluate again, and write the before/after report."""

from __future__ import annotations

from pathlib import Path

from dapft.engine import FinetuneConfig, finetune
from dapft.runtime import console
from dapft.shapes import make_shapes_dataset

DEFAULT_MODEL = "dapft/tiny-rtdetr-shapes"


def demo(output: str | Path = "runs/demo", *, model: str = DEFAULT_MODEL, train_images: int = 400,
         val_images: int = 200, epochs: int | None = None, seed: int = 1, num_workers: int | None = None, progress: bool = True,
         loss: str = "dap") -> dict:
    """Fresh shapes data (seed 1: images the bundled detectors never saw, same distribution), then a
    DAP fine-tune with the paper's schedule from the detector's recipe (epochs=None keeps its 10%)."""
    out = Path(output)
    data = out / "data"
    if not (data / "annotations" / "instances_val2017.json").exists():
        console.print(f"generating shapes data (seed {seed}) in {data}", markup=False)
        make_shapes_dataset(data, train_images=train_images, val_images=val_images, seed=seed)
    run = out / "run"
    cfg = FinetuneConfig(model=model, data=str(data), output=str(run), loss=loss, epochs=epochs, seed=seed,
                         device="cpu", num_workers=num_workers, progress=progress,
                         resume=(run / "checkpoint-last").exists())
    return finetune(cfg)
