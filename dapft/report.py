"""Markdown reports and PNG plots for evaluations, fine-tuning runs and sweeps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dapft.config import drops_text  # noqa: E402
from dapft.metrics import STAT_NAMES, CocoMetrics  # noqa: E402
from dapft.runtime import atomic_write_text, software_line  # noqa: E402
from dapft.state import read_log  # noqa: E402

HEADLINE = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def _mean_valid(p: np.ndarray, axis) -> np.ndarray:
    masked = np.where(p > -1, p, np.nan)
    with np.errstate(invalid="ignore"):
        out = np.nanmean(masked, axis=axis)
    return np.nan_to_num(out, nan=0.0)


def plot_pr_curves(metrics: CocoMetrics, path: Path) -> None:
    """Precision-recall over COCO's 101 recall points, averaged over classes (area all, 100 dets)."""
    p = metrics.precision[:, :, :, 0, -1]  # [T, R, K]
    recall = np.linspace(0, 1, p.shape[1])
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, curve in (("IoU 0.50", _mean_valid(p[0], 1)), ("IoU 0.75", _mean_valid(p[5], 1)),
                         ("IoU 0.50:0.95", _mean_valid(p, (0, 2)))):
        ax.plot(recall, curve, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Precision-recall (AP {100 * metrics.stats['AP']:.1f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class_ap(metrics: CocoMetrics, path: Path, top: int = 40) -> None:
    items = sorted(metrics.per_class.items(), key=lambda kv: kv[1], reverse=True)[:top]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [100 * v for _, v in items][::-1], color="tab:blue")
    ax.set(xlabel="AP@[.50:.95]", title="AP per class" + (f" (best {top})" if len(metrics.per_class) > top else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ERROR_ROWS = (("Cls", "classification (right box, wrong class)"), ("Loc", "localisation (right class, IoU 0.1-0.5)"),
              ("Both", "classification and localisation"), ("Dupe", "duplicate detection"),
              ("Bkg", "background (IoU < 0.1 with every object)"), ("Miss", "missed object"),
              ("FP", "every false positive (oracle)"), ("FN", "every false negative (oracle)"))


def errors_table(columns: dict[str, dict]) -> str:
    """TIDE's dAP per error type (AP50 points gained were those errors fixed) for one or more
    evaluations' `errors` (metrics.json), with the change when there are two; then TIDE's base AP50
    and the calibration error. Lower dAP is better."""
    names = list(columns)
    extra = {1: ["count"], 2: ["change"]}.get(len(names), [])
    lines = ["| error type | " + " | ".join(names + extra) + " |", "|---|" + "---:|" * (len(names) + len(extra))]

    def row(label: str, values: list[float], fmt: str, extra: str | None = None) -> str:
        cells = [fmt.format(v) for v in values]
        if len(values) == 2:
            change = values[1] - values[0]
            shown = ("{:+" + fmt[2:]).format(change)
            cells.append(shown.replace("-", "+") if float(shown) == 0 else shown)  # no "-0.00"
        elif extra is not None:
            cells.append(extra)
        return f"| {label} | " + " | ".join(cells) + " |"

    for key, label in ERROR_ROWS:
        count = str(columns[names[0]]["counts"][key]) if key in columns[names[0]]["counts"] else ""
        lines.append(row(label, [100 * c["dAP"][key] for c in columns.values()], "{:.2f}", count))
    lines.append(row("AP50, the base (not an error)", [100 * c["AP50"] for c in columns.values()], "{:.2f}", ""))
    lines.append(row("calibration error of the scores (ECE, x100)", [100 * c["ECE"] for c in columns.values()],
                     "{:.2f}", ""))
    return "\n".join(lines)


def plot_confusion(errors: dict, path: Path, top: int = 30) -> None:
    """The confusion matrix at the drawing threshold, rows normalised (ground truth -> predicted),
    background last; with more than `top` classes, the `top` with the most ground truth."""
    matrix = np.asarray(errors["confusion"], dtype=float)
    names = list(errors["confusion_names"])
    if len(names) - 1 > top:
        keep = sorted(np.argsort(-matrix[:-1].sum(1))[:top].tolist()) + [len(names) - 1]
        matrix, names = matrix[np.ix_(keep, keep)], [names[k] for k in keep]
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = 2.5 + 0.32 * len(names)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 12:  # counts are readable in cells this size
        for (r, c), v in np.ndenumerate(matrix):
            if v:
                ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if share[r, c] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"Confusion at score >= {errors['score_threshold']:g}, IoU >= 0.5")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery_markdown(entries: list[tuple[Path, str]], base: Path, columns: int = 1) -> list[str]:
    """Pictures with their captions, `columns` to a row (a table: Markdown viewers show its
    pictures side by side)."""
    if not entries:
        return []
    cells = [f"![{caption}]({Path(path).relative_to(base).as_posix()})<br>{caption}" for path, caption in entries]
    if columns == 1:
        return [line for cell in cells for line in (cell, "")]
    rows = [cells[k:k + columns] for k in range(0, len(cells), columns)]
    return (["| " + " | ".join([""] * columns) + " |", "|" + "---|" * columns]
            + ["| " + " | ".join(r + [""] * (columns - len(r))) + " |" for r in rows] + [""])


def _errors_section(title: str, columns: dict[str, dict], confusion: dict, folder: Path, *,
                    of_run: bool = False) -> list[str]:
    """A report's error breakdown: the table of `columns` (evaluations' `errors`) and the confusion
    matrix of `confusion`, drawn into folder/confusion.png."""
    plot_confusion(confusion, folder / "confusion.png")
    change, which = ("; a negative change: fewer such errors", " (last evaluation)") if of_run else ("", "")
    return [f"## {title}", "",
            "TIDE's error types: the AP at IoU 0.5 gained were every error of that type fixed (lower is "
            f"better{change}). The confusion matrix{which} counts the detections scoring at least "
            f"{confusion['score_threshold']:g}.", "",
            errors_table(columns), "", "![confusion matrix](confusion.png)", ""]


def _gallery_section(title: str, threshold: float, entries: list[tuple[Path, str]], base: Path,
                     columns: int = 1) -> list[str]:
    return [f"## {title} (detections scoring >= {threshold:g}; ground truth: white boxes, edged dark)", "",
            *gallery_markdown(entries, base, columns)]


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("s" if n != 1 else "")


def metrics_table(rows: dict[str, dict[str, float]], keys=HEADLINE, deltas_from: str | None = None) -> str:
    """Markdown table, values in AP points (x100); optionally a delta row against one row."""
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    def cell(v):  # COCO reports -1 where a size range has no ground truth
        return "—" if v < 0 else f"{100 * v:.1f}"

    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(stats[k]) for k in keys) + " |")
    if deltas_from is not None and len(rows) > 1:
        base = rows[deltas_from]
        last = list(rows.values())[-1]
        lines.append("| delta | " + " | ".join("—" if min(last[k], base[k]) < 0 else f"{100 * (last[k] - base[k]):+.1f}"
                                                for k in keys) + " |")
    return "\n".join(lines)


_SKIP_NOTE = (" (degenerate boxes and boxes outside their image are left out of training and evaluation alike; "
              "crowd regions are ignored in matching, as COCO does; clipped boxes train clipped)")


def write_eval_report(output: Path, metrics: CocoMetrics, info: dict,
                      gallery: list[tuple[Path, str]] = ()) -> Path:
    plot_pr_curves(metrics, output / "pr_curves.png")
    plot_per_class_ap(metrics, output / "per_class_ap.png")
    s = metrics.stats
    lines = [
        f"# Evaluation of `{info.get('model')}`", "",
        f"Data: `{info.get('annotations')}` ({info.get('images')} images); evaluator: {metrics.evaluator}.", "",
        metrics_table({"this model": s}), "",
        f"AR@1 {100 * s['AR1']:.1f} · AR@10 {100 * s['AR10']:.1f} · AR@100 {100 * s['AR100']:.1f}", "",
        "![precision-recall](pr_curves.png)", "", "## AP per class", "",
        "| class | AP |", "|---|---:|",
        *[f"| {k} | {100 * v:.1f} |" for k, v in sorted(metrics.per_class.items(), key=lambda kv: -kv[1])],
        "", "![per-class AP](per_class_ap.png)", "",
    ]
    if metrics.errors is not None:
        errors = metrics.errors.to_json()
        lines += _errors_section("What it gets wrong", {"dAP": errors}, errors, output)
    if gallery:
        lines += _gallery_section("The images with the most errors", metrics.errors.score_threshold, gallery, output,
                                  columns=2)
    if info.get("skipped"):
        lines += ["Annotations skipped or changed as COCO/DETR training would: "
                  + ", ".join(f"{k} {v}" for k, v in info["skipped"].items()) + _SKIP_NOTE, ""]
    path = output / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


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
    import json

    path = folder / "metrics.json" if folder is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def _error_summary(errors: dict | None) -> dict | None:
    """The breakdown's numbers, without its per-image counts and matrix (report.json, sweeps)."""
    return {k: errors[k] for k in ("dAP", "counts", "AP50", "ECE", "score_threshold")} if errors else None


def per_class_table(before: dict[str, float], after: dict[str, float], show: int = 10) -> str:
    """Markdown table of AP per class after fine-tuning (and before, with the change), best classes
    first; with more than 2 x `show` classes, the best and the worst `show`."""
    ranked = sorted(after.items(), key=lambda kv: -kv[1])
    rows = ranked if len(ranked) <= 2 * show else ranked[:show] + [None] + ranked[-show:]
    lines = ["| class | AP before | AP after | change |", "|---|---:|---:|---:|"]
    for row in rows:
        if row is None:
            lines.append(f"| ({len(ranked) - 2 * show} classes) | | | |")
            continue
        name, ap = row
        old = before.get(name)
        lines.append(f"| {name} | {'—' if old is None else f'{100 * old:.1f}'} | {100 * ap:.1f} | "
                     f"{'—' if old is None else f'{100 * (ap - old):+.1f}'} |")
    return "\n".join(lines)


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
    folder); `gallery`: the pictures of the images that changed most (dapft.gallery)."""
    import dataclasses
    import json

    history = state["history"]
    after = {k: history[-1][k] for k in STAT_NAMES} if history else None
    best = max(history, key=lambda h: h["AP"]) if history else None
    before = {k: state["before"][k] for k in STAT_NAMES} if state.get("before") else None
    train = {tag: {k: source[f"train_{k}"] for k in STAT_NAMES} for tag, source in
             (("before", state.get("before") or {}), ("after", history[-1] if history else {})) if "train_AP" in source}
    records = read_log(run_dir / "log.jsonl")  # read once: long runs log many thousand steps
    plot_training_curves(records, run_dir / "curves.png")
    matching = matching_summary(records)
    rows = {}
    if before:
        rows["before (r_o)"] = before
    if after:
        rows[f"after ({cfg.loss})"] = after
    last = _evaluation(run_dir / "eval" / str(history[-1].get("tag"))) if history else {}
    first = _evaluation(before_eval or run_dir / "eval" / "before") if before else {}
    per_class_after, per_class_before = last.get("per_class_AP", {}), first.get("per_class_AP", {})
    errors = {"before": _error_summary(first.get("errors")), "after": _error_summary(last.get("errors"))}
    payload = {"model": cfg.model, "family": family, "before": before, "after": after,
               "best": {k: best[k] for k in ("epoch", "global_step", *STAT_NAMES)} if best else None,
               "delta_AP": (after["AP"] - before["AP"]) if (before and after) else None,
               "train_before": train.get("before"), "train_after": train.get("after"), "matching": matching,
               "per_class_AP": {"before": per_class_before, "after": per_class_after}, "errors": errors,
               "history": history, "train_seconds": round(state["elapsed"], 1),
               "global_steps": state["global_step"], "stopped_early": state.get("stopped_early"),
               "parameters": dataclasses.asdict(freezing),
               "evaluated_weights": "ema" if cfg.ema else "model", "skipped": state.get("skipped"),
               "software": state.get("software", []), "config": dataclasses.asdict(cfg)}
    atomic_write_text(run_dir / "report.json", json.dumps(payload, indent=2, default=str))
    lines = [f"# Fine-tuning `{cfg.model}` ({family}) with `{cfg.loss}`", "",
             f"Matcher {cfg.matcher}, sigma {cfg.sigma}, {cfg.bins} bins, {_epochs(cfg.epochs)} "
             f"({state['global_step']} optimizer steps), batch {cfg.batch_size}, lr {cfg.lr:g} "
             f"(x{cfg.backbone_lr_multiplier:g} backbone, {drops_text(cfg)}), seed {cfg.seed}.", "",
             _recipe_line(cfg, freezing), "",
             "## COCO AP on the validation split", "",
             metrics_table(rows, deltas_from="before (r_o)" if before else None) if rows else "(no evaluation)", ""]
    if before and after and cfg.loss != "original":
        lines += [f"The change from before includes what the extra training alone does. The same fine-tune with the "
                  f"model's own loss, paired by seed, separates the two: `dapft sweep --model {cfg.model} ... --loss "
                  f"original,{cfg.loss} --seed 0,1,2,3,4`.", ""]
    if train:
        train_rows = {f"{tag} ({cfg.loss})" if tag == "after" else "before": m for tag, m in train.items()}
        lines += [f"## COCO AP on {cfg.train_eval_images} training images (`--train-eval-images`)", "",
                  "The first training images by id, scored without augmentation as the validation split is. "
                  "A change here and none on validation: the loss moved the model, the change did not "
                  "transfer; no change on either: it did not move the model.", "",
                  metrics_table(train_rows, deltas_from="before" if "before" in train_rows else None), ""]
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
            + _SKIP_NOTE, ""]
    ran_on = state.get("software", [])
    if ran_on:
        lines += ["Ran on " + software_line(ran_on[0]) + "".join(
            f"; resumed on {software_line(s)}" for s in ran_on[1:]) + ".", ""]
    lines += [f"Training time: {state['elapsed']:.0f} s.", "", "![curves](curves.png)", ""]
    if errors["after"]:
        columns = {name: errors[name] for name in ("before", "after") if errors[name]}
        lines += _errors_section("What changed: the errors before and after", columns, last["errors"], run_dir,
                                 of_run=True)
    if gallery:
        lines += _gallery_section("The images that changed most", errors["after"]["score_threshold"], gallery,
                                  run_dir)
    if per_class_after:
        lines += ["## AP per class (last evaluation)", "", per_class_table(per_class_before, per_class_after), ""]
    lines += ["## Configuration", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str), "```", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return payload


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
             f"- schedule: {_epochs(cfg.epochs)}, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}",
             f"- data: `{data}`",
             f"- command: `{cfg.command or 'dapft.engine.finetune(...)'}`", "",
             "## COCO AP on the validation split", "",
             metrics_table(rows) if rows else "(not evaluated yet: a mid-epoch checkpoint)", "",
             "## Use", "", "```python",
             "from transformers import AutoImageProcessor, AutoModelForObjectDetection", "",
             'model = AutoModelForObjectDetection.from_pretrained("path/to/this/directory")',
             'processor = AutoImageProcessor.from_pretrained("path/to/this/directory")', "```", ""]
    if state.get("stopped_early"):
        lines += [state["stopped_early"].capitalize() + ".", ""]
    return "\n".join(lines)
