"""`dapft predict`: a checkpoint's detections on any images, drawn and as COCO results.

The images go through the evaluation's own path (read upright by their EXIF orientation, the
checkpoint's processor per batch, the family's post-processing, at most 100 detections an image),
so the boxes of a validation image are those `dapft eval` writes to predictions.json."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dapft.analysis.errors import SCORE_THRESHOLD
from dapft.analysis.evaluate import predict
from dapft.analysis.gallery import detections_by_image, draw
from dapft.data.coco_file import DataError
from dapft.data.labels import LabelMap
from dapft.data.loader import BatchLoader, default_num_workers, read_image
from dapft.utils.console import console, make_progress
from dapft.utils.device import amp_dtype, pick_device
from dapft.utils.files import OutputFolder, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files, folders (their images, not recursing) and glob patterns, in the order given,
    each file once. A name that matches nothing is refused by name, before any model loads."""
    found: dict[Path, None] = {}  # ordered, and a membership test that stays cheap for a folder of 100k images
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True)
                             if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file())
        if not matches:
            raise DataError(f"{item}: no image there (a file, a folder of {', '.join(IMAGE_SUFFIXES)} files, or a "
                            "glob pattern such as 'photos/*.jpg')")
        found.update(dict.fromkeys(matches))
    return list(found)


class ImageFiles(Dataset):
    """Image files as the evaluation's items: upright uint8 tensors with their sizes, no boxes."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = read_image(self.paths[index])
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{self.paths[index]}: cannot read image ({exc})") from exc
        return {"image": image, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "image_id": index + 1, "orig_size": tuple(image.shape[-2:]), "seed": None}


def predict_images(model: str, inputs: list[str | Path], output: str | Path, *,
                   threshold: float = SCORE_THRESHOLD, batch_size: int = 8, device: str | None = None,
                   precision: str = "auto", num_workers: int | None = None, progress: bool = True,
                   draw_images: bool = True) -> list[dict]:
    """`dapft predict`: predictions.json (COCO results, the model's label ids as category ids),
    images.json (the image ids' files and upright sizes, the categories), and each image drawn in
    drawn/. Returns the results."""
    from torchvision.io import write_jpeg

    from dapft.modeling.export import load_model

    if not 0.0 <= threshold <= 1.0 or batch_size < 1:
        raise ValueError(f"--threshold must lie in [0, 1] and --batch-size be at least 1, got {threshold} and "
                         f"{batch_size}")
    paths = collect_images(inputs)
    out = Path(output)
    if (out / "predictions.json").exists():
        raise FileExistsError(f"{out}: holds predictions already; choose another --output, or delete it")
    dev = pick_device(device)
    amp = amp_dtype(precision, dev)
    with OutputFolder(out):
        detector, processor, _family = load_model(model, log=console.print)  # a checkpoint, or an exported file
        detector.to(dev)
        names = {int(k): v for k, v in detector.config.id2label.items()}
        loader = BatchLoader(ImageFiles(paths), processor, batch_size=batch_size, train=False,
                             num_workers=default_num_workers(dev) if num_workers is None else num_workers, device=dev)
        with make_progress(disable=not progress) as bar:
            results = predict(detector, processor, loader, LabelMap({k: k for k in names}), device=dev,
                              amp_dtype=amp, progress=bar)
        results = [r for r in results if r["score"] >= threshold]
        images = []
        by_image = detections_by_image(results, threshold)
        drawn = out / "drawn"
        taken: set[str] = set()
        for k, path in enumerate(paths, start=1):
            image = read_image(path)
            images.append({"id": k, "file_name": str(path), "height": int(image.shape[1]), "width": int(image.shape[2])})
            if draw_images:
                name = path.stem if path.stem not in taken else f"{path.stem}-{k}"
                taken.add(name)
                drawn.mkdir(parents=True, exist_ok=True)
                write_jpeg(draw(image, by_image.get(k, []), names), str(drawn / f"{name}.jpg"), quality=90)
        atomic_write_text(out / "predictions.json", json.dumps(results))
        atomic_write_text(out / "images.json", json.dumps(
            {"images": images, "categories": [{"id": k, "name": v} for k, v in sorted(names.items())]}, indent=1))
    console.print(f"{len(results)} detections at score >= {threshold:g} on {len(paths)} images: "
                  f"{out / 'predictions.json'}" + (f", drawn in {drawn}" if draw_images else ""), markup=False)
    return results
