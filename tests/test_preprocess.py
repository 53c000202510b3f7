"""The batch preparation dapft runs where the model runs, held to each family's own image processor."""

from __future__ import annotations

import pytest
import torch
import transformers

from dapft.data.preprocess import BatchPreprocessor, UnsupportedProcessorError
from dapft.modeling.tiny import TINY_FAMILIES, tiny_processor

# Every family's processor as the tiny models have it, and the defaults real checkpoints ship with
# (DETR / Deformable: shortest edge 800, longest 1333, padded; RT-DETR: 640 x 640, not normalised).
PROCESSORS = {f: (lambda f=f: tiny_processor(f, 96)) for f in TINY_FAMILIES} | {
    "DetrImageProcessor()": transformers.DetrImageProcessor,
    "DeformableDetrImageProcessor()": transformers.DeformableDetrImageProcessor,
    "RTDetrImageProcessor()": transformers.RTDetrImageProcessor,
    "RfDetrImageProcessor()": transformers.RfDetrImageProcessor,
    # the third form of size a DETR-family processor takes: the image fitted into a box, aspect kept
    "DetrImageProcessor(max_height, max_width)": lambda: transformers.DetrImageProcessor(
        size={"max_height": 80, "max_width": 100}),
}


def _batch(seed: int = 0):
    """Three images of different shapes (so a padding processor pads two of them), 0-3 boxes each."""
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for (h, w), n in (((97, 131), 3), ((120, 120), 1), ((64, 150), 0)):
        images.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 2
        boxes.append(torch.cat([xy, xy + wh], 1))
    return images, boxes


def _processor_output(processor, images, boxes, **kwargs):
    annotations = [{"image_id": i, "annotations": [
        {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 1, "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        for x0, y0, x1, y1 in b.tolist()]} for i, b in enumerate(boxes)]
    return processor(images=images, annotations=annotations, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_pixels_and_mask_are_the_processors_and_boxes_are_relative_to_the_image(name):
    processor = PROCESSORS[name]()
    images, boxes = _batch()
    ours = BatchPreprocessor.from_processor(processor)(images, boxes)
    theirs = _processor_output(processor, images, boxes)
    # Bit for bit on CPU: the same torchvision resize of the same uint8 pixels, the same float32 maths.
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert ("pixel_mask" in ours) == ("pixel_mask" in theirs)
    if "pixel_mask" in theirs:
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
    canvas_h, canvas_w = theirs["pixel_values"].shape[-2:]
    for k, (mine, label) in enumerate(zip(ours["boxes"], theirs["labels"])):
        # The processor rescales boxes to the padded canvas; dapft keeps them relative to the image
        # (the original DETR code's convention, which post-processing assumes): the same boxes up to
        # the padding ratio, and identical for an image the batch did not pad.
        if "pixel_mask" in ours:
            rows, cols = ours["pixel_mask"][k].nonzero().max(0).values.tolist()
            h, w = rows + 1, cols + 1
        else:
            h, w = canvas_h, canvas_w
        ratio = torch.tensor([w / canvas_w, h / canvas_h, w / canvas_w, h / canvas_h])
        torch.testing.assert_close(mine * ratio, label["boxes"], rtol=1e-6, atol=1e-6)
        if (h, w) == (canvas_h, canvas_w):
            assert torch.equal(mine, label["boxes"])


@pytest.mark.parametrize("name", ["detr", "deformable_detr", "rt_detr", "DetrImageProcessor()"])
def test_a_perfect_prediction_of_the_targets_post_processes_to_the_annotated_boxes(name):
    """What training asks the model to predict is what evaluation scores as a perfect detection,
    padded batch or not: the targets, as predictions, come back as the annotated boxes through the
    processor's own post-processing (which scales by each image's own size)."""
    processor = PROCESSORS[name]()
    images, boxes = _batch(seed=1)
    ours = BatchPreprocessor.from_processor(processor)(images, boxes)
    for image, annotated, target in zip(images, boxes, ours["boxes"]):
        if not len(annotated):
            continue
        logits = torch.full((1, len(target), 3), -10.0)
        logits[..., 0] = 10.0
        outputs = transformers.utils.ModelOutput(logits=logits, pred_boxes=target[None])
        out = processor.post_process_object_detection(outputs, threshold=0.0,
                                                       target_sizes=[tuple(image.shape[-2:])])[0]
        found = out["boxes"][out["scores"].argsort(descending=True)][: len(target)]
        matched = torch.cdist(annotated, found).min(1).values
        assert float(matched.max()) < 1e-3  # pixels


def test_a_multi_scale_size_is_the_processors_with_that_size():
    processor = tiny_processor("detr", 96)
    images, boxes = _batch(seed=2)
    size = {"shortest_edge": 72, "longest_edge": 160}
    ours = BatchPreprocessor.from_processor(processor)(images, boxes, size=size)
    theirs = _processor_output(processor, images, boxes, size=size)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])


def test_settings_it_cannot_reproduce_are_refused_by_name():
    with pytest.raises(UnsupportedProcessorError, match="do_convert_annotations"):
        BatchPreprocessor.from_processor(transformers.DetrImageProcessor(do_convert_annotations=False))
    with pytest.raises(UnsupportedProcessorError, match="shortest_edge"):
        BatchPreprocessor(size=None)([torch.zeros(3, 8, 8, dtype=torch.uint8)], size={"shortest_edge": 4})
    fixed = BatchPreprocessor(size={"shortest_edge": 16, "longest_edge": 64}, pad=False)
    with pytest.raises(UnsupportedProcessorError, match="do_pad"):
        fixed([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 16, dtype=torch.uint8)])


def test_every_family_is_reproduced_and_an_unknown_processor_is_used_as_it_is():
    assert all(isinstance(BatchPreprocessor.from_processor(make()), BatchPreprocessor) for make in PROCESSORS.values())

    class Sharper(transformers.DetrImageProcessor):  # a processor of the user's own, resizing otherwise
        def resize(self, image, size, resample=None, **kwargs):
            return super().resize(image, size, resample=3, **kwargs)  # bicubic

    processor = Sharper(size={"shortest_edge": 96, "longest_edge": 160})
    prepare = BatchPreprocessor.from_processor(processor)
    assert not isinstance(prepare, BatchPreprocessor)
    images, boxes = _batch(seed=3)
    ours, theirs = prepare(images, boxes), _processor_output(processor, images, boxes)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
    reference = BatchPreprocessor.from_processor(tiny_processor("detr", 96))(images, boxes)  # same sizes
    for mine, expected in zip(ours["boxes"], reference["boxes"]):
        assert torch.equal(mine, expected)
