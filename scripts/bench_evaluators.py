"""What COCO scoring and the error breakdown cost, with each evaluator dapft offers.

1. The bundled data (`dapft eval` of the bundled RT-DETR on 200 generated validation images, as the
   demo makes them): inference, COCO metrics with each evaluator, the error breakdown
   (dapft.analysis.errors) and the worst-images gallery, each timed in one process; then an evaluation with
   the breakdown and gallery against one without, as a ratio.
2. COCO val's size (5,000 images, 80 classes, about 7.3 boxes an image, 100 detections an image:
   500,000): generated ground truth and noisy detections, scored by each evaluator and broken down,
   after a check that every evaluator gives the same 12 numbers.

    python scripts/bench_evaluators.py             # both parts
    python scripts/bench_evaluators.py --repeats 3 --images 5000
    python scripts/bench_evaluators.py --repeats 1 --images 20 --bundled-images 16   # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bundled(repeats: int, images: int) -> None:
    import torch

    from dapft.analysis.errors import error_breakdown
    from dapft.analysis.evaluate import EVALUATORS, coco_evaluate, predict
    from dapft.analysis.gallery import write_worst
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.shapes import make_shapes_dataset
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.loading import load_detector

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shapes_dataset(Path(tmp) / "shapes", train_images=8, val_images=images, seed=1)
        split = load_split(resolve_split(root, "val"), progress=False)
        model, processor, _ = load_detector("dapft/tiny-rtdetr-shapes")
        mapping = LabelMap.build(split.categories, model.config.id2label)
        loader = BatchLoader(CocoDetection(split, mapping), processor, batch_size=8, train=False, num_workers=0)
        ids = split.ids.tolist()
        infer, results = timed(lambda: predict(model, processor, loader, mapping, device=torch.device("cpu")), repeats)
        truth = split.ground_truth()
        scoring = {e: timed(lambda e=e: coco_evaluate(truth, results, ids, e), repeats)[0] for e in EVALUATORS}
        breakdown_s, errors = timed(lambda: error_breakdown(truth, results, ids), repeats)
        gallery_s, _ = timed(lambda: write_worst(Path(tmp) / "gallery", split, results, errors.per_image), repeats)
    print(f"\n## The bundled data: dapft/tiny-rtdetr-shapes on {len(ids)} validation images (CPU, "
          f"{torch.get_num_threads()} threads), median of {repeats}\n")
    print("| part | seconds |\n|---|---:|")
    print(f"| inference (model, post-processing, COCO results) | {infer:.3f} |")
    for e, s in scoring.items():
        print(f"| COCO metrics, {e} | {s:.3f} |")
    print(f"| error breakdown (hotcoco: TIDE, confusion, ECE, per-image counts) | {breakdown_s:.3f} |")
    print(f"| gallery of the 8 worst images | {gallery_s:.3f} |")
    print("\n| evaluator | evaluation without the breakdown (s) | with breakdown and gallery (s) | ratio |")
    print("|---|---:|---:|---:|")
    for e, s in scoring.items():
        plain = infer + s
        print(f"| {e} | {plain:.2f} | {plain + breakdown_s + gallery_s:.2f} | "
              f"{(plain + breakdown_s + gallery_s) / plain:.2f} |")


def coco_sized(images: int, repeats: int) -> None:
    from dapft.analysis.errors import error_breakdown
    from dapft.analysis.evaluate import EVALUATORS, coco_evaluate

    rng = np.random.default_rng(0)
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    truth = {"images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"}
                        for i in range(1, images + 1)], "categories": categories, "annotations": []}
    results = []
    for i in range(1, images + 1):
        for _ in range(rng.poisson(7.3)):
            w, h = rng.uniform(8, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(1, 81))
            truth["annotations"].append({"id": len(truth["annotations"]) + 1, "image_id": i, "category_id": c,
                                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.7:  # found, jittered, sometimes with another class
                j = rng.normal(0, 0.1 * max(w, h), 4)
                results.append({"image_id": i, "category_id": c if rng.random() < 0.85 else int(rng.integers(1, 81)),
                                "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                                "score": float(rng.uniform(0.3, 1))})
        found = sum(1 for r in results[-20:] if r["image_id"] == i)
        for _ in range(100 - found):  # the rest of the 100 a DETR returns: low-scored boxes anywhere
            w, h = rng.uniform(8, 200, 2)
            results.append({"image_id": i, "category_id": int(rng.integers(1, 81)),
                            "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), w, h],
                            "score": float(rng.uniform(0, 0.5))})
    ids = [im["id"] for im in truth["images"]]
    print(f"\n## COCO val's size: {images} images, {len(truth['annotations'])} boxes, {len(results)} detections; "
          f"median of {repeats}\n")
    stats = {}
    print("| evaluator | COCO metrics (s) |\n|---|---:|")
    for e in EVALUATORS:
        s, metrics = timed(lambda e=e: coco_evaluate(truth, results, ids, e), repeats)
        stats[e] = metrics.stats
        print(f"| {e} | {s:.2f} |")
    same = all(max(abs(stats[e][k] - stats["pycocotools"][k]) for k in stats[e]) < 1e-6 for e in EVALUATORS)
    s, errors = timed(lambda: error_breakdown(truth, results, ids), repeats)
    print(f"| error breakdown (hotcoco) | {s:.2f} |")
    print(f"\nThe three evaluators' 12 numbers agree to 1e-6: {same} (AP {100 * stats['pycocotools']['AP']:.2f}); "
          f"TIDE dAP: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in errors.dAP.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=5000, help="Images of the COCO-sized part.")
    parser.add_argument("--part", choices=("bundled", "coco", "both"), default="both")
    parser.add_argument("--bundled-images", type=int, default=200, help="Validation images of the bundled part.")
    args = parser.parse_args()
    if args.part in ("bundled", "both"):
        bundled(args.repeats, args.bundled_images)
    if args.part in ("coco", "both"):
        coco_sized(args.images, args.repeats)


if __name__ == "__main__":
    main()
