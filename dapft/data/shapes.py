"""A generated COCO-format detection dataset of rendered shapes (`dapft make-dataset shapes`).

What makes it a useful benchmark rather than a toy: six classes that differ only in outline (colour
is random, so it is no cue), sizes from a few pixels to half the image (COCO small, medium and
large all occur), objects that occlude each other (boxes are the full extent of each shape, up to
45% hidden), and textured backgrounds with distractor strokes. Everything is a function of the seed.

Layout written (the COCO 2017 one, so `--data DIR` works as for COCO):
    DIR/train2017/*.png, DIR/val2017/*.png, DIR/annotations/instances_{train,val}2017.json
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "diamond", "cross", "star")
MAX_HIDDEN = 0.45


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "diamond":
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    elif kind == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    # A smooth colour gradient, coarse blotches and fine noise, then distractor strokes.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    blotch = rng.normal(0, 25, (size // 16 + 1, size // 16 + 1, 3))
    blotch = np.kron(blotch, np.ones((16, 16, 1)))[:size, :size]
    img = img + blotch + rng.normal(0, 12, (size, size, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 7)):
        p = rng.uniform(0, size, 4)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)),
                  width=int(rng.integers(1, 3)))
    return pil


def render_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[Image.Image, list[dict]]:
    """One image and its annotations (category index, bbox xywh, visible area)."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    owner = np.full((size, size), -1, dtype=np.int32)  # which object each pixel shows
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            # log-uniform radius: many small objects, some large ones
            r = float(np.exp(rng.uniform(math.log(size * 0.035), math.log(size * 0.35))))
            cx, cy = rng.uniform(r * 0.7, size - r * 0.7, 2)
            kind = CLASSES[int(rng.integers(len(CLASSES)))]
            angle = float(rng.uniform(0, 2 * math.pi)) if kind != "circle" else 0.0
            mask_img = Image.new("L", (size, size), 0)
            mdraw = ImageDraw.Draw(mask_img)
            if kind == "circle":
                mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            else:
                mdraw.polygon(_polygon(kind, cx, cy, r, angle), fill=255)
            mask = np.asarray(mask_img) > 127
            if mask.sum() < 12:
                continue
            # Reject a placement that hides too much of an object already drawn.
            if any((owner[mask] == k).sum() > MAX_HIDDEN * o["full_area"] for k, o in enumerate(objects)):
                continue
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
            outline = tuple(int(v) for v in rng.uniform(0, 255, 3))
            if kind == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline)
            else:
                draw.polygon(_polygon(kind, cx, cy, r, angle), fill=colour, outline=outline)
            owner[mask] = len(objects)
            objects.append({"category": CLASSES.index(kind), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                            "full_area": int(mask.sum())})
            break
    for k, o in enumerate(objects):
        o["area"] = float((owner == k).sum())
    return img, objects


def make_shapes_dataset(
    output: str | os.PathLike,
    *,
    train_images: int = 800,
    val_images: int = 200,
    image_size: int = 192,
    max_objects: int = 8,
    seed: int = 0,
) -> Path:
    """Write the dataset under `output` and return that path. Same arguments, same bytes."""
    root = Path(output)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    for split, count, split_seed in (("train", train_images, 0), ("val", val_images, 1)):
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, split_seed, index])
            img, objects = render_image(rng, image_size, max_objects)
            name = f"{index:06d}.png"
            img.save(folder / name)
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
            for o in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": o["category"] + 1,
                                    "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
        data = {"info": {"description": f"dapft shapes, seed {seed}"}, "images": images,
                "annotations": annotations, "categories": categories}
        tmp = root / "annotations" / f".instances_{split}2017.json.tmp"
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, root / "annotations" / f"instances_{split}2017.json")
    return root
