"""Mixed precision and CUDA: which autocast dtype a --precision gives (runs everywhere), and what only a
GPU can show (marked `gpu`, skipped where torch sees none): DAP on the device equals DAP on the
CPU, a bf16 / fp16 training step stays finite and near fp32, and `dapft finetune` / `dapft eval
--device cuda` run end to end, resume where they stopped, and score as the CPU scores.

    python -m pytest tests/test_gpu.py      # on a GPU machine: nothing skipped
    python -m pytest -m gpu                 # the CUDA tests alone
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapft import differentiable_ap
from dapft.data.shapes import CLASSES
from dapft.modeling.families import family_of
from dapft.modeling.tiny import tiny_model
from dapft.objective.criterion import DAPCriterion
from dapft.objective.detection_loss import install_loss
from dapft.utils.device import amp_dtype

CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda(test):
    """Marks a test `gpu` and skips it where torch sees no GPU."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_cpu_never_autocasts(precision):
    # CPU autocast is slower than float32 there and changes results: every precision means fp32.
    assert amp_dtype(precision, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="--precision must be"):
        amp_dtype("fp64", torch.device("cpu"))  # refused on any device: a GPU run would fail on it later


def test_gpu_precisions_map_to_their_autocast_dtype():
    gpu = torch.device("cuda")  # a device object needs no GPU
    assert amp_dtype("bf16", gpu) is torch.bfloat16
    assert amp_dtype("fp16", gpu) is torch.float16
    assert amp_dtype("fp32", gpu) is None
    with pytest.raises(ValueError, match="precision must be"):
        amp_dtype("half", gpu)



@pytest.mark.parametrize("family", ["detr", "rt_detr"])
@pytest.mark.parametrize("matcher", ["constant", "momentum", "original"])
def test_a_dap_step_takes_half_precision_outputs(family, matcher):
    # What a GPU's autocast hands the criterion (bf16 logits and boxes), made here on the CPU: the
    # matching and the loss must take it (scipy's assignment takes no bf16 arrays).
    torch.manual_seed(0)
    model = tiny_model(family, dict(enumerate(CLASSES))).train()
    fam = family_of(model.config)
    install_loss(model, fam, "dap", DAPCriterion(fam, model.config, matcher=matcher))
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])
    targets = [{"class_labels": torch.tensor([0, 3]), "boxes": boxes}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=torch.randn(1, 3, 64, 64), labels=targets)
    assert out.logits.dtype == torch.bfloat16 or out.pred_boxes.dtype == torch.bfloat16
    out.loss.backward()
    assert torch.isfinite(out.loss)

@cuda
def test_auto_precision_is_bf16_where_the_gpu_has_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype("auto", torch.device("cuda")) is expected


def _candidates(m: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(m, generator=g) ** 4  # most near 0, as a detector's class scores are
    positive = torch.rand(m, generator=g) < 0.005
    ious = torch.rand(m, generator=g) * 0.5 + 0.5
    labels = torch.randint(0, num_classes, (m,), generator=g)
    num_gt = torch.bincount(labels[positive], minlength=num_classes) + 2
    return scores, positive, ious, labels, num_gt


@cuda
@pytest.mark.parametrize("average", ["pooled", "per_class"])
@pytest.mark.parametrize("exact", [False, True])
def test_dap_on_cuda_equals_dap_on_cpu(average, exact):
    # 100 queries x 80 classes x 25 images: a real-size DETR step's candidates.
    scores, positive, ious, labels, num_gt = _candidates(200_000, 80, 0)
    values, grads = [], []
    for device in ("cpu", "cuda"):
        s = scores.clone().to(device).requires_grad_(True)
        i = ious.clone().to(device).requires_grad_(True)
        dap = differentiable_ap(s, positive.to(device), i, num_gt.to(device) if average == "per_class" else
                                int(positive.sum()) + 10, labels=labels.to(device), average=average, exact=exact)
        dap.backward()
        values.append(float(dap.detach()))
        grads.append(torch.cat([s.grad, i.grad]).cpu().double())
    assert values[1] == pytest.approx(values[0], abs=2e-5)
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], 0)) > 0.9999


@pytest.fixture(scope="module")
def trained_batch(shapes_root):
    """The bundled RT-DETR (trained: its DAP is far from 0 and 1) and a batch of shapes images."""
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.loading import load_detector

    model, processor, family = load_detector("dapft/tiny-rtdetr-shapes", log=lambda _: None)
    split = load_split(resolve_split(shapes_root, "val"), max_images=8)
    mapping = LabelMap({c["id"]: c["id"] - 1 for c in split.categories})
    batch = next(iter(BatchLoader(CocoDetection(split, mapping), processor, batch_size=8, train=False, num_workers=0)))
    return model, family, batch


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float16),
    pytest.param("cuda", torch.bfloat16, marks=CUDA_MARKS),
    pytest.param("cuda", torch.float16, marks=CUDA_MARKS),
])
def test_a_mixed_precision_dap_step_is_finite_and_near_fp32(trained_batch, device, dtype):
    model, family, batch = trained_batch
    model = model.to(device).train()
    install_loss(model, family, "dap", DAPCriterion(family, model.config).to(device))
    x = batch["pixel_values"].to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
    daps = {}
    for amp in (None, dtype):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same denoising queries for both (RT-DETR draws them per step)
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(pixel_values=x, labels=targets)
        out.loss.backward()
        assert torch.isfinite(out.loss), out.loss_dict
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        daps[amp] = float(out.loss_dict["dap"])
    model.to("cpu")
    assert 0.05 < daps[None] < 0.95  # a trained model's DAP: neither bound makes the check vacuous
    # The criterion runs in float32 under autocast; only the model's outputs are rounded. On this
    # batch the converged RT-DETR's DAP is 0.1681 in float32, 0.1678 with float16 outputs (10-bit
    # mantissa), 0.1971 with bfloat16 ones (7-bit: its boxes round to 1/256 in [0.5, 1), enough to
    # move a match on 8 images; measured on CPU, 2026-11-30). The bound says which rounding it is.
    bound = 0.02 if dtype == torch.float16 else 0.05
    assert daps[dtype] == pytest.approx(daps[None], abs=bound), daps


