"""Where and how things run: device, mixed precision, seeding, progress bars, atomic files."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def quiet_transformers() -> None:
    """dapft draws its own progress bars; transformers' per-file loading bars would interleave."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def amp_dtype(precision: str, device: torch.device):
    """bf16/fp16 autocast on GPU; float32 on CPU whatever is asked (CPU autocast is slow and inexact)."""
    if precision not in ("auto", "bf16", "fp16", "fp32", "float32", "no"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision in ("fp32", "float32", "no"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16 if (precision == "bf16" or torch.cuda.is_bf16_supported()) else torch.float16
    return torch.float16  # fp16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=disable, transient=False,
    )


def check_writable(folder: Path, flag: str = "--output") -> None:
    """Before any long work: the folder can be made and written to (a read-only or full disk shows
    here, not after an hour of inference or training). Leaves the folder, empty, in place."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dapft-write-check-"):
            pass
    except OSError as exc:
        raise OSError(f"{flag} {folder}: cannot write there ({exc.strerror or exc}); choose another {flag}") from None


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and `timeout` send before they kill) for
    the length of a run: the first asks the loop to save a resumable checkpoint at the next step
    boundary and stop (`signum` says which came); a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log):
        self.signum, self.log, self.previous = 0, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: saving a resumable checkpoint at the end of this step "
                 "(Ctrl-C again to quit at once, losing the steps since the last checkpoint)")
