"""`dapft export` to ONNX, and the exported file run by ONNX Runtime where dapft runs a model: the
bundled detectors score the AP their checkpoints score, families that need work export (two-stage
Deformable DETR's float64 grid), one that cannot is refused naming the operator, and bad input is one
line before any work."""

from __future__ import annotations

import json

import pytest
from runs_helpers import COMMON, dapft

from dapft.data.shapes import CLASSES
from dapft.modeling.export import ExportError, export
from dapft.modeling.tiny import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # exports, evaluations


def _ap(model, shapes_root, out) -> dict:
    from dapft.analysis.checkpoint_eval import evaluate_model

    return evaluate_model(str(model), str(shapes_root), output=out, num_workers=0, progress=False, report_to="none",
                          gallery=False, device="cpu")


def test_the_bundled_rtdetr_exports_and_scores_through_onnx_runtime_as_through_pytorch(tmp_path, shapes_root):
    proc = dapft("export", "--model", "dapft/tiny-rtdetr-shapes", "--output", tmp_path / "export")
    assert "exported" in proc.stderr and "largest difference" in proc.stderr
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["image_size"] == [160, 160] and record["inputs"] == ["pixel_values"]  # its processor's size
    assert max(record["max_diff_logits"], record["max_diff_boxes"]) < 1e-3
    ours, theirs = (_ap(m, shapes_root, tmp_path / name) for m, name in
                    ((tmp_path / "export" / "model.onnx", "onnx"), ("dapft/tiny-rtdetr-shapes", "torch")))
    assert ours["stats"]["AP"] == pytest.approx(theirs["stats"]["AP"], abs=1e-3)  # within 0.1 AP
    assert ours["detections"] == theirs["detections"] and "errors" in ours  # the same breakdown comes out
    # dapft predict through the file: the boxes of the validation images as PyTorch draws them
    images = sorted((shapes_root / "val2017").iterdir())[:3]
    dapft("predict", *images, "--model", tmp_path / "export" / "model.onnx", "--output", tmp_path / "p-onnx",
          "--threshold", "0.3", *COMMON[:3])
    dapft("predict", *images, "--model", "dapft/tiny-rtdetr-shapes", "--output", tmp_path / "p-torch",
          "--threshold", "0.3", *COMMON[:3])
    a, b = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("p-onnx", "p-torch"))
    assert [(r["image_id"], r["category_id"]) for r in a] == [(r["image_id"], r["category_id"]) for r in b]
    assert all(x["bbox"] == pytest.approx(y["bbox"], abs=0.05) and x["score"] == pytest.approx(y["score"], abs=1e-4)
               for x, y in zip(a, b))
    assert len(list((tmp_path / "p-onnx" / "drawn").glob("*.jpg"))) == 3


def test_the_bundled_deformable_detr_is_refused_any_size_and_exports_at_a_fixed_one(tmp_path, shapes_root):
    with pytest.raises(ExportError, match="keeps the sizes of its feature maps as constants.*--image-size H W"):
        export("dapft/tiny-deformable-detr-shapes", tmp_path / "any", log=lambda *a, **k: None)
    assert not (tmp_path / "any").exists()  # nothing half-written stays
    result = export("dapft/tiny-deformable-detr-shapes", tmp_path / "fixed", image_size=(160, 160), dynamic_batch=True,
                    log=lambda *a, **k: None)
    assert result.inputs == ["pixel_values", "pixel_mask"] and max(result.max_diff_logits, result.max_diff_boxes) < 1e-3
    saved = json.loads((tmp_path / "fixed" / "preprocessor_config.json").read_text())
    assert saved["pad_size"] == {"height": 160, "width": 160} and saved["size"]["max_height"] == 160
    ours, theirs = (_ap(m, shapes_root, tmp_path / name) for m, name in
                    ((result.file, "onnx"), ("dapft/tiny-deformable-detr-shapes", "torch")))
    assert ours["stats"]["AP"] == pytest.approx(theirs["stats"]["AP"], abs=1e-3)


def test_two_stage_deformable_detr_exports_with_its_grid_cast_and_rf_detr_is_refused_naming_the_operator(tmp_path):
    labels = dict(enumerate(CLASSES))
    two_stage = save_tiny_checkpoint("deformable_detr_two_stage", tmp_path / "two", labels, image_size=128)
    result = export(str(two_stage), tmp_path / "two-x", image_size=(128, 128), log=lambda *a, **k: None)
    assert max(result.max_diff_logits, result.max_diff_boxes) < 1e-3  # ONNX Runtime runs it, as PyTorch does
    rf = save_tiny_checkpoint("rf_detr", tmp_path / "rf", labels, image_size=128)
    with pytest.raises(ExportError, match=r"rf_detr: cannot be exported to ONNX \(opset 17\): the DINOv2 backbone's "
                                          r"resize .* aten::_upsample_bicubic2d_aa"):
        export(str(rf), tmp_path / "rf-x", log=lambda *a, **k: None)


def test_bad_export_requests_are_one_line_before_any_model_loads(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a checkpoint")
    cases = [
        (dict(model=str(tmp_path / "notes")), "not a checkpoint folder \\(no config.json\\)"),
        (dict(model="dapft/tiny-rtdetr-shapes", fmt="tensorrt"), "--format 'tensorrt': dapft exports onnx"),
        (dict(model="dapft/tiny-rtdetr-shapes", image_size=(0, 160)), "--image-size 0 160: give a height and a width"),
        (dict(model="dapft/tiny-rtdetr-shapes", opset=11), "--opset 11: the DETR family needs at least 16"),
        (dict(model="model.onnx"), "already an ONNX file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            export(output=tmp_path / "out", log=lambda *a, **k: None, **kwargs)
    with pytest.raises(ExportError, match="--image-size 40 40: rt_detr cannot take it .*; try a multiple of 32"):
        export("dapft/tiny-rtdetr-shapes", tmp_path / "out", image_size=(40, 40), log=lambda *a, **k: None)
    assert not (tmp_path / "out").exists()
    # An output that holds an export already, and an exported file without what reads it beside it
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="holds an export already"):
        export("dapft/tiny-rtdetr-shapes", tmp_path / "done", log=lambda *a, **k: None)
    from dapft.modeling.export import load_onnx_detector

    with pytest.raises(FileNotFoundError, match="preprocessor_config.json and config.json are not beside it"):
        load_onnx_detector(tmp_path / "done" / "model.onnx")
