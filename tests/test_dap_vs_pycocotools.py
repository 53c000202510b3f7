"""The hard limit (READING-NOTES 6): sigma -> 0, many bins and the step localisation make DAP the
all-point interpolated COCO AP. Checked against pycocotools itself on synthetic detections."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert, box_iou

from dapft import differentiable_ap
from dapft.objective.dap import COCO_IOU_THRESHOLDS as COCO_THRESHOLDS

NUM_BINS = 4096
SIGMA = 1e-5  # bins are 1/4096 wide and scores sit at bin centres: 12 sigma from every edge
CELL, SIDE, IMAGE = 150, 60, 1000


def _draw(rng: np.random.Generator, num_images: int, num_classes: int):
    """Ground truths on a grid in the left 600 px; each gets at most one candidate shifted to a
    random IoU (low ones included). Negatives live in the right strip, overlapping no ground truth.
    Scores are distinct bin centres."""
    images, gts, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": IMAGE, "height": IMAGE})
        cells = rng.choice(16, size=rng.integers(1, 12), replace=False)
        for cell in cells:
            x, y = 20 + (cell % 4) * CELL, 20 + (cell // 4) * CELL
            cat = int(rng.integers(1, num_classes + 1))
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, SIDE, SIDE],
                        "area": SIDE * SIDE, "iscrowd": 0})
            if rng.random() < 0.1:  # a missed ground truth
                continue
            iou = rng.uniform(0.2, 1.0)
            dx = SIDE * (1 - iou) / (1 + iou)  # equal boxes shifted by dx have this IoU
            dets.append({"image_id": image_id, "category_id": cat, "bbox": [x + dx, y, SIDE, SIDE], "positive": True})
        for _ in range(rng.integers(0, 15)):
            w, h = rng.uniform(20, 120, size=2)
            dets.append({"image_id": image_id, "category_id": int(rng.integers(1, num_classes + 1)),
                         "bbox": [rng.uniform(650, IMAGE - w), rng.uniform(0, IMAGE - h), w, h], "positive": False})
    bins = rng.choice(NUM_BINS, size=len(dets), replace=False)
    for det, b in zip(dets, bins):
        det["score"] = (b + 0.5) / NUM_BINS
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": gts, "categories": categories}, dets


def _evaluate(dataset: dict, dets: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _all_point_ap(ev: COCOeval, cat_index: int) -> float:
    """All-point interpolated AP averaged over IoU thresholds, from pycocotools' own matching."""
    num_imgs, num_areas = len(ev.params.imgIds), len(ev.params.areaRng)
    evals = [e for e in ev.evalImgs[cat_index * num_areas * num_imgs : cat_index * num_areas * num_imgs + num_imgs]
             if e is not None]  # area range 'all'
    scores = np.concatenate([e["dtScores"] for e in evals])
    order = np.argsort(-scores, kind="mergesort")
    matches = np.concatenate([e["dtMatches"] for e in evals], axis=1)[:, order]
    ignore = np.concatenate([e["dtIgnore"] for e in evals], axis=1)[:, order]
    npig = sum(int(np.count_nonzero(e["gtIgnore"] == 0)) for e in evals)
    aps = []
    for t in range(matches.shape[0]):
        tp = np.cumsum((matches[t] != 0) & ~ignore[t])
        fp = np.cumsum((matches[t] == 0) & ~ignore[t])
        precision = tp / np.maximum(tp + fp, 1e-12)
        interp = np.maximum.accumulate(precision[::-1])[::-1]
        recall_step = np.diff(np.concatenate([[0], tp])) / npig
        aps.append(float((recall_step * interp).sum()))
    return float(np.mean(aps))


def _dap_inputs(dataset: dict, dets: list[dict]):
    gt_by_image = {}
    for a in dataset["annotations"]:
        gt_by_image.setdefault(a["image_id"], []).append(a)
    ious, positive = [], []
    for d in dets:
        if d["positive"]:
            # The ground truth this candidate was made for is the one it overlaps most.
            boxes = torch.tensor([g["bbox"] for g in gt_by_image[d["image_id"]]], dtype=torch.float64)
            iou = box_iou(box_convert(torch.tensor([d["bbox"]], dtype=torch.float64), "xywh", "xyxy"),
                          box_convert(boxes, "xywh", "xyxy")).max()
            ious.append(float(iou))
        else:
            ious.append(0.0)
        positive.append(d["positive"])
    scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
    labels = torch.tensor([d["category_id"] - 1 for d in dets])
    return scores, torch.tensor(positive), torch.tensor(ious, dtype=torch.float32), labels


@pytest.mark.parametrize("seed", range(12))
def test_pooled_single_class_equals_coco_ap(seed):
    rng = np.random.default_rng(seed)
    dataset, dets = _draw(rng, num_images=int(rng.integers(3, 10)), num_classes=1)
    ev = _evaluate(dataset, dets)
    scores, positive, ious, _ = _dap_inputs(dataset, dets)
    dap = differentiable_ap(scores, positive, ious, len(dataset["annotations"]), sigma=SIGMA,
                            num_bins=NUM_BINS, localization="step")
    assert abs(float(dap) - _all_point_ap(ev, 0)) < 2e-3
    assert abs(float(dap) - ev.stats[0]) < 0.01  # COCO samples recall at 101 points


