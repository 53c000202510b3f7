"""COCO-format data: locating splits, validating them before any long work (files, image sizes,
annotations), and mapping the dataset's categories to a model's labels. Reading, augmenting and
batching images for the model is dapft.loader's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
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


TRAINED, CROWD, SKIPPED = 0, 1, 2  # what an annotation is to a run: CocoSplit.use


@dataclass(frozen=True)
class CocoSplit:
    """A validated split as flat numpy arrays: a few dozen bytes an annotation, which data-loader
    workers read without touching a Python object (a worker forked with a split of dicts and lists
    copies every page whose reference counts reading moves: about 10 KB an item read at COCO train's
    size, BENCHMARKS.md).

    Image i is `ids[i]` of `sizes[i]` (width, height) in file `names[i]` (UTF-8); its annotations are
    rows `rows(i)` of the annotation columns, in the file's order, each with its `use`: TRAINED
    (scored, and trained on as `clipped`, the box cut to its image), CROWD (a region COCO's matching
    ignores: scored, never trained on) or SKIPPED (a degenerate box or one outside its image: neither,
    so that evaluation does not count as missed what the model was never shown)."""

    source: SplitSource
    categories: list[dict]
    ids: np.ndarray           # int64 [images]
    sizes: np.ndarray         # int64 [images, 2]: width, height
    names: np.ndarray         # bytes [images], fixed width
    ann_ends: np.ndarray      # int64 [images]: image i's rows end here
    ann_ids: np.ndarray       # int64 [annotations]
    category_ids: np.ndarray  # int64 [annotations]
    bbox: np.ndarray          # float64 [annotations, 4]: x, y, width, height as the file has them
    iscrowd: np.ndarray       # int64 [annotations]
    area: np.ndarray          # float64 [annotations]: the file's, else the box's
    use: np.ndarray           # int8 [annotations]: TRAINED, CROWD or SKIPPED
    clipped: np.ndarray       # float64 [annotations, 4]: the box inside its image (TRAINED rows)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}

    def rows(self, i: int) -> slice:
        return slice(int(self.ann_ends[i - 1]) if i else 0, int(self.ann_ends[i]))

    def index(self, image_id: int) -> int:
        return int(np.flatnonzero(self.ids == image_id)[0])

    def image(self, i: int) -> dict:
        width, height = self.sizes[i].tolist()
        return {"id": int(self.ids[i]), "file_name": self.names[i].decode(), "width": width, "height": height}

    def evaluated(self, i: int) -> list[dict]:
        """Image i's annotations that evaluation scores, as COCO annotation dicts."""
        rows = np.r_[self.rows(i)]
        return self._dicts(rows[self.use[rows] != SKIPPED], self.bbox, self.ids[i])

    def trained(self, i: int) -> list[dict]:
        """Image i's annotations that training reads, their boxes clipped to the image."""
        rows = np.r_[self.rows(i)]
        return self._dicts(rows[self.use[rows] == TRAINED], self.clipped, self.ids[i])

    def ground_truth(self) -> dict:
        """The split's ground truth as a COCO dataset dict (new objects: COCOeval writes into them)."""
        rows = np.flatnonzero(self.use != SKIPPED)
        return {"images": [self.image(i) for i in range(len(self))], "categories": [dict(c) for c in self.categories],
                "annotations": self._dicts(rows, self.bbox, self.ids[self.image_of_rows()[rows]])}

    def image_of_rows(self) -> np.ndarray:
        """Each annotation row's image (its position in the split)."""
        return np.repeat(np.arange(len(self)), np.diff(self.ann_ends, prepend=0))

    def _dicts(self, rows: np.ndarray, boxes: np.ndarray, image_ids) -> list[dict]:
        image_ids = np.broadcast_to(image_ids, rows.shape)
        return [{"id": a, "image_id": im, "category_id": c, "bbox": b, "iscrowd": crowd, "area": area}
                for a, im, c, b, crowd, area in zip(
                    self.ann_ids[rows].tolist(), image_ids.tolist(), self.category_ids[rows].tolist(),
                    boxes[rows].tolist(), self.iscrowd[rows].tolist(), self.area[rows].tolist())]

    def take(self, images: np.ndarray) -> CocoSplit:
        """The split of these images (positions), in this order, with their annotations."""
        images = np.asarray(images, dtype=np.int64)
        starts = np.concatenate([[0], self.ann_ends[:-1]])[images]
        counts = self.ann_ends[images] - starts
        rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        return dataclasses.replace(
            self, ids=self.ids[images], sizes=self.sizes[images], names=self.names[images],
            ann_ends=np.cumsum(counts), **{k: getattr(self, k)[rows] for k in _ANNOTATION_COLUMNS})


_ANNOTATION_COLUMNS = ("ann_ids", "category_ids", "bbox", "iscrowd", "area", "use", "clipped")


def _check_image(path: str) -> tuple[str, str | None, tuple[int, int] | None]:
    if not os.path.isfile(path):
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


def _fingerprint(path: str) -> str:
    """What tells the cache a file is the one it decoded: its inode, size, modification time and
    change time. The change time (ctime) moves whenever the file is written, replaced or has its
    times reset, and no user call can set it back: an image replaced in place with its size and
    mtime kept is checked again. A hash of the contents would do the same by reading every byte of
    the data set at every start (18 GB for COCO train), which is what the cache is there to avoid."""
    st = os.stat(path)
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


