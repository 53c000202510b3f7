"""The bundled tiny detectors and the offline demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dapft.data.shapes import make_shapes_dataset
from dapft.modeling.loading import BUNDLED_DIR, bundled_models, resolve_model

pytestmark = pytest.mark.slow  # the bundled detectors evaluated and fine-tuned

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_the_demo_detector_is_bundled():
    assert "dapft/tiny-rtdetr-shapes" in bundled_models()


@pytest.mark.parametrize("name", bundled_models())
def test_bundled_checkpoint_reproduces_its_recorded_validation_ap(name, tmp_path):
    from dapft.analysis.checkpoint_eval import evaluate_model

    folder = BUNDLED_DIR / name.split("/", 1)[1]
    meta = json.loads((folder / "bundled.json").read_text())
    data = meta["data"]
    # Validation images depend only on (seed, index): the training split need not be rendered.
    root = make_shapes_dataset(tmp_path / "shapes", train_images=0, val_images=data["val_images"],
                               image_size=data["image_size"], seed=data["seed"])
    assert resolve_model(name) == str(folder)
    metrics = evaluate_model(name, str(root), output=tmp_path / "eval", num_workers=0, progress=False, device="cpu")
    assert metrics["stats"]["AP"] == pytest.approx(meta["val"]["AP"], abs=1e-4)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20  # a few MB


@pytest.mark.parametrize("name", bundled_models())
def test_bundled_checkpoint_was_trained_to_a_plateau(name):
    """What REPRODUCTION.md's A/B needs: a converged detector. At most 0.5 AP points gained over the
    last quarter of its evaluations, all of them after the rate was lowered; the weights bundled are
    the best evaluation's."""
    meta = json.loads((BUNDLED_DIR / name.split("/", 1)[1] / "bundled.json").read_text())
    history, epochs = meta["val_history"], meta["val_epochs"]
    cut = len(history) - max(1, len(history) // 4)
    assert cut >= 1 and max(history[cut:]) - max(history[:cut]) <= 0.005
    assert meta["lr_drop_epoch"] < epochs[cut] and meta["plateau"] is True
    assert max(history) == pytest.approx(meta["val"]["AP"], abs=1e-5)


def test_demo_runs_and_reports_before_and_after(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "dapft", "demo", "--output", str(tmp_path / "zero"), "--epochs",
                              "0"], capture_output=True, text=True, env=ENV, timeout=600)
    assert refused.returncode == 1 and "--epochs must be at least 1" in " ".join(refused.stderr.split())
    assert not (tmp_path / "zero" / "data").exists()  # refused before the data is made
    proc = subprocess.run([sys.executable, "-m", "dapft", "demo", "--output", str(tmp_path / "demo"), "--train-images",
                           "40", "--val-images", "20", "--epochs", "1", "--num-workers", "0", "--no-progress"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "demo" / "sweep"
    report = (runs / "loss=dap" / "report.md").read_text()
    assert "| before (r_o) |" in report and "| after (dap) |" in report and "| delta |" in report
    assert "--loss original,dap --seed 0,1,2,3,4" in report  # every run's report names the control's sweep
    data = json.loads((runs / "loss=dap" / "report.json").read_text())
    control = json.loads((runs / "loss=original" / "report.json").read_text())
    assert data["before"]["AP"] > 0.01 and data["after"]["AP"] > 0.01 and control["after"]["AP"] > 0.01
    assert control["global_steps"] == data["global_steps"] and control["config"]["seed"] == data["config"]["seed"]
    said = " ".join(proc.stderr.split())
    assert "after its own loss (control)" in said and "| after dap |" in said and "one seed decides nothing" in said
    difference = 100 * ((data["after"]["AP"] - data["before"]["AP"]) - (control["after"]["AP"] - control["before"]["AP"]))
    assert f"dap minus the control {difference:+.2f} on one seed" in said
    assert "+0.11 AP [-0.09, +0.32] over 5 seeds" in said
