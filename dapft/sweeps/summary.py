"""A sweep's summary files: sweep.md (a row per setting, the paired comparisons, the error
breakdown), sweep.json and sweep.png."""

from __future__ import annotations

import statistics
from pathlib import Path

from dapft.sweeps.statistics import RUNNING
from dapft.utils.files import atomic_write_text, write_json
from dapft.utils.provenance import software_line


def _pts(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def write_summary(root: Path, summary: dict) -> None:
    keys, metrics = summary["keys"], summary["metrics"]
    before = summary["before"]
    lines = [f"# Sweep over {', '.join(keys)}", ""]
    open_runs = [r["run"] for r in summary["runs"] if r.get("state") in (RUNNING, "unfinished")]
    if open_runs:
        lines += [f"**Partial: {len(open_runs)} of {len(summary['runs'])} runs not finished** ("
                  + ", ".join(f"{r['run']}: {'running in another worker' if r['state'] == RUNNING else 'interrupted'}"
                              for r in summary["runs"] if r["run"] in open_runs)
                  + "). The worker that ends the last run writes the whole summary; the same command run again "
                  "resumes an interrupted run, or, once all are finished, only writes the summary.", ""]
    if before is not None:
        lines += [f"Before fine-tuning (evaluated once, shared by every run): AP {_pts(before['AP'])}, "
                  f"AP50 {_pts(before['AP50'])}, AP75 {_pts(before['AP75'])}.", ""]
    software = summary.get("software", [])
    if len(software) == 1:
        lines += [f"Every run on {software_line(software[0])}.", ""]
    elif software:  # a comparison across these mixes the change of code with the change of setting
        lines += [f"**The runs ran on {len(software)} different versions of the code** (each run's report.md "
                  "names its own): "
                  + "; ".join(software_line(s) for s in software) + ". A paired difference between runs of two "
                  "versions mixes the change of code with the change of setting: delete the runs of the other "
                  "versions and run the sweep again.", ""]
    lines += ["## Per setting (mean ± sd over seeds)", "", "| setting | seeds | " + " | ".join(metrics) + " |",
              "|---|---:|" + "---:|" * len(metrics)]
    for s in summary["settings"]:
        cells = [_pts(s[m]["mean"]) + (f" ± {100 * s[m]['sd']:.2f}" if s[m]["sd"] is not None else "")
                 for m in metrics]
        lines.append(f"| {s['setting']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "## Against the original loss, paired by seed", "",
                  "Mean difference in AP points over the seeds both runs have, with its 95% interval "
                  "(Student t over the paired differences). An interval that contains 0 shows no "
                  "difference at this number of seeds; its width bounds the effect these runs could miss.", "",
                  "| setting | baseline | metric | n | mean difference | 95% interval |", "|---|---|---|---:|---:|---|"]
        lines += [_comparison_row(c) for c in summary["comparisons"] if c["metric"] in metrics]
    lines += _errors_part(summary)
    lines += ["", "## Runs", "", "| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    lines += [f"| {r['run']} | " + " | ".join(_run_cells(r, metrics)) + " |" for r in summary["runs"]]
    failed = [r for r in summary["runs"] if r.get("failed")]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed (their errors above; `failed.json` in each run's folder): they "
                  "count in no mean and no comparison. Delete a failed run's folder to try it again."]
    if "train_AP" in metrics:
        lines += ["", "train_*: COCO AP on the first training images by id (`--train-eval-images`), unaugmented."]
    lines += ["", "![AP of each run, and the paired differences](sweep.png)", ""]
    atomic_write_text(root / "sweep.md", "\n".join(lines))
    write_json(root / "sweep.json", summary)
    _plot(root / "sweep.png", summary)


def _run_cells(row: dict, metrics: list[str]) -> list[str]:
    state = row.get("state", "finished")
    if state == "finished" and not row.get("failed"):
        return [_pts(row[m]) for m in metrics]
    text = {"failed": f"failed: {(row.get('failed') or '')[:200]}", RUNNING: "running in another worker",
            "unfinished": "not finished (the same command resumes it)"}[state if not row.get("failed") else "failed"]
    return [text] + [""] * (len(metrics) - 1)


def _comparison_row(c: dict, scale: float = 100) -> str:
    ci = f"[{scale * c['ci95'][0]:+.2f}, {scale * c['ci95'][1]:+.2f}]" if c["ci95"] else "— (one seed)"
    return (f"| {c['setting']} | {c['baseline']} | {c['metric']} | {c['n']} | {scale * c['mean_difference']:+.2f} "
            f"| {ci} |")


def _errors_part(summary: dict) -> list[str]:
    """sweep.md's error breakdown: TIDE's dAP of each setting's last evaluations, and each against
    the original loss paired by seed (a negative difference: fewer such errors)."""
    errors = summary.get("errors") or []
    if not errors:
        return []
    lines = ["", "## Error breakdown (TIDE, last evaluation; mean over seeds)", "",
             "dAP: the AP at IoU 0.5 (points) gained were every error of that type fixed; lower is better. ECE: "
             "the calibration error of the scores (x100). Each run's report.md has its own, before and after.", "",
             "| setting | seeds | " + " | ".join(e.removeprefix("dAP_") for e in errors) + " |",
             "|---|---:|" + "---:|" * len(errors)]
    for s in summary["settings"]:
        lines.append(f"| {s['setting']} | {len(s['seeds'])} | " + " | ".join(_pts(s[e]["mean"]) for e in errors) + " |")
    paired_errors = [c for c in summary["comparisons"] if c["metric"] in errors]
    if paired_errors:
        lines += ["", "Against the original loss, paired by seed (a negative difference: fewer such errors):", "",
                  "| setting | baseline | error | n | mean difference | 95% interval |", "|---|---|---|---:|---:|---|"]
        lines += [_comparison_row(c) for c in paired_errors]
    return lines


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, comparisons = summary["settings"], [c for c in summary["comparisons"] if c["metric"] == "AP"]
    panels = 2 if comparisons else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 1.1 * len(settings) + 2) + 4.5 * (panels - 1), 4.0),
                             squeeze=False)
    ax = axes[0][0]
    for x, s in enumerate(settings):  # every seed a dot: the spread, not only the mean
        values = [100 * v for v in s["AP"]["values"]]
        ax.scatter([x] * len(values), values, s=18, alpha=0.7, color="C0", zorder=3)
        if values:
            ax.hlines(statistics.fmean(values), x - 0.3, x + 0.3, color="C3", lw=2, zorder=4)
    if summary["before"] is not None:
        ax.axhline(100 * summary["before"]["AP"], color="grey", ls="--", label="before fine-tuning")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(settings)), [s["setting"] for s in settings], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="COCO AP (val)", title="AP per run (dots: seeds; bar: mean)")
    ax.grid(alpha=0.3)
    if comparisons:
        ax = axes[0][1]
        for x, c in enumerate(comparisons):
            mean = 100 * c["mean_difference"]
            err = [[mean - 100 * c["ci95"][0]], [100 * c["ci95"][1] - mean]] if c["ci95"] else None
            ax.errorbar([x], [mean], yerr=err, fmt="o", capsize=4, color="C1")
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(range(len(comparisons)), [c["setting"] for c in comparisons], rotation=30, ha="right",
                      fontsize=8)
        ax.set(ylabel="AP difference (points)", title="minus the original loss, paired by seed (95% CI)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
