"""The command line, run for real in subprocesses on tiny models and generated data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs_helpers import COMMON, ENV, dapft
from runs_helpers import assert_same_weights as _assert_same_weights
from runs_helpers import weights as _weights
from safetensors.torch import load_file

from dapft.data.shapes import CLASSES
from dapft.modeling.tiny import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # every test here starts the command line in a subprocess and most train


def test_help_reads_well():
    out = dapft("--help").stdout
    for cmd in ("finetune", "eval", "sweep", "make-dataset"):
        assert cmd in out
    for cmd, opts in {"finetune": ["--loss", "--matcher", "--sigma", "--resume", "--max-steps"],
                      "eval": ["--evaluator", "--max-images"], "sweep": ["--sigma", "--bins"],
                      "make-dataset": ["--train-images", "--seed"]}.items():
        text = dapft(cmd, "--help").stdout
        assert all(o in text for o in opts), cmd


def test_help_is_whole_in_an_80_column_terminal():
    import typer.main

    from dapft.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        text = subprocess.run([sys.executable, "-m", "dapft", name, "--help"], capture_output=True, text=True,
                              env={**ENV, "COLUMNS": "80"}).stdout
        assert max(map(len, text.splitlines())) <= 80, name
        # Typer's own click (typer 0.29 vendors it): its options by their kind, not by click's class
        flags = [o for p in command.params if p.param_type_name == "option" for o in p.opts + p.secondary_opts]
        assert len(flags) >= 3, (name, flags)
        missing = [f for f in flags if f not in text]
        assert not missing, (name, missing)  # no option name cut short


def test_errors_are_one_clear_line(tmp_path, tiny_detr):
    proc = dapft("eval", "--model", tiny_detr, "--data", tmp_path / "nowhere", "--no-progress", check=False)
    assert proc.returncode == 1
    assert "annotation file not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = dapft("--debug", "eval", "--model", tiny_detr, "--data", tmp_path / "nowhere", check=False)
    assert "Traceback" in proc.stderr


def test_a_model_that_cannot_exist_is_refused_at_once_with_what_to_do(tmp_path, shapes_root):
    common = ["--data", shapes_root, "--output", tmp_path / "e", "--no-progress", "--device", "cpu"]
    for model, words in (("dapft/tiny-rtdetr-shape", "did you mean dapft/tiny-rtdetr-shapes?"),
                         (str(tmp_path / "nowhere"), "no such directory")):
        t0 = time.time()
        proc = dapft("eval", "--model", model, *common, check=False)
        assert proc.returncode == 1 and words in " ".join(proc.stderr.split()), proc.stderr
        # No Hub retries (minutes offline); the bound leaves room for a loaded machine's start-up.
        assert "Traceback" not in proc.stderr and time.time() - t0 < 60


def test_a_corrupted_checkpoint_is_refused_before_it_is_used(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "1",
          "--no-eval-before", "--max-eval-images", "2", *COMMON)
    weights = run / "checkpoint-best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, other numbers: would load and score as a (wrong) model
    weights.write_bytes(bytes(data))
    proc = dapft("eval", "--model", run / "checkpoint-best", "--data", shapes_root, "--output", tmp_path / "e",
                 "--no-progress", "--device", "cpu", check=False)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "do not match the manifest" in message and "dapft_checkpoint.json" in message
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_a_split_without_annotations_is_refused(tmp_path, tiny_detr, shapes_root):
    data = tmp_path / "data"
    shutil.copytree(shapes_root, data)
    val = data / "annotations" / "instances_val2017.json"
    content = json.loads(val.read_text())
    content["annotations"] = []
    val.write_text(json.dumps(content))
    proc = dapft("finetune", "--model", tiny_detr, "--data", data, "--output", tmp_path / "run", *COMMON, check=False)
    assert proc.returncode == 1 and "no usable annotations" in proc.stderr and not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_one_short_error(tmp_path, shapes_root):
    # lr 1000 turns RT-DETR's outputs to NaN by the second step; its own loss code then raises a
    # ValueError carrying the whole NaN tensor. The user gets what happened and what to do.
    proc = dapft("finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", tmp_path / "r",
                 "--lr", "1000", "--max-steps", "6", "--no-eval-before", "--max-eval-images", "2", *COMMON, check=False)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "not finite" in message and "lower --lr" in message, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 15


def test_an_output_that_cannot_be_written_is_refused_before_inference(tmp_path, tiny_detr, shapes_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for cmd in (["eval"], ["finetune", "--max-steps", "1"]):
        proc = dapft(*cmd, "--model", tiny_detr, "--data", shapes_root, "--output", blocker / "out",
                     "--no-progress", "--device", "cpu", "--precision", "fp32", check=False)
        message = " ".join(proc.stderr.split())
        assert proc.returncode == 1 and "cannot write there" in message and "choose another --output" in message
        assert "evaluating" not in proc.stderr and "Traceback" not in proc.stderr
    proc = dapft("eval", "--model", tiny_detr, "--data", shapes_root, "--output", tmp_path / "e", "--precision",
                 "fp64", check=False)
    assert proc.returncode == 1 and "precision must be" in proc.stderr and not (tmp_path / "e").exists()


def test_finetune_then_eval_of_the_checkpoint_matches_the_report(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--loss", "dap+box",
          "--epochs", "1", *COMMON)
    report = json.loads((run / "report.json").read_text())
    assert report["before"] is not None and report["after"] is not None
    for f in ("report.md", "curves.png", "config.json", "log.jsonl", "checkpoint-best/config.json"):
        assert (run / f).exists(), f
    umask = os.umask(0)
    os.umask(umask)
    for ckpt in ("checkpoint-last", "checkpoint-best"):  # readable by whoever may read the run (transformers: 0600)
        assert {f.stat().st_mode & 0o777 for f in (run / ckpt).iterdir()} == {0o666 & ~umask}, ckpt
    # The matching diagnostic: logged every step, summarised in the report.
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
    assert all(0 <= s["match_vs_model"] <= 1 for s in steps)
    assert report["matching"]["steps"] == len(steps)
    assert report["matching"]["vs_model"] == pytest.approx(sum(s["match_vs_model"] for s in steps) / len(steps))
    assert "to another query than the model's own matcher would" in (run / "report.md").read_text()
    # The code the run trained on, named in its report: here a git checkout, so its commit.
    import dapft as package

    checkout = Path(package.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    [ran_on] = report["software"]
    assert ran_on["dapft"] == package.__version__ and ran_on["torch"] == torch.__version__
    assert ran_on["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert f"Ran on dapft {package.__version__}" in (run / "report.md").read_text()
    ev = tmp_path / "eval"
    dapft("eval", "--model", run / "checkpoint-last", "--data", shapes_root, "--output", ev, "--num-workers", "0",
          "--no-progress", "--batch-size", "3", "--evaluator", "pycocotools")
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["stats"]["AP"] == pytest.approx(report["after"]["AP"], abs=1e-6)
    for f in ("predictions.json", "report.md", "pr_curves.png", "per_class_ap.png", "confusion.png"):
        assert (ev / f).exists(), f
    # The run's last evaluation and this one: the same error breakdown, in both reports
    assert ({k: metrics["errors"][k] for k in ("dAP", "counts", "AP50", "ECE")}
            == {k: report["errors"]["after"][k] for k in ("dAP", "counts", "AP50", "ECE")})
    assert "## What it gets wrong" in (ev / "report.md").read_text()
    assert "## What changed: the errors before and after" in (run / "report.md").read_text()
    from transformers import AutoModelForObjectDetection

    AutoModelForObjectDetection.from_pretrained(run / "checkpoint-best")  # loads as any HF checkpoint


def test_train_eval_images_scores_a_fixed_training_subset_before_and_after(tmp_path, shapes_root):
    run = tmp_path / "run"
    bundled = "dapft/tiny-rtdetr-shapes"  # trained: its AP is far from 0, so equal numbers mean something
    dapft("finetune", "--model", bundled, "--data", shapes_root, "--output", run, "--loss", "dap",
          "--max-steps", "2", "--lr", "1e-3", "--train-eval-images", "6", "--max-eval-images", "4",
          "--evaluator", "pycocotools", *COMMON)
    report = json.loads((run / "report.json").read_text())
    assert "training images (`--train-eval-images`)" in (run / "report.md").read_text()
    assert report["train_before"]["AP"] > 0.05 and report["train_after"]["AP"] != report["train_before"]["AP"]
    # The same numbers as `dapft eval` of the same weights on the first 6 training images.
    for model, which in ((bundled, "train_before"), (run / "checkpoint-last", "train_after")):
        ev = tmp_path / f"eval-{which}"
        dapft("eval", "--model", model, "--data", shapes_root, "--split", "train", "--max-images", "6",
              "--output", ev, "--evaluator", "pycocotools", "--num-workers", "0", "--no-progress", "--batch-size", "4")
        scored = json.loads((ev / "metrics.json").read_text())["stats"]["AP"]
        assert scored == pytest.approx(report[which]["AP"], abs=1e-9)


def test_the_schedule_follows_the_recipe_a_tenth_then_a_hundredth(tmp_path, tiny_detr, shapes_root):
    import yaml

    common = ["--model", tiny_detr, "--data", shapes_root, "--epochs", "2", "--max-train-images", "8",
              "--no-eval-before", "--max-eval-images", "2", *COMMON]  # batch 4: 2 steps an epoch
    recipe = tmp_path / "recipe.yaml"  # DETR's recipe with other numbers, given as --recipe FILE
    detr = yaml.safe_load((Path(__file__).parents[1] / "dapft" / "recipes" / "detr.yaml").read_text())
    recipe.write_text(yaml.safe_dump({**detr, "pretrain_lr": 3e-3, "backbone_lr_multiplier": 0.2, "weight_decay": 0.05}))
    for name, extra, lr, backbone, wd in (("family", [], 1e-5, 0.1, 1e-4),  # recipes/detr.yaml: 1e-4 / 10
                                          ("file", ["--recipe", recipe], 3e-4, 0.2, 0.05)):
        run = tmp_path / name
        dapft("finetune", *common, "--output", run, *extra)
        steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
        assert [s["epoch"] for s in steps] == [1, 1, 2, 2]
        assert [s["lr"] for s in steps] == pytest.approx([lr, lr, lr / 10, lr / 10])  # /100 of pre-training last
        groups = torch.load(run / "checkpoint-last" / "trainer_state.pt", weights_only=True)["optimizer"]["param_groups"]
        assert [g["lr"] for g in groups] == pytest.approx([lr / 10, lr * backbone / 10])  # the rest, the backbone
        assert all(g["weight_decay"] == pytest.approx(wd) for g in groups)


def test_a_one_epoch_run_trains_at_the_fine_tuning_rate_and_lr_drop_sets_a_step_schedule(tmp_path, tiny_detr,
                                                                                         shapes_root):
    common = ["--model", tiny_detr, "--data", shapes_root, "--max-train-images", "8", "--no-eval-before",
              "--max-eval-images", "2", *COMMON]  # batch 4: 2 steps an epoch
    lr = 1e-5  # recipes/detr.yaml: 1e-4 / 10
    for name, extra, expected in (("one", ["--epochs", "1"], [lr, lr]),  # no drop: it would leave no epoch at lr
                                  ("drop", ["--epochs", "3", "--lr-drop", "1"], [lr] * 2 + [lr / 10] * 4)):
        run = tmp_path / name
        dapft("finetune", *common, "--output", run, *extra)
        steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
        assert [s["lr"] for s in steps] == pytest.approx(expected)
    # Longer, and a second drop: a multi-step schedule, grown on resume as a plateau asks for it.
    dapft("finetune", *common, "--output", tmp_path / "drop", "--epochs", "5", "--lr-drop", "1,4", "--resume")
    steps = [json.loads(x) for x in (tmp_path / "drop" / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
    assert [s["epoch"] for s in steps[-6:]] == [3, 3, 4, 4, 5, 5]
    assert [s["lr"] for s in steps[-6:]] == pytest.approx([lr / 10] * 4 + [lr / 100] * 2)
    assert "/10 after epoch 1 and again after 4" in (tmp_path / "drop" / "report.md").read_text()


def test_eval_every_evaluates_every_n_epochs_and_after_the_last(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "7",
            "--eval-every", "3", "--max-train-images", "4", "--no-eval-before", "--max-eval-images", "2",
            "--loss", "dap+box", "--lr", "1e-3", *COMMON]  # one step an epoch
    dapft(*args, "--max-steps", "4")  # stops after epoch 4, which it evaluates as the run's end
    dapft(*args, "--resume")
    report = json.loads((run / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [3, 4, 6, 7]
    evals = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "eval"' in x]
    assert [e["epoch"] for e in evals] == [3, 4, 6, 7]
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["epoch003", "epoch004", "epoch006", "epoch007"]
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"type": "step"' in x]
    assert len(steps) == 7  # every epoch trained; each epoch's end is a checkpoint, evaluated or not


def test_momentum_matcher_resumes_with_its_estimate(tmp_path, tiny_detr, shapes_root):
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--loss", "dap+box", "--matcher", "momentum",
            "--epochs", "2", "--lr", "1e-3", "--max-train-images", "16", "--no-eval-before", "--max-eval-images", "2",
            "--seed", "4", *COMMON]
    dapft(*args, "--output", tmp_path / "full")
    dapft(*args, "--output", tmp_path / "cut", "--max-steps", "3")  # stops mid-epoch 1 of 4 steps
    dapft(*args, "--output", tmp_path / "cut", "--resume", "--max-steps", "8")
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    estimates = [torch.load(tmp_path / r / "checkpoint-last" / "trainer_state.pt", weights_only=True)["criterion"]
                 for r in ("full", "cut")]
    ema = [e[k] for e in estimates for k in e if k.endswith("precision_ema")]
    assert len(ema) == 2 and torch.equal(ema[0], ema[1])
    assert not torch.equal(ema[0], torch.ones_like(ema[0]))  # it moved from its start (precision 1)


def test_checkpoint_best_holds_the_best_evaluation_and_a_half_swapped_last_still_resumes(tmp_path, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", run, "--loss",
            "dap", "--epochs", "3", "--lr", "3e-4", "--max-train-images", "16", "--no-eval-before",
            "--evaluator", "pycocotools", *COMMON]
    dapft(*args, "--max-steps", "8")  # two of the three epochs
    # A kill between checkpoint-last's two renames leaves only the previous copy, under its old name.
    (run / "checkpoint-last").rename(run / ".checkpoint-last.old")
    dapft(*args, "--resume")
    report = json.loads((run / "report.json").read_text())
    aps = [h["AP"] for h in report["history"]]
    assert len(aps) == 3 and len(set(aps)) > 1  # the evaluations differ, so "best" means something
    ev = tmp_path / "eval"
    dapft("eval", "--model", run / "checkpoint-best", "--data", shapes_root, "--output", ev, "--evaluator",
          "pycocotools", "--num-workers", "0", "--no-progress", "--batch-size", "4", "--device", "cpu")
    assert json.loads((ev / "metrics.json").read_text())["stats"]["AP"] == pytest.approx(max(aps), abs=1e-9)


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_detr, shapes_root):
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--loss", "dap+box", "--epochs", "3",
            "--save-every", "2", "--no-eval-before", "--max-eval-images", "4", "--seed", "5", *COMMON]
    full = tmp_path / "full"
    dapft(*args, "--output", full)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args), "--output", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    log = cut / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it mid-epoch 2 (6 steps an epoch), after a mid-epoch save
        steps = [json.loads(x)["global_step"] for x in log.read_text().splitlines()] if log.exists() else []
        if steps and max(steps) >= 9:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "report.json").exists(), "the run finished before it could be interrupted"
    state = json.loads((cut / "checkpoint-last" / "dapft_checkpoint.json").read_text())
    assert 6 < state["global_step"] < 18
    dapft(*args, "--output", cut, "--resume")
    _assert_same_weights(_weights(full), _weights(cut))
    steps = [json.loads(x) for x in (cut / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert [s["global_step"] for s in steps if s["type"] == "step"] == list(range(1, 19))


def test_a_second_run_in_the_same_directory_needs_resume(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    base = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "1",
            "--no-eval-before", "--max-eval-images", "2", *COMMON]
    dapft(*base)
    proc = dapft(*base, check=False)
    assert proc.returncode == 1 and "--resume" in proc.stderr


def test_corrupt_or_partial_checkpoints_are_refused(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    base = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "1",
            "--no-eval-before", "--max-eval-images", "2", *COMMON]
    previous = os.umask(0o022)  # as on most systems: files readable by all, written by their owner
    try:
        dapft(*base)
    finally:
        os.umask(previous)
    # every file of a checkpoint is shared as the run's other outputs are (transformers writes
    # model.safetensors for its owner alone)
    assert {p.name: p.stat().st_mode & 0o777 for p in (run / "checkpoint-last").iterdir()} == {
        p.name: 0o644 for p in (run / "checkpoint-last").iterdir()}
    weights = run / "checkpoint-last" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = dapft(*base, "--resume", check=False)
    assert proc.returncode == 1 and "do not match the manifest" in proc.stderr and "model.safetensors" in proc.stderr
    (run / "checkpoint-last" / "dapft_checkpoint.json").unlink()
    proc = dapft(*base, "--resume", check=False)
    assert proc.returncode == 1 and "not a complete dapft checkpoint" in proc.stderr


def test_sweep_skips_finished_settings(tmp_path, tiny_detr, shapes_root):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--sigma", "0.02,0.1",
            "--max-steps", "1", "--max-eval-images", "2", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    dapft(*args)
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["sigma"] for r in rows] == [0.02, 0.1]
    assert (out / "sweep.png").exists() and (out / "sweep.md").exists()
    assert "Every run on dapft" in (out / "sweep.md").read_text()
    # A finished run of other code (as after a `git pull`) stays, and the sweep says so.
    kept = json.loads((out / "sigma=0.02" / "report.json").read_text())
    kept["software"][0]["commit"] = "0123456789" * 4
    (out / "sigma=0.02" / "report.json").write_text(json.dumps(kept))
    first = (out / "sigma=0.02" / "report.json").stat().st_mtime_ns
    shutil.rmtree(out / "sigma=0.1" / "checkpoint-best")
    (out / "sigma=0.1" / "report.json").unlink()  # as if that run had been interrupted after its last save
    proc = dapft(*args)
    assert "sigma=0.02: finished earlier, skipped" in proc.stderr
    assert "sigma=0.1 (resuming)" in proc.stderr
    assert (out / "sigma=0.02" / "report.json").stat().st_mtime_ns == first
    assert (out / "sigma=0.1" / "report.json").exists()
    assert "2 different versions of the code" in " ".join(proc.stderr.split())
    assert len(json.loads((out / "sweep.json").read_text())["software"]) == 2
    assert "commit 0123456789" in (out / "sweep.md").read_text()


def test_sweep_over_loss_and_seed_pairs_each_setting_with_the_original_loss(tmp_path, tiny_detr, shapes_root):
    from scipy import stats

    out = tmp_path / "ab"
    dapft("sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--loss", "original,dap+box",
          "--matcher", "constant,momentum", "--seed", "0,1,2", "--max-steps", "3", "--lr", "2e-3",
          "--max-eval-images", "6", "--num-workers", "0", "--no-progress", "--device", "cpu")
    summary = json.loads((out / "sweep.json").read_text())
    # The original loss reads no matcher: one run per seed, not one per matcher.
    names = sorted(r["run"] for r in summary["runs"])
    assert names == sorted([f"loss=original_seed={s}" for s in range(3)]
                           + [f"loss=dap+box_matcher={m}_seed={s}" for m in ("constant", "momentum") for s in range(3)])
    # Evaluated once before fine-tuning, in the sweep's own folder, shared by all nine runs.
    assert (out / "eval" / "before" / "predictions.json").is_file() and not list(out.glob("*/eval/before"))
    before = json.loads((out / "before.json").read_text())["metrics"]
    for name in names:
        assert json.loads((out / name / "report.json").read_text())["before"]["AP"] == before["AP"]
    # Each comparison recomputed here from the runs' own reports: paired by seed, Student t.
    after = {n: json.loads((out / n / "report.json").read_text())["after"] for n in names}
    comparisons = {(c["setting"], c["metric"]): c for c in summary["comparisons"]}
    assert len([c for c in comparisons if c[1] in ("AP", "AP50", "AP75")]) == 2 * 3
    for m in ("constant", "momentum"):
        for metric in ("AP", "AP50", "AP75"):
            diffs = [after[f"loss=dap+box_matcher={m}_seed={s}"][metric] - after[f"loss=original_seed={s}"][metric]
                     for s in range(3)]
            c = comparisons[(f"loss=dap+box_matcher={m}", metric)]
            assert c["baseline"] == "loss=original" and c["n"] == 3
            assert c["mean_difference"] == pytest.approx(sum(diffs) / 3, abs=1e-12)
            if max(diffs) > min(diffs):
                low, high = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
                assert c["ci95"] == pytest.approx([low, high], abs=1e-9)
    setting = next(s for s in summary["settings"] if s["setting"] == "loss=original")
    assert setting["seeds"] == [0, 1, 2] and len(setting["AP"]["values"]) == 3
    text = (out / "sweep.md").read_text()
    assert "paired by seed" in text and "loss=dap+box_matcher=momentum" in text
    # The error breakdown: every run's before (the shared evaluation, made in the first run's folder)
    # and after, and the sweep's per-setting means and paired differences of the same numbers.
    errors = {n: json.loads((out / n / "report.json").read_text())["errors"] for n in names}
    assert all(e["before"] == errors["loss=original_seed=0"]["before"] and e["before"] is not None
               for e in errors.values())
    assert "## What changed: the errors before and after" in (out / "loss=original_seed=2" / "report.md").read_text()
    for kind in ("Cls", "Miss"):
        diffs = [errors[f"loss=dap+box_matcher=momentum_seed={s}"]["after"]["dAP"][kind]
                 - errors[f"loss=original_seed={s}"]["after"]["dAP"][kind] for s in range(3)]
        c = comparisons[("loss=dap+box_matcher=momentum", f"dAP_{kind}")]
        assert c["mean_difference"] == pytest.approx(sum(diffs) / 3, abs=1e-12)
    assert setting["ECE"]["values"] == [errors[f"loss=original_seed={s}"]["after"]["ECE"] for s in range(3)]
    assert "## Error breakdown (TIDE" in text and "| loss=dap+box_matcher=constant | 3 |" in text


def test_ctrl_c_in_a_sweep_saves_the_run_and_the_same_command_continues_it(tmp_path, tiny_detr, shapes_root):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--seed", "0,1", "--loss", "dap+box",
            "--epochs", "2", "--max-eval-images", "2", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    log = out / "seed=0" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and '"type": "step"' in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    message = " ".join(err.split())
    assert proc.returncode == 130 and "run the same dapft sweep command again" in message, err[-2000:]
    assert (out / "seed=0" / "checkpoint-last").is_dir() and not (out / "seed=0" / "report.json").exists()
    proc = dapft(*args)
    assert "seed=0 (resuming)" in proc.stderr
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 2


def test_sweep_refuses_bad_lists_before_any_run(tmp_path, tiny_detr, shapes_root):
    base = ["sweep", "--model", tiny_detr, "--data", shapes_root, "--output", tmp_path / "s", "--device", "cpu"]
    for flags, words in ((["--seed", "0,x"], "--seed takes comma-separated int values"),
                         (["--loss", "dap,nope"], "--loss must be one of"),
                         (["--sigma", "0.05"], "give two or more comma-separated values")):
        proc = dapft(*base, *flags, check=False)
        assert proc.returncode != 0 and words in " ".join(proc.stderr.split()), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not any((tmp_path / "s").glob("*/report.json"))


def test_gradient_accumulation_steps_once_per_accumulated_batches(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--grad-accum", "2",
          "--epochs", "1", "--no-eval-before", "--max-eval-images", "2", "--loss", "dap+box", *COMMON)
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert [s["global_step"] for s in steps] == [1, 2, 3]  # 24 images, batches of 4, two per step
    for s in steps:  # each step's own time and rate (8 images), not a running average
        assert s["step_seconds"] > 0
        assert s["images_per_second"] == pytest.approx(8 / s["step_seconds"], rel=0.01)


@pytest.fixture(scope="module")
def two_boxes_root(tmp_path_factory, shapes_root):
    """Eight training images with exactly two annotations each: DETR's loss normalises by the
    batch's box count, so only equal counts make two batches of 4 one batch of 8."""
    root = tmp_path_factory.mktemp("two_boxes")
    shutil.copytree(shapes_root / "val2017", root / "val2017")
    shutil.copytree(shapes_root / "annotations", root / "annotations")
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    keep = [im for im in data["images"] if len(by_image.get(im["id"], [])) >= 2][:8]
    assert len(keep) == 8
    (root / "train2017").mkdir()
    for im in keep:
        shutil.copy(shapes_root / "train2017" / im["file_name"], root / "train2017" / im["file_name"])
    data["images"], data["annotations"] = keep, [a for im in keep for a in by_image[im["id"]][:2]]
    ann.write_text(json.dumps(data))
    return root


