"""The COCO data path and evaluation, end to end on generated data with real pycocotools."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from transformers import DetrImageProcessor, RTDetrImageProcessor

from dapft.analysis.evaluate import EVALUATORS, coco_evaluate, to_coco_results
from dapft.data.coco_file import DataError
from dapft.data.coco_names import contiguous_id2label, detr_id2label
from dapft.data.labels import LabelMap
from dapft.data.loader import BatchLoader, CocoDetection, TrainAugmentation
from dapft.data.shapes import CLASSES, make_shapes_dataset
from dapft.data.splits import load_split, resolve_split

CONVENTIONS = {
    "detr-91-slots": (detr_id2label(), DetrImageProcessor(size={"shortest_edge": 160, "longest_edge": 256}), "softmax"),
    "rtdetr-80-contiguous": (contiguous_id2label(), RTDetrImageProcessor(size={"height": 160, "width": 160}), "sigmoid"),
}


def _ground_truth_as_outputs(batch, num_labels: int, kind: str, queries: int = 30):
    """Model outputs that predict exactly the (processed) ground truth of a batch."""
    n = len(batch["labels"])
    width = num_labels + 1 if kind == "softmax" else num_labels
    logits = torch.full((n, queries, width), -20.0)
    boxes = torch.full((n, queries, 4), 0.5)
    boxes[..., 2:] = 0.01
    if kind == "softmax":
        logits[..., -1] = 20.0  # no-object
    for i, lab in enumerate(batch["labels"]):
        g = len(lab["class_labels"])
        boxes[i, :g] = lab["boxes"]
        logits[i, :g, :] = -20.0
        logits[i, torch.arange(g), lab["class_labels"]] = 20.0 - 0.01 * torch.arange(g)  # distinct scores
    return SimpleNamespace(logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_ground_truth_as_predictions_scores_ap_one(coco_named_root, convention, evaluator):
    id2label, processor, kind = CONVENTIONS[convention]
    split = load_split(resolve_split(coco_named_root, "val"))
    mapping = LabelMap.build(split.categories, id2label)
    loader = BatchLoader(CocoDetection(split, mapping), processor, batch_size=4, train=False, num_workers=0)
    results = []
    for batch in loader:
        outputs = _ground_truth_as_outputs(batch, len(id2label), kind)
        dets = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=batch["orig_sizes"])
        results += to_coco_results(dets, batch["image_ids"], mapping)
    metrics = coco_evaluate(split.source.annotations, results, split.ids.tolist(), evaluator)
    assert metrics.stats["AP"] == pytest.approx(1.0, abs=1e-6)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in metrics.per_class.values())


def test_label_maps_by_name_for_both_conventions_and_round_trip(coco_named_root):
    split = load_split(resolve_split(coco_named_root, "val"))
    detr = LabelMap.build(split.categories, detr_id2label())
    rt = LabelMap.build(split.categories, contiguous_id2label())
    assert detr.to_model[18] == 18 and detr.to_model[90] == 90  # DETR keeps COCO's ids
    assert rt.to_model[18] == 16 and rt.to_model[90] == 79  # RT-DETR's contiguous indices
    for m in (detr, rt):
        assert {m.to_dataset[m.to_model[c]] for c in m.to_model} == set(m.to_model)


def test_explicit_label_map_file(shapes_root, tmp_path):
    split = load_split(resolve_split(shapes_root, "val"))
    f = tmp_path / "map.json"
    f.write_text(json.dumps({str(k + 1): k for k in range(len(CLASSES))}))
    m = LabelMap.build(split.categories, {i: f"x{i}" for i in range(6)}, f)
    assert m.to_model == {k + 1: k for k in range(6)}
    with pytest.raises(DataError, match="not among the model's labels"):
        LabelMap.build(split.categories, {i: f"x{i}" for i in range(6)})


def _noisy_results(split) -> list[dict]:
    """80% of the ground truth found with jittered boxes (10% with the wrong class), five random
    false positives an image: a detector's typical mix."""
    rng = np.random.default_rng(0)
    results = []
    for i in range(len(split)):
        im = split.image(i)
        for a in split.trained(i):
            x, y, w, h = a["bbox"]
            if rng.random() < 0.8:
                j = rng.normal(0, 0.1 * max(w, h), 4)
                results.append({"image_id": im["id"], "category_id": a["category_id"] if rng.random() < 0.9 else 1,
                                "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                                "score": float(rng.random())})
        for _ in range(5):
            results.append({"image_id": im["id"], "category_id": int(rng.integers(1, 7)),
                            "bbox": list(rng.uniform(0, 100, 2)) + list(rng.uniform(5, 60, 2)), "score": float(rng.random())})
    return results


@pytest.mark.parametrize("evaluator", ["hotcoco", "faster-coco-eval"])
def test_each_evaluator_agrees_with_pycocotools_on_imperfect_predictions(shapes_root, evaluator):
    split = load_split(resolve_split(shapes_root, "val"))
    results = _noisy_results(split)
    ids = split.ids.tolist()
    a = coco_evaluate(split.source.annotations, results, ids, "pycocotools")
    b = coco_evaluate(split.source.annotations, results, ids, evaluator)
    assert 0.1 < a.stats["AP"] < 0.9
    for k in a.stats:
        assert a.stats[k] == pytest.approx(b.stats[k], abs=1e-4), k
    for k in a.per_class:
        assert a.per_class[k] == pytest.approx(b.per_class[k], abs=1e-4), k
    np.testing.assert_allclose(a.precision, b.precision, atol=1e-6)


def test_shapes_dataset_is_deterministic_by_seed(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    a = make_shapes_dataset(tmp_path / "a", train_images=3, val_images=2, seed=7)
    b = make_shapes_dataset(tmp_path / "b", train_images=3, val_images=2, seed=7)
    c = make_shapes_dataset(tmp_path / "c", train_images=3, val_images=2, seed=8)
    assert digest(a) == digest(b) != digest(c)


def test_shapes_dataset_covers_coco_size_ranges(tmp_path):
    root = make_shapes_dataset(tmp_path, train_images=0, val_images=60, seed=0)
    anns = json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).sum() > 10 and ((areas >= 32**2) & (areas < 96**2)).sum() > 10 and (areas >= 96**2).sum() >= 1
    assert {a["category_id"] for a in anns} == set(range(1, len(CLASSES) + 1))


# ---------------------------------------------------------------------------------------------
# Bad input: each named, with the file and the item, before any long work


def _copy(shapes_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(shapes_root, root)
    ann = root / "annotations" / "instances_val2017.json"
    return root, ann, json.loads(ann.read_text())


def test_missing_image_is_named(shapes_root, tmp_path):
    root, _, data = _copy(shapes_root, tmp_path)
    (root / "val2017" / data["images"][2]["file_name"]).unlink()
    with pytest.raises(DataError, match=rf"{data['images'][2]['file_name']} \(missing\)"):
        load_split(resolve_split(root, "val"))


def test_unreadable_image_is_named(shapes_root, tmp_path):
    root, _, data = _copy(shapes_root, tmp_path)
    (root / "val2017" / data["images"][1]["file_name"]).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{data['images'][1]['file_name']} \(unreadable"):
        load_split(resolve_split(root, "val"))


def test_a_truncated_image_is_found_before_training_and_the_verdicts_are_remembered(shapes_root, tmp_path):
    import os

    root, _, data = _copy(shapes_root, tmp_path)
    load_split(resolve_split(root, "val"))  # decodes every image once, remembers each by size and mtime
    path = root / "val2017" / data["images"][3]["file_name"]
    whole = path.read_bytes()
    stat = path.stat()
    # The same size and mtime, other contents: the remembered verdict stands (a re-run starts at once).
    path.write_bytes(whole[: len(whole) // 2] + bytes(len(whole) - len(whole) // 2))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_split(resolve_split(root, "val"))
    # A file that changed (here: cut short, its header intact) is decoded again, in full.
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"{data['images'][3]['file_name']} \(unreadable"):
        load_split(resolve_split(root, "val"))


def test_unknown_category_is_named(shapes_root, tmp_path):
    root, ann, data = _copy(shapes_root, tmp_path)
    data["annotations"][4]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"annotation id {data['annotations'][4]['id']} .*category_id 99"):
        load_split(resolve_split(root, "val"))


def test_empty_split_and_missing_files_are_named(shapes_root, tmp_path):
    root, ann, data = _copy(shapes_root, tmp_path)
    data["images"], data["annotations"] = [], []
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="empty"):
        load_split(resolve_split(root, "val"))
    with pytest.raises(DataError, match="instances_test2017.json: annotation file not found"):
        resolve_split(root, "test")


def test_degenerate_and_outside_boxes_are_skipped_and_counted(shapes_root, tmp_path):
    root, ann, data = _copy(shapes_root, tmp_path)
    data["annotations"][0]["bbox"][2] = 0  # zero width
    data["annotations"][1]["bbox"] = [500, 500, 10, 10]  # outside the 192 px image
    data["annotations"][2]["bbox"] = [-5, 3, 20, 20]  # partly outside: clipped
    ann.write_text(json.dumps(data))
    split = load_split(resolve_split(root, "val"))
    assert split.skipped == {"degenerate_boxes": 1, "boxes_outside_image": 1, "clipped_boxes": 1}
    kept = [a for i in range(len(split)) for a in split.trained(i)]
    assert len(kept) == len(data["annotations"]) - 2
    clipped = next(a for a in kept if a["id"] == data["annotations"][2]["id"])
    assert clipped["bbox"] == [0.0, 3, 15, 20]


def test_image_size_mismatch_is_named(shapes_root, tmp_path):
    root, ann, data = _copy(shapes_root, tmp_path)
    data["images"][0]["width"] = 999
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="999"):
        load_split(resolve_split(root, "val"))


# ---------------------------------------------------------------------------------------------
# Augmentation keeps boxes on the objects they frame


@pytest.mark.parametrize("seed", range(25))
def test_augmentation_keeps_boxes_on_their_objects(seed):
    rng = np.random.default_rng(seed)
    h, w = 120, 160
    img = np.zeros((h, w, 3), dtype=np.uint8)
    boxes, colours = [], [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for c in colours:
        bw, bh = rng.integers(10, 40, 2)
        x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
        img[y:y + bh, x:x + bw] = c
        boxes.append([x, y, bw, bh])
    # disjoint colours; later rectangles may overlap earlier ones, so check only fully visible pixels' extent
    import random

    xyxy = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], dtype=torch.float32)
    out_img, out_boxes, out_labels = TrainAugmentation(w)(torch.from_numpy(img).permute(2, 0, 1), xyxy,
                                                           torch.arange(3), random.Random(seed))
    arr = out_img.permute(1, 2, 0).numpy()
    for box, label in zip(out_boxes, out_labels):
        ys, xs = np.nonzero((arr == np.array(colours[int(label)])).all(-1))
        if len(xs) == 0:
            continue  # fully covered by a later rectangle
        x0, y0, x1, y1 = box.tolist()
        x, y, bw, bh = x0, y0, x1 - x0, y1 - y0
        # every visible pixel of the object lies inside its transformed box
        assert xs.min() >= x - 1e-3 and ys.min() >= y - 1e-3
        assert xs.max() + 1 <= x + bw + 1e-3 and ys.max() + 1 <= y + bh + 1e-3
        if int(label) == 2:  # drawn last, never occluded: the box is exactly its pixels' extent
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx([x, y, x + bw, y + bh], abs=1e-3)


def test_collated_boxes_frame_the_objects_after_processing(shapes_root):
    # The processor's normalised cxcywh boxes, mapped back to the resized image, frame the same pixels.
    split = load_split(resolve_split(shapes_root, "val"))
    mapping = LabelMap.build(split.categories, {i: n for i, n in enumerate(CLASSES)})
    proc = DetrImageProcessor(size={"shortest_edge": 160, "longest_edge": 256})
    batch = next(iter(BatchLoader(CocoDetection(split, mapping), proc, batch_size=2, train=False, num_workers=0)))
    lab = batch["labels"][0]
    hh, ww = batch["pixel_mask"][0].nonzero().max(0).values.add(1).tolist()  # the resized image, unpadded
    orig = split.trained(split.index(batch["image_ids"][0]))
    scale = ww / Image.open(split.source.images / split.image(0)["file_name"]).width
    got = TF.convert_bounding_box_format(lab["boxes"] * torch.tensor([ww, hh, ww, hh]), "CXCYWH", "XYWH")
    want = torch.tensor([a["bbox"] for a in orig]) * scale
    torch.testing.assert_close(got, want, atol=1.0, rtol=0)


def test_duplicate_image_ids_are_refused(shapes_root, tmp_path):
    root, ann, data = _copy(shapes_root, tmp_path)
    data["images"][3]["id"] = data["images"][1]["id"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"image id {data['images'][1]['id']} is used by both "
                                        rf"{data['images'][1]['file_name']} and {data['images'][3]['file_name']}"):
        load_split(resolve_split(root, "val"))


def test_label_map_collisions_and_unknown_categories_are_refused(shapes_root, tmp_path):
    split = load_split(resolve_split(shapes_root, "val"))
    labels = {i: f"x{i}" for i in range(6)}
    f = tmp_path / "map.json"
    f.write_text(json.dumps({**{str(k + 1): k for k in range(len(CLASSES))}, "3": 0}))  # 1 and 3 -> label 0
    with pytest.raises(DataError, match=r"categories \[1, 3\] all map to model label 0"):
        LabelMap.build(split.categories, labels, f)
    f.write_text(json.dumps({**{str(k + 1): k for k in range(len(CLASSES))}, "42": 5}))
    with pytest.raises(DataError, match=r"category ids \[42\] are not in"):
        LabelMap.build(split.categories, labels, f)
    f.write_text(json.dumps({str(k + 1): k + 3 for k in range(len(CLASSES))}))  # labels 6..8 do not exist
    with pytest.raises(DataError, match=r"model label indices \[6, 7, 8\] do not exist in the model \(it has 6"):
        LabelMap.build(split.categories, labels, f)


def test_a_root_without_the_2017_names_is_read_and_the_2017_layout_comes_first(shapes_root, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(shapes_root / "val2017", plain / "val")
    (plain / "annotations").mkdir()
    shutil.copy(shapes_root / "annotations" / "instances_val2017.json", plain / "annotations" / "instances_val.json")
    assert resolve_split(plain, "val").images == plain / "val"
    both = tmp_path / "both"
    shutil.copytree(plain, both)
    shutil.copytree(shapes_root / "val2017", both / "val2017")
    shutil.copy(shapes_root / "annotations" / "instances_val2017.json", both / "annotations" / "instances_val2017.json")
    assert resolve_split(both, "val") == resolve_split(shapes_root, "val").__class__(
        both / "val2017", both / "annotations" / "instances_val2017.json")


def test_the_first_images_of_a_loaded_split_are_those_load_split_takes(shapes_root):
    """--train-eval-images: the subset cut from the loaded split, as loading only it would give."""
    from dapft.data.flat_split import first_images

    source = resolve_split(shapes_root, "train")
    cut, alone = first_images(load_split(source), 5), load_split(source, max_images=5)
    assert cut.ids.tolist() == alone.ids.tolist() and len(cut) == 5
    for i in range(5):
        assert cut.image(i) == alone.image(i)
        assert cut.trained(i) == alone.trained(i) and cut.evaluated(i) == alone.evaluated(i)
    assert cut.ground_truth() == alone.ground_truth()


@pytest.mark.parametrize("suffix", [".webp", ".tiff", ".jpg", ".png"])
def test_a_photo_with_an_exif_orientation_is_read_upright_in_every_format(tmp_path, suffix):
    # torchvision reads JPEG and PNG upright but not WebP; PIL reads TIFF and WebP: each must come out
    # as a browser shows it, which is what the data check measured and the boxes were drawn on.
    from dapft.data.loader import read_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :10] = 255  # a mark in the top left corner as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[274] = 6  # "rotate 90 degrees clockwise to view"
    image.save(tmp_path / f"photo{suffix}", exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
    upright = read_image(tmp_path / f"photo{suffix}").permute(1, 2, 0).numpy()
    assert upright.shape == (40, 20, 3)
    mark = np.argwhere(upright[..., 0] > 128)
    assert mark[:, 0].max() < 12 and mark[:, 1].min() >= 13  # now in the top right corner


@pytest.mark.parametrize("suffix", [".png", ".tiff"])  # torchvision's decoder, and PIL's for what it cannot read
def test_16_bit_images_keep_their_contents(tmp_path, suffix):
    from PIL import Image

    from dapft.data.loader import read_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / f"deep{suffix}")
    rgb = read_image(tmp_path / f"deep{suffix}").permute(1, 2, 0).numpy()
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 < rgb.mean() < 135  # not all white
    Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB").save(tmp_path / f"plain{suffix}")
    plain = read_image(tmp_path / f"plain{suffix}").permute(1, 2, 0).numpy()
    np.testing.assert_allclose(rgb.astype(int), plain.astype(int), atol=1)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_boxes_skipped_in_training_are_left_out_of_evaluation_too(tmp_path, shapes_root, evaluator):
    from dapft.analysis.checkpoint_eval import evaluate_model

    clean = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    bad = json.loads(json.dumps(clean))
    first = bad["images"][0]
    next_id = max(a["id"] for a in bad["annotations"]) + 1
    bad["annotations"] += [  # a negative width, a NaN, one entirely outside the image
        {"id": next_id, "image_id": first["id"], "category_id": 1, "bbox": [10, 10, -5, 8], "area": 40, "iscrowd": 0},
        {"id": next_id + 1, "image_id": first["id"], "category_id": 2, "bbox": [10, 10, float("nan"), 8],
         "area": 40, "iscrowd": 0},
        {"id": next_id + 2, "image_id": first["id"], "category_id": 3, "bbox": [first["width"] + 5, 3, 6, 6],
         "area": 36, "iscrowd": 0}]
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(bad))
    common = dict(images=str(shapes_root / "val2017"), max_images=6, batch_size=3, num_workers=0,
                  progress=False, device="cpu", evaluator=evaluator)
    with_bad = evaluate_model("dapft/tiny-rtdetr-shapes", None, annotations=str(ann), output=str(tmp_path / "a"),
                              **common)
    ann_clean = tmp_path / "clean.json"
    ann_clean.write_text(json.dumps(clean))
    without = evaluate_model("dapft/tiny-rtdetr-shapes", None, annotations=str(ann_clean), output=str(tmp_path / "b"),
                             **common)
    assert without["stats"]["AP"] > 0.05
    assert with_bad["stats"] == without["stats"]  # the three boxes count neither as misses nor as ground truth
    report = (tmp_path / "a" / "report.md").read_text()
    assert "degenerate_boxes 2" in report and "boxes_outside_image 1" in report and "left out of" in report


