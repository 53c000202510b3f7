"""From image files to the model's inputs: reading, training augmentation, batching, data order.

Data-loader workers do what only the host can: read and decode each image (torchvision's decoders,
upright by its EXIF orientation), apply the training augmentation to the uint8 image and its boxes
(torchvision `transforms.v2`), and hand over uint8 tensors. The checkpoint's resize, normalisation
and padding (dapft.data.preprocess) then run on the whole batch where the model runs: on the GPU for a
CUDA run, so that a GPU user's accelerator does not wait on per-image processing in a few workers.
"""

from __future__ import annotations

import gc
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as TF

from dapft.data.coco_file import DataError
from dapft.data.flat_split import TRAINED, CocoSplit
from dapft.data.labels import LabelMap
from dapft.data.preprocess import BatchPreprocessor

try:  # deprecated in torchvision 0.29 for TorchCodec; PIL reads every image when it is gone
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # pragma: no cover
    decode_image = None

# ----------------------------------------------------------------------------------------------
# Reading images


def read_image(path: Path) -> Tensor:
    """An image file as upright 8-bit RGB, (3, H, W) uint8. Upright: photos store their pixels as the
    sensor saw them with an EXIF orientation tag, and COCO tools, browsers and labelling tools (so the
    boxes) show them rotated by it. 16-bit images are rescaled from their full range (a plain cast
    would keep the low byte, PIL's conversion clips: most pixels would turn white)."""
    try:
        if decode_image is None:
            raise RuntimeError("no torchvision decoders")
        data = read_file(str(path))
        # torchvision turns JPEG and PNG upright by their EXIF orientation, but not WebP (0.29): the
        # others go to PIL, which turns every format it reads upright.
        if not (bytes(data[:3].tolist()) == _JPEG or bytes(data[:8].tolist()) == _PNG):
            raise RuntimeError("not JPEG or PNG")
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # formats torchvision does not decode or turn upright (WebP, BMP, TIFF, ...)
        return torch.from_numpy(np.array(_read_with_pil(path))).permute(2, 0, 1).contiguous()
    if image.dtype != torch.uint8:
        image = (image.to(torch.float64) / 65535.0 * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    return image


_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def _read_with_pil(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16- and 32-bit integer images: rescaled from their range
            deep = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or deep.max() <= 65535 else float(deep.max())
            im = Image.fromarray(np.clip(deep / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Augmentation


class TrainAugmentation:
    """The DETR family's training augmentation on a uint8 image and its xyxy boxes, scaled to the
    image size: a horizontal flip half of the time, and half of the time a random crop of 0.48-0.75
    of the image (DETR: 384-600 px of ~800), boxes clamped to it and those left under a pixel wide or
    high dropped. torchvision's own kernels move the boxes; the draws come from the generator the
    caller passes (seeded by image and epoch), so no global random state is read or moved: the
    number of data workers, or a resume, never changes what an image becomes. Resizing, including
    multi-scale, is the batch's (multi_scale_sizes, dapft.data.preprocess)."""

    XYXY = tv_tensors.BoundingBoxFormat.XYXY

    def __init__(self, image_size: int):
        self.lo, self.hi = max(8, int(0.48 * image_size)), max(8, int(0.75 * image_size))

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor, rng: random.Random):
        h, w = image.shape[-2:]
        if rng.random() < 0.5:
            image = TF.horizontal_flip_image(image)
            boxes = TF.horizontal_flip_bounding_boxes(boxes, format=self.XYXY, canvas_size=(h, w))
        if rng.random() < 0.5:
            ch, cw = rng.randint(min(self.lo, h), min(h, self.hi)), rng.randint(min(self.lo, w), min(w, self.hi))
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            image = TF.crop_image(image, top, left, ch, cw)
            boxes, _ = TF.crop_bounding_boxes(boxes, self.XYXY, top, left, ch, cw)  # clamped to the crop
            keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            boxes, labels = boxes[keep], labels[keep]
        return image, boxes, labels


def multi_scale_sizes(processor) -> list[dict] | None:
    """DETR's multi-scale training for processors with a shortest edge: 11 shortest edges from 0.6x
    to 1x of the checkpoint's (even numbers), the longest edge kept. None for fixed-size processors."""
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if not get("shortest_edge"):
        return None
    base = get("shortest_edge")
    return [{"shortest_edge": int(round(base * (0.6 + 0.04 * k) / 2) * 2), "longest_edge": get("longest_edge")}
            for k in range(11)]


# ----------------------------------------------------------------------------------------------
# Dataset and batches


class CocoDetection(Dataset):
    """Images of a validated split as uint8 tensors, with their boxes (xyxy, pixels) and labels in
    model label space; augmented when given an augmentation.

    Holds flat numpy arrays only (the split's, and its trained boxes with their labels): data-loader
    workers forked with it read items without touching a Python object of the annotation set, whose
    pages would become each worker's own as reading moves their reference counts (BENCHMARKS.md)."""

    def __init__(self, split: CocoSplit, label_map: LabelMap, augment: TrainAugmentation | None = None):
        self.folder, self.augment = split.source.images, augment
        self.ids, self.names = split.ids, split.names
        self.sizes = np.ascontiguousarray(split.sizes[:, ::-1])  # height, width
        trained = split.use == TRAINED
        self.box_ends = np.cumsum(np.bincount(split.image_of_rows()[trained], minlength=len(split)))
        self.boxes = split.clipped[trained].astype(np.float32)
        categories, inverse = np.unique(split.category_ids[trained], return_inverse=True)
        self.labels = np.array([label_map.to_model[c] for c in categories.tolist()], dtype=np.int64)[inverse]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # Training samplers pass (index, seed): the sample's augmentation then depends on that seed
        # alone, not on worker count or on where a resumed run restarted.
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.folder / self.names[index].decode()
        try:
            image = read_image(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot read image ({exc})") from exc
        span = slice(int(self.box_ends[index - 1]) if index else 0, int(self.box_ends[index]))
        boxes = box_convert(torch.from_numpy(self.boxes[span].copy()), "xywh", "xyxy")
        labels = torch.from_numpy(self.labels[span].copy())
        if self.augment is not None:
            image, boxes, labels = self.augment(image, boxes, labels, random.Random(seed))
        height, width = self.sizes[index].tolist()
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": int(self.ids[index]),
                "orig_size": (height, width), "seed": seed}


class Collate:
    """Items -> one batch: the images still uint8 and of their own sizes, unless `prepare` is given
    (then the batch is made ready for the model here, in the worker: CPU runs)."""

    def __init__(self, scales: list[dict] | None = None, prepare: BatchPreprocessor | None = None):
        self.scales, self.prepare = scales, prepare

    def __call__(self, items: list[dict]) -> dict:
        size = None
        if self.scales:  # DETR picks a scale per image; per batch keeps padding small
            seed = items[0].get("seed")
            size = (random.Random(seed) if seed is not None else random).choice(self.scales)
        batch = {"images": [it["image"] for it in items], "boxes": [it["boxes"] for it in items],
                 "class_labels": [it["labels"] for it in items], "image_ids": [it["image_id"] for it in items],
                 "orig_sizes": torch.tensor([it["orig_size"] for it in items]), "size": size}
        return finish_batch(batch, self.prepare, torch.device("cpu")) if self.prepare is not None else batch


def finish_batch(batch: dict, prepare, device: torch.device) -> dict:
    """A collated batch on `device`, resized, normalised and padded: what the model takes, with
    `labels` as transformers' losses read them (class_labels, boxes relative to the image)."""
    blocking = device.type != "cuda"
    images = [im.to(device, non_blocking=not blocking) for im in batch["images"]]
    boxes = [b.to(device, non_blocking=not blocking) for b in batch["boxes"]]
    out = prepare(images, boxes, size=batch["size"])
    labels = [{"class_labels": c.to(device, non_blocking=not blocking), "boxes": b}
              for c, b in zip(batch["class_labels"], out.pop("boxes"))]
    return {**out, "labels": labels, "image_ids": batch["image_ids"], "orig_sizes": batch["orig_sizes"]}


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic data order for (seed, epoch), sharded over processes, resumable mid-epoch.

    Yields (index, sample_seed). With K processes, process r takes every K-th sample of the epoch's
    permutation, so K processes of batch B see exactly the batches one process of batch K*B sees.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_samples

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        pad = (-len(order)) % self.world  # equal shards, as DistributedSampler does, shuffled or not
        return order + order[:pad]

    def __iter__(self):
        mine = self._order()[self.rank :: self.world][self.skip :]
        for i in mine:
            yield (i, (self.seed * 7_919 + self.epoch) * 1_000_003 + i)

    def __len__(self) -> int:
        return len(self._order()[self.rank :: self.world]) - self.skip


def default_num_workers(device: torch.device | str, processes_per_node: int = 1, cap: int = 8,
                        cpus: int | None = None) -> int:
    """Data-loader workers per process. For a GPU: the CPUs this process may use (`cpus`, by default
    its CPU affinity: those of the machine shared among its processes), less one for the process
    itself; at least 1, at most `cap`. For a CPU run: none. There the model's step already uses every core, and a worker beside
    it takes them from the step: measured on 2 cores with the bundled tiny RT-DETR, a worker made the
    step 1.19x the bare step and preparing the batch in the step's own process 1.04x (BENCHMARKS.md)."""
    if torch.device(device).type == "cpu":
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(cap, cpus // max(1, processes_per_node) - 1))


class BatchLoader:
    """Batches of `dataset` as the model takes them, on `device`.

    Workers persist across epochs and evaluations (starting them is seconds a time on a large
    split). On a CUDA device, batches leave the workers as pinned uint8 tensors, are copied without
    blocking and prepared on the GPU; on a CPU device the workers prepare them too, beside the model
    step (BENCHMARKS.md measures both placements)."""

    def __init__(self, dataset: Dataset, processor, *, batch_size: int, train: bool, num_workers: int,
                 sampler=None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.prepare = BatchPreprocessor.from_processor(processor)
        in_workers = self.device.type == "cpu" and num_workers > 0
        collate = Collate(multi_scale_sizes(processor) if train else None, self.prepare if in_workers else None)
        # An explicit generator keeps DataLoader from drawing on the global RNG (which a resumed run
        # must find exactly as the interrupted one left it).
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                                 collate_fn=collate,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0),
                                 drop_last=False)

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.loader.num_workers:
            # Workers are forked at the first iteration (and persist): objects alive now are left
            # out of the cyclic collector's scans, which would write into every object's header in
            # each worker and so copy the whole annotation set's pages into it.
            gc.freeze()
        for batch in self.loader:
            yield batch if "pixel_values" in batch else finish_batch(batch, self.prepare, self.device)

