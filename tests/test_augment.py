"""The augmentation's own rules and the batch preparation's, as properties over random cases.

Images are drawn with their objects at their boxes: solid, disjoint rectangles, each object a colour
of its own (channel 0 says which object, channel 1 its label), on integer coordinates. After a flip
or a crop the pixels of the image then say exactly which boxes must remain, where, with what label:
a bug in how boxes follow the pixels cannot hide behind a tolerance."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapft.data.labels import LabelMap
from dapft.data.loader import BatchLoader, CocoDetection, EpochSampler, TrainAugmentation
from dapft.data.preprocess import BatchPreprocessor
from dapft.data.shapes import CLASSES
from dapft.data.splits import load_split, resolve_split
from dapft.modeling.tiny import tiny_processor

# Derandomised: the same cases on every machine, so a failure in CI is a failure here.
CASES = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def drawn_objects(seed: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uint8 (3, H, W) image with up to 12 disjoint solid rectangles (one per cell of a 3 x 4 grid,
    at least 1 px each way), their xyxy boxes and labels. Object k is drawn in channel 0 as 10 + k."""
    rng = random.Random(seed)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    boxes, labels = [], []
    rows, cols = 3, 4
    for r in range(rows):
        for c in range(cols):
            top, bottom = r * height // rows, (r + 1) * height // rows
            left, right = c * width // cols, (c + 1) * width // cols
            if bottom - top < 1 or right - left < 1 or rng.random() < 0.25:
                continue
            y0, y1 = sorted(rng.sample(range(top, bottom + 1), 2))
            x0, x1 = sorted(rng.sample(range(left, right + 1), 2))
            label = rng.randrange(len(CLASSES))
            image[0, y0:y1, x0:x1] = 10 + len(boxes)
            image[1, y0:y1, x0:x1] = 100 + label
            image[2, y0:y1, x0:x1] = 255
            boxes.append([x0, y0, x1, y1])
            labels.append(label)
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


