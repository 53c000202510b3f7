"""Checkpoints: `save_pretrained` directories (model + image processor, loadable by
`AutoModelForObjectDetection.from_pretrained`) plus `trainer_state.pt` with everything needed to
resume exactly. Written to a temporary directory and renamed into place; a manifest with each
file's size and SHA-256, written last, is what makes a checkpoint valid."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "dapft_checkpoint.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, model, processor, trainer_state: dict | None, info: dict,
                    card: str | None = None) -> None:
    """Atomically replace the checkpoint directory `path`; `card` is its README.md (model card)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    # transformers writes model.safetensors for its owner alone (0600: a temporary file renamed). A
    # checkpoint is shared like every other output, so its files all take the mode the umask gave
    # the config file.
    mode = (tmp / "config.json").stat().st_mode & 0o777
    for p in tmp.iterdir():
        if p.is_file():
            p.chmod(mode)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files, **info}, indent=2, default=str), encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; a clear error otherwise."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: not a complete dapft checkpoint (no {MANIFEST}; the run was probably "
                              "interrupted while writing it). Delete it, or resume from another checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_file}: unreadable manifest ({exc}); the checkpoint is corrupt") from exc
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing; the checkpoint is incomplete")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: contents do not match the manifest (corrupt or modified); "
                                  f"restore it, or, to use a deliberately edited checkpoint, delete its {MANIFEST}")
    return manifest


def find_resumable(run_dir: Path) -> Path | None:
    """checkpoint-last, or its previous version if a crash hit between the two renames."""
    for name in ("checkpoint-last", ".checkpoint-last.old"):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def load_trainer_state(path: Path) -> dict:
    verify_checkpoint(path)
    # Tensors, numbers, strings, tuples and dicts only: no pickled code runs when a run is resumed.
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=True)
