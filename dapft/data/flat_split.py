"""A split as flat numpy arrays (CocoSplit): what each annotation is to a run (trained, crowd,
skipped), boxes clipped to their image, and the subsets --max-*-images takes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dapft.data.coco_file import CocoTable


@dataclass(frozen=True)
class SplitSource:
    images: Path
    annotations: Path


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


def first_images(split: CocoSplit, n: int) -> CocoSplit:
    """The split's first `n` images by id (as `load_split(max_images=n)` takes them), from a split
    already loaded and checked: no second pass over the annotation file or the images."""
    return split.take(first_by_id(split.ids, n))


def first_by_id(ids: np.ndarray, n: int) -> np.ndarray:
    """The positions of the `n` smallest ids, in id order: what --max-*-images takes."""
    return np.argsort(ids, kind="stable")[:n]


def flatten_split(source: SplitSource, table: CocoTable, images: np.ndarray) -> CocoSplit:
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