def _step_gradients(model, data, tmp_path, **settings) -> list[dict[str, torch.Tensor]]:
    """The gradient of each optimizer step of a run, all taken at the starting weights (the
    optimizer never steps), in the run's own data order."""
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import Trainer

    class Recorder(Trainer):
        def _optimizer_step(self, terms, losses):
            self.grads.append({n: p.grad.clone() for n, p in self.run.model.named_parameters() if p.grad is not None})
            self.run.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": 0.0, **{k: float(v) for k, v in terms.items()}}

    cfg = FinetuneConfig(model=str(model), data=str(data), output=str(tmp_path / "run"), device="cpu", num_workers=0,
                         progress=False, eval_before=False, max_eval_images=1, augment=False, seed=0, **settings)
    trainer = Recorder(cfg)
    trainer.grads = []
    trainer.train()
    shutil.rmtree(tmp_path / "run")
    return trainer.grads


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over the whole gradient (single tensors such as attention key biases have a
    true gradient of zero, and float32 noise there says nothing)."""
    assert a.keys() == b.keys()
    flat_a, flat_b = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (a, b))
    return float((flat_a - flat_b).norm() / flat_b.norm())


def test_grad_accum_2_of_batch_4_is_one_batch_of_8_for_the_original_loss(tmp_path, tiny_detr, two_boxes_root):
    eight, = _step_gradients(tiny_detr, two_boxes_root, tmp_path, loss="original", batch_size=8, max_steps=1)
    accumulated, = _step_gradients(tiny_detr, two_boxes_root, tmp_path, loss="original", batch_size=4,
                                   grad_accum=2, max_steps=1)
    assert _relative_difference(accumulated, eight) < 1e-5  # measured 8e-8


def test_grad_accum_averages_each_micro_batchs_own_dap(tmp_path, tiny_detr, two_boxes_root):
    # The documented decision (docs/reading-the-paper.md): with --grad-accum N each micro-batch is its own DAP, and the step averages
    # the N gradients (AP is not a sum over images; more processes give a larger batch's exact AP).
    first, second = _step_gradients(tiny_detr, two_boxes_root, tmp_path, loss="dap", batch_size=4, max_steps=2)
    accumulated, = _step_gradients(tiny_detr, two_boxes_root, tmp_path, loss="dap", batch_size=4, grad_accum=2,
                                   max_steps=1)
    eight, = _step_gradients(tiny_detr, two_boxes_root, tmp_path, loss="dap", batch_size=8, max_steps=1)
    mean = {n: (first[n] + second[n]) / 2 for n in first}
    assert _relative_difference(accumulated, mean) < 1e-5
    assert _relative_difference(accumulated, eight) > 1e-3, "the DAP of 8 images pools their ranking"


@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees_and_0_turns_it_off(tmp_path, tiny_detr, shapes_root,
                                                                                  clip):
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import Trainer

    class Watcher(Trainer):
        def setup(self):
            super().setup()
            step = self.run.optimizer.step

            def watched(*args, **kwargs):
                grads = [p.grad for g in self.run.optimizer.param_groups for p in g["params"] if p.grad is not None]
                self.seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
                return step(*args, **kwargs)

            self.run.optimizer.step = watched

    cfg = FinetuneConfig(model=str(tiny_detr), data=str(shapes_root), output=str(tmp_path / "run"), loss="original",
                         clip_grad_norm=clip, batch_size=4, max_steps=2, device="cpu", num_workers=0, progress=False,
                         eval_before=False, max_eval_images=1, lr=1e-3)
    trainer = Watcher(cfg)
    trainer.seen = []
    trainer.train()
    logged = [json.loads(x)["grad_norm"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"type": "step"' in x]
    assert len(trainer.seen) == len(logged) == 2 and min(logged) > 1.0  # the log keeps the norm before clipping
    expected = logged if clip == 0 else [clip, clip]
    assert trainer.seen == pytest.approx(expected, rel=1e-3)


def test_a_diverging_run_stops_at_the_bad_step_and_keeps_finite_checkpoints(tmp_path, tiny_detr, shapes_root):
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import Trainer

    class Diverging(Trainer):
        """Injects a NaN gradient from the third optimizer step on, as an unstable rate would."""

        def setup(self):
            super().setup()
            param = next(p for p in self.run.model.parameters() if p.requires_grad)
            param.register_hook(lambda g: g * float("nan") if self.state["global_step"] >= 2 else g)

    cfg = FinetuneConfig(model=str(tiny_detr), data=str(shapes_root), output=str(tmp_path / "run"), epochs=1,
                         batch_size=4, device="cpu", num_workers=0, progress=False, eval_before=False,
                         save_every=1, loss="dap+box")
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 3.*lower --lr"):
        Diverging(cfg).train()
    saved = _weights(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert json.loads((tmp_path / "run" / "checkpoint-last" / "dapft_checkpoint.json").read_text())["global_step"] == 2


@pytest.fixture(scope="module")
def tiny_rtdetr(tmp_path_factory):
    return save_tiny_checkpoint("rt_detr", tmp_path_factory.mktemp("tiny") / "rt_detr", dict(enumerate(CLASSES)),
                                image_size=128)


def _raw_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint-last" / "trainer_state.pt", weights_only=True)["model"]


def test_with_an_ema_the_reported_best_and_last_ap_are_those_of_the_saved_weights(tmp_path, shapes_root):
    """The AP a run reports, checkpoint-best's choice and --patience read the weights it saves: the
    EMA's. A decay of 0.5 without warm-up keeps the average far from the raw weights."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    rt_detr = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "rt_detr.yaml").read_text())
    recipe.write_text(yaml.safe_dump({**rt_detr, "ema_decay": 0.5, "ema_warmup_steps": 0}))
    run = tmp_path / "run"
    dapft("finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", run, "--loss",
          "dap+original", "--epochs", "3", "--recipe", recipe, "--lr", "2e-4", "--max-eval-images", "6",
          "--no-eval-before", *COMMON)
    report = json.loads((run / "report.json").read_text())
    assert report["evaluated_weights"] == "ema" and len({round(h["AP"], 6) for h in report["history"]}) > 1
    raw, ema = _raw_weights(run), _weights(run)
    assert max(float((raw[k].float() - ema[k].float()).abs().max()) for k in ema if k in raw) > 1e-3
    for name, expected in (("checkpoint-best", report["best"]["AP"]), ("checkpoint-last", report["after"]["AP"])):
        dapft("eval", "--model", run / name, "--data", shapes_root, "--output", tmp_path / name, "--max-images", "6",
              "--num-workers", "0", "--no-progress")
        assert json.loads((tmp_path / name / "metrics.json").read_text())["stats"]["AP"] == pytest.approx(expected,
                                                                                                          abs=1e-9)