@pytest.mark.parametrize("seed", range(6))
def test_per_class_equals_coco_mean_over_categories(seed):
    rng = np.random.default_rng(100 + seed)
    num_classes = 4
    dataset, dets = _draw(rng, num_images=8, num_classes=num_classes)
    ev = _evaluate(dataset, dets)
    scores, positive, ious, labels = _dap_inputs(dataset, dets)
    num_gt = torch.bincount(torch.tensor([a["category_id"] - 1 for a in dataset["annotations"]]),
                            minlength=num_classes)
    dap = differentiable_ap(scores, positive, ious, num_gt, labels=labels, sigma=SIGMA, num_bins=NUM_BINS,
                            localization="step", average="per_class")
    present = [k for k in range(num_classes) if num_gt[k] > 0]
    expected = np.mean([_all_point_ap(ev, k) for k in present])
    assert abs(float(dap) - expected) < 2e-3
    assert abs(float(dap) - ev.stats[0]) < 0.01


def test_low_iou_matches_are_false_positives_at_strict_thresholds():
    # One detection per ground truth, all at IoU 0.57: a true positive at 0.50 and 0.55 only.
    g = 20
    scores = torch.linspace(0.9, 0.5, g)
    dap = differentiable_ap(scores, torch.ones(g, dtype=torch.bool), torch.full((g,), 0.57), g,
                            sigma=SIGMA, num_bins=NUM_BINS, localization="step")
    assert float(dap) == pytest.approx(0.2, abs=1e-4)


def test_ious_exactly_on_a_threshold_and_a_score_of_one_count_as_coco_counts_them():
    # COCO matches at IoU >= threshold. Boxes here overlap their ground truth at exactly 0.5 and
    # exactly 0.75 (areas 5000 / 10000 and 7500 / 10000: exact in float32 too); one detection scores
    # 1.0, in the last score bin. A `>` comparison, or a lost last bin, changes the AP.
    ious = {0: 0.5, 1: 0.75, 2: 1.0, 3: 0.5, 4: 0.75}
    scores = {0: 1.0, 1: 0.8 + 0.5 / NUM_BINS, 2: 0.6 + 0.5 / NUM_BINS, 3: 0.4 + 0.5 / NUM_BINS,
              4: 0.2 + 0.5 / NUM_BINS}
    images, gts, dets = [], [], []
    for i, iou in ious.items():
        images.append({"id": i + 1, "width": 400, "height": 400})
        gts.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [100, 100, 100, 100],
                    "area": 10000, "iscrowd": 0})
        dets.append({"image_id": i + 1, "category_id": 1, "bbox": [100, 100, 100 * iou, 100], "score": scores[i],
                     "positive": True})
    dets.append({"image_id": 1, "category_id": 1, "bbox": [300, 300, 50, 50], "score": 0.7 + 0.5 / NUM_BINS,
                 "positive": False})
    dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "c1"}]}
    ev = _evaluate(dataset, dets)
    matched = np.concatenate([e["dtMatches"] for e in ev.evalImgs[: len(images)] if e is not None], axis=1)
    assert matched[0].astype(bool).sum() == 5 and matched[5].astype(bool).sum() == 3  # 0.5: all; 0.75: three
    s, positive, iou_t, _ = _dap_inputs(dataset, dets)
    assert sorted(set(iou_t.tolist())) == [0.0, 0.5, 0.75, 1.0]  # exactly on the thresholds
    dap = differentiable_ap(s, positive, iou_t, len(gts), sigma=SIGMA, num_bins=NUM_BINS, localization="step")
    assert float(dap) == pytest.approx(_all_point_ap(ev, 0), abs=1e-4)


def test_l_int_by_hand_including_an_iou_above_the_last_threshold():
    # Eq. 6: anchors (0, 0.5, 0.55, ..., 0.95, 1) with values y_0 = 0, y_k = p_1 + ... + p_k and the
    # extrapolated y_11 = 2 y_10 - y_9. With precision p_k = 1.0, 0.9, ..., 0.1 at one score bin:
    # y = 0, 1.0, 1.9, 2.7, 3.4, 4.0, 4.5, 4.9, 5.2, 5.4, 5.5, 5.6.
    from dapft.objective.dap import _anchor_values, interpolation_weights

    thresholds = torch.tensor(COCO_THRESHOLDS, dtype=torch.float64)
    precision = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)[:, None]  # (K, N=1)
    y = _anchor_values(precision)[:, 0]
    torch.testing.assert_close(y, torch.tensor([0, 1.0, 1.9, 2.7, 3.4, 4.0, 4.5, 4.9, 5.2, 5.4, 5.5, 5.6],
                                               dtype=torch.float64))
    ious = torch.tensor([0.25, 0.62, 0.95, 0.97, 1.0], dtype=torch.float64)
    values = interpolation_weights(ious, thresholds) @ y
    # 0.25: halfway from 0 to y_1; 0.62: 0.4 of the way from y_3 to y_4; 0.97: 0.4 of the way from
    # y_10 to the extrapolated y_11; 1.0: y_11 itself.
    expected = [0.5, 2.7 + 0.4 * 0.7, 5.5, 5.5 + 0.4 * 0.1, 5.6]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))
    step = interpolation_weights(ious, thresholds, "step") @ y  # Eq. 4: the thresholds reached
    torch.testing.assert_close(step, torch.tensor([0, 2.7, 5.5, 5.5, 5.5], dtype=torch.float64))
