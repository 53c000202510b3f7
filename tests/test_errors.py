"""The error breakdown (dapft.analysis.errors): TIDE's error types on hand-built cases whose answer is known
by hand, held to tidecv (TIDE's authors' code) as well; the per-image counts, the confusion matrix
and the calibration error on cases counted by hand; and the galleries' choice of images."""

from __future__ import annotations

import json

import pytest

from dapft.analysis.errors import TIDE_TYPES, error_breakdown
from dapft.analysis.gallery import most_changed, worst

# Three 200x200 images: one 40x40 object of class "a" in images 1 and 2, one of class "b" in image 3,
# which is always found (0.7). COCO's AP interpolates precision at 101 recall points: one of two
# objects found first and nothing else = 51/101; TIDE's AP is the mean of AP50 over a and b.
HALF = 51 / 101
SHIFT_TO_IOU_03 = 21.54  # a 40x40 box moved this far sideways overlaps the object at IoU 0.30


def _truth(with_b: bool = True) -> dict:
    ids = (1, 2, 3) if with_b else (1, 2)
    return {"images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in ids],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1 if i < 3 else 2, "bbox": [10, 10, 40, 40],
                             "area": 1600, "iscrowd": 0} for i in ids]}


def _det(image: int, category: int, score: float, dx: float = 0.0, box=None) -> dict:
    return {"image_id": image, "category_id": category, "score": score, "bbox": box or [10 + dx, 10, 40, 40]}


FOUND, B = _det(1, 1, 0.9), _det(3, 2, 0.7)  # the first a, and the b, found
# What the second a (or an extra detection) is, and each error type's dAP by hand: the mean over a
# and b of AP50 with those errors fixed, minus the mean as it is.
CASES = {
    # the right box with the wrong class (b, 0.8): a is HALF, b 1/2 (the b box ranks above b's hit);
    # fixed, the box is a's second hit: both 1
    "Cls": ([FOUND, _det(2, 2, 0.8), B], {"Cls": 1 - (HALF + 0.5) / 2}),
    # the right class at IoU 0.3: fixed, a is 1
    "Loc": ([FOUND, _det(2, 1, 0.8, SHIFT_TO_IOU_03), B], {"Loc": (1 - HALF) / 2}),
    # wrong class and IoU 0.3: TIDE removes such a box (b back to 1); the a under it stays missed
    "Both": ([FOUND, _det(2, 2, 0.8, SHIFT_TO_IOU_03), B], {"Both": 0.25, "Miss": (1 - HALF) / 2}),
    # a duplicate scored between a's two hits: precision 1 up to recall 0.5, 2/3 beyond
    "Dupe": ([FOUND, _det(1, 1, 0.85), _det(2, 1, 0.8), B], {"Dupe": (1 - (51 + 50 * 2 / 3) / 101) / 2}),
    # an a on nothing, scored above a's hits: a's precision 2/3 at every recall
    "Bkg": ([_det(1, 1, 0.95, box=[150, 150, 30, 30]), FOUND, _det(2, 1, 0.8), B], {"Bkg": (1 - 2 / 3) / 2}),
    # the second a not detected at all
    "Miss": ([FOUND, B], {"Miss": (1 - HALF) / 2}),
}


def _tidecv(truth: dict, results: list[dict]) -> dict[str, float]:
    """tidecv's dAP (AP points) of the same case, fed through its own data API."""
    from tidecv import TIDE, Data

    gt, dt = Data("gt"), Data("dt")
    for a in truth["annotations"]:
        gt.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
    for r in results:
        dt.add_detection(r["image_id"], r["category_id"], r["score"], r["bbox"])
    tide = TIDE()
    tide.evaluate(gt, dt, mode=TIDE.BOX)
    special = tide.get_special_errors()["dt"]
    return {**tide.get_main_errors()["dt"], "FP": special["FalsePos"], "FN": special["FalseNeg"],
            "AP50": tide.runs["dt"].ap}


def test_the_shift_makes_iou_03():
    import torch
    from torchvision.ops import box_iou

    a = torch.tensor([[10.0, 10, 50, 50]])
    assert box_iou(a, a + torch.tensor([SHIFT_TO_IOU_03, 0, SHIFT_TO_IOU_03, 0])).item() == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("kind", list(CASES))
def test_each_hand_built_error_costs_what_it_must_and_no_other_type_costs_anything(kind):
    results, costs = CASES[kind]
    ours = error_breakdown(_truth(), results, [1, 2, 3])
    for error in TIDE_TYPES:
        assert ours.dAP[error] == pytest.approx(costs.get(error, 0.0), abs=1e-3), error
    assert ours.counts[kind] == 1


