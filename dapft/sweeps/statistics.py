"""A sweep's statistics: mean and standard deviation over seeds, and each setting compared with its
`original`-loss control run for run by seed (paired differences)."""

from __future__ import annotations

import math
import statistics

from dapft.analysis.errors import ORACLES, TIDE_TYPES
from dapft.sweeps.settings import DAP_ONLY, run_name

METRICS = ("AP", "AP50", "AP75")
TRAIN_METRICS = ("train_AP", "train_AP50", "train_AP75")  # with --train-eval-images
# The last evaluation's error breakdown (dapft.analysis.errors): TIDE's dAP per error type, the
# calibration error
ERROR_TYPES = TIDE_TYPES + ORACLES
ERROR_METRICS = tuple(f"dAP_{k}" for k in ERROR_TYPES) + ("ECE",)


def paired(differences: list[float]) -> dict:
    """Mean of paired differences with its Student-t 95% interval (None for one pair)."""
    from scipy.stats import t

    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"n": n, "mean_difference": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(differences)
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean_difference": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def summarize(rows: list[dict], keys: list[str], before: dict | None) -> dict:
    """Mean +- sd over seeds per setting, and each setting's paired comparison by seed against the
    `original`-loss run with the same values of the settings the original loss reads."""
    setting_keys = [k for k in keys if k != "seed"]
    metrics = METRICS + (TRAIN_METRICS if any(r.get("train_AP") is not None for r in rows) else ())
    errors = ERROR_METRICS if any(r.get("dAP_Cls") is not None for r in rows) else ()

    def label(row: dict) -> str:
        return run_name({k: row[k] for k in setting_keys if k in row}) or "base"

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(label(row), []).append(row)
    settings = []
    for name, group in groups.items():
        entry = {"setting": name, **{k: group[0][k] for k in setting_keys if k in group[0]},
                 "seeds": [r["seed"] for r in group]}
        for m in metrics + errors:
            values = [r[m] for r in group if r.get(m) is not None]
            entry[m] = {"mean": statistics.fmean(values) if values else None,
                        "sd": statistics.stdev(values) if len(values) > 1 else None, "values": values}
        settings.append(entry)

    comparisons = []
    baselines = [r for r in rows if r.get("loss") == "original"]
    for name, group in groups.items():
        if group[0].get("loss", "original") == "original":
            continue
        shared = [k for k in setting_keys if k not in DAP_ONLY and k != "loss"]
        base = {r["seed"]: r for r in baselines if all(r.get(k) == group[0].get(k) for k in shared)}
        for m in metrics + errors:
            pairs = [(r[m], base[r["seed"]][m]) for r in group
                     if r["seed"] in base and r.get(m) is not None and base[r["seed"]].get(m) is not None]
            if pairs:
                baseline = label(next(iter(base.values())))
                comparisons.append({"setting": name, "baseline": baseline, "metric": m,
                                    **paired([a - b for a, b in pairs])})
    return {"keys": keys, "metrics": list(metrics), "errors": list(errors), "before": before, "runs": rows,
            "settings": settings, "comparisons": comparisons}


RUNNING = "running"  # a run another worker holds
