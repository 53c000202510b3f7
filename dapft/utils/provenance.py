"""The software a run ran on (dapft's version and commit, torch, transformers, Python), recorded at
each start and resume."""

from __future__ import annotations

from pathlib import Path


def software() -> dict:
    """What produced a number: dapft's version and, run from a git checkout (an editable install),
    its commit and whether dapft/ had uncommitted changes; torch, transformers and Python. A run
    records it at each start and resume, a sweep checks that its runs agree."""
    import platform
    import subprocess

    import torch
    import transformers

    from dapft import __version__

    root = Path(__file__).resolve().parents[2]  # the repository, in a clone
    commit = modified = None
    if (root / ".git").exists():  # a directory in a clone, a file in a worktree
        def git(*args: str) -> str | None:
            try:
                done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                      check=False, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return done.stdout.strip() if done.returncode == 0 else None

        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", "dapft") if commit else None
        modified = None if status is None else bool(status)
    # str(): torch's version is a str subclass, which trainer_state.pt's weights-only loading refuses.
    return {"dapft": __version__, "commit": commit, "modified": modified, "torch": str(torch.__version__),
            "transformers": transformers.__version__, "python": platform.python_version()}


def software_line(entry: dict) -> str:
    """One software record in words: `dapft 0.1.0 (commit 1a2b3c4d5e), torch ..., transformers ...`."""
    code = f"dapft {entry['dapft']}"
    if entry.get("commit"):
        changed = ", with uncommitted changes" if entry.get("modified") else ""
        code += f" (commit {entry['commit'][:10]}{changed})"
    return f"{code}, torch {entry['torch']}, transformers {entry['transformers']}, Python {entry['python']}"
