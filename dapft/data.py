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
    clipped to the image, degenerate ones dropped); `ground_truth` what evaluation scores against."""

    source: SplitSource
    images: list[dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)
    # Per image, the annotations as the file has them (missing iscrowd and area filled in), less
    # those training skipped (degenerate boxes, boxes outside their image): evaluation must not
    # count as missed what the model was never shown.
    evaluated: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}

    def ground_truth(self) -> dict:
        """The split's ground truth as a COCO dataset dict (copies: COCOeval writes into them)."""
        return {"images": [dict(im) for im in self.images], "categories": [dict(c) for c in self.categories],
                "annotations": [dict(a) for im in self.images for a in self.evaluated.get(im["id"], [])]}


def _check_image(path: Path) -> tuple[Path, str | None, tuple[int, int] | None]:
    if not path.is_file():
        return path, "missing", None
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: a truncated file fails here, not in a worker mid-run
            # The upright size: photos store their pixels with an EXIF rotation, which COCO tools,
            # labelling tools and dapft's reader apply (orientations 5-8 swap width and height).
            width, height = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            return path, None, (width, height)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return path, f"unreadable ({exc.__class__.__name__}: {exc})", None


def _verdict_cache(images: Path) -> Path:
    """Where the images already decoded in full are remembered, so that a second run over the same
    data starts at once: one small JSON per image folder, under $DAPFT_CACHE (~/.cache/dapft)."""
    root = Path(os.environ.get("DAPFT_CACHE", Path.home() / ".cache" / "dapft")).expanduser()
    return root / "checked-images" / (hashlib.sha1(str(images.resolve()).encode()).hexdigest()[:16] + ".json")


def _fingerprint(path: Path) -> str:
    """What tells the cache a file is the one it decoded: its inode, size, modification time and
    change time. The change time (ctime) moves whenever the file is written, replaced or has its
    times reset, and no user call can set it back: an image replaced in place with its size and
    mtime kept is checked again. A hash of the contents would do the same by reading every byte of
    the data set at every start (18 GB for COCO train), which is what the cache is there to avoid."""
    st = path.stat()
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}"


def _read_cache(cache_file: Path) -> dict:
    """file name -> [fingerprint, width, height]; a cache it cannot read is ignored (and rewritten)."""
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)}


def check_images(images: Path, entries: list[dict], ann_file: Path, progress: bool = False) -> None:
    """Decode every image of `entries` fully (threads; decoders release the GIL), unless the cache
    says a file of these very contents decoded before; then check each against its declared width
    and height."""
    cache_file = _verdict_cache(images)
    cache = _read_cache(cache_file)
    todo, sizes, prints = {}, {}, {}  # path -> file_name still to decode; -> (width, height); -> fingerprint
    for im in entries:
        path = images / im["file_name"]
        try:
            prints[path] = _fingerprint(path)
        except OSError:
            todo[path] = im["file_name"]
            continue
        known = cache.get(im["file_name"])
        if known and known[0] == prints[path]:
            sizes[path] = tuple(known[1:])
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
                cache[todo[path]] = [prints[path], *size]
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
    ids = [im["id"] for im in images]
    return dataclasses.replace(split, images=images, annotations={i: split.annotations[i] for i in ids},
                               evaluated={i: split.evaluated.get(i, []) for i in ids})


def load_split(source: SplitSource, *, check: bool = True, max_images: int | None = None,
               progress: bool = False) -> CocoSplit:
    """Read a COCO annotation file and check everything that would otherwise fail mid-run."""
    ann_file = source.annotations
    data = _read_coco_file(ann_file)
    image_by_id = _index_images(data["images"], ann_file)
    images = data["images"] if max_images is None else sorted(data["images"], key=lambda im: im["id"])[:max_images]
    per_image, evaluated, skipped = _annotations(data, image_by_id, {im["id"] for im in images}, ann_file)
    if not any(per_image.values()) and not skipped["crowd_annotations"]:
        subset = f" among its first {max_images} images (--max-*-images)" if max_images is not None else ""
        raise DataError(f"{ann_file}: no usable annotations{subset} ({sum(skipped.values())} skipped); COCO AP "
                        "and training both need ground-truth boxes: annotate the split or choose another")
    if check:
        check_images(source.images, images, ann_file, progress)
    return CocoSplit(source, images, per_image, data["categories"], {k: v for k, v in skipped.items() if v},
                     evaluated)


def _read_coco_file(ann_file: Path) -> dict:
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: a JSON {type(data).__name__}; a COCO file is an object with 'images', "
                        "'annotations' and 'categories' lists")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: missing the '{key}' list required by the COCO format")
    if not data["images"]:
        raise DataError(f"{ann_file}: the split is empty ('images' has no entries)")
    if not data["categories"]:
        raise DataError(f"{ann_file}: 'categories' is empty; list the classes with their ids and names")
    for c in data["categories"]:
        if not (isinstance(c, dict) and _is_id(c.get("id")) and "name" in c):
            raise DataError(f"{ann_file}: category {c!r} needs an integer 'id' and a 'name'")
    return data


_INT64 = 2**63


