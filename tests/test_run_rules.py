"""The decisions a run and a sweep make from their settings, held without training anything: what a
resumed run may change, the schedule's rate, the evaluation policy (best AP, --patience) and how a
sweep pairs its runs with the original-loss control."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from dapft.sweeps.grid import expand, run_name
from dapft.sweeps.statistics import summarize
from dapft.training.config import (
    NOT_SETTINGS,
    RESUMABLE_CHANGES,
    FinetuneConfig,
    check_choices,
    lr_factor,
    resumed_config,
)
from dapft.training.state import new_state, record_evaluation

# A value other than the saved one, for settings whose type alone does not give one.
OTHER = {"model": "other/model", "data": "/elsewhere", "loss": "dap+box", "matcher": "constant", "average": "per_class",
         "evaluator": "pycocotools", "precision": "fp32", "label_map": "labels.json", "recipe": "recipe.yaml",
         "train_images": "x", "train_annotations": "x.json", "val_images": "y", "val_annotations": "y.json",
         "freeze_backbone": True, "ema": True, "ema_decay": 0.5, "lr_drop": [3]}


def _fixed_settings() -> list[str]:
    """Every setting `dapft finetune` takes on its command line that a resumed run keeps."""
    from dapft.cli import finetune

    return [name for name in inspect.signature(finetune).parameters
            if name not in ("ctx", "resume", "output") and name not in RESUMABLE_CHANGES]


def _saved() -> dict:
    """A run's config.json: its settings as resolved."""
    cfg = FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data="/data/coco", epochs=4, batch_size=8, lr=2e-5,
                         backbone_lr_multiplier=1.0, weight_decay=1e-4, clip_grad_norm=0.1, ema=False,
                         max_eval_images=200, max_train_images=800, train_eval_images=100)
    return dataclasses.asdict(cfg)


def _other(name: str, value):
    if name in OTHER:
        return OTHER[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    raise AssertionError(f"no other value for {name}={value!r}: add it to OTHER")


def test_every_fixed_setting_is_covered():
    names = _fixed_settings()
    assert {"batch_size", "grad_accum", "seed", "epochs", "weight_decay", "clip_grad_norm", "matcher", "bins",
            "precision", "sigma", "lr", "loss", "augment", "eval_before"} <= set(names)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(names) <= fields and not set(names) & set(NOT_SETTINGS)


@pytest.mark.parametrize("name", _fixed_settings())
def test_resume_refuses_every_fixed_setting_asked_otherwise(name):
    saved = _saved()
    asked = _other(name, saved[name])
    requested = dataclasses.replace(FinetuneConfig(model=saved["model"]), **{name: asked}, given=(name,))
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match="a resumed run keeps its settings") as caught:
        resumed_config(requested, saved, Path("runs/x"))
    message = str(caught.value)
    assert flag in message or (name == "freeze_backbone" and "--freeze-backbone" in message), message
    # The same value given again is no difference; not giving it continues with the run's.
    same = dataclasses.replace(requested, **{name: saved[name]})
    assert getattr(resumed_config(same, saved, Path("runs/x")), name) == saved[name]
    unset = dataclasses.replace(FinetuneConfig(model=saved["model"]), given=())
    assert getattr(resumed_config(unset, saved, Path("runs/x")), name) == saved[name]


@pytest.mark.parametrize("name", RESUMABLE_CHANGES)
def test_resume_takes_what_may_change(name):
    saved = _saved()
    value = {"progress": False, "num_workers": 3, "save_every": 7, "eval_every": 2, "device": "cpu", "max_steps": 9,
             "patience": 4, "report_to": "mlflow", "log_checkpoints": True, "gallery": False,
             "evaluator": "pycocotools"}[name]
    requested = dataclasses.replace(FinetuneConfig(model=saved["model"]), **{name: value}, given=(name,))
    assert getattr(resumed_config(requested, saved, Path("runs/x")), name) == value


def test_a_run_with_a_step_schedule_may_be_lengthened_on_resume_and_no_other():
    """Training longer is resuming with more --epochs, as DETR's users do: with a step schedule the
    rates of the epochs done do not depend on the total. With the last-epoch drop they did."""
    step = {**_saved(), "lr_drop": 3}
    longer = dataclasses.replace(FinetuneConfig(model=step["model"]), epochs=9, given=("epochs",))
    assert resumed_config(longer, step, Path("runs/x")).epochs == 9
    shorter = dataclasses.replace(longer, epochs=3)
    with pytest.raises(ValueError, match="--epochs 3 differs"):
        resumed_config(shorter, step, Path("runs/x"))
    with pytest.raises(ValueError, match="last-epoch rate drop cannot be lengthened"):
        resumed_config(longer, _saved(), Path("runs/x"))


