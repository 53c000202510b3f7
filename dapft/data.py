"""COCO-format data: locating splits, validating them before any long work (files, image sizes,
annotations), and mapping the dataset's categories to a model's labels. Reading, augmenting and
batching images for the model is dapft.loader's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dapft.runtime import atomic_write_text, make_progress


class DataError(ValueError):
    """Bad input data; the message names the file, the item and the fix."""


# ----------------------------------------------------------------------------------------------
# Where the data is


@dataclass(frozen=True)
class SplitSource:
    images: Path
    annotations: Path


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


# ----------------------------------------------------------------------------------------------
# Reading and checking a split


@dataclass
class CocoSplit:
    """A validated split. `annotations[image_id]` holds the annotations kept for training (boxes
    clipped to the image, degenerate ones dropped); evaluation uses the original JSON file."""

    source: SplitSource
    images: list[dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_ids: frozenset[int] = frozenset()  # annotations left out of training, so of evaluation too

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}


def _check_image(path: Path) -> tuple[Path, str | None, tuple[int, int] | None]:
    if not path.is_file():
        return path, "missing", None
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: a truncated file fails here, not in a worker mid-run
            return path, None, im.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return path, f"unreadable ({exc.__class__.__name__}: {exc})", None


def _verdict_cache(images: Path) -> Path:
    """Where the images already decoded in full are remembered (by file size and mtime), so that
    a second run over the same data starts at once: one small JSON per image folder."""
    root = Path(os.environ.get("DAPFT_CACHE", Path.home() / ".cache" / "dapft")).expanduser()
    return root / "checked-images" / (hashlib.sha1(str(images.resolve()).encode()).hexdigest()[:16] + ".json")


def check_images(images: Path, entries: list[dict], ann_file: Path, progress: bool = False) -> None:
    """Decode every image of `entries` fully (threads; decoders release the GIL), unless the cache
    says this very file (same size and mtime) decoded before; then check each against its declared
    width and height."""
    cache_file = _verdict_cache(images)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    todo, sizes = {}, {}  # path -> file_name still to decode; path -> (width, height)
    for im in entries:
        path = images / im["file_name"]
        try:
            st = path.stat()
        except OSError:
            todo[path] = im["file_name"]
            continue
        known = cache.get(im["file_name"])
        if known and known[:2] == [st.st_size, st.st_mtime_ns]:
            sizes[path] = tuple(known[2:])
        else:
            todo[path] = im["file_name"]
    bad = []
    if todo:
        with make_progress(disable=not progress or len(todo) < 200) as bar, \
                ThreadPoolExecutor(min(32, (os.cpu_count() or 2) * 2)) as pool:
            task = bar.add_task("checking images", total=len(todo), info="full decode, once")
            for path, why, size in pool.map(_check_image, todo):
                bar.advance(task)
                if why:
                    bad.append((path, why))
                    continue
                sizes[path] = size
                st = path.stat()
                cache[todo[path]] = [st.st_size, st.st_mtime_ns, *size]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a read-only home: the check runs again next time, nothing else changes
    if bad:
        listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        raise DataError(f"{ann_file}: {len(bad)} of {len(entries)} images cannot be read: {listing}"
                        f"{' ...' if len(bad) > 5 else ''}. Fix or remove them from 'images'")
    for im in entries:
        size = sizes[images / im["file_name"]]
        if size != (im["width"], im["height"]):
            raise DataError(f"{images / im['file_name']}: the image is {size[0]}x{size[1]} but {ann_file} says "
                            f"{im['width']}x{im['height']}; fix 'width'/'height' of image id {im['id']}")


def first_images(split: CocoSplit, n: int) -> CocoSplit:
    """The split's first `n` images by id (as `load_split(max_images=n)` takes them), from a split
    already loaded and checked: no second pass over the annotation file or the images."""
    images = sorted(split.images, key=lambda im: im["id"])[:n]
    return dataclasses.replace(split, images=images, annotations={im["id"]: split.annotations[im["id"]]
                                                                  for im in images})


def load_split(source: SplitSource, *, check: bool = True, max_images: int | None = None,
               progress: bool = False) -> CocoSplit:
    """Read a COCO annotation file and check everything that would otherwise fail mid-run."""
    ann_file = source.annotations
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: missing the '{key}' list required by the COCO format")
    images = data["images"]
    if not images:
        raise DataError(f"{ann_file}: the split is empty ('images' has no entries)")
    if not data["categories"]:
        raise DataError(f"{ann_file}: 'categories' is empty; list the classes with their ids and names")
    cat_ids = {c["id"] for c in data["categories"]}
    image_by_id = {}
    for im in images:
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(f"{ann_file}: image entry {im.get('id', im)} lacks '{key}'")
        if im["id"] in image_by_id:  # their annotations would merge: each would train on the other's boxes
            raise DataError(f"{ann_file}: image id {im['id']} is used by both {image_by_id[im['id']]['file_name']} "
                            f"and {im['file_name']}; give every image its own id")
        image_by_id[im["id"]] = im
    if max_images is not None:
        images = sorted(images, key=lambda im: im["id"])[:max_images]
    kept_ids = {im["id"] for im in images}

    skipped = {"degenerate_boxes": 0, "boxes_outside_image": 0, "clipped_boxes": 0, "crowd_annotations": 0}
    dropped: set = set()
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in images}
    for ann in data["annotations"]:
        where = f"{ann_file}: annotation id {ann.get('id')} (image_id {ann.get('image_id')})"
        if ann.get("category_id") not in cat_ids:
            raise DataError(f"{where} has category_id {ann.get('category_id')}, which is not in 'categories' "
                            f"(ids {sorted(cat_ids)}); fix the annotation or add the category")
        if ann.get("image_id") not in image_by_id:
            raise DataError(f"{where} refers to an image that is not in 'images'; remove it or add the image")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where} has bbox {bbox!r}; COCO boxes are [x, y, width, height] in pixels")
        if ann["image_id"] not in kept_ids:
            continue
        if ann.get("iscrowd", 0):
            skipped["crowd_annotations"] += 1  # COCO ignores crowd regions in matching: kept for eval only
            continue
        x, y, w, h = bbox
        if not all(map(math.isfinite, bbox)) or w <= 0 or h <= 0:
            skipped["degenerate_boxes"] += 1  # zero, negative or NaN / inf extent
            dropped.add(ann.get("id"))
            continue
        im = image_by_id[ann["image_id"]]
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, im["width"]), min(y + h, im["height"])
        if x1 <= x0 or y1 <= y0:
            skipped["boxes_outside_image"] += 1
            dropped.add(ann.get("id"))
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            skipped["clipped_boxes"] += 1
        per_image[ann["image_id"]].append({**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]})

    if not any(per_image.values()) and not skipped["crowd_annotations"]:
        subset = f" among its first {max_images} images (--max-*-images)" if max_images is not None else ""
        raise DataError(f"{ann_file}: no usable annotations{subset} ({sum(skipped.values())} skipped); COCO AP "
                        "and training both need ground-truth boxes: annotate the split or choose another")
    if check:
        check_images(source.images, images, ann_file, progress)
    return CocoSplit(source, images, per_image, data["categories"], {k: v for k, v in skipped.items() if v},
                     frozenset(dropped))


# ----------------------------------------------------------------------------------------------
# Dataset categories <-> model labels


def normalize_name(name: str) -> str:
    """Class names compare case-, space-, '_'- and '-'-insensitively ('traffic_light' = 'Traffic light')."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def match_names(names: dict[int, str], candidates: dict[int, str]) -> dict[int, int]:
    """id in `names` -> id in `candidates` with the same (normalised) name; the first such candidate
    wins, and names without a match are left out."""
    by_name: dict[str, int] = {}
    for idx, name in candidates.items():
        by_name.setdefault(normalize_name(name), idx)
    return {i: by_name[normalize_name(n)] for i, n in names.items() if normalize_name(n) in by_name}


