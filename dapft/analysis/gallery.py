"""Detections drawn on images: `dapft predict`'s pictures, and the reports' galleries (a run's
images that changed most between before and after fine-tuning, an evaluation's worst images).

Boxes are drawn by torchvision at a panel size fixed in pixels (the image scaled to it), so the
labels keep one legible size whatever the image's: a Markdown viewer shows a two-panel picture
about 900 pixels wide. Ground truth: white boxes with a dark edge, no label; detections: a colour
per class with 'class score' on a filled label."""

from __future__ import annotations

from pathlib import Path

import torch

from dapft.analysis.errors import SCORE_THRESHOLD
from dapft.data.loader import read_image

PANEL = 480  # pixels on an image's longer side in a gallery panel


def draw(image: torch.Tensor, detections: list[dict], names: dict[int, str],
         ground_truth: list[list[float]] | None = None) -> torch.Tensor:
    """`image` (uint8 CHW) with `detections` (COCO results: bbox xywh in its pixels) and, if given,
    the ground-truth boxes (xywh) under them. Line and text sized to the image."""
    from matplotlib import colormaps, font_manager
    from torchvision.utils import draw_bounding_boxes

    side = max(image.shape[-2:])
    width = max(2, side // 300)
    if ground_truth:
        boxes = _xyxy([list(b) for b in ground_truth])
        image = draw_bounding_boxes(image, boxes, colors=(20, 20, 20), width=width + 2)
        image = draw_bounding_boxes(image, boxes, colors=(255, 255, 255), width=width)
    if not detections:
        return image
    palette = colormaps["tab10"]
    colors = [tuple(int(255 * c) for c in palette(d["category_id"] % 10)[:3]) for d in detections]
    labels = [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in detections]
    return draw_bounding_boxes(image, _xyxy([d["bbox"] for d in detections]), labels, colors=colors, width=width,
                               font=font_manager.findfont("DejaVu Sans"), font_size=max(12, side // 30),
                               label_colors="white", label_background_colors=colors, fill_labels=True)


def _xyxy(xywh: list[list[float]]) -> torch.Tensor:
    boxes = torch.tensor(xywh, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)


def errors_of(counts: dict[str, int]) -> int:
    return counts["false"] + counts["missed"]


def most_changed(before: dict[int, dict], after: dict[int, dict], n: int = 8) -> list[tuple[int, int]]:
    """Up to n images with the largest change in errors (false + missed at the drawing threshold)
    between two evaluations, half of them improved and half worsened where both exist:
    (image id, errors after minus before), improved first."""
    change = {i: errors_of(after[i]) - errors_of(before[i]) for i in after if i in before}
    better = sorted((c, i) for i, c in change.items() if c < 0)
    worse = sorted(((-c, i) for i, c in change.items() if c > 0))
    take_better = min(len(better), max(n // 2, n - len(worse)))
    take_worse = min(len(worse), n - take_better)
    return [(i, c) for c, i in better[:take_better]] + [(i, -c) for c, i in worse[:take_worse]]


def worst(per_image: dict[int, dict], n: int = 8) -> list[int]:
    """Up to n images with the most errors (missed first on a tie), none without an error."""
    ranked = sorted(per_image, key=lambda i: (-errors_of(per_image[i]), -per_image[i]["missed"], i))
    return [i for i in ranked[:n] if errors_of(per_image[i]) > 0]


def detections_by_image(results: list[dict], threshold: float = SCORE_THRESHOLD) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def render(path: Path, image_file: Path, ground_truth: list[list[float]],
           panels: list[tuple[str, list[dict]]], names: dict[int, str]) -> Path:
    """One JPEG: the image once per panel, side by side, each with its detections, the ground truth
    and the panel's title above it. (PIL composes and JPEG encodes: a matplotlib figure saved as
    PNG cost 10 times as much, most of it PNG's compression of photographs.)"""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.v2.functional import resize

    image = read_image(image_file)
    h, w = image.shape[-2:]
    scale = PANEL / max(h, w)
    shown = resize(image, [round(h * scale), round(w * scale)], antialias=True)
    gt = [[v * scale for v in box] for box in ground_truth]
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 17)
    gap, strip = 10, 30
    pictures = [Image.fromarray(draw(shown, [{**d, "bbox": [v * scale for v in d["bbox"]]} for d in detections],
                                     names, gt).permute(1, 2, 0).numpy()) for _, detections in panels]
    canvas = Image.new("RGB", (len(pictures) * (shown.shape[-1] + gap) - gap, shown.shape[-2] + strip), "white")
    pen = ImageDraw.Draw(canvas)
    for k, ((title, _), picture) in enumerate(zip(panels, pictures)):
        x = k * (shown.shape[-1] + gap)
        canvas.paste(picture, (x, strip))
        pen.text((x + 4, strip // 2), title, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90)
    return path


def _counts_text(counts: dict[str, int]) -> str:
    return f"{counts['found']} found, {counts['false']} false, {counts['missed']} missed"


def _image_parts(split, image_id: int) -> tuple[Path, list[list[float]]]:
    i = split.index(image_id)
    truth = [a["bbox"] for a in split.evaluated(i) if not a["iscrowd"]]
    return split.source.images / split.image(i)["file_name"], truth


def write_worst(folder: Path, split, results: list[dict], per_image: dict[int, dict], n: int = 8,
                threshold: float = SCORE_THRESHOLD) -> list[tuple[Path, str]]:
    """An evaluation's gallery: its n images with the most errors, one picture each. (file, caption)."""
    detections = detections_by_image(results, threshold)
    entries = []
    for image_id in worst(per_image, n):
        file, truth = _image_parts(split, image_id)
        title = f"image {image_id}: {_counts_text(per_image[image_id])}"
        entries.append((render(folder / f"worst-{image_id}.jpg", file, truth,
                               [(title, detections.get(image_id, []))], split.category_names), file.name))
    return entries


def write_changed(folder: Path, split, before: tuple[list[dict], dict[int, dict]],
                  after: tuple[list[dict], dict[int, dict]], n: int = 8,
                  threshold: float = SCORE_THRESHOLD) -> list[tuple[Path, str]]:
    """A fine-tuning run's gallery: the images whose errors changed most, before beside after, one
    picture each, improved ones first. `before` and `after`: (COCO results, per-image counts)."""
    shown_before, shown_after = detections_by_image(before[0], threshold), detections_by_image(after[0], threshold)
    entries = []
    for image_id, change in most_changed(before[1], after[1], n):
        file, truth = _image_parts(split, image_id)
        panels = [(f"before: {_counts_text(before[1][image_id])}", shown_before.get(image_id, [])),
                  (f"after: {_counts_text(after[1][image_id])}", shown_after.get(image_id, []))]
        word = "fewer" if change < 0 else "more"
        entries.append((render(folder / f"changed-{image_id}.jpg", file, truth, panels, split.category_names),
                        f"{file.name}: {abs(change)} {word} error{'s' if abs(change) != 1 else ''}"))
    return entries


def read_evaluation(folder: Path) -> tuple[list[dict], dict[int, dict]] | None:
    """An evaluation folder's predictions and per-image counts, or None where it has none (an
    evaluation made before dapft kept them)."""
    import json

    metrics, predictions = folder / "metrics.json", folder / "predictions.json"
    if not (metrics.is_file() and predictions.is_file()):
        return None
    errors = json.loads(metrics.read_text(encoding="utf-8")).get("errors")
    if errors is None:
        return None
    per_image = {int(k): v for k, v in errors["per_image"].items()}
    return json.loads(predictions.read_text(encoding="utf-8")), per_image
