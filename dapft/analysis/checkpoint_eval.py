"""`dapft eval`: one checkpoint (or exported file) on one split: everything checked first, then its
predictions, metrics with the error breakdown, report and gallery, and the trackers."""

from __future__ import annotations

import json
from pathlib import Path

from dapft.analysis.evaluate import Evaluator, check_evaluator, evaluate_split
from dapft.analysis.gallery import read_evaluation, write_worst
from dapft.analysis.report import write_eval_report
from dapft.data.labels import LabelMap
from dapft.data.loader import BatchLoader, CocoDetection, default_num_workers
from dapft.data.splits import load_split, resolve_split
from dapft.modeling.export import load_model
from dapft.utils.console import console, make_progress
from dapft.utils.device import amp_dtype, pick_device
from dapft.utils.files import OutputFolder
from dapft.utils.trackers import Trackers, parse_report_to


def evaluate_model(model: str, data: str | None = None, *, split: str = "val", images: str | None = None,
                   annotations: str | None = None, output: str | Path = "runs/eval", batch_size: int = 8,
                   evaluator: Evaluator = "hotcoco", max_images: int | None = None,
                   label_map: str | None = None, device: str | None = None, precision: str = "auto",
                   num_workers: int | None = None, progress: bool = True, report_to: str | None = None,
                   gallery: bool = True) -> dict:
    """`dapft eval`: everything checked first, then inference, predictions.json, metrics (with the
    error breakdown), report (with its worst images drawn unless `gallery` is False), and the
    numbers to the trackers (--report-to)."""
    out = Path(output)
    check_evaluator(evaluator)
    trackers = parse_report_to(report_to)  # before any work: an unknown tracker, or one not installed
    if (out / "config.json").is_file() and (out / "log.jsonl").is_file():
        # A fine-tuning run's own report.md and metrics are there: an evaluation must not replace them.
        raise FileExistsError(f"{out}: a fine-tuning run's directory; write this evaluation into a folder of "
                              f"its own, e.g. --output {out / 'eval' / 'dapft-eval'}")
    if (out / "metrics.json").is_file() or (out / "predictions.json").is_file():
        raise FileExistsError(f"{out}: holds an evaluation already (metrics.json, predictions.json); choose another "
                              "--output, or delete it to evaluate again")
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"--batch-size must be at least 1 and --num-workers at least 0, got {batch_size} and "
                         f"{num_workers}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1 (or left out: every image), got {max_images}")
    dev = pick_device(device)
    amp = amp_dtype(precision, dev)  # an unknown --precision fails here, not after inference
    with OutputFolder(out):
        source = resolve_split(data, split, images, annotations)
        coco = load_split(source, max_images=max_images, progress=progress)
        detector, processor, _family = load_model(model, log=console.print)  # a checkpoint, or an exported file
        mapping = LabelMap.build(coco.categories, detector.config.id2label, label_map, where=str(source.annotations))
        detector.to(dev)
        loader = BatchLoader(CocoDetection(coco, mapping), processor, batch_size=batch_size, train=False,
                             num_workers=default_num_workers(dev) if num_workers is None else num_workers, device=dev)
        with make_progress(disable=not progress) as bar:
            metrics = evaluate_split(detector, processor, coco, mapping, loader, device=dev, output=out,
                                     evaluator=evaluator, amp_dtype=amp, progress=bar)
        info = {"model": model, "annotations": source.annotations, "images": len(coco), "skipped": coco.skipped}
        shown = read_evaluation(out) if gallery else None
        write_eval_report(out, metrics, info, write_worst(out / "gallery", coco, *shown) if shown else [])
        if trackers:
            params = {**info, "annotations": str(source.annotations), "evaluator": evaluator, "batch_size": batch_size,
                      "max_images": max_images, "label_map": label_map, "precision": precision}
            tracked = Trackers(out, trackers, run_name=out.name, params=params, group={"wandb_job_type": "eval"})
            tracked.log({"type": "eval", "global_step": 0, **metrics.stats})
            tracked.summary({f"eval/{k}": v for k, v in metrics.stats.items()})
            tracked.files([out / name for name in ("report.md", "metrics.json", "pr_curves.png", "per_class_ap.png",
                                                   "confusion.png") if (out / name).is_file()])
            tracked.close()
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