def test_rtdetr_keeps_an_ema_and_a_killed_run_resumes_to_the_same_ema_and_weights(tmp_path, tiny_rtdetr,
                                                                                  shapes_root):
    args = ["finetune", "--model", tiny_rtdetr, "--data", shapes_root, "--loss", "dap", "--epochs", "3",
            "--save-every", "2", "--no-eval-before", "--max-eval-images", "4", "--seed", "2", *COMMON]
    full = tmp_path / "full"
    proc = dapft(*args, "--output", full)
    assert "model EMA decay 0.9999" in proc.stderr
    report = json.loads((full / "report.json").read_text())
    assert report["evaluated_weights"] == "ema" and report["config"]["ema_decay"] == 0.9999
    assert "EMA weights are evaluated and saved" in (full / "report.md").read_text()
    ema, raw = _weights(full), _raw_weights(full)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k in raw), "the checkpoint holds the average"

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args), "--output", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    manifest = cut / "checkpoint-last" / "dapft_checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and not manifest.exists():  # kill it right after its first checkpoint
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "report.json").exists(), "the run finished before it could be interrupted"
    assert json.loads(manifest.read_text())["global_step"] < 18
    dapft(*args, "--output", cut, "--resume")
    _assert_same_weights(_weights(full), _weights(cut))
    _assert_same_weights(_raw_weights(full), _raw_weights(cut))
    proc = dapft(*args, "--output", cut, "--resume", "--no-ema", check=False)
    assert proc.returncode == 1 and "--no-ema differs from the run's --ema" in " ".join(proc.stderr.split())