def assert_boxes_are_the_visible_objects(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> None:
    """Every box lies inside its image, is at least a pixel each way, covers exactly the pixels of one
    object (all of them that are visible) and carries that object's label; and every object with a
    visible pixel has its box."""
    height, width = image.shape[-2:]
    assert boxes.shape == (len(labels), 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), boxes
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all(), (boxes, image.shape)
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(), boxes
    seen = set()
    for box, label in zip(boxes.round().long().tolist(), labels.tolist()):
        x0, y0, x1, y1 = box
        region = image[:, y0:y1, x0:x1]
        ids = region[0].unique().tolist()
        assert len(ids) == 1 and ids[0] >= 10, f"box {box} covers objects {ids}"
        assert (region[1] == 100 + label).all(), f"box {box} has label {label}, its pixels another"
        assert int((image[0] == ids[0]).sum()) == (x1 - x0) * (y1 - y0), f"box {box} is not its object's extent"
        seen.add(ids[0])
    visible = set(image[0].unique().tolist()) - {0}
    assert visible == seen, f"objects {sorted(visible - seen)} are visible without a box"


@CASES
@given(seed=st.integers(0, 2**31), height=st.integers(8, 90), width=st.integers(8, 90))
def test_every_augmented_box_is_its_visible_object_with_its_label(seed, height, width):
    image, boxes, labels = drawn_objects(seed, height, width)
    assert_boxes_are_the_visible_objects(image, boxes, labels)  # the drawing itself holds the rule
    augment = TrainAugmentation(max(height, width))
    out = augment(image, boxes, labels, random.Random(seed + 1))
    assert_boxes_are_the_visible_objects(*out)


class Draws(random.Random):
    """A random source whose draws are given: the augmentation takes its generator from the caller,
    so a test can name the flip and the crop it wants."""

    def __init__(self, randoms: list[float], ints: list[int]):
        super().__init__(0)
        self.randoms, self.ints = list(randoms), list(ints)

    def random(self) -> float:
        return self.randoms.pop(0)

    def randint(self, a: int, b: int) -> int:
        value = self.ints.pop(0)
        assert a <= value <= b, (a, value, b)
        return value


def test_a_random_crop_drops_boxes_left_under_a_pixel_with_their_labels():
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    boxes = torch.tensor([[10, 10, 40, 40],      # inside the crop
                          [60.6, 50, 90, 60],    # 0.4 px of it left inside
                          [20, 60.5, 30, 90],    # 0.5 px high left inside
                          [70, 70, 90, 90],      # wholly outside: clamped to nothing
                          [50, 20, 90, 30]])     # 11 px of it left inside
    labels = torch.tensor([1, 2, 3, 4, 5])
    # no flip (0.9), a crop (0.1) of 61 x 61 at the top left corner
    out_image, out_boxes, out_labels = TrainAugmentation(100)(image, boxes, labels, Draws([0.9, 0.1], [61, 61, 0, 0]))
    assert out_image.shape[-2:] == (61, 61)
    assert out_labels.tolist() == [1, 5]
    torch.testing.assert_close(out_boxes, torch.tensor([[10.0, 10, 40, 40], [50, 20, 61, 30]]))


# ---------------------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def train_split(shapes_root):
    split = load_split(resolve_split(shapes_root, "train"))
    return split, LabelMap.build(split.categories, dict(enumerate(CLASSES)))


def _epoch(dataset, epoch: int) -> dict[int, dict]:
    """Each image's training item in `epoch`, as the sampler hands it to the dataset."""
    sampler = EpochSampler(len(dataset), seed=0)
    sampler.set_epoch(epoch)
    return {index: dataset[(index, seed)] for index, seed in sampler}


def _same(a: dict, b: dict) -> bool:
    return a["image"].shape == b["image"].shape and torch.equal(a["image"], b["image"]) \
        and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_each_epoch_shows_an_image_another_augmentation_and_the_same_epoch_the_same(train_split):
    split, mapping = train_split
    dataset = CocoDetection(split, mapping, TrainAugmentation(192))
    first, again, second = _epoch(dataset, 1), _epoch(dataset, 1), _epoch(dataset, 2)
    assert all(_same(first[i], again[i]) for i in first)
    changed = sum(not _same(first[i], second[i]) for i in first)
    # a flip and a crop each drawn with probability 1/2: 1 image in 16 repeats by chance
    assert changed >= 0.7 * len(first), f"only {changed} of {len(first)} images changed between epochs"


def _batches(split, mapping, workers: int, epoch: int) -> list[dict]:
    sampler = EpochSampler(len(split), seed=3)
    sampler.set_epoch(epoch)
    loader = BatchLoader(CocoDetection(split, mapping, TrainAugmentation(192)), tiny_processor("detr", 96),
                         batch_size=4, train=True, num_workers=workers, sampler=sampler)
    return list(loader)


def test_the_same_image_and_epoch_give_the_same_batch_with_0_1_or_2_workers(train_split):
    split, mapping = train_split
    reference = _batches(split, mapping, 0, epoch=2)
    for workers in (1, 2):
        for a, b in zip(reference, _batches(split, mapping, workers, epoch=2), strict=True):
            assert a["image_ids"] == b["image_ids"]
            torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
            torch.testing.assert_close(a["pixel_mask"], b["pixel_mask"], rtol=0, atol=0)
            for la, lb in zip(a["labels"], b["labels"]):
                assert torch.equal(la["class_labels"], lb["class_labels"]) and torch.equal(la["boxes"], lb["boxes"])


@CASES
@given(seed=st.integers(0, 2**31), sizes=st.lists(st.tuples(st.integers(8, 70), st.integers(8, 70)), min_size=1,
                                                  max_size=3),
       target=st.sampled_from([{"shortest_edge": 48, "longest_edge": 80}, {"height": 40, "width": 56},
                               {"max_height": 50, "max_width": 30}]))
def test_prepared_boxes_frame_their_objects_in_the_resized_image_with_their_labels(seed, sizes, target):
    """The batch preparation's boxes (centre format, relative to each resized image) mapped back to
    that image's pixels are its objects' boxes scaled by the resize; the mask covers the resized image
    and nothing else; labels stay where they were."""
    drawn = [drawn_objects(seed + k, h, w) for k, (h, w) in enumerate(sizes)]
    prepare = BatchPreprocessor(size=target)
    batch = prepare([d[0] for d in drawn], [d[1] for d in drawn])
    for (image, boxes, _labels), mask, rel in zip(drawn, batch["pixel_mask"], batch["boxes"]):
        rows, cols = int(mask.any(1).sum()), int(mask.any(0).sum())
        assert int(mask.sum()) == rows * cols  # a rectangle at the top left
        h, w = image.shape[-2:]
        assert rel.shape == boxes.shape and ((rel >= 0) & (rel <= 1)).all()
        xyxy = torch.cat([rel[:, :2] - rel[:, 2:] / 2, rel[:, :2] + rel[:, 2:] / 2], 1) * torch.tensor(
            [cols, rows, cols, rows])
        torch.testing.assert_close(xyxy, boxes * torch.tensor([cols / w, rows / h, cols / w, rows / h]),
                                   rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cpus, processes, cap, workers", [
    (16, 1, 8, 8),   # at most the cap
    (6, 1, 8, 5),    # one CPU left for the process itself
    (16, 4, 8, 3),   # the machine's CPUs shared among its torchrun processes, one each for themselves
    (2, 8, 8, 1),    # at least one
    (16, 1, 4, 4),
])
def test_a_gpu_process_gets_the_workers_its_cpus_allow_and_a_cpu_run_none(cpus, processes, cap, workers):
    from dapft.data.loader import default_num_workers

    assert default_num_workers("cuda", processes, cap, cpus=cpus) == workers
    assert default_num_workers("cpu", processes, cap, cpus=cpus) == 0


def test_by_default_a_gpu_process_counts_the_cpus_it_may_run_on():
    import os

    from dapft.data.loader import default_num_workers

    assert default_num_workers("cuda") == default_num_workers("cuda", cpus=len(os.sched_getaffinity(0)))


def test_an_unshuffled_sampler_keeps_the_order_and_gives_every_process_as_many_samples():
    # Unequal shards would leave one process waiting in a collective for a batch that never comes.
    shards = []
    for rank in (0, 1):
        sampler = EpochSampler(5, seed=0, shuffle=False, rank=rank, world_size=2)
        shards.append([index for index, _seed in sampler])
    assert shards == [[0, 2, 4], [1, 3, 0]]
    assert [i for i, _ in EpochSampler(4, seed=0, shuffle=False)] == [0, 1, 2, 3]