@dataclass(frozen=True)
class LabelMap:
    """dataset category id <-> model label index."""

    to_model: dict[int, int]

    @property
    def to_dataset(self) -> dict[int, int]:
        return {v: k for k, v in self.to_model.items()}

    @classmethod
    def build(cls, categories: list[dict], id2label: dict, mapping_file: str | Path | None = None,
              *, where: str = "the dataset") -> "LabelMap":
        """By name (DETR's 91-slot COCO ids and RT-DETR's 80 contiguous classes both map), or from an
        explicit JSON file {"dataset category id": model label index}."""
        id2label = {int(k): v for k, v in id2label.items()}
        if mapping_file is not None:
            raw = json.loads(Path(mapping_file).read_text())
            mapping = {int(k): int(v) for k, v in raw.items()}
            unknown = [v for v in mapping.values() if v not in id2label]
            if unknown:
                raise DataError(f"{mapping_file}: model label indices {unknown} do not exist in the model "
                                f"(it has {len(id2label)} labels)")
            missing = [c["id"] for c in categories if c["id"] not in mapping]
            if missing:
                raise DataError(f"{mapping_file}: no entry for dataset category ids {missing}")
            strangers = sorted(set(mapping) - {c["id"] for c in categories})
            if strangers:
                raise DataError(f"{mapping_file}: category ids {strangers} are not in {where}'s categories; "
                                "remove them or fix the ids")
            by_label: dict[int, list[int]] = {}
            for category, label in sorted(mapping.items()):
                by_label.setdefault(label, []).append(category)
            shared = [(label, ids) for label, ids in sorted(by_label.items()) if len(ids) > 1]
            if shared:
                label, ids = shared[0]
                raise DataError(f"{mapping_file}: dataset categories {ids} all map to model label {label}; "
                                "each category needs a label of its own (AP is computed per category)")
            return cls(mapping)
        mapping = match_names({c["id"]: c["name"] for c in categories}, id2label)
        missing = [c["name"] for c in categories if c["id"] not in mapping]
        if missing:
            raise DataError(
                f"{where}: categories {missing[:10]}{' ...' if len(missing) > 10 else ''} are not among the "
                f"model's labels (e.g. {list(id2label.values())[:5]}). Pass a label-map JSON "
                "{dataset_category_id: model_label_index}, or fine-tune, which resizes the classifier")
        return cls(mapping)