@pytest.mark.parametrize("kind", list(CASES))
def test_tide_numbers_are_tidecvs_on_the_hand_built_cases(kind):
    results, _ = CASES[kind]
    ours, theirs = error_breakdown(_truth(), results, [1, 2, 3]), _tidecv(_truth(), results)
    for key in TIDE_TYPES + ("FP", "FN"):
        assert 100 * ours.dAP[key] == pytest.approx(theirs[key], abs=0.1), key
    assert 100 * ours.ap50 == pytest.approx(theirs["AP50"], abs=0.1)


def test_tide_numbers_are_tidecvs_with_every_error_at_once(shapes_root):
    # A detector's usual mix on a real split (the noisy results the evaluators are held to each other with)
    from test_data_eval import _noisy_results

    from dapft.data.splits import load_split, resolve_split

    split = load_split(resolve_split(shapes_root, "val"))
    results = _noisy_results(split)
    truth = split.ground_truth()
    ours, theirs = error_breakdown(truth, results, split.ids.tolist()), _tidecv(truth, results)
    assert sum(ours.counts.values()) > 50 and min(ours.dAP[k] for k in ("Cls", "Loc", "Both", "Bkg", "Miss")) > 0
    for key in TIDE_TYPES + ("FP", "FN"):
        assert 100 * ours.dAP[key] == pytest.approx(theirs[key], abs=0.1), key


def test_where_tidecv_differs_a_class_with_detections_and_no_ground_truth():
    # COCO (pycocotools, hotcoco, dapft) leaves a class without ground truth out of the mean; tidecv
    # counts it as AP 0. Here a b box lies on the second a and no b exists: COCO's AP50 is a's alone.
    results = [FOUND, _det(2, 2, 0.8)]
    ours, theirs = error_breakdown(_truth(with_b=False), results, [1, 2]), _tidecv(_truth(with_b=False), results)
    assert ours.ap50 == pytest.approx(HALF) and theirs["AP50"] == pytest.approx(100 * HALF / 2)
    assert ours.dAP["Cls"] == pytest.approx(1 - HALF) and theirs["Cls"] == pytest.approx(100 * (1 - HALF / 2))


def test_tides_base_is_pycocotools_ap50(shapes_root):
    from test_data_eval import _noisy_results

    from dapft.analysis.evaluate import coco_evaluate
    from dapft.data.splits import load_split, resolve_split

    split = load_split(resolve_split(shapes_root, "val"))
    results, ids = _noisy_results(split), split.ids.tolist()
    assert error_breakdown(split.ground_truth(), results, ids).ap50 == pytest.approx(
        coco_evaluate(split.ground_truth(), results, ids, "pycocotools").stats["AP50"], abs=1e-6)


# One operating point, counted by hand: image 1 has its object found (0.9), a duplicate (0.6) and a
# weak box on nothing (0.3, under the threshold); image 2's object is found only at 0.4.
POINT = [_det(1, 1, 0.9), _det(1, 1, 0.6, 2), _det(1, 2, 0.3, box=[150, 150, 30, 30]), _det(2, 1, 0.4)]


def test_per_image_counts_are_at_the_threshold():
    b = error_breakdown(_truth(False), POINT, [1, 2], score_threshold=0.5)
    assert b.per_image == {1: {"found": 1, "false": 1, "missed": 0}, 2: {"found": 0, "false": 0, "missed": 1}}
    low = error_breakdown(_truth(False), POINT, [1, 2], score_threshold=0.25)
    assert low.per_image == {1: {"found": 1, "false": 2, "missed": 0}, 2: {"found": 1, "false": 0, "missed": 0}}


def test_no_detections_at_all_miss_every_object():
    b = error_breakdown(_truth(False), [], [1, 2])
    assert b.per_image == {1: {"found": 0, "false": 0, "missed": 1}, 2: {"found": 0, "false": 0, "missed": 1}}
    assert b.counts["Miss"] == 2 and b.ap50 == 0


def test_with_nothing_detected_a_crowd_region_and_an_image_outside_the_ids_count_as_no_miss():
    truth = _truth(True)
    truth["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [100, 100, 60, 60], "area": 3600,
                                 "iscrowd": 1})  # a crowd region: scored by COCO as ignored, never missed
    b = error_breakdown(truth, [], [1, 2])  # image 3 and its object are not evaluated
    assert b.per_image == {1: _counts(0, 0, 1), 2: _counts(0, 0, 1)}


def test_the_confusion_matrix_takes_an_images_100_best_detections_as_coco_does():
    # 101 detections of class a on image 1's object, every one above the threshold: COCO's maxDets keeps 100
    results = [_det(1, 1, 0.99 - k * 0.001) for k in range(101)]
    b = error_breakdown(_truth(False), results, [1, 2])
    assert int(b.confusion.sum()) == 100 + 1  # 100 detections (1 found, 99 duplicates) and image 2's miss


