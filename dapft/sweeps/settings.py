"""What a sweep is: the settings it may vary, their combinations (a grid), and each run's name."""

from __future__ import annotations

import itertools

# Settings a sweep may vary (FinetuneConfig fields), in the order run names list them.
SWEEPABLE = ("loss", "matcher", "sigma", "bins", "batch_size", "lr", "seed")
# Settings only the DAP loss reads: the `original` loss runs once per value of the others.
DAP_ONLY = ("matcher", "sigma", "bins")


def run_name(setting: dict) -> str:
    # repr: values that differ never print alike (1e-4 and 1.0000001e-4 would under "%g")
    return "_".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def expand(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in grid order. With loss `original` the DAP-only
    settings mean nothing: those combinations collapse to one run (named without them)."""
    unknown = [k for k in grid if k not in SWEEPABLE]
    if unknown:
        raise ValueError(f"cannot sweep {unknown}; sweepable settings: {', '.join(SWEEPABLE)}")
    keys = sorted(grid, key=SWEEPABLE.index)
    settings: list[dict] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, values))
        if setting.get("loss") == "original":
            setting = {k: v for k, v in setting.items() if k not in DAP_ONLY}
        if setting not in settings:
            settings.append(setting)
    return settings