def test_max_images_scores_exactly_that_subset(tmp_path, shapes_root):
    # The first 5 images by id, evaluated from the whole file, score as a file holding only them:
    # images without detections must not count as misses.
    from dapft.analysis.checkpoint_eval import evaluate_model

    whole = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    first = sorted(im["id"] for im in whole["images"])[:5]
    subset = {**whole, "images": [im for im in whole["images"] if im["id"] in first],
              "annotations": [a for a in whole["annotations"] if a["image_id"] in first]}
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    common = dict(images=str(shapes_root / "val2017"), batch_size=3, num_workers=0, progress=False, device="cpu",
                  evaluator="pycocotools")
    cut = evaluate_model("dapft/tiny-rtdetr-shapes", None, annotations=str(shapes_root / "annotations" /
                         "instances_val2017.json"), max_images=5, output=str(tmp_path / "a"), **common)
    alone = evaluate_model("dapft/tiny-rtdetr-shapes", None, annotations=str(tmp_path / "subset.json"),
                           output=str(tmp_path / "b"), **common)
    assert cut["images"] == 5 and cut["stats"]["AP"] > 0.05
    assert cut["stats"] == alone["stats"]


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_coco_evaluate_of_a_whole_file_scores_only_the_image_ids_it_is_given(shapes_root, evaluator):
    # The library call a researcher makes with a whole annotation file and predictions for some of
    # its images: the other images' boxes are not misses.
    path = shapes_root / "annotations" / "instances_val2017.json"
    whole = json.loads(path.read_text())
    first = sorted(im["id"] for im in whole["images"])[:5]
    exact = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in whole["annotations"] if a["image_id"] in first and not a.get("iscrowd")]
    assert coco_evaluate(path, exact, first, evaluator).stats["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_per_class_ap_is_cocoevals_ap_of_that_category_alone(shapes_root, evaluator):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    split = load_split(resolve_split(shapes_root, "val"))
    results = _noisy_results(split)
    ids = split.ids.tolist()
    ours = coco_evaluate(split.source.annotations, results, ids, evaluator)
    gt = COCO(str(split.source.annotations))
    assert set(ours.per_class) == {c["name"] for c in gt.loadCats(gt.getCatIds())}
    for cat in gt.loadCats(gt.getCatIds()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds, ev.params.catIds = ids, [cat["id"]]
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ours.per_class[cat["name"]] == pytest.approx(ev.stats[0], abs=1e-4), cat["name"]
    assert len(set(round(v, 4) for v in ours.per_class.values())) > 1  # not one number for every class


def test_at_most_100_detections_an_image_the_best_and_the_same_ap(shapes_root):
    # COCO scores 100 detections an image (maxDets): a model with 120 queries keeps its 100 best, and
    # the AP is the one pycocotools computes from all 120.
    from dapft.analysis.evaluate import predict
    from dapft.modeling.tiny import tiny_model, tiny_processor

    split = load_split(resolve_split(shapes_root, "val"))
    torch.manual_seed(0)
    model = tiny_model("detr", dict(enumerate(CLASSES)), num_queries=120)
    processor = tiny_processor("detr", 128)
    mapping = LabelMap.build(split.categories, model.config.id2label)
    loader = BatchLoader(CocoDetection(split, mapping), processor, batch_size=4, train=False, num_workers=0)
    capped = predict(model, processor, loader, mapping, device=torch.device("cpu"))
    every = predict(model, processor, loader, mapping, device=torch.device("cpu"), max_detections=10**6)
    ids = split.ids.tolist()
    for i in ids:
        mine = sorted(r["score"] for r in capped if r["image_id"] == i)
        scores = sorted(r["score"] for r in every if r["image_id"] == i)
        assert len(scores) == 120 and mine == scores[-100:]
    a = coco_evaluate(split.source.annotations, capped, ids, "pycocotools")
    b = coco_evaluate(split.source.annotations, every, ids, "pycocotools")
    assert a.stats == b.stats


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_no_detections_at_all_score_zero_as_detections_that_match_nothing(shapes_root, evaluator):
    split = load_split(resolve_split(shapes_root, "val"))
    ids = split.ids.tolist()
    empty = coco_evaluate(split.source.annotations, [], ids, evaluator)
    # One far-off, tiny detection in one image: COCOeval's own answer for "found nothing".
    nothing = coco_evaluate(split.source.annotations, [{"image_id": ids[0], "category_id": 1, "bbox": [0, 0, 1, 1],
                                                         "score": 0.01}], ids, evaluator)
    assert empty.stats == pytest.approx(nothing.stats, abs=1e-12) and empty.stats["AP"] == 0
    assert empty.stats["AP_large"] == -1  # COCO's "no such ground truth" (this split has no large object), not 0
    assert empty.per_class == pytest.approx(nothing.per_class) and set(empty.per_class) == set(nothing.per_class)
    assert empty.precision.shape == nothing.precision.shape


def test_scores_under_bf16_autocast_are_post_processed_in_float32(shapes_root):
    """Under autocast the model's outputs are bf16 (GPU runs, `--precision auto`): post-processing
    must see them in float32, or every score is rounded to bf16's 3 digits and AP ranks ties."""
    from dapft.analysis.evaluate import predict
    from dapft.modeling.tiny import tiny_model, tiny_processor

    split = load_split(resolve_split(shapes_root, "val"), max_images=4)
    torch.manual_seed(0)
    model = tiny_model("deformable_detr_box_refine", dict(enumerate(CLASSES)))
    processor = tiny_processor("deformable_detr", 96)
    mapping = LabelMap.build(split.categories, model.config.id2label)
    loader = BatchLoader(CocoDetection(split, mapping), processor, batch_size=4, train=False, num_workers=0)
    results = predict(model, processor, loader, mapping, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    scores = torch.tensor([r["score"] for r in results])
    assert (scores.bfloat16().float() != scores).any()  # not all of them bf16 values


def test_a_split_keeps_only_what_box_training_and_evaluation_read_and_scores_the_same(tmp_path, shapes_root):
    # COCO's files carry a polygon for every object (most of their size): a box-only fine-tune
    # must not hold them for the run's length, and leaving them out must change no number.
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        a["attributes"] = {"occluded": False}
    path.write_text(json.dumps(data))
    split = load_split(resolve_split(root, "val"))
    kept = {"id", "image_id", "category_id", "bbox", "iscrowd", "area"}
    assert all(set(a) <= kept for i in range(len(split)) for a in split.evaluated(i) + split.trained(i))
    results = _noisy_results(split)
    ids = split.ids.tolist()
    assert coco_evaluate(split.ground_truth(), results, ids, "pycocotools").stats == coco_evaluate(
        path, results, ids, "pycocotools").stats  # the file as written, polygons and all


def test_the_dataset_item_is_the_splits_image_and_boxes(shapes_root):
    # The dataset holds the split as flat arrays: each item must still be its image's file, size,
    # id and boxes (xyxy) with their labels in model label space.
    from dapft.data.loader import read_image

    split = load_split(resolve_split(shapes_root, "val"))
    mapping = LabelMap.build(split.categories, {i: n for i, n in enumerate(CLASSES)})
    dataset = CocoDetection(split, mapping)
    assert len(dataset) == len(split)
    for index in range(len(split)):
        im, item, anns = split.image(index), dataset[index], split.trained(index)
        assert item["image_id"] == im["id"] and item["orig_size"] == (im["height"], im["width"])
        assert torch.equal(item["image"], read_image(split.source.images / im["file_name"]))
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        torch.testing.assert_close(item["boxes"], expected.float())
        assert item["labels"].tolist() == [mapping.to_model[a["category_id"]] for a in anns]


def _set(path: str, value):
    """A change to a COCO file: `value` put at `path` ("annotations.0.bbox"; DEL deletes the key)."""
    def change(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DEL:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value
    return change


DEL = object()
FILE_CHANGES = {  # name -> change; each is either a file COCO takes or one dapft must refuse
    "as written": _set("info", {}),
    "polygons and an RLE": lambda d: [a.update(segmentation={"counts": "x1y", "size": [2, 2]}) for a in d["annotations"]],
    "no area, no iscrowd": lambda d: [(a.pop("area"), a.pop("iscrowd")) for a in d["annotations"]],
    "integer boxes": lambda d: [a.update(bbox=[int(v) for v in a["bbox"]]) for a in d["annotations"]],
    "a crowd as true": _set("annotations.0.iscrowd", True),
    "a NaN box": _set("annotations.0.bbox.2", float("nan")),
    "an infinite box": _set("annotations.0.bbox.2", float("inf")),
    "negative and 64-bit ids": lambda d: [_set("annotations.0.id", -7)(d), _set("annotations.1.id", 2**63 - 1)(d)],
    "a repeated annotation id": lambda d: _set("annotations.1.id", d["annotations"][0]["id"])(d),
    "a repeated image id": lambda d: _set("images.1.id", d["images"][0]["id"])(d),
    "an unknown category": _set("annotations.0.category_id", 999),
    "an unknown image": _set("annotations.0.image_id", 999),
    "iscrowd 2": _set("annotations.0.iscrowd", 2),
    "area a string": _set("annotations.0.area", "big"),
    "area null": _set("annotations.0.area", None),
    "a box of 3 numbers": _set("annotations.0.bbox", [1, 2, 3]),
    "a box with a boolean": _set("annotations.0.bbox.3", True),
    "a fractional id": _set("annotations.0.id", 1.5),
    "an id past 64 bits": _set("annotations.0.id", 2**63),
    "a boolean image id": _set("images.0.id", True),
    "width 0": _set("images.0.width", 0),
    "width a string": _set("images.0.width", "640"),
    "a numeric file name": _set("images.0.file_name", 5),
    "an empty file name": _set("images.0.file_name", ""),
    "no image file name": _set("images.0.file_name", DEL),
    "a category without a name": _set("categories.0.name", DEL),
    "a category with a string id": _set("categories.0.id", "1"),
    "no categories": _set("categories", []),
    "no images": lambda d: (d.update(images=[], annotations=[])),
    "an image that is a list": _set("images.0", [1, 2]),
    "an annotation that is a number": _set("annotations.0", 3),
    "no annotations list": _set("annotations", DEL),
}


@pytest.mark.parametrize("change", FILE_CHANGES)
def test_the_fast_reader_takes_only_files_the_checked_reader_takes_and_reads_them_alike(shapes_root, tmp_path, change):
    """dapft reads an annotation file with a typed decoder that skips polygons (msgspec) and falls back
    to the standard parser with item-by-item checks for anything it does not take: it must never take
    a file the checks refuse, and what it reads must be what the checks read, column for column."""
    from dapft.data.coco_file import _decode_checked, _decode_typed

    data = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    FILE_CHANGES[change](data)
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    try:
        checked = _decode_checked(path)
    except DataError as exc:
        assert str(path) in str(exc)
        assert _decode_typed(path) is None, f"the fast reader took a file the checks refuse ({exc})"
        return
    typed = _decode_typed(path)
    if change in ("as written", "polygons and an RLE", "no area, no iscrowd", "integer boxes",
                  "negative and 64-bit ids"):
        assert typed is not None, "a plain COCO file must take the fast path"
    if typed is not None:
        for column, value in vars(checked).items():
            np.testing.assert_equal(getattr(typed, column), value, err_msg=column)


def test_asking_for_no_images_is_refused_naming_the_file(shapes_root):
    source = resolve_split(shapes_root, "val")
    with pytest.raises(DataError, match="instances_val2017.json: asked for its first 0 images"):
        load_split(source, max_images=0)
