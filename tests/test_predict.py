"""`dapft predict` as a user runs it: on a folder of photos of mixed formats, sizes and orientations,
and on the validation images, where its boxes must be `dapft eval`'s."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from runs_helpers import dapft

pytestmark = pytest.mark.slow  # the command line in subprocesses

BUNDLED = "dapft/tiny-rtdetr-shapes"


def test_the_boxes_of_the_validation_images_are_those_eval_writes(tmp_path, shapes_root):
    dapft("eval", "--model", BUNDLED, "--data", shapes_root, "--output", tmp_path / "eval", "--num-workers", "0",
          "--no-progress", "--device", "cpu")
    dapft("predict", "--model", BUNDLED, shapes_root / "val2017", "--output", tmp_path / "pred", "--threshold", "0",
          "--no-draw", "--num-workers", "0", "--no-progress", "--device", "cpu")
    ground_truth = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    listing = json.loads((tmp_path / "pred" / "images.json").read_text())

    def by_file(results, files, categories):
        return sorted((files[r["image_id"]].rsplit("/", 1)[-1], categories[r["category_id"]], round(r["score"], 5),
                       tuple(np.round(r["bbox"], 2))) for r in results)

    eval_view = by_file(evaluated, {im["id"]: im["file_name"] for im in ground_truth["images"]},
                        {c["id"]: c["name"] for c in ground_truth["categories"]})
    pred_view = by_file(predicted, {im["id"]: im["file_name"] for im in listing["images"]},
                        {c["id"]: c["name"] for c in listing["categories"]})
    assert len(eval_view) > 100 and pred_view == eval_view


def test_a_folder_and_a_glob_of_photos_of_mixed_sizes_and_orientations(tmp_path, shapes_root):
    photos = tmp_path / "photos"
    photos.mkdir()
    scene = Image.open(next((shapes_root / "val2017").iterdir())).convert("RGB")  # 192 x 192 with shapes on it
    wide = scene.resize((300, 180))
    exif = wide.getexif()
    exif[274] = 6  # stored sideways, shown upright: 180 wide, 300 high
    wide.save(photos / "phone.jpg", exif=exif)
    scene.resize((96, 140)).save(photos / "small.png")
    scene.save(photos / "notes.txt.webp", lossless=True)
    (photos / "notes.txt").write_text("not an image")  # left alone
    more = tmp_path / "more"
    more.mkdir()
    scene.save(more / "extra.png")
    proc = dapft("predict", "--model", BUNDLED, photos, str(more / "*.png"), "--output", tmp_path / "pred",
                 "--threshold", "0.3", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu")
    listing = json.loads((tmp_path / "pred" / "images.json").read_text())
    sizes = {im["file_name"].rsplit("/", 1)[-1]: (im["width"], im["height"]) for im in listing["images"]}
    assert sizes == {"phone.jpg": (180, 300), "small.png": (96, 140), "notes.txt.webp": (192, 192),
                     "extra.png": (192, 192)}
    for name, size in sizes.items():
        assert Image.open(tmp_path / "pred" / "drawn" / f"{name.rsplit('.', 1)[0]}.jpg").size == size
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert results and all(r["score"] >= 0.3 for r in results)
    names = {c["name"] for c in listing["categories"]}
    assert "circle" in names and "detections at score >= 0.3 on 4 images" in " ".join(proc.stderr.split())


def test_a_path_with_no_image_is_refused_by_name_before_the_model_loads(tmp_path):
    proc = dapft("predict", "--model", BUNDLED, tmp_path / "nowhere", "--output", tmp_path / "pred", check=False)
    assert proc.returncode == 1 and f"{tmp_path / 'nowhere'}: no image there" in " ".join(proc.stderr.split())
    assert not (tmp_path / "pred").exists()


def test_files_folders_and_globs_are_taken_in_the_order_given_each_file_once(tmp_path, shapes_root):
    from dapft.analysis.predict import collect_images

    folder = shapes_root / "val2017"
    first, second = sorted(folder.iterdir())[:2]
    taken = collect_images([second, folder, str(folder / "00000[01].png")])
    assert taken[:2] == [second, first] and len(taken) == len(list(folder.iterdir()))  # none twice
    assert collect_images([first]) == [first]


def test_the_library_call_returns_what_it_writes_with_its_default_workers(tmp_path, shapes_root):
    from dapft.analysis.predict import predict_images

    images = sorted((shapes_root / "val2017").iterdir())[:2]
    results = predict_images(BUNDLED, images, tmp_path / "pred", threshold=0.3, device="cpu", progress=False,
                             draw_images=False)  # num_workers left to dapft: none on a CPU
    assert results and results == json.loads((tmp_path / "pred" / "predictions.json").read_text())
