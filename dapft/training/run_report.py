"""What a fine-tuning run tells: its start lines, its trackers, and at its end report.md and
report.json (before / after / best, training curves, the matching diagnostic, per-class changes,
the changed images) and the model card of each checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt  # noqa: E402
from rich.markup import escape  # noqa: E402

from dapft.analysis.gallery import read_evaluation, write_changed  # noqa: E402
from dapft.analysis.metrics import STAT_NAMES  # noqa: E402
from dapft.analysis.report import (  # noqa: E402
    SKIP_NOTE,
    epochs_text,
    errors_section,
    gallery_section,
    metrics_table,
    per_class_table,
)
from dapft.training.config import drops_text  # noqa: E402
from dapft.training.state import RunLog, read_log  # noqa: E402
from dapft.utils import distributed as dist_utils  # noqa: E402
from dapft.utils.files import atomic_write_text  # noqa: E402
from dapft.utils.provenance import software_line  # noqa: E402
from dapft.utils.trackers import Trackers, parse_report_to  # noqa: E402


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over about 1/25 of the run: per-batch values are too noisy to read a trend from."""
    import numpy as np

    window = max(1, len(values) // 25)
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    count = np.minimum(np.arange(1, len(values) + 1), window)
    return ((sums[1:] - sums[np.arange(1, len(values) + 1) - count]) / count).tolist()


def _per_step(ax, steps: list[dict], key: str, color: str, ylabel: str, title: str) -> None:
    x, values = [r["global_step"] for r in steps], [r[key] for r in steps]
    ax.plot(x, values, lw=0.6, alpha=0.35, color=color, label="per batch")
    ax.plot(x, _smooth(values), lw=1.5, color=color, label="smoothed")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if steps:
        ax.legend()


def plot_training_curves(records: list[dict], path: Path) -> None:
    """curves.png from a run's log records (log.jsonl)."""
    steps = [r for r in records if r["type"] == "step"]
    evals = [r for r in records if r["type"] == "eval"]
    has_dap = bool(steps) and "dap" in steps[0]
    fig, axes = plt.subplots(1, 3 if has_dap else 2, figsize=(15 if has_dap else 10, 3.8))
    a, b = axes[0], axes[-1]
    _per_step(a, steps, "loss", "C0", "loss", "Training loss (all terms)")
    if has_dap:  # DAP on its own axis: next to a total loss several times larger it would read flat
        _per_step(axes[1], steps, "dap", "C2", "DAP", "DAP of the training batches (last layer)")
    if evals:
        for key in ("AP", "AP50", "AP75"):
            b.plot([r["global_step"] for r in evals], [100 * r[key] for r in evals], marker="o", label=key)
        if "train_AP" in evals[-1]:
            train = [r for r in evals if "train_AP" in r]
            b.plot([r["global_step"] for r in train], [100 * r["train_AP"] for r in train], marker="s", ls="--",
                   color="C0", alpha=0.6, label="AP, training subset")
    b.set(xlabel="optimizer step", ylabel="COCO AP", title="Validation AP (step 0 = before)")
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evaluation(folder: Path | None) -> dict:
    """An evaluation folder's metrics.json ({} where there is none)."""
    path = folder / "metrics.json" if folder is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def _error_summary(errors: dict | None) -> dict | None:
    """The breakdown's numbers, without its per-image counts and matrix (report.json, sweeps)."""
    return {k: errors[k] for k in ("dAP", "counts", "AP50", "ECE", "score_threshold")} if errors else None


def _recipe_line(cfg, freezing) -> str:
    ema = (f"model EMA decay {cfg.ema_decay:g} (warm-up {cfg.extra.get('ema_warmup_steps', 0)} steps); the EMA "
           "weights are evaluated and saved" if cfg.ema else "no model EMA; the trained weights are evaluated")
    return f"Backbone: {freezing.summary()}. {ema}."


def matching_summary(records: list[dict]) -> dict | None:
    """Mean over a run's steps (its log records) of the matching-disagreement fractions the DAP
    criterion logs."""
    steps = [r for r in records if r["type"] == "step" and "match_vs_model" in r]
    if not steps:
        return None
    top = [r["match_vs_top"] for r in steps if "match_vs_top" in r]
    return {"steps": len(steps), "vs_model": sum(r["match_vs_model"] for r in steps) / len(steps),
            "vs_top": sum(top) / len(top) if top else None}  # None: no query overlapped a ground truth


def write_run_report(run_dir: Path, cfg, family: str, state: dict, freezing, before_eval: Path | None = None,
                     gallery: list[tuple[Path, str]] = ()) -> dict:
    """report.md + report.json + curves.png (+ confusion.png) of a fine-tuning run. `before_eval`:
    the folder of the evaluation before fine-tuning (a sweep's shared one lies in the sweep's
    folder); `gallery`: the pictures of the images that changed most (dapft.analysis.gallery)."""
    history = state["history"]
    records = read_log(run_dir / "log.jsonl")  # read once: long runs log many thousand steps
    plot_training_curves(records, run_dir / "curves.png")
    last = _evaluation(run_dir / "eval" / str(history[-1].get("tag"))) if history else {}
    first = _evaluation(before_eval or run_dir / "eval" / "before") if state.get("before") else {}
    payload = run_payload(cfg, family, state, freezing, matching_summary(records), first, last)
    atomic_write_text(run_dir / "report.json", json.dumps(payload, indent=2, default=str))
    lines = (_result_lines(cfg, state, freezing, payload) + _run_lines(run_dir, cfg, state, payload)
             + _detail_lines(run_dir, cfg, payload, last, gallery))
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return payload


def run_payload(cfg, family: str, state: dict, freezing, matching: dict | None, first: dict, last: dict) -> dict:
    """report.json: before / after / best, the training subset's, the matching diagnostic, per-class
    AP and the error summaries of the first and last evaluations (`first`, `last`: their
    metrics.json), the history, what trained, the software and the configuration."""
    history = state["history"]
    after = {k: history[-1][k] for k in STAT_NAMES} if history else None
    best = max(history, key=lambda h: h["AP"]) if history else None
    before = {k: state["before"][k] for k in STAT_NAMES} if state.get("before") else None
    train = {tag: {k: source[f"train_{k}"] for k in STAT_NAMES} for tag, source in
             (("before", state.get("before") or {}), ("after", history[-1] if history else {})) if "train_AP" in source}
    return {"model": cfg.model, "family": family, "before": before, "after": after,
            "best": {k: best[k] for k in ("epoch", "global_step", *STAT_NAMES)} if best else None,
            "delta_AP": (after["AP"] - before["AP"]) if (before and after) else None,
            "train_before": train.get("before"), "train_after": train.get("after"), "matching": matching,
            "per_class_AP": {"before": first.get("per_class_AP", {}), "after": last.get("per_class_AP", {})},
            "errors": {"before": _error_summary(first.get("errors")), "after": _error_summary(last.get("errors"))},
            "history": history, "train_seconds": round(state["elapsed"], 1),
            "global_steps": state["global_step"], "stopped_early": state.get("stopped_early"),
            "parameters": dataclasses.asdict(freezing),
            "evaluated_weights": "ema" if cfg.ema else "model", "skipped": state.get("skipped"),
            "software": state.get("software", []), "config": dataclasses.asdict(cfg)}


def _result_lines(cfg, state: dict, freezing, payload: dict) -> list[str]:
    """The report's head: what ran, and COCO AP before and after on validation (and the training subset)."""
    before, after = payload["before"], payload["after"]
    rows = {}
    if before:
        rows["before (r_o)"] = before
    if after:
        rows[f"after ({cfg.loss})"] = after
    lines = [f"# Fine-tuning `{cfg.model}` ({payload['family']}) with `{cfg.loss}`", "",
             f"Matcher {cfg.matcher}, sigma {cfg.sigma}, {cfg.bins} bins, {epochs_text(cfg.epochs)} "
             f"({state['global_step']} optimizer steps), batch {cfg.batch_size}, lr {cfg.lr:g} "
             f"(x{cfg.backbone_lr_multiplier:g} backbone, {drops_text(cfg)}), seed {cfg.seed}.", "",
             _recipe_line(cfg, freezing), "",
             "## COCO AP on the validation split", "",
             metrics_table(rows, deltas_from="before (r_o)" if before else None) if rows else "(no evaluation)", ""]
    if before and after and cfg.loss != "original":
        lines += [f"The change from before includes what the extra training alone does. The same fine-tune with the "
                  f"model's own loss, paired by seed, separates the two: `dapft sweep --model {cfg.model} ... --loss "
                  f"original,{cfg.loss} --seed 0,1,2,3,4`.", ""]
    train = {tag: payload[f"train_{tag}"] for tag in ("before", "after") if payload[f"train_{tag}"] is not None}
    if train:
        train_rows = {f"{tag} ({cfg.loss})" if tag == "after" else "before": m for tag, m in train.items()}
        lines += [f"## COCO AP on {cfg.train_eval_images} training images (`--train-eval-images`)", "",
                  "The first training images by id, scored without augmentation as the validation split is. "
                  "A change here and none on validation: the loss moved the model, the change did not "
                  "transfer; no change on either: it did not move the model.", "",
                  metrics_table(train_rows, deltas_from="before" if "before" in train_rows else None), ""]
    return lines


def _run_lines(run_dir: Path, cfg, state: dict, payload: dict) -> list[str]:
    """How the run went: the matching diagnostic, an early stop, the checkpoints, the annotations
    skipped, the software, the time and the training curves."""
    lines, matching, best = [], payload["matching"], payload["best"]
    if matching:
        lines += [f"AP-cost matching ({cfg.matcher}) of the last decoder layer, mean over {matching['steps']} steps: "
                  f"it assigned {100 * matching['vs_model']:.1f}% of ground truths to another query than the "
                  f"model's own matcher would" + ("" if matching["vs_top"] is None else
                  f", and {100 * matching['vs_top']:.1f}% to another query than the best-scoring one overlapping "
                  "them at IoU >= 0.5 (that query then counts as a false positive)") + ".", ""]
    if state.get("stopped_early"):
        lines += [f"**{state['stopped_early'].capitalize()}.**", ""]
    if best and (run_dir / "checkpoint-best").is_dir():
        lines += [f"Best: AP {100 * best['AP']:.2f} after epoch {best['epoch']} (`checkpoint-best/`); "
                  f"last: `checkpoint-last/`. Both load with `AutoModelForObjectDetection.from_pretrained`.", ""]
    elif best:  # killed while writing it, and no better evaluation came after the resume
        lines += [f"Best: AP {100 * best['AP']:.2f} after epoch {best['epoch']}, but `checkpoint-best/` is missing "
                  "(the run was stopped while writing it); `checkpoint-last/` holds the last weights.", ""]
    skipped = {split: counts for split, counts in state.get("skipped", {}).items() if counts}
    if skipped:
        lines += ["Annotations skipped or changed (as COCO / DETR training would): " + "; ".join(
            f"{split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) for split, counts in skipped.items())
            + SKIP_NOTE, ""]
    ran_on = state.get("software", [])
    if ran_on:
        lines += ["Ran on " + software_line(ran_on[0]) + "".join(
            f"; resumed on {software_line(s)}" for s in ran_on[1:]) + ".", ""]
    return lines + [f"Training time: {state['elapsed']:.0f} s.", "", "![curves](curves.png)", ""]


def _detail_lines(run_dir: Path, cfg, payload: dict, last: dict, gallery: list[tuple[Path, str]]) -> list[str]:
    """The details: what changed in the errors, the images that changed most, AP per class, the
    configuration."""
    lines, errors, per_class = [], payload["errors"], payload["per_class_AP"]
    if errors["after"]:
        columns = {name: errors[name] for name in ("before", "after") if errors[name]}
        lines += errors_section("What changed: the errors before and after", columns, last["errors"], run_dir,
                                of_run=True)
    if gallery:
        lines += gallery_section("The images that changed most", errors["after"]["score_threshold"], gallery,
                                 run_dir)
    if per_class["after"]:
        lines += ["## AP per class (last evaluation)", "", per_class_table(per_class["before"], per_class["after"]), ""]
    lines += ["## Configuration", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str), "```", ""]
    return lines


def model_card(cfg, family: str, state: dict, which: str) -> str:
    """README.md of a checkpoint directory, as Hub checkpoints carry: what it is, how it was made,
    its COCO AP, how to load it. `which` is 'best' or 'last'."""
    history = state["history"]
    evaluated = (max(history, key=lambda h: h["AP"]) if which == "best" else history[-1]) if history else None
    rows = {}
    if state.get("before"):
        rows["before fine-tuning"] = state["before"]
    if evaluated:
        # A mid-epoch checkpoint-last (--save-every, Ctrl-C) is newer than the run's last evaluation.
        same = which == "best" or evaluated["global_step"] == state["global_step"]
        label = "this checkpoint" if same else "the run's last evaluation"
        rows[f"{label} (epoch {evaluated['epoch']}, step {evaluated['global_step']})"] = evaluated
    data = cfg.data or f"{cfg.train_annotations} (train), {cfg.val_annotations} (val)"
    weights = f"the model EMA (decay {cfg.ema_decay:g})" if cfg.ema else "the trained weights"
    saved = ("the best validation AP of the run" if which == "best" else
             f"the latest state of the run (step {state['global_step']})")
    lines = ["---", "library_name: transformers", "pipeline_tag: object-detection",
             f"base_model: {cfg.model}", f"tags: [object-detection, dapft, {family}]", "---", "",
             f"# `{cfg.model}` fine-tuned with dapft (`{cfg.loss}` loss)", "",
             f"Checkpoint `{which}`: {saved}; the weights are {weights}.", "",
             f"- family: {family}; loss `{cfg.loss}`, matcher `{cfg.matcher}`, sigma {cfg.sigma}, {cfg.bins} bins",
             f"- schedule: {epochs_text(cfg.epochs)}, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}",
             f"- data: `{data}`",
             f"- command: `{cfg.command or 'dapft.training.trainer.finetune(...)'}`", "",
             "## COCO AP on the validation split", "",
             metrics_table(rows) if rows else "(not evaluated yet: a mid-epoch checkpoint)", "",
             "## Use", "", "```python",
             "from transformers import AutoImageProcessor, AutoModelForObjectDetection", "",
             'model = AutoModelForObjectDetection.from_pretrained("path/to/this/directory")',
             'processor = AutoImageProcessor.from_pretrained("path/to/this/directory")', "```", ""]
    if state.get("stopped_early"):
        lines += [state["stopped_early"].capitalize() + ".", ""]
    return "\n".join(lines)


def announce(run) -> None:
    """The run's start lines: what trains how, on what."""
    cfg = run.cfg
    run.log(f"[bold]dapft finetune[/] {escape(cfg.model)} ({run.family.name}) · loss {cfg.loss} · matcher "
            f"{cfg.matcher} · sigma {cfg.sigma} · bins {cfg.bins} · {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} "
            f"· batch {cfg.batch_size} · lr {cfg.lr:g} ({drops_text(cfg)}) · {run.device} x{run.dist.world_size} · "
            f"{cfg.num_workers} data workers")
    run.log(f"{run.freezing.summary()} · " + (
        f"model EMA decay {cfg.ema_decay:g} (warm-up {cfg.extra.get('ema_warmup_steps', 0)} steps): evaluated "
        "and saved" if run.ema is not None else "no model EMA"))


def finish(run, state: dict, log: RunLog) -> dict:
    """The report (main process), then the processes part."""
    report = {}
    if run.dist.is_main:
        before_eval = run.out / "eval" / "before"
        if not before_eval.is_dir() and run.cfg.before_metrics and run.cfg.before_metrics.get("eval_dir"):
            before_eval = Path(run.cfg.before_metrics["eval_dir"])  # a sweep's, made once in the sweep's folder
        report = write_run_report(run.out, run.cfg, run.family.name, state, run.freezing, before_eval,
                                  _changed_gallery(run, state, before_eval))
        if log.trackers is not None:
            best = run.out / "checkpoint-best"
            log.trackers.summary(summary_values(report))
            log.trackers.files([run.out / name for name in ("report.md", "report.json", "curves.png", "confusion.png")
                                if (run.out / name).is_file()],
                               best if run.cfg.log_checkpoints and best.is_dir() else None)
    dist_utils.barrier(run.dist)
    dist_utils.shutdown(run.dist)
    log.close()
    return report


def _changed_gallery(run, state: dict, before_eval: Path) -> list[tuple[Path, str]]:
    """The before/after pictures of the validation images that changed most (none without both
    evaluations, or with --no-gallery)."""
    history = state["history"]
    if not history or not run.cfg.gallery:
        return []
    before, after = read_evaluation(before_eval), read_evaluation(run.out / "eval" / str(history[-1]["tag"]))
    if before is None or after is None:
        return []
    return write_changed(run.out / "gallery", run.splits["val"], before, after)


def open_trackers(run) -> Trackers | None:
    """The run's trackers (--report-to; TensorBoard where installed by default), with its settings,
    the resolved recipe among them, as parameters."""
    cfg = run.cfg
    names = parse_report_to(cfg.report_to)
    if not names:
        return None
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("before_metrics", "tracker_group", "given")}
    params["recipe"] = params.pop("extra")
    params["family"] = run.family.name
    return Trackers(run.out, names, run_name=run.out.name, params=params, group=cfg.tracker_group)


def summary_values(report: dict) -> dict[str, float]:
    """A run's before / after / best COCO numbers and the change, as the trackers' summary."""
    values = {f"{tag}/{k}": v for tag in ("before", "after", "best") for k, v in (report.get(tag) or {}).items()
              if k in STAT_NAMES}
    if report.get("delta_AP") is not None:
        values["delta/AP"] = report["delta_AP"]
    return values