def test_a_step_schedule_may_gain_later_drops_on_resume_never_earlier_ones():
    """A run trained to a plateau at its rate drops it again (a multi-step schedule), resuming: the
    drops it adds come after the epoch its checkpoint is in, so the epochs trained keep their rates."""
    step = {**_saved(), "epochs": 6, "lr_drop": 3}  # config.json of a dapft before multi-step schedules
    again = dataclasses.replace(FinetuneConfig(model=step["model"]), epochs=9, lr_drop=[3, 7],
                                given=("epochs", "lr_drop"))
    resumed = resumed_config(again, step, Path("runs/x"), reached=5)
    assert (resumed.epochs, resumed.lr_drop) == (9, [3, 7])
    assert [lr_factor(e, resumed.epochs, resumed.lr_drop) for e in range(9)] == [1, 1, 1, .1, .1, .1, .1, .01, .01]
    for reached, asked in ((7, [3, 7]), (5, [3, 4]), (5, [2, 7]), (5, [7])):  # in the past, or one dropped
        with pytest.raises(ValueError, match="--lr-drop") as caught:
            resumed_config(dataclasses.replace(again, lr_drop=asked), step, Path("runs/x"), reached=reached)
        assert "later drops" in str(caught.value)
    with pytest.raises(ValueError, match="--lr-drop 7 differs from the run's --lr-drop of its recipe"):
        resumed_config(dataclasses.replace(again, lr_drop=[7]), _saved(), Path("runs/x"), reached=5)


@pytest.mark.parametrize("epochs, lr_drop, factors", [
    (1, None, [1.0]),  # one epoch: the fine-tuning rate (the drop would leave no epoch at it)
    (2, None, [1.0, 0.1]),
    (4, None, [1.0, 1.0, 1.0, 0.1]),  # the paper: /10 (in cfg.lr), then /100 in the last epoch
    (5, [2], [1.0, 1.0, 0.1, 0.1, 0.1]),  # --lr-drop 2: a step schedule
    (3, [3], [1.0, 1.0, 1.0]),  # a drop after the last epoch: never
    (6, [1, 4], [1.0, 0.1, 0.1, 0.1, 0.01, 0.01]),  # --lr-drop 1,4: a tenth after each
])
def test_the_rate_of_each_epoch(epochs, lr_drop, factors):
    assert [lr_factor(e, epochs, lr_drop) for e in range(epochs)] == factors


@pytest.mark.parametrize("name, value", [("sigma", 1.0), ("sigma", float("nan")), ("momentum", 1.0),
                                         ("clip_grad_norm", float("nan")), ("backbone_lr_multiplier", float("inf")),
                                         ("lr", -1e-4), ("batch_size", 0), ("eval_every", 0), ("ema_decay", 0.0),
                                         ("precision", "fp64"), ("loss", "ap"),
                                         ("lr_drop", [0]), ("lr_drop", [5, 3]), ("lr_drop", [])])
def test_out_of_range_and_non_finite_settings_are_refused(name, value):
    with pytest.raises(ValueError, match="--" + name.replace("_", "-")):
        check_choices(FinetuneConfig(model="m", **{name: value}))


def test_an_unknown_evaluator_is_refused_by_finetune_and_sweep_before_any_work(tmp_path):
    # The evaluator's own check (dapft.analysis.evaluate), made before a run is assembled or a grid starts.
    from dapft.sweeps.grid import sweep
    from dapft.training.trainer import finetune

    cfg = FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data=str(tmp_path / "none"), evaluator="cocoapi",
                         output=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--evaluator must be hotcoco, faster-coco-eval or pycocotools"):
        finetune(cfg)
    with pytest.raises(ValueError, match="--evaluator"):
        sweep(cfg, {"seed": [0, 1]})
    assert not (tmp_path / "run").exists()


def test_the_best_ap_and_patience_follow_the_evaluations():
    cfg = FinetuneConfig(model="m", epochs=10, patience=2)
    state = new_state({})
    improved = []
    for epoch, ap in enumerate([0.20, 0.25, 0.25, 0.24, 0.30], start=1):
        state["epoch"] = epoch
        improved.append(record_evaluation(state, {"AP": ap}, f"epoch{epoch}", cfg))
        if state["stopped_early"]:
            break
    assert improved == [True, True, False, False]  # an equal AP is no improvement
    assert state["best_ap"] == 0.25 and state["evals_since_best"] == 2 and "after epoch 4" in state["stopped_early"]
    last = new_state({})
    last["epoch"] = 10  # the run ends anyway: patience does not stop what is already over
    for ap in (0.3, 0.2, 0.1):
        record_evaluation(last, {"AP": ap}, "e", cfg)
    assert last["stopped_early"] is None


