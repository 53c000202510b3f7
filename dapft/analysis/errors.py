"""What a detector gets wrong, beyond its AP: TIDE's error types, a confusion matrix, the
calibration of its scores, and each image's found / false / missed counts (which the galleries
pick images by). All from hotcoco (pycocotools' numbers, in Rust), on the same results and
images as the COCO metrics.

- TIDE (Bolya et al., ECCV 2020): each error type's dAP is the AP at IoU 0.5 gained if every error
  of that type were fixed (and only those): classification (right place, wrong class), localisation
  (right class, 0.1 <= IoU < 0.5), both, duplicate, background (IoU < 0.1 with everything) and
  missed ground truth; FP and FN are the two oracles that remove every false positive, every false
  negative. Computed by hotcoco; tests/test_errors.py holds it to tidecv on hand-built cases.
- The confusion matrix and the per-image counts are at one operating point, a score threshold
  (`SCORE_THRESHOLD`, the one `dapft predict` draws at): a user looks at the detections above a
  threshold, not at the 100 an image COCO ranks.
- ECE: expected calibration error over every scored detection (10 equal-width score bins; a
  detection is correct when it matches a ground truth of its class at IoU >= 0.5)."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np

from dapft.analysis.metrics import ErrorBreakdown

SCORE_THRESHOLD = 0.5
TIDE_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
ORACLES = ("FP", "FN")


def error_breakdown(ground_truth: dict, results: list[dict], image_ids: list[int],
                    score_threshold: float = SCORE_THRESHOLD) -> ErrorBreakdown:
    """The breakdown of `results` (COCO results) against `ground_truth` (a COCO dataset dict) on
    exactly `image_ids`."""
    from hotcoco import COCO, COCOeval

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth)
        dt = gt.loadRes(results) if results else COCO({**ground_truth, "annotations": []})
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        tide = ev.tide_errors(pos_thr=0.5, bg_thr=0.1)
        calibration = ev.calibration(n_bins=10, iou_threshold=0.5) if results else {"ece": 0.0}
        confusion = ev.confusion_matrix(iou_thr=0.5, max_det=100, min_score=score_threshold)
        diagnostics = ev.image_diagnostics(iou_thr=0.5, score_thr=score_threshold) if results else None
    per_image = _counts_at(score_threshold, results, ground_truth, image_ids, diagnostics)
    return ErrorBreakdown(
        dAP={k: float(tide["delta_ap"][k]) for k in TIDE_TYPES + ORACLES},
        counts={k: int(tide["counts"][k]) for k in TIDE_TYPES}, ap50=float(tide["ap_base"]),
        ece=float(calibration["ece"]), confusion=np.asarray(confusion["matrix"], dtype=np.int64),
        category_names=list(confusion["cat_names"]), score_threshold=score_threshold, per_image=per_image,
        seconds=time.perf_counter() - t0)


def _counts_at(threshold: float, results: list[dict], ground_truth: dict, image_ids: list[int],
               diagnostics: dict | None) -> dict[int, dict[str, int]]:
    """Found / false / missed per image among the detections scoring >= threshold. COCO matches
    detections greedily by score, so a match made among all detections is the match made among
    those above any threshold: a ground truth matched only below it is missed there."""
    counts = {i: {"found": 0, "false": 0, "missed": 0} for i in image_ids}
    image_of_gt = {a["id"]: a["image_id"] for a in ground_truth["annotations"]}
    if diagnostics is None:  # nothing detected: every scored ground truth is missed
        for a in ground_truth["annotations"]:
            if a["image_id"] in counts and not a.get("iscrowd", 0):
                counts[a["image_id"]]["missed"] += 1
        return counts
    # loadRes numbers results 1..N in the order given (pycocotools and hotcoco alike)
    for dt_id, status in diagnostics["dt_status"].items():  # ignored ones (on crowd regions) are not listed
        result = results[dt_id - 1]
        if result["score"] >= threshold and result["image_id"] in counts:
            counts[result["image_id"]]["found" if status == "tp" else "false"] += 1
    matched_by = diagnostics["gt_match"]
    for gt_id, status in diagnostics["gt_status"].items():
        image = image_of_gt[gt_id]
        below = status == "matched" and results[matched_by[gt_id] - 1]["score"] < threshold
        if image in counts and (status == "fn" or below):
            counts[image]["missed"] += 1
    return counts
