"""What the tests that run dapft for real share: the CLI in a subprocess, and reading a run's weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["--num-workers", "0", "--no-progress", "--batch-size", "4", "--device", "cpu"]


def dapft(*args, check=True, timeout=300, env=None, **kw):
    """`python -m dapft ARGS` in a subprocess, as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "dapft", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"dapft {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def weights(run_dir: Path, name="checkpoint-last") -> dict[str, torch.Tensor]:
    return load_file(run_dir / name / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"