def _is_id(value) -> bool:
    """COCO ids are integers (both evaluators index by them, and faster-coco-eval stores int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64


def _index_images(images: list, ann_file: Path) -> dict:
    image_by_id = {}
    for im in images:
        if not isinstance(im, dict):
            raise DataError(f"{ann_file}: image entry {im!r} is not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(f"{ann_file}: image entry {im.get('id', im)} lacks '{key}'")
        if not _is_id(im["id"]):
            raise DataError(f"{ann_file}: image {im['file_name']} has id {im['id']!r}; image ids must be integers "
                            "(64-bit): renumber the images and their annotations' image_id")
        if not all(isinstance(im[k], int) and not isinstance(im[k], bool) and im[k] > 0 for k in ("width", "height")):
            raise DataError(f"{ann_file}: image {im['file_name']} has width {im['width']!r} and height {im['height']!r}; "
                            "both are positive integers (pixels)")
        if im["id"] in image_by_id:  # their annotations would merge: each would train on the other's boxes
            raise DataError(f"{ann_file}: image id {im['id']} is used by both {image_by_id[im['id']]['file_name']} "
                            f"and {im['file_name']}; give every image its own id")
        image_by_id[im["id"]] = im
    return image_by_id


_KEPT = {"id", "image_id", "category_id", "bbox", "iscrowd", "area"}


def _annotations(data: dict, image_by_id: dict, kept_ids: set, ann_file: Path):
    """Every annotation checked; per kept image those training uses (clipped) and those evaluation
    scores. A missing `iscrowd` means 0; a missing `area` means the box's area (COCO's own files give
    the segmentation's area, which only a polygon or mask has)."""
    cat_ids = {c["id"] for c in data["categories"]}
    skipped = {"degenerate_boxes": 0, "boxes_outside_image": 0, "clipped_boxes": 0, "crowd_annotations": 0}
    per_image: dict[int, list[dict]] = {i: [] for i in kept_ids}
    evaluated: dict[int, list[dict]] = {i: [] for i in kept_ids}
    seen: dict[int, int] = {}  # annotation id -> its image
    for index, ann in enumerate(data["annotations"]):
        where = f"{ann_file}: annotation id {ann.get('id')} (image_id {ann.get('image_id')})"
        _check_annotation(ann, index, where, cat_ids, image_by_id, seen, ann_file)
        if ann["image_id"] not in kept_ids:
            continue
        x, y, w, h = ann["bbox"]
        # What box training and box evaluation read, and no more: a polygon is most of a COCO file's
        # size, freed here rather than kept for the run's length.
        for key in [k for k in ann if k not in _KEPT]:
            del ann[key]
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w * h) if all(map(math.isfinite, ann["bbox"])) else 0.0)
        if ann["iscrowd"]:
            skipped["crowd_annotations"] += 1  # COCO ignores crowd regions in matching: kept for eval only
            evaluated[ann["image_id"]].append(ann)
            continue
        im = image_by_id[ann["image_id"]]
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, im["width"]), min(y + h, im["height"])
        if not all(map(math.isfinite, ann["bbox"])) or w <= 0 or h <= 0:
            skipped["degenerate_boxes"] += 1  # zero, negative or NaN / inf extent
        elif x1 <= x0 or y1 <= y0:
            skipped["boxes_outside_image"] += 1
        else:
            skipped["clipped_boxes"] += int((x0, y0, x1, y1) != (x, y, x + w, y + h))
            per_image[ann["image_id"]].append({**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            evaluated[ann["image_id"]].append(ann)
    return per_image, evaluated, skipped


def _check_annotation(ann, index: int, where: str, cat_ids: set, image_by_id: dict, seen: dict,
                      ann_file: Path) -> None:
    if not isinstance(ann, dict):
        raise DataError(f"{ann_file}: annotation #{index} is {ann!r}, not an object")
    if not _is_id(ann.get("id")):
        raise DataError(f"{ann_file}: annotation #{index} (image_id {ann.get('image_id')}) has id {ann.get('id')!r}; "
                        "every annotation needs its own integer 'id' (both evaluators index by it)")
    if ann["id"] in seen:  # both evaluators would keep one of them and silently drop the others
        raise DataError(f"{where}: the id is used again (first for an annotation of image {seen[ann['id']]}); give "
                        "every annotation its own id, e.g. number them 1, 2, 3, ... across the file")
    seen[ann["id"]] = ann.get("image_id")
    if ann.get("category_id") not in cat_ids:
        raise DataError(f"{where} has category_id {ann.get('category_id')}, which is not in 'categories' "
                        f"(ids {sorted(cat_ids)}); fix the annotation or add the category")
    if ann.get("image_id") not in image_by_id:
        raise DataError(f"{where} refers to an image that is not in 'images'; remove it or add the image")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise DataError(f"{where} has bbox {bbox!r}; COCO boxes are [x, y, width, height] in pixels")
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        raise DataError(f"{where} has iscrowd {ann['iscrowd']!r}; it is 0 (an object) or 1 (a crowd region)")
    if "area" in ann and not (isinstance(ann["area"], (int, float)) and not isinstance(ann["area"], bool)):
        raise DataError(f"{where} has area {ann['area']!r}; it is a number (pixels), or leave it out")


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


def read_label_map(path: str | Path) -> dict[int, int]:
    """A --label-map file: {"dataset category id": model label index}, integers both."""
    expected = 'expected a JSON object {"dataset category id": model label index}, e.g. {"1": 0, "7": 1}'
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label map ({exc.strerror or exc}); {expected}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not JSON ({exc}); {expected}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a JSON {type(raw).__name__}; {expected}")
    mapping = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}: category {key!r} maps to {json.dumps(value)}, not a model label index; {expected}")
        try:
            mapping[int(key)] = value
        except ValueError:
            raise DataError(f"{path}: key {key!r} is not a dataset category id; {expected}") from None
    return mapping


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
            mapping = read_label_map(mapping_file)
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
