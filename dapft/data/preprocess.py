"""What a checkpoint's image processor does to a batch, done on the device the model runs on.

The image processors of the DETR family in transformers (DETR, Conditional, DAB and Deformable DETR,
RT-DETR, D-FINE, LW-DETR, RF-DETR) all do four things to a batch: resize each image (to a fixed
size, or keeping its aspect ratio within a shortest and a longest edge), rescale and normalise it
in float32, pad the batch to its largest image (bottom and right, zeros, with a pixel mask), and
turn each box into centre format relative to the image. `BatchPreprocessor` reads those settings
off the checkpoint's processor and makes the same torchvision calls, on uint8 tensors, so that on
CPU the pixels are those of the processor bit for bit (tests/test_preprocess.py holds every family
to its processor). Done per batch where the model runs, a GPU resizes and normalises a batch in a
fraction of a millisecond, where the processor in data-loader workers cost several times decoding
the image (BENCHMARKS.md); data-loader workers then only read, decode and augment.

One deliberate difference from the processor: boxes are normalised by the image's own (resized)
size, not by the padded batch canvas. The DETR family's original code trains so (its boxes are
normalised before the batch is padded: predictions are relative to the visible image, which the
model finds from the pixel mask), its published checkpoints predict so, and transformers'
`post_process_object_detection` scales predictions back by the image's own size. transformers'
processors since 4.37 rescale boxes to the padded canvas instead, which would teach a fine-tuned
checkpoint boxes that its own post-processing then misplaces whenever a batch is padded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF


class UnsupportedProcessorError(ValueError):
    """A processor setting dapft does not reproduce; the message names the setting."""


def _get(obj, key: str, default=None):
    """A field of a processor's `size` (a dict, or transformers' SizeDict) or of the processor."""
    value = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
    return default if value is None else value


def _interpolation(resample) -> InterpolationMode:
    if isinstance(resample, InterpolationMode):
        return resample
    from transformers.image_utils import pil_torch_interpolation_mapping

    return pil_torch_interpolation_mapping[resample]


def check_size(size: dict, name: str = "size") -> None:
    if not ({"shortest_edge", "longest_edge"} <= size.keys() or {"max_height", "max_width"} <= size.keys()
            or {"height", "width"} <= size.keys()):
        raise UnsupportedProcessorError(
            f"{name}: size {size}; DETR-family processors take shortest_edge and longest_edge, max_height and "
            "max_width, or height and width")


def output_size(size: dict | None, height: int, width: int) -> tuple[int, int]:
    """(height, width) an image of this size is resized to under `size` (None: not resized), by
    transformers' own rules."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    if size is None:
        return height, width
    if "shortest_edge" in size and "longest_edge" in size:
        return tuple(get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"]))
    if "max_height" in size and "max_width" in size:
        return tuple(get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"]))
    return size["height"], size["width"]


@dataclass(frozen=True)
class PixelOps:
    """What a processor does to the pixels of one resized image: the resize's interpolation, the
    rescale and the normalisation, in the processor's order and float32 arithmetic."""

    interpolation: InterpolationMode = InterpolationMode.BILINEAR
    rescale_factor: float | None = 1 / 255  # None: no rescale
    mean: tuple[float, ...] | None = None  # None: no normalisation
    std: tuple[float, ...] | None = None
    # RF-DETR's processor rescales to [0, 1] first and resizes the float image without antialiasing;
    # the others resize the uint8 image with antialiasing, then rescale and normalise in one step.
    rescale_first: bool = False

    def resized(self, images: Tensor, new: tuple[int, int] | None) -> Tensor:
        """A stack of same-sized uint8 images resized to `new` (None: not resized): still uint8 in the
        processors' usual order (normalised later, in place); rescaled and normalised already in
        RF-DETR's."""
        if not self.rescale_first:
            return images if new is None else tvF.resize(images, list(new), interpolation=self.interpolation,
                                                         antialias=True)
        if self.rescale_factor is not None:
            images = images * self.rescale_factor
        if new is not None:
            images = tvF.resize(images, list(new), interpolation=self.interpolation, antialias=False)
        return tvF.normalize(images.to(torch.float32), list(self.mean), list(self.std)) if self.mean is not None \
            else images.to(torch.float32)

    def write(self, region: Tensor, image: Tensor) -> None:
        """Write one resized image into its place on the batch canvas, rescaled and normalised as the
        processor does it: the fused (x - mean / factor) / (std / factor) on the unscaled pixels, in
        float32 (here, in place, so that no batch-sized intermediate is made)."""
        region.copy_(image)
        if self.rescale_first:
            return
        if self.mean is not None:
            scale = 1.0 / self.rescale_factor if self.rescale_factor is not None else 1.0
            # float32 products, as the processors compute them (on the host: no device round trip)
            mean = (torch.tensor(self.mean) * scale).tolist()
            std = (torch.tensor(self.std) * scale).tolist()
            tvF.normalize(region, mean, std, inplace=True)
        elif self.rescale_factor is not None:
            region.mul_(self.rescale_factor)


def processor_settings(processor) -> dict:
    """A checkpoint processor's resize, pixel operations and padding, as BatchPreprocessor's fields;
    a setting dapft does not reproduce raises UnsupportedProcessorError naming it."""
    name = type(processor).__name__
    fmt = str(_get(processor, "format", "coco_detection"))
    if "coco_detection" not in fmt.lower():
        raise UnsupportedProcessorError(f"{name}: format {fmt!r}; dapft trains detection (coco_detection)")
    if not _get(processor, "do_convert_annotations", True):
        raise UnsupportedProcessorError(
            f"{name}: do_convert_annotations is false, but DETR-family losses need boxes relative to the image; "
            "set it to true in preprocessor_config.json")
    if _get(processor, "do_center_crop", False):
        raise UnsupportedProcessorError(f"{name}: do_center_crop is not part of DETR-family preprocessing")
    size = None
    if _get(processor, "do_resize", True):
        raw = _get(processor, "size", {})
        size = {k: int(_get(raw, k)) for k in ("shortest_edge", "longest_edge", "max_height", "max_width",
                                               "height", "width") if _get(raw, k) is not None}
        check_size(size, name)
    pad_size = _get(processor, "pad_size")
    normalize = bool(_get(processor, "do_normalize", True))
    pixels = PixelOps(interpolation=_interpolation(_get(processor, "resample", 2)),
                      rescale_factor=float(_get(processor, "rescale_factor")) if _get(processor, "do_rescale", True)
                      else None,
                      mean=tuple(_get(processor, "image_mean")) if normalize else None,
                      std=tuple(_get(processor, "image_std")) if normalize else None)
    return dict(size=size, pixels=pixels, pad=bool(_get(processor, "do_pad", False)),
                pad_size=(int(_get(pad_size, "height")), int(_get(pad_size, "width"))) if pad_size else None)


@dataclass(frozen=True)
class BatchPreprocessor:
    """A checkpoint image processor's work on a batch, as data: each image resized and written onto
    the padded batch canvas by `pixels`, the pixel mask, and the boxes made relative to each image."""

    size: dict[str, int] | None  # None: no resize
    pixels: PixelOps = PixelOps()
    pad: bool = True
    pad_size: tuple[int, int] | None = None  # None: the batch's largest image

    @classmethod
    def from_processor(cls, processor) -> "BatchPreprocessor | ProcessorBatches":
        """The processor's settings, checked against the processor itself on a probe batch (the
        order of its operations is code, not configuration, and may change between transformers
        versions): the first of the known orders that reproduces it bit for bit. A processor neither
        reproduces is used as it is, per batch (`ProcessorBatches`)."""
        settings = processor_settings(processor)
        for rescale_first in (False, True):
            candidate = cls(**{**settings, "pixels": replace(settings["pixels"], rescale_first=rescale_first)})
            if candidate.reproduces(processor):
                return candidate
        return ProcessorBatches(processor, candidate)

    def reproduces(self, processor) -> bool:
        """Whether this makes the processor's own pixels and mask, bit for bit, on a probe batch."""
        g = torch.Generator().manual_seed(0)
        probe = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((37, 53), (61, 29))]
        expected = processor(images=probe, return_tensors="pt")
        try:
            ours = self(probe)
        except UnsupportedProcessorError:
            return False
        return all(k in ours and ours[k].shape == v.shape and torch.equal(ours[k], v) for k, v in expected.items()
                   if k in ("pixel_values", "pixel_mask")) and ("pixel_mask" in ours) == ("pixel_mask" in expected)

    def _canvas(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        if self.pad:
            return self.pad_size or (max(h for h, _ in sizes), max(w for _, w in sizes))
        if len(set(sizes)) > 1:
            raise UnsupportedProcessorError(
                f"images of different sizes {sorted(set(sizes))} in one batch, and the processor does not pad "
                "(do_pad false): give it a fixed size (height and width) or do_pad true")
        return sizes[0]

    def __call__(self, images: list[Tensor], boxes: list[Tensor] | None = None, size: dict | None = None) -> dict:
        """uint8 (3, H, W) images, and their boxes (xyxy in their pixels), on any device -> the model's
        inputs: `pixel_values` (and `pixel_mask` when the processor pads), and with boxes, per image
        the (N, 4) boxes in centre format relative to the resized image. `size` overrides the
        processor's resize (multi-scale training)."""
        if size is not None:
            check_size(size)
        size = size or self.size
        sizes = [output_size(size, *im.shape[-2:]) for im in images]
        canvas = self._canvas(sizes)
        device = images[0].device
        pixel_values = torch.zeros(len(images), images[0].shape[0], *canvas, dtype=torch.float32, device=device)
        groups: dict[tuple[int, int], list[int]] = {}  # one resize call per input shape, as the processors do
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        for members in groups.values():
            h, w = sizes[members[0]]
            resized = self.pixels.resized(torch.stack([images[i] for i in members]), (h, w) if size else None)
            for k, i in enumerate(members):
                self.pixels.write(pixel_values[i, :, :h, :w], resized[k])
        batch = {"pixel_values": pixel_values}
        if self.pad:
            batch["pixel_mask"] = torch.zeros(len(images), *canvas, dtype=torch.int64, device=device)
            for i, (h, w) in enumerate(sizes):
                batch["pixel_mask"][i, :h, :w] = 1
        if boxes is not None:
            batch["boxes"] = [_relative_centre_boxes(b, tuple(im.shape[-2:]), new)
                              for b, im, new in zip(boxes, images, sizes)]
        return batch


def _relative_centre_boxes(boxes: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """xyxy boxes in the pixels of an image of size `old` -> centre format relative to the image,
    through the resized size `new` in the processors' own order of float32 operations."""
    from transformers.image_transforms import corners_to_center_format

    (oh, ow), (nh, nw) = old, new
    rh, rw = nh / oh, nw / ow
    scaled = boxes.to(torch.float32) * torch.tensor([rw, rh, rw, rh], dtype=torch.float32, device=boxes.device)
    centre = corners_to_center_format(scaled)
    return centre / torch.tensor([nw, nh, nw, nh], dtype=torch.float32, device=boxes.device)


class ProcessorBatches:
    """A processor `BatchPreprocessor` does not reproduce, called per batch for the pixels (on the
    batch's device); boxes as BatchPreprocessor makes them, from each image's resized size."""

    def __init__(self, processor, settings: BatchPreprocessor):
        self.processor, self.settings = processor, settings

    def __call__(self, images: list[Tensor], boxes: list[Tensor] | None = None, size: dict | None = None) -> dict:
        kwargs = {"size": size} if size is not None else {}
        encoded = self.processor(images=images, return_tensors="pt", device=images[0].device, **kwargs)
        batch = {k: encoded[k] for k in ("pixel_values", "pixel_mask") if k in encoded}
        if boxes is not None:
            if "pixel_mask" in batch:  # the resized image is where the mask is set
                sizes = [(int(m.any(1).sum()), int(m.any(0).sum())) for m in batch["pixel_mask"]]
            else:
                sizes = [tuple(batch["pixel_values"].shape[-2:])] * len(images)
            batch["boxes"] = [_relative_centre_boxes(b, tuple(im.shape[-2:]), s) for b, im, s in zip(boxes, images, sizes)]
        return batch
