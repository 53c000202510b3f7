"""Reading a COCO annotation file: a typed decoder for the few fields dapft reads, and a checked
reader that names the item and the fix when the typed one refuses the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, the item and the fix."""


@dataclass
class CocoTable:
    """What dapft reads of a COCO annotation file, as columns: every image and annotation, checked
    (ids unique and integer, every annotation's image and category known, boxes of 4 numbers)."""

    categories: list[dict]
    image_ids: np.ndarray     # int64
    sizes: np.ndarray         # int64 [images, 2]: width, height
    names: np.ndarray         # bytes: UTF-8 file names
    ann_ids: np.ndarray       # int64
    ann_image_ids: np.ndarray  # int64
    category_ids: np.ndarray  # int64
    bbox: np.ndarray          # float64 [annotations, 4]
    iscrowd: np.ndarray       # int64
    area: np.ndarray          # float64; NaN where the file gives none (`has_area`)
    has_area: np.ndarray      # bool


def read_coco_file(ann_file: Path) -> CocoTable:
    """The file decoded against the few fields dapft reads (msgspec): polygons and masks are skipped
    by the decoder, never built as Python objects, so a file of COCO train's size is read in about
    3 s and 0.7 GB where the standard parser takes 16 s and 2.7 GB (BENCHMARKS.md). A file the
    typed decoder does not take as it is (a wrong type, a missing key, NaN, a repeated id...) is read
    again by the standard parser and checked item by item: that path names the item and the fix, or
    accepts what Python's parser does and the decoder does not (NaN, booleans as iscrowd)."""
    table = _decode_typed(ann_file)
    return table if table is not None else _decode_checked(ann_file)


def _read_bytes(ann_file: Path) -> bytes:
    try:
        return ann_file.read_bytes()
    except OSError as exc:
        raise DataError(f"{ann_file}: cannot read the annotation file ({exc})") from exc


_Id = Annotated[int, msgspec.Meta(ge=-2**63, le=2**63 - 1)]  # both evaluators store ids as int64
_Pixels = Annotated[int, msgspec.Meta(gt=0)]


class _Image(msgspec.Struct, gc=False):
    id: _Id
    file_name: Annotated[str, msgspec.Meta(min_length=1)]
    width: _Pixels
    height: _Pixels


class _Annotation(msgspec.Struct, gc=False):  # all but the box: see _decode_typed
    id: _Id
    image_id: _Id
    category_id: _Id
    iscrowd: int = 0
    area: float | msgspec.UnsetType = msgspec.UNSET


class _Box(msgspec.Struct, gc=False):
    bbox: tuple[float, float, float, float]


class _CocoFile(msgspec.Struct):
    images: list[_Image]
    annotations: list[_Annotation]
    categories: list[Any]


class _CocoBoxes(msgspec.Struct):
    annotations: list[_Box]