def check_images(split: CocoSplit, progress: bool = False) -> None:
    """Decode every image of the split fully (threads; decoders release the GIL), unless the cache
    says a file of these very contents decoded before; then check each against its declared width
    and height. Paths are plain strings here: at COCO train's size pathlib's objects cost seconds."""
    folder, ann_file = split.source.images, split.source.annotations
    cache_file = _verdict_cache(folder)
    cache = _read_cache(cache_file)
    names = [n.decode() for n in split.names.tolist()]
    paths = [os.path.join(folder, name) for name in names]
    todo, sizes, prints = {}, {}, {}  # path -> file_name still to decode; -> (width, height); -> fingerprint
    for name, path in zip(names, paths):
        try:
            prints[path] = _fingerprint(path)
        except OSError:
            todo[path] = name
            continue
        known = cache.get(name)
        if known and known[0] == prints[path]:
            sizes[path] = tuple(known[1:])
        else:
            todo[path] = name
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
        raise DataError(f"{ann_file}: {len(bad)} of {len(names)} images cannot be read: {listing}"
                        f"{' ...' if len(bad) > 5 else ''}. Fix or remove them from 'images'")
    for path, image_id, declared in zip(paths, split.ids.tolist(), split.sizes.tolist()):
        size = sizes[path]
        if list(size) != declared:
            raise DataError(f"{path}: the image is {size[0]}x{size[1]} but {ann_file} says "
                            f"{declared[0]}x{declared[1]}; fix 'width'/'height' of image id {image_id}")


def first_images(split: CocoSplit, n: int) -> CocoSplit:
    """The split's first `n` images by id (as `load_split(max_images=n)` takes them), from a split
    already loaded and checked: no second pass over the annotation file or the images."""
    return split.take(_first_by_id(split.ids, n))


def _first_by_id(ids: np.ndarray, n: int) -> np.ndarray:
    """The positions of the `n` smallest ids, in id order: what --max-*-images takes."""
    return np.argsort(ids, kind="stable")[:n]


def load_split(source: SplitSource, *, check: bool = True, max_images: int | None = None,
               progress: bool = False) -> CocoSplit:
    """Read a COCO annotation file and check everything that would otherwise fail mid-run."""
    ann_file = source.annotations
    if max_images is not None and max_images < 1:
        raise DataError(f"{ann_file}: asked for its first {max_images} images; take at least 1 (or all)")
    table = read_coco_file(ann_file)
    images = np.arange(len(table.image_ids)) if max_images is None else _first_by_id(table.image_ids, max_images)
    split = _split(source, table, images)
    if not (split.use == TRAINED).any() and not split.skipped.get("crowd_annotations"):
        subset = f" among its first {max_images} images (--max-*-images)" if max_images is not None else ""
        raise DataError(f"{ann_file}: no usable annotations{subset} ({sum(split.skipped.values())} skipped); COCO "
                        "AP and training both need ground-truth boxes: annotate the split or choose another")
    if check:
        check_images(split, progress)
    return split


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


def _split(source: SplitSource, table: CocoTable, images: np.ndarray) -> CocoSplit:
    """The split of `images` (positions in the file): each image's annotations gathered in the file's
    order, and what each is to a run. A missing `iscrowd` means 0; a missing `area` the box's (COCO's
    own files give the segmentation's area, which only a polygon or mask has)."""
    ids = table.image_ids[images]
    by_id = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids[by_id], table.ann_image_ids).clip(max=len(ids) - 1)
    kept = ids[by_id][at] == table.ann_image_ids  # an annotation of a kept image
    position = by_id[at]
    rows = np.flatnonzero(kept)
    rows = rows[np.argsort(position[rows], kind="stable")]
    sizes = table.sizes[images]
    bbox = table.bbox[rows]
    x, y, w, h = bbox.T
    width, height = sizes[position[rows]].T
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(bbox).all(axis=1)
        area = np.where(table.has_area[rows], table.area[rows], np.where(finite, w * h, 0.0))
        x0, y0, x1, y1 = np.maximum(x, 0.0), np.maximum(y, 0.0), np.minimum(x + w, width), np.minimum(y + h, height)
        crowd = table.iscrowd[rows] != 0
        degenerate = ~crowd & (~finite | (w <= 0) | (h <= 0))
        outside = ~crowd & ~degenerate & ((x1 <= x0) | (y1 <= y0))
        trained = ~(crowd | degenerate | outside)
        moved = trained & ((x0 != x) | (y0 != y) | (x1 != x + w) | (y1 != y + h))
    use = np.full(len(rows), SKIPPED, dtype=np.int8)
    use[crowd], use[trained] = CROWD, TRAINED
    skipped = {"degenerate_boxes": int(degenerate.sum()), "boxes_outside_image": int(outside.sum()),
               "clipped_boxes": int(moved.sum()), "crowd_annotations": int(crowd.sum())}
    return CocoSplit(
        source=source, categories=table.categories, ids=ids, sizes=sizes, names=table.names[images],
        ann_ends=np.cumsum(np.bincount(position[rows], minlength=len(ids))), ann_ids=table.ann_ids[rows],
        category_ids=table.category_ids[rows], bbox=bbox, iscrowd=table.iscrowd[rows], area=area, use=use,
        clipped=np.stack([x0, y0, x1 - x0, y1 - y0], axis=1), skipped={k: v for k, v in skipped.items() if v})


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