def _row(loss, lr, seed, ap, batch_size=8):
    return {"loss": loss, "lr": lr, "batch_size": batch_size, "seed": seed, "run": "", "failed": None, "AP": ap,
            "AP50": ap, "AP75": ap}


def test_a_sweep_pairs_each_run_with_the_original_run_of_the_same_other_values_and_seed():
    rows = []
    for lr, base in ((1e-4, 0.30), (1e-5, 0.10)):  # the original loss at two rates: 0.30 and 0.10 apart
        for seed in (0, 1, 2):
            rows.append(_row("original", lr, seed, base + 0.01 * seed))
            rows.append(_row("dap", lr, seed, base + 0.01 * seed + (0.02 if lr == 1e-4 else -0.03) + 0.001 * seed))
    summary = summarize(rows, ["loss", "lr", "seed"], None)
    got = {c["setting"]: c for c in summary["comparisons"] if c["metric"] == "AP"}
    assert got["loss=dap_lr=0.0001"]["baseline"] == "loss=original_lr=0.0001"
    assert got["loss=dap_lr=0.0001"]["mean_difference"] == pytest.approx(0.021)
    assert got["loss=dap_lr=1e-05"]["mean_difference"] == pytest.approx(-0.029)
    assert got["loss=dap_lr=1e-05"]["n"] == 3 and got["loss=dap_lr=1e-05"]["sd"] == pytest.approx(0.001)
    rows = [_row(loss, 1e-4, s, ap + 0.02 * s, batch_size=b) for s in (0, 1) for loss, b, ap in
            (("original", 8, 0.3), ("original", 16, 0.5), ("dap", 8, 0.31), ("dap", 16, 0.55))]
    pairs = {c["setting"]: c for c in summarize(rows, ["loss", "batch_size", "seed"], None)["comparisons"]
             if c["metric"] == "AP"}
    assert pairs["loss=dap_batch_size=16"]["mean_difference"] == pytest.approx(0.05)
    assert pairs["loss=dap_batch_size=8"]["mean_difference"] == pytest.approx(0.01)


def test_failed_runs_count_in_no_mean_and_no_comparison():
    rows = [_row("original", 1e-4, s, 0.3) for s in (0, 1)] + [_row("dap", 1e-4, 0, 0.32),
                                                                {**_row("dap", 1e-4, 1, None), "failed": "diverged"}]
    summary = summarize(rows, ["loss", "seed"], None)
    dap = next(s for s in summary["settings"] if s["setting"] == "loss=dap")
    assert dap["AP"]["values"] == [0.32]
    assert next(c for c in summary["comparisons"] if c["metric"] == "AP")["n"] == 1


def test_the_original_loss_runs_once_per_value_of_what_it_reads():
    settings = expand({"loss": ["original", "dap"], "sigma": [0.01, 0.1], "seed": [0, 1]})
    assert [run_name(s) for s in settings] == ["loss=original_seed=0", "loss=original_seed=1",
                                               "loss=dap_sigma=0.01_seed=0", "loss=dap_sigma=0.01_seed=1",
                                               "loss=dap_sigma=0.1_seed=0", "loss=dap_sigma=0.1_seed=1"]


@pytest.mark.parametrize("name, value", [("momentum", 0.0), ("clip_grad_norm", 0.0), ("lr", 0.0),
                                         ("weight_decay", 0.0), ("backbone_lr_multiplier", 0.0)])
def test_the_edges_of_the_ranges_are_accepted(name, value):
    check_choices(FinetuneConfig(model="m", **{name: value}))  # momentum 0: the estimate is the last batch's


@pytest.mark.parametrize("family, asked, ema, decay", [
    ("rt_detr", {}, True, 0.9999), ("rt_detr", {"ema": False}, False, None), ("detr", {}, False, None),
    ("detr", {"ema_decay": 0.5}, True, 0.5), ("detr", {"ema": True}, True, 0.9999), ("lw_detr", {}, True, 0.9997)])
def test_the_model_ema_follows_the_recipe_unless_a_flag_says_otherwise(family, asked, ema, decay):
    from dapft.training.config import resolve

    cfg = resolve(FinetuneConfig(model=f"no/such-{family}", **asked), family)
    assert cfg.ema is ema and cfg.ema_decay == decay