def test_backbone_freezing_flags_and_the_report(tmp_path, tiny_detr, shapes_root):
    base = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--max-steps", "2", "--no-eval-before",
            "--max-eval-images", "2", "--loss", "dap+box", "--lr", "1e-3", *COMMON]
    start = load_file(Path(tiny_detr) / "model.safetensors")
    runs = {}
    for flag in ("--freeze-backbone", "--train-backbone", None):
        run = tmp_path / str(flag)
        dapft(*base, "--output", run, *([flag] if flag else []))
        raw = _weights(run)
        runs[flag] = {k for k in raw if "backbone" in k and not torch.equal(raw[k], start[k])}
        runs[flag, "report"] = json.loads((run / "report.json").read_text())["parameters"]
    assert runs["--freeze-backbone"] == set() and runs["--freeze-backbone", "report"]["backbone_trainable"] == 0
    assert any(".embeddings." in k for k in runs["--train-backbone"])  # the stem trains
    recipe = runs[None]  # DETR's recipe: stem and stage 0 frozen, the later stages train
    assert recipe and not any(".embeddings." in k or ".stages.0." in k for k in recipe)
    assert runs[None, "report"]["frozen"][:2] == ["stem", "stage 0"]
    text = (tmp_path / "None" / "report.md").read_text()
    assert "trainable" in text and "(frozen: stem, stage 0" in text and "no model EMA" in text