def _decode_typed(ann_file: Path) -> CocoTable | None:
    """The typed reading, or None where the file needs the checked one. Two passes over the bytes
    (all but the boxes, then the boxes), each made columns before the next: at COCO train's size an
    annotation's Python objects are about 300 bytes, and one pass would hold them all at once."""
    raw = _read_bytes(ann_file)
    try:
        coco = msgspec.json.decode(raw, type=_CocoFile)
    except msgspec.MsgspecError:
        return None
    images, anns = coco.images, coco.annotations
    n, ints = len(anns), (lambda values, count: np.fromiter(values, np.int64, count))  # noqa: E731
    columns = dict(
        categories=coco.categories, image_ids=ints((im.id for im in images), len(images)),
        sizes=np.array([(im.width, im.height) for im in images], dtype=np.int64).reshape(-1, 2),
        names=np.array([im.file_name.encode() for im in images], dtype=bytes),
        ann_ids=ints((a.id for a in anns), n), ann_image_ids=ints((a.image_id for a in anns), n),
        category_ids=ints((a.category_id for a in anns), n), iscrowd=ints((a.iscrowd for a in anns), n),
        area=np.fromiter((np.nan if a.area is msgspec.UNSET else a.area for a in anns), np.float64, n),
        has_area=np.fromiter((a.area is not msgspec.UNSET for a in anns), bool, n))
    del coco, images, anns
    try:
        boxes = msgspec.json.decode(raw, type=_CocoBoxes).annotations
    except msgspec.MsgspecError:
        return None
    del raw
    table = CocoTable(**columns, bbox=np.array([b.bbox for b in boxes], dtype=np.float64).reshape(-1, 4))
    cat_ids = [c.get("id") if isinstance(c, dict) else None for c in table.categories]
    plausible = (len(table.image_ids) and table.categories and all(_is_id(i) for i in cat_ids)
                 and all("name" in c for c in table.categories)
                 and len(np.unique(table.image_ids)) == len(table.image_ids)
                 and len(np.unique(table.ann_ids)) == len(table.ann_ids)
                 and np.isin(table.ann_image_ids, table.image_ids).all() and np.isin(table.category_ids, cat_ids).all()
                 and np.isin(table.iscrowd, (0, 1)).all())
    return table if plausible else None


def _decode_checked(ann_file: Path) -> CocoTable:
    try:
        data = json.loads(_read_bytes(ann_file).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{ann_file}: not UTF-8 text ({exc}); COCO files are UTF-8 JSON") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from exc
    _check_layout(data, ann_file)
    image_by_id = _index_images(data["images"], ann_file)
    cat_ids = {c["id"] for c in data["categories"]}
    seen: dict[int, int] = {}  # annotation id -> its image
    for index, ann in enumerate(data["annotations"]):
        _check_annotation(ann, index, cat_ids, image_by_id, seen, ann_file)
    images, anns = data["images"], data["annotations"]
    return CocoTable(
        categories=data["categories"], image_ids=np.array([im["id"] for im in images], dtype=np.int64),
        sizes=np.array([(im["width"], im["height"]) for im in images], dtype=np.int64).reshape(-1, 2),
        names=np.array([im["file_name"].encode() for im in images], dtype=bytes),
        ann_ids=np.array([a["id"] for a in anns], dtype=np.int64),
        ann_image_ids=np.array([a["image_id"] for a in anns], dtype=np.int64),
        category_ids=np.array([a["category_id"] for a in anns], dtype=np.int64),
        bbox=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        iscrowd=np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=np.int64),
        area=np.array([a.get("area", np.nan) for a in anns], dtype=np.float64),
        has_area=np.array(["area" in a for a in anns], dtype=bool))


def _check_layout(data, ann_file: Path) -> None:
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
        if not (isinstance(im["file_name"], str) and im["file_name"]):
            raise DataError(f"{ann_file}: image id {im['id']} has file_name {im['file_name']!r}; it is the image's "
                            "path under the image folder, a non-empty string")
        if not all(isinstance(im[k], int) and not isinstance(im[k], bool) and im[k] > 0 for k in ("width", "height")):
            raise DataError(f"{ann_file}: image {im['file_name']} has width {im['width']!r} and height {im['height']!r}; "
                            "both are positive integers (pixels)")
        if im["id"] in image_by_id:  # their annotations would merge: each would train on the other's boxes
            raise DataError(f"{ann_file}: image id {im['id']} is used by both {image_by_id[im['id']]['file_name']} "
                            f"and {im['file_name']}; give every image its own id")
        image_by_id[im["id"]] = im
    return image_by_id


def _check_annotation(ann, index: int, cat_ids: set, image_by_id: dict, seen: dict, ann_file: Path) -> None:
    if not isinstance(ann, dict):
        raise DataError(f"{ann_file}: annotation #{index} is {ann!r}, not an object")
    where = f"{ann_file}: annotation id {ann.get('id')} (image_id {ann.get('image_id')})"
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
