"""Multi-process training with real `torchrun` and the gloo backend on CPU: two processes give the
loss and gradients one process gives on the concatenated batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dapft.data.shapes import CLASSES
from dapft.modeling.tiny import tiny_model, tiny_processor

pytestmark = pytest.mark.slow  # torchrun with two processes

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("matcher", ["constant", "momentum"])
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, matcher):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _run([sys.executable, str(HERE / "ddp_worker.py"), str(one), matcher])
    _run([*TORCHRUN, str(HERE / "ddp_worker.py"), str(two), matcher])
    ref = torch.load(one / "rank0.pt")
    assert 0.05 < ref["dap"] < 0.95 and ref["logits_grad"].abs().sum() > 0 and ref["boxes_grad"].abs().sum() > 0
    for rank in (0, 1):
        got = torch.load(two / f"rank{rank}.pt")
        assert got["dap"] == pytest.approx(ref["dap"], rel=1e-6)  # the AP of the global batch
        torch.testing.assert_close(got["logits_grad"], ref["logits_grad"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got["boxes_grad"], ref["boxes_grad"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got["ema"], ref["ema"])  # the momentum state stays in step


def _fitted_checkpoint(path: Path, shapes_root: Path) -> Path:
    """A tiny Deformable DETR briefly fitted with its own loss, so that DAP has a gradient."""
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split

    torch.manual_seed(0)
    model = tiny_model("deformable_detr_box_refine", dict(enumerate(CLASSES))).train()
    proc = tiny_processor("deformable_detr", 128)
    split = load_split(resolve_split(shapes_root, "train"), max_images=8)
    loader = BatchLoader(CocoDetection(split, LabelMap({c["id"]: c["id"] - 1 for c in split.categories})), proc,
                         batch_size=8, train=False, num_workers=0)
    batch = next(iter(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss.backward()
        opt.step()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_torchrun_finetune_matches_one_process(tmp_path, shapes_root):
    ckpt = _fitted_checkpoint(tmp_path / "fitted", shapes_root)
    args = ["finetune", "--model", ckpt, "--data", shapes_root, "--loss", "dap", "--max-steps", "2", "--batch-size", "4",
            "--max-train-images", "8", "--no-augment", "--no-eval-before", "--num-workers", "0", "--no-progress",
            "--device", "cpu", "--lr", "1e-4", "--ema-decay", "0.6"]  # an EMA that moves within 2 steps
    args = list(map(str, args))
    _run([sys.executable, "-m", "dapft", *args, "--output", str(tmp_path / "one")])
    _run([*TORCHRUN, "-m", "dapft", *args, "--output", str(tmp_path / "two")])

    def steps(run):
        return [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines() if '"step"' in x]

    one, two = steps("one"), steps("two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert 0 < a["dap"] < 1
        assert b["dap"] == pytest.approx(a["dap"], rel=1e-5)
        assert b["dap_0"] == pytest.approx(a["dap_0"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # evaluation gathers every process's predictions
    m1 = json.loads((tmp_path / "one" / "report.json").read_text())["after"]
    m2 = json.loads((tmp_path / "two" / "report.json").read_text())["after"]
    assert m2["AP"] == pytest.approx(m1["AP"], abs=2e-3)  # (each process evaluates its own EMA copy)
    # every process keeps the same EMA: rank 0's, saved, follows one process's
    from safetensors.torch import load_file

    ema1, ema2 = (load_file(tmp_path / run / "checkpoint-last" / "model.safetensors") for run in ("one", "two"))
    start = load_file(ckpt / "model.safetensors")
    moved = max(float((ema1[k] - start[k]).abs().max()) for k in ema1)
    apart = max(float((ema2[k] - ema1[k]).abs().max()) for k in ema1)
    # (Adam turns last-bit differences of near-zero gradients into lr-sized ones: measured 4% apart.)
    assert apart < 0.2 * moved, f"EMA moved by {moved}, differs between 1 and 2 processes by {apart}"
    shutil.rmtree(tmp_path / "fitted")


@pytest.mark.parametrize("name, unused", [("deformable_detr_two_stage", True), ("rt_detr", False)])
def test_ddp_is_told_to_look_for_unused_parameters_only_where_the_family_leaves_some(shapes_root, name, unused):
    """Found by running the model: two-stage Deformable DETR's proposal head gets no gradient from the
    DAP loss (nor from its own); RT-DETR's every parameter does, its denoising queries included (they run in
    training only). The probe leaves the model, its buffers, the matcher and the generators as they were."""
    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split
    from dapft.modeling.families import family_of
    from dapft.objective.criterion import DAPCriterion
    from dapft.objective.detection_loss import install_loss
    from dapft.utils.distributed import parameters_without_gradient

    torch.manual_seed(0)
    model = tiny_model(name, dict(enumerate(CLASSES))).eval()
    family = family_of(model.config)
    criterion = DAPCriterion(family, model.config, matcher="momentum")
    install_loss(model, family, "dap", criterion)
    split = load_split(resolve_split(shapes_root, "train"), max_images=2)
    batch = next(iter(BatchLoader(CocoDetection(split, LabelMap({c["id"]: c["id"] - 1 for c in split.categories})),
                                  tiny_processor(name, 128), batch_size=1, train=False, num_workers=0)))
    inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "labels") if k in batch}
    state = {k: v.clone() for k, v in [*model.state_dict().items(), *criterion.state_dict().items()]}
    rng = torch.get_rng_state()

    missing = parameters_without_gradient(model, inputs, modules=(criterion,))
    assert bool(missing) == unused, missing
    # the encoder's proposal head and its class and box layers (transformers computes no loss for them)
    assert all(n.startswith(("model.enc_output", "model.decoder.bbox_embed.2.", "model.decoder.class_embed.2."))
               for n in missing), missing
    after = {**model.state_dict(), **criterion.state_dict()}
    assert all(torch.equal(state[k], after[k]) for k in state)  # batch-norm statistics, the matcher's estimate
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert all(p.grad is None for p in model.parameters())
