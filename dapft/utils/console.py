"""What a run prints: the console, progress bars, and transformers' own warnings kept quiet."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

console = Console(stderr=True)


def quiet_transformers() -> None:
    """dapft draws its own progress bars; transformers' per-file loading bars would interleave.
    Through the environment, which transformers reads when imported (`dapft --help` imports it not)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def make_progress(disable: bool = False) -> Progress:
    """Bars that read whole in an 80-column terminal: counts and times first, at fixed widths, then
    the run's figures (loss, rate, images/s), wrapped onto a second line rather than cut."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(ratio=1, overflow="fold")),
        console=console, disable=disable, transient=False,
    )
