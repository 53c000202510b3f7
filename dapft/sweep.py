"""`dapft sweep`: one fine-tune per setting, sequentially and resumably, then AP against the swept
value (the paper's Figure 3)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from dapft.engine import FinetuneConfig, finetune
from dapft.runtime import atomic_write_text, console


def run_name(setting: dict) -> str:
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def sweep(base: FinetuneConfig, grid: dict[str, list]) -> list[dict]:
    """Fine-tune `base` once per combination in `grid` (field name -> values) under base.output.
    A finished run (report.json present) is kept and skipped; an interrupted one is resumed."""
    root = Path(base.output)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(grid)
    rows = []
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, values))
        run_dir = root / run_name(setting)
        report_file = run_dir / "report.json"
        if report_file.exists():
            console.print(f"[dim]{run_dir.name}: finished earlier, skipped[/]")
            report = json.loads(report_file.read_text())
        else:
            resume = (run_dir / "checkpoint-last").exists() or (run_dir / ".checkpoint-last.old").exists()
            console.print(f"[bold]{run_dir.name}[/]" + (" (resuming)" if resume else ""))
            cfg = dataclasses.replace(base, output=str(run_dir), resume=resume, **setting)
            report = finetune(cfg)
        rows.append({**setting, "before_AP": (report.get("before") or {}).get("AP"),
                     **{k: (report.get("after") or {}).get(k) for k in ("AP", "AP50", "AP75")}, "run": run_dir.name})
    _write(root, keys, rows)
    return rows


def _write(root: Path, keys: list[str], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = "| " + " | ".join(keys) + " | AP | AP50 | AP75 | AP before |"
    lines = [f"# Sweep over {', '.join(keys)}", "", header, "|" + "---:|" * (len(keys) + 4)]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [f"{100 * r[m]:.2f}" if r[m] is not None else "—"
                                             for m in ("AP", "AP50", "AP75", "before_AP")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![AP against the swept value](sweep.png)", ""]
    atomic_write_text(root / "sweep.md", "\n".join(lines))
    atomic_write_text(root / "sweep.json", json.dumps(rows, indent=2))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        for fixed, group in itertools.groupby(sorted(rows, key=lambda r: tuple(r[k] for k in others + [key])),
                                              key=lambda r: tuple(r[k] for k in others)):
            group = list(group)
            label = ", ".join(f"{k}={v}" for k, v in zip(others, fixed)) or None
            ax.plot([r[key] for r in group], [100 * (r["AP"] or 0) for r in group], marker="o", label=label)
        if rows and rows[0]["before_AP"] is not None:
            ax.axhline(100 * rows[0]["before_AP"], color="grey", ls="--", label="before fine-tuning")
        if key == "sigma" or (key == "bins" and len({r[key] for r in rows}) > 2):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="COCO AP (val)", title=f"AP against {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "sweep.png", dpi=110)
    plt.close(fig)
