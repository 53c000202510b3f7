"""COCO evaluation: inference, the family's own post-processing, the results JSON (written before
any metric is computed), and COCO metrics from hotcoco, faster-coco-eval or pycocotools (the same
numbers: tests/test_data_eval.py holds the three to each other)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from dapft.analysis.errors import error_breakdown
from dapft.analysis.metrics import STAT_NAMES, CocoMetrics
from dapft.data.flat_split import CocoSplit
from dapft.data.labels import LabelMap
from dapft.utils.files import atomic_write_text

Evaluator = Literal["hotcoco", "faster-coco-eval", "pycocotools"]
EVALUATORS = ("hotcoco", "faster-coco-eval", "pycocotools")


def check_evaluator(evaluator: str) -> None:
    """Before any work: an unknown evaluator would otherwise fail only after inference."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"--evaluator must be {', '.join(EVALUATORS[:-1])} or {EVALUATORS[-1]}, got {evaluator!r}")


def to_coco_results(detections: list[dict], image_ids: list[int], label_map: LabelMap) -> list[dict]:
    """Post-processed detections (boxes xyxy in original pixels, model labels) -> COCO results, with
    one copy to the host for the batch. Detections of model classes the dataset does not have
    (DETR's 'N/A' slots, say) are dropped."""
    if not detections:
        return []
    counts = [len(d["scores"]) for d in detections]
    scores = torch.cat([d["scores"] for d in detections]).float().cpu().numpy()
    labels = torch.cat([d["labels"] for d in detections]).cpu().numpy()
    boxes = torch.cat([d["boxes"] for d in detections]).float().cpu().numpy()
    to_dataset = label_map.to_dataset
    lookup = np.full(max(max(to_dataset, default=0), int(labels.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[list(to_dataset)] = list(to_dataset.values())
    category = lookup[labels]
    image = np.repeat(np.asarray(image_ids, dtype=np.int64), counts)
    keep = category >= 0
    xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).astype(np.float64), 3)
    return [{"image_id": i, "category_id": c, "bbox": b, "score": sc} for i, c, b, sc in
            zip(image[keep].tolist(), category[keep].tolist(), xywh[keep].tolist(), scores[keep].tolist())]


@torch.no_grad()
def predict(model, processor, loader, label_map: LabelMap, *, device: torch.device, amp_dtype=None,
            progress=None, max_detections: int = 100) -> list[dict]:
    """Run the model over `loader` and return COCO results, post-processed as the family does."""
    model.eval()
    results: list[dict] = []
    task = progress.add_task("evaluating", total=len(loader.sampler), info="") if progress else None
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask") if k in batch}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        detections = processor.post_process_object_detection(outputs, threshold=0.0,
                                                              target_sizes=batch["orig_sizes"].to(device))
        detections = [_top(d, max_detections) for d in detections]
        results.extend(to_coco_results(detections, batch["image_ids"], label_map))
        seen += len(batch["image_ids"])
        if progress:
            progress.update(task, advance=len(batch["image_ids"]),
                            info=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
    return results


def _top(det: dict, k: int) -> dict:
    # COCO scores at most 100 detections per image: keep the best, as maxDets would.
    if det["scores"].numel() <= k:
        return det
    idx = det["scores"].topk(k).indices
    return {key: det[key][idx] for key in ("scores", "labels", "boxes")}


def coco_evaluate(ground_truth: str | Path | dict, results: list[dict], image_ids: list[int],
                  evaluator: Evaluator = "hotcoco") -> CocoMetrics:
    """Score `results` against the ground truth (an annotation file, or a dataset dict such as
    `CocoSplit.ground_truth()`) on exactly `image_ids` (so --max-images is fair)."""
    check_evaluator(evaluator)
    t0 = time.perf_counter()
    if evaluator == "hotcoco":
        from hotcoco import COCO, COCOeval
    elif evaluator == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    def from_dict(data: dict):  # hotcoco's and faster-coco-eval's COCO take a dict; pycocotools' only a file name
        if evaluator != "pycocotools":
            return COCO(data)
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
        return coco

    with contextlib.redirect_stdout(io.StringIO()):
        gt = from_dict(ground_truth) if isinstance(ground_truth, dict) else COCO(str(ground_truth))
        cat_ids = sorted(gt.getCatIds())
        names = [gt.loadCats(c)[0]["name"] for c in cat_ids]
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes refuses an empty list; COCOeval scores "found nothing" itself (0; -1 where no ground truth)
            dt = from_dict({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []})
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    precision = np.asarray(ev.eval["precision"])
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            per_class[name] = float(p[p > -1].mean())
    return CocoMetrics(stats, per_class, precision, names, evaluator, time.perf_counter() - t0)


def write_results(path: Path, results: list[dict]) -> None:
    atomic_write_text(path, json.dumps(results))


def evaluate_split(model, processor, split: CocoSplit, label_map: LabelMap, loader, *, device, output: Path,
                   evaluator: Evaluator = "hotcoco", amp_dtype=None, progress=None,
                   gather: Callable[[list[dict]], list[dict] | None] | None = None) -> CocoMetrics | None:
    """Predict, write `predictions.json`, then score it: COCO's metrics and the error breakdown
    (dapft.analysis.errors). The predictions are on disk before the evaluator runs, so a failure in
    evaluation loses no inference work.

    Under several processes each predicts its shard of `loader`; `gather` returns all shards' results
    on the main process and None on the others, which then write nothing and return None."""
    t0 = time.perf_counter()
    results = predict(model, processor, loader, label_map, device=device, amp_dtype=amp_dtype, progress=progress)
    infer_s = time.perf_counter() - t0
    if gather is not None:
        results = gather(results)
        if results is None:
            return None
    output.mkdir(parents=True, exist_ok=True)
    write_results(output / "predictions.json", results)
    image_ids = split.ids.tolist()
    ground_truth = split.ground_truth()
    metrics = coco_evaluate(ground_truth, results, image_ids, evaluator)
    metrics.errors = error_breakdown(ground_truth, results, image_ids)
    payload = {**metrics.to_json(), "images": len(image_ids), "detections": len(results),
               "inference_seconds": round(infer_s, 3), "images_per_second": round(len(image_ids) / max(infer_s, 1e-9), 2),
               "skipped": split.skipped}
    atomic_write_text(output / "metrics.json", json.dumps(payload, indent=2))
    return metrics
