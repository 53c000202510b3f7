"""Checkpoints on their own (dapft.utils.checkpoint): what is written, how a damaged one is refused, which
one a resume takes after a crash between the two renames, and that the state comes back as saved."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dapft.data.shapes import CLASSES
from dapft.modeling.tiny import tiny_model, tiny_processor
from dapft.utils.checkpoint import (
    MANIFEST,
    CheckpointError,
    find_resumable,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    return tiny_model("detr", dict(enumerate(CLASSES))), tiny_processor("detr")


def _save(folder, model_and_processor, step: int):
    model, processor = model_and_processor
    state = {"state": {"global_step": step}, "weights": torch.arange(4.0) + step}
    save_checkpoint(folder, model, processor, state, {"global_step": step}, card=f"step {step}")


def test_a_checkpoint_is_loadable_shared_and_verified_file_by_file(tmp_path, model_and_processor):
    from transformers import AutoModelForObjectDetection

    previous = os.umask(0o022)
    try:
        _save(tmp_path / "checkpoint-last", model_and_processor, 3)
    finally:
        os.umask(previous)
    folder = tmp_path / "checkpoint-last"
    # every file as the run's other outputs are: readable by all (transformers writes its weights 0600)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    manifest = verify_checkpoint(str(folder))  # a path as a string, as library users give one
    assert manifest["global_step"] == 3
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert (folder / "README.md").read_text() == "step 3"
    AutoModelForObjectDetection.from_pretrained(folder)
    state = load_trainer_state(str(folder))
    assert state["state"] == {"global_step": 3} and torch.equal(state["weights"], torch.arange(4.0) + 3)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary or old copy left


def test_a_damaged_checkpoint_is_refused_naming_what_is_wrong(tmp_path, model_and_processor):
    folder = tmp_path / "checkpoint-last"
    _save(folder, model_and_processor, 1)
    (folder / "README.md").write_text("step 1, edited")  # same name, other bytes
    with pytest.raises(CheckpointError, match="README.md: contents do not match the manifest"):
        verify_checkpoint(folder)
    _save(folder, model_and_processor, 2)  # replaces it whole
    verify_checkpoint(folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="file preprocessor_config.json is missing"):
        load_trainer_state(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_checkpoint(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a complete dapft checkpoint"):
        verify_checkpoint(folder)


def test_a_resume_takes_the_last_checkpoint_or_the_one_a_crash_left_beside_it(tmp_path, model_and_processor):
    assert find_resumable(tmp_path) is None
    _save(tmp_path / "checkpoint-last", model_and_processor, 1)
    _save(tmp_path / "checkpoint-last", model_and_processor, 2)
    assert find_resumable(tmp_path) == tmp_path / "checkpoint-last"
    assert json.loads((tmp_path / "checkpoint-last" / MANIFEST).read_text())["global_step"] == 2
    # a crash after the old one was moved aside and before the new one took its place
    (tmp_path / "checkpoint-last").rename(tmp_path / ".checkpoint-last.old")
    assert find_resumable(tmp_path) == tmp_path / ".checkpoint-last.old"
    assert load_trainer_state(find_resumable(tmp_path))["state"]["global_step"] == 2