def test_patience_stops_the_run_and_the_report_says_so(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    # lr 0: the AP can never improve after the first epoch
    proc = dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "4",
                 "--lr", "0", "--patience", "1", "--no-eval-before", "--max-eval-images", "4", "--loss", "dap+box",
                 *COMMON)
    report = json.loads((run / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert "--patience 1" in report["stopped_early"] and "stopped early after epoch 2" in proc.stderr
    assert "Stopped early after epoch 2" in (run / "report.md").read_text()


def test_report_per_class_table_and_checkpoint_model_cards(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "1",
          "--max-eval-images", "6", "--loss", "dap", *COMMON)
    text = (run / "report.md").read_text()
    table = text.split("## AP per class")[1]
    assert all(name in table for name in CLASSES) and "| class | AP before | AP after | change |" in table
    report = json.loads((run / "report.json").read_text())
    after = report["per_class_AP"]["after"]
    listed = [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("| ")]
    assert listed == sorted(after, key=lambda k: -after[k])  # best first
    for name in ("checkpoint-best", "checkpoint-last"):
        card = (run / name / "README.md").read_text()
        assert "pipeline_tag: object-detection" in card and f"base_model: {tiny_detr}" in card
        assert "dapft finetune --model" in card and str(shapes_root) in card and "| this checkpoint" in card
        files = json.loads((run / name / "dapft_checkpoint.json").read_text())["files"]
        assert "README.md" in files  # covered by the manifest like every other file


def test_a_label_set_change_under_dap_alone_is_warned_about(tmp_path, shapes_root):
    model = save_tiny_checkpoint("detr", tmp_path / "other", {i: f"c{i}" for i in range(3)}, image_size=128)
    base = ["finetune", "--model", model, "--data", shapes_root, "--max-steps", "1", "--no-eval-before",
            "--max-eval-images", "2", *COMMON]
    proc = dapft(*base, "--output", tmp_path / "dap", "--loss", "dap")
    assert "label set changed" in proc.stderr and "--loss dap+original trains them" in proc.stderr
    proc = dapft(*base, "--output", tmp_path / "mixed", "--loss", "dap+original")
    assert "label set changed" in proc.stderr and "dap+original trains them" not in proc.stderr


@pytest.mark.parametrize("matcher", ["original", "constant"])
def test_a_model_that_outputs_nan_boxes_stops_with_the_step_and_the_layer(tmp_path, tiny_detr, shapes_root, matcher):
    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import Trainer

    class NanBoxes(Trainer):
        """The box head outputs NaN from the second step on, as a diverging model would."""

        def setup(self):
            super().setup()
            nan_from_step_2 = lambda m, i, out: out * float("nan") if self.state["global_step"] >= 1 else out  # noqa
            self.run.model.bbox_predictor.register_forward_hook(nan_from_step_2)

    cfg = FinetuneConfig(model=str(tiny_detr), data=str(shapes_root), output=str(tmp_path / "run"), epochs=1,
                         batch_size=4, device="cpu", num_workers=0, progress=False, eval_before=False, loss="dap",
                         matcher=matcher)
    with pytest.raises(FloatingPointError, match=r"step 2: the matching cost of decoder layer 0 of 2.*lower --lr"):
        NanBoxes(cfg).train()


def test_resume_continues_with_the_runs_settings_and_refuses_different_ones(tmp_path, tiny_detr, shapes_root):
    import hashlib

    run = tmp_path / "run"
    base = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--no-eval-before",
            "--max-eval-images", "2", "--epochs", "2", *COMMON]
    dapft(*base, "--loss", "dap+box", "--lr", "2e-4", "--max-steps", "1")

    def digest():
        return {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
                if p.is_file() and p.name != ".dapft.lock"}  # the lock names whichever process came last

    written = digest()
    proc = dapft(*base, "--resume", "--max-steps", "2", "--loss", "dap", "--lr", "1e-3", "--sigma", "0.1",
                 "--no-augment", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "a resumed run keeps its settings" in message and "drop the flags" in message
    for name in ("--loss dap differs from the run's --loss dap+box", "--lr 0.001 differs from the run's --lr 0.0002",
                 "--sigma 0.1 differs", "--no-augment differs from the run's --augment"):
        assert name in message, f"{name!r} not named: {message}"  # every difference in the one refusal
    assert digest() == written, "a refused resume changed the run"
    dapft(*base, "--resume", "--max-steps", "2")  # no --loss / --lr: the run's own
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["loss"] == "dap+box" and report["config"]["lr"] == 2e-4 and report["global_steps"] == 2


@pytest.mark.parametrize("flag, value, says", [
    ("--epochs", "0", "--epochs must be at least 1"), ("--epochs", "-1", "--epochs must be at least 1"),
    ("--max-steps", "0", "--max-steps must be at least 1"), ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--max-eval-images", "0", "--max-eval-images must be at least 1"),
    ("--precision", "foo", "--precision must be auto, bf16, fp16 or fp32"),
    ("--sigma", "0", "--sigma must lie in (0, 1)"), ("--ema-decay", "1.5", "--ema-decay must lie in (0, 1)"),
    ("--lr", "-1e-4", "--lr must be at least 0.0"),
])
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, tiny_detr, shapes_root, flag, value, says):
    run = tmp_path / "run"
    t0 = time.time()
    proc = dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, *COMMON, flag, value,
                 check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert says in " ".join(proc.stderr.split()) and len(proc.stderr.strip().splitlines()) <= 2
    assert not run.exists() and time.time() - t0 < 30


def test_eval_refuses_to_overwrite_a_fine_tuning_runs_report(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "1",
          "--no-eval-before", "--max-eval-images", "2", *COMMON)
    report = (run / "report.md").read_bytes()
    proc = dapft("eval", "--model", run / "checkpoint-last", "--data", shapes_root, "--output", run,
                 "--num-workers", "0", "--no-progress", "--max-images", "2", check=False)
    assert proc.returncode == 1 and "a fine-tuning run's directory" in " ".join(proc.stderr.split())
    assert (run / "report.md").read_bytes() == report
    proc = dapft("eval", "--model", run / "checkpoint-last", "--data", shapes_root, "--output",
                 run / "eval" / "dapft-eval", "--num-workers", "0", "--no-progress", "--max-images", "2")
    assert (run / "eval" / "dapft-eval" / "report.md").exists() and (run / "report.md").read_bytes() == report


def test_error_messages_keep_square_brackets_of_user_text(tmp_path, tiny_detr, shapes_root):
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    name = data["images"][0]["file_name"]
    (root / "val2017" / name).rename(root / "val2017" / "a[b]c.png")  # the JSON still names the old file
    data["images"][0]["file_name"] = "x[red]y.png"
    ann.write_text(json.dumps(data))
    proc = dapft("eval", "--model", tiny_detr, "--data", root, "--output", tmp_path / "ev", "--no-progress",
                 check=False)
    assert proc.returncode == 1 and "x[red]y.png" in " ".join(proc.stderr.split()).replace(" ", "")