def _dapft(*args):
    proc = subprocess.run([sys.executable, "-m", "dapft", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, f"dapft {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}"
    return proc


@cuda
def test_finetune_and_eval_on_cuda_end_to_end(tmp_path, shapes_root):
    common = ["--data", shapes_root, "--num-workers", "2", "--no-progress", "--batch-size", "4"]
    run = tmp_path / "run"
    _dapft("finetune", "--model", "dapft/tiny-rtdetr-shapes", "--output", run, "--loss", "dap", "--epochs", "2",
           "--device", "cuda", "--precision", "bf16", *common)
    report = json.loads((run / "report.json").read_text())
    assert report["before"]["AP"] > 0.05 and report["after"] is not None
    assert report["config"]["device"] == "cuda"
    # The checkpoint scored on the GPU (fp32) and on the CPU: the same detections up to float rounding.
    scored = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"eval-{device}"
        _dapft("eval", "--model", run / "checkpoint-last", "--output", out, "--device", device,
               "--precision", "fp32", *common)
        scored[device] = json.loads((out / "metrics.json").read_text())["stats"]
    assert scored["cuda"]["AP"] == pytest.approx(scored["cpu"]["AP"], abs=0.005)
    assert scored["cuda"]["AP"] == pytest.approx(report["after"]["AP"], abs=0.02)  # that one under bf16


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_resumed_cuda_run_ends_where_an_uninterrupted_one_does(tmp_path, shapes_root, precision):
    args = ["finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--loss", "dap",
            "--epochs", "2", "--no-eval-before", "--max-eval-images", "4", "--seed", "3", "--num-workers", "0",
            "--no-progress", "--batch-size", "4", "--device", "cuda", "--precision", precision]
    _dapft(*args, "--output", tmp_path / "full")
    _dapft(*args, "--output", tmp_path / "cut", "--max-steps", "5")
    _dapft(*args, "--output", tmp_path / "cut", "--resume", "--max-steps", "12")  # 2 epochs of 6 steps
    for run in ("full", "cut"):
        manifest = tmp_path / run / "checkpoint-last" / "dapft_checkpoint.json"
        assert json.loads(manifest.read_text())["global_step"] == 12
    full, cut = (load_file(tmp_path / r / "checkpoint-last" / "model.safetensors") for r in ("full", "cut"))
    start = load_file(Path(__file__).parents[1] / "dapft" / "checkpoints" / "tiny-rtdetr-shapes" / "model.safetensors")
    # CUDA kernels with atomic adds (grid_sample's backward) are not bit-reproducible, so the two
    # runs agree to rounding, far closer than either is to where they started.
    weights = [k for k in full if full[k].is_floating_point() and k in start]  # not BN's step counters
    worst = max(float((full[k] - cut[k]).abs().max()) for k in weights)
    moved = max(float((full[k] - start[k]).abs().max()) for k in weights)
    assert worst < 0.05 * moved, (worst, moved)


@cuda
@pytest.mark.parametrize("family", ["detr", "rt_detr", "rf_detr"])
def test_batches_are_prepared_on_the_gpu_as_the_processor_prepares_them_there(family, shapes_root):
    """On a CUDA run the workers hand over uint8 images and the batch is resized, normalised and
    padded on the GPU: equal to the processor run on the GPU, and to the CPU's preparation within
    one uint8 level (torchvision resizes uint8 on CUDA through float32 and rounds)."""
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.tiny import tiny_processor

    processor = tiny_processor(family, 96)
    split = load_split(resolve_split(shapes_root, "val"), max_images=8)
    dataset = CocoDetection(split, LabelMap({c["id"]: c["id"] - 1 for c in split.categories}))
    gpu, cpu = (next(iter(BatchLoader(dataset, processor, batch_size=8, train=False, num_workers=1, device=device)))
                for device in ("cuda", "cpu"))
    assert gpu["pixel_values"].is_cuda and all(t["boxes"].is_cuda for t in gpu["labels"])
    theirs = processor(images=[dataset[i]["image"] for i in range(8)], return_tensors="pt", device="cuda")
    assert torch.equal(gpu["pixel_values"], theirs["pixel_values"])
    std = min(processor.image_std) if processor.do_normalize else 1.0
    torch.testing.assert_close(gpu["pixel_values"].cpu(), cpu["pixel_values"], rtol=0, atol=1.01 / 255 / std)
    for a, b in zip(gpu["labels"], cpu["labels"]):
        torch.testing.assert_close(a["boxes"].cpu(), b["boxes"])
