"""An evaluation's Markdown report and PNG plots: the COCO table, precision-recall curves, per-class
AP, the error breakdown and confusion matrix, the gallery of worst images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dapft.analysis.metrics import CocoMetrics  # noqa: E402
from dapft.utils.files import atomic_write_text  # noqa: E402

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


def errors_section(title: str, columns: dict[str, dict], confusion: dict, folder: Path, *,
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


def gallery_section(title: str, threshold: float, entries: list[tuple[Path, str]], base: Path,
                     columns: int = 1) -> list[str]:
    return [f"## {title} (detections scoring >= {threshold:g}; ground truth: white boxes, edged dark)", "",
            *gallery_markdown(entries, base, columns)]


def epochs_text(n: int) -> str:
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


SKIP_NOTE = (" (degenerate boxes and boxes outside their image are left out of training and evaluation alike; "
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
        lines += errors_section("What it gets wrong", {"dAP": errors}, errors, output)
    if gallery:
        lines += gallery_section("The images with the most errors", metrics.errors.score_threshold, gallery, output,
                                  columns=2)
    if info.get("skipped"):
        lines += ["Annotations skipped or changed as COCO/DETR training would: "
                  + ", ".join(f"{k} {v}" for k, v in info["skipped"].items()) + SKIP_NOTE, ""]
    path = output / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


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