def test_confusion_matrix_counts_the_detections_above_the_threshold():
    b = error_breakdown(_truth(False), POINT, [1, 2], score_threshold=0.5)
    assert b.category_names == ["a", "b"]
    # rows: ground truth a, b, background; columns: predicted a, b, background
    assert b.confusion.tolist() == [[1, 0, 1],  # one a found; one a (image 2) missed at this threshold
                                    [0, 0, 0],
                                    [1, 0, 0]]  # the duplicate: an a on no object


def test_calibration_error_counted_by_hand():
    # a hit at 0.9 (bin 0.9-1.0: accuracy 1, gap 0.1) and a box on nothing at 0.3 (gap 0.3): mean 0.2
    b = error_breakdown(_truth(False), [_det(1, 1, 0.9), _det(1, 1, 0.3, box=[150, 150, 30, 30])], [1, 2])
    assert b.ece == pytest.approx(0.2, abs=1e-9)


def _counts(found, false, missed):
    return {"found": found, "false": false, "missed": missed}


def test_the_changed_gallery_shows_the_largest_gains_and_losses_gains_first():
    before = {i: _counts(1, 2, 2) for i in range(1, 11)}
    after = dict(before)
    after.update({1: _counts(3, 0, 0), 2: _counts(2, 1, 1), 3: _counts(1, 4, 3), 4: _counts(1, 2, 3)})
    assert most_changed(before, after, n=4) == [(1, -4), (2, -2), (3, 3), (4, 1)]
    # fewer losses than half: the gains fill the places; unchanged images are never shown
    after = {**before, 1: _counts(3, 0, 0), 2: _counts(2, 1, 1), 5: _counts(2, 1, 2), 3: _counts(1, 2, 3)}
    assert most_changed(before, after, n=4) == [(1, -4), (2, -2), (5, -1), (3, 1)]
    assert most_changed(before, before, n=4) == []


def test_the_worst_gallery_ranks_by_errors_missed_first_and_skips_clean_images():
    per_image = {1: _counts(2, 0, 0), 2: _counts(0, 1, 3), 3: _counts(0, 3, 1), 4: _counts(1, 5, 0)}
    assert worst(per_image, n=8) == [4, 2, 3]
    assert worst(per_image, n=1) == [4]


@pytest.mark.slow
def test_reports_draw_the_images_that_changed_most_and_an_evaluations_worst(tmp_path):
    import re

    from PIL import Image

    from dapft.analysis.checkpoint_eval import evaluate_model
    from dapft.analysis.gallery import errors_of
    from dapft.data.shapes import make_shapes_dataset
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import finetune

    data = make_shapes_dataset(tmp_path / "data", train_images=40, val_images=40, seed=1)  # unseen by the model
    run = tmp_path / "run"
    finetune(FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data=str(data), output=str(run), epochs=1, max_steps=25,
                            lr=1e-3, device="cpu", num_workers=0, progress=False, report_to="none"))
    per_image = {tag: {int(k): v for k, v in json.loads((run / "eval" / tag / "metrics.json").read_text())
                       ["errors"]["per_image"].items()} for tag in ("before", "epoch001")}
    text = (run / "report.md").read_text()
    shown = re.findall(r"\]\((gallery/changed-(\d+)\.jpg)\)<br>\S+: (\d+) (fewer|more) errors?", text)
    assert 2 <= len(shown) <= 8
    changes = [(int(n) if word == "more" else -int(n)) for _, _, n, word in shown]
    assert changes == sorted(changes, key=lambda c: (c > 0, -abs(c)))  # gains first, the largest first
    for (path, image_id, _, _), change in zip(shown, changes):
        i = int(image_id)
        assert errors_of(per_image["epoch001"][i]) - errors_of(per_image["before"][i]) == change
        width, height = Image.open(run / path).size
        assert 900 <= width <= 1000 and 400 <= height <= 520  # two panels, legible where Markdown shows them
    ev = tmp_path / "eval"
    metrics = evaluate_model(str(run / "checkpoint-last"), str(data), output=str(ev), num_workers=0, progress=False,
                             device="cpu", report_to="none")
    ranked = worst({int(k): v for k, v in metrics["errors"]["per_image"].items()})
    drawn = [int(i) for i in re.findall(r"\]\(gallery/worst-(\d+)\.jpg\)", (ev / "report.md").read_text())]
    assert drawn == ranked and len(drawn) == 8
    assert all(400 <= Image.open(ev / "gallery" / f"worst-{i}.jpg").size[0] <= 600 for i in drawn)
    evaluate_model(str(run / "checkpoint-last"), str(data), output=str(tmp_path / "plain"), num_workers=0,
                   progress=False, device="cpu", report_to="none", gallery=False)
    assert not (tmp_path / "plain" / "gallery").exists() and "gallery/" not in (tmp_path / "plain" / "report.md").read_text()
