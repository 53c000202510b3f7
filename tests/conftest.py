from __future__ import annotations

import os

# Under pytest-xdist the workers share the machine's cores: one thread each (torch reads this when
# imported, and the CLI subprocesses inherit it), or two workers' OpenMP threads on 2 cores spin
# against each other and in-process training tests run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ["OMP_NUM_THREADS"] = "1"

import json
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest

from dapft.data.shapes import make_shapes_dataset

warnings.filterwarnings("ignore", message=".*TypedStorage.*")
# The image-check verdicts of this test session (inherited by the CLI subprocesses), not ~/.cache's.
os.environ["DAPFT_CACHE"] = tempfile.mkdtemp(prefix="dapft-cache-")

# COCO names with COCO's original (gapped) ids, so both label conventions can be exercised.
COCO_SUBSET = {1: "person", 18: "dog", 44: "bottle", 90: "toothbrush", 13: "stop sign", 85: "clock"}
REPO = Path(__file__).resolve().parent.parent


def _tree_changes() -> set[str] | None:
    """The files and folders in the checkout that git does not track, ignored ones included (a
    tracker's ./mlruns, a run's ./runs), less Python's bytecode caches; None outside a git
    checkout. (Changes to tracked files are left out: a developer edits them while the suite runs.)"""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "--untracked-files=normal"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line for line in out.stdout.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="session", autouse=True)
def leaves_the_working_tree_as_it_found_it():
    """Fails the suite (an error at the last test's teardown) when a test wrote into the checkout:
    tests write under their temporary folders, never beside the code."""
    before = _tree_changes()
    yield
    after = _tree_changes()
    if before is not None and after is not None and after - before:
        pytest.fail("the tests changed the working tree (write into tmp_path instead):\n  "
                    + "\n  ".join(sorted(after - before)), pytrace=False)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train_images=24, val_images=12, seed=3)


@pytest.fixture(scope="session")
def coco_named_root(tmp_path_factory, shapes_root):
    """The shapes images relabelled with COCO category ids and names."""
    root = tmp_path_factory.mktemp("coco_named")
    ids = list(COCO_SUBSET)
    for split in ("train", "val"):
        shutil.copytree(shapes_root / f"{split}2017", root / f"{split}2017")
        data = json.loads((shapes_root / "annotations" / f"instances_{split}2017.json").read_text())
        data["categories"] = [{"id": ids[c["id"] - 1], "name": COCO_SUBSET[ids[c["id"] - 1]]} for c in data["categories"]]
        for a in data["annotations"]:
            a["category_id"] = ids[a["category_id"] - 1]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory):
    """A randomly initialised tiny DETR checkpoint with its processor (the shapes classes)."""
    from dapft.data.shapes import CLASSES
    from dapft.modeling.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("detr", tmp_path_factory.mktemp("tiny") / "detr", dict(enumerate(CLASSES)),
                                image_size=128)
