"""Where a split's files are (the COCO 2017 layout, or explicit paths) and a split loaded with
everything checked that would otherwise fail mid-run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dapft.data.coco_file import DataError, read_coco_file
from dapft.data.flat_split import TRAINED, CocoSplit, SplitSource, first_by_id, flatten_split
from dapft.data.image_check import check_images


def resolve_split(data: str | Path | None, split: str, images: str | Path | None = None,
                  annotations: str | Path | None = None) -> SplitSource:
    """`data` is a COCO 2017 root (ROOT/{split}2017/, ROOT/annotations/instances_{split}2017.json);
    explicit `images` + `annotations` override it for any COCO-format dataset."""
    if images is not None or annotations is not None:
        if images is None or annotations is None:
            raise DataError(f"the {split} split needs both an image folder and an annotation JSON")
        src = SplitSource(Path(images), Path(annotations))
    elif data is None:
        raise DataError("no data given: pass --data ROOT (COCO layout) or explicit images and annotations")
    else:
        root = Path(data)
        src = SplitSource(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json")
        if not src.annotations.exists() and (root / "annotations" / f"instances_{split}.json").exists():
            src = SplitSource(root / split, root / "annotations" / f"instances_{split}.json")
    if not src.annotations.is_file():
        raise DataError(f"{src.annotations}: annotation file not found (expected the COCO layout "
                        f"ROOT/annotations/instances_{split}2017.json, or pass the file explicitly)")
    if not src.images.is_dir():
        raise DataError(f"{src.images}: image folder not found for the {split} split")
    return src


def load_split(source: SplitSource, *, check: bool = True, max_images: int | None = None,
               progress: bool = False) -> CocoSplit:
    """Read a COCO annotation file and check everything that would otherwise fail mid-run."""
    ann_file = source.annotations
    if max_images is not None and max_images < 1:
        raise DataError(f"{ann_file}: asked for its first {max_images} images; take at least 1 (or all)")
    table = read_coco_file(ann_file)
    images = np.arange(len(table.image_ids)) if max_images is None else first_by_id(table.image_ids, max_images)
    split = flatten_split(source, table, images)
    if not (split.use == TRAINED).any() and not split.skipped.get("crowd_annotations"):
        subset = f" among its first {max_images} images (--max-*-images)" if max_images is not None else ""
        raise DataError(f"{ann_file}: no usable annotations{subset} ({sum(split.skipped.values())} skipped); COCO "
                        "AP and training both need ground-truth boxes: annotate the split or choose another")
    if check:
        check_images(split, progress)
    return split
