"""Loading a detector and its processor: a Hub id, a save_pretrained folder, a dapft checkpoint
(verified against its manifest) or a bundled model; a label set changed to the dataset's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from dapft.modeling.families import Family, family_of

BUNDLED_DIR = Path(__file__).parents[1] / "checkpoints"


_VERIFIED: set[tuple[str, float]] = set()


def resolve_model(name: str | Path) -> str:
    """A local `save_pretrained` directory, a bundled short name ('dapft/tiny-rtdetr-shapes'), or a
    Hub id (as transformers resolves it). A local checkpoint that carries dapft's SHA-256 manifest
    (every checkpoint dapft writes) is verified before anything loads from it; a name that can only
    be a local path or a bundled model, and is neither, is refused here rather than after the Hub's
    retries."""
    import difflib

    from dapft.utils.checkpoint import MANIFEST, verify_checkpoint

    path = Path(name).expanduser()
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file() and (str(path.resolve()), manifest.stat().st_mtime) not in _VERIFIED:
            verify_checkpoint(path)
            _VERIFIED.add((str(path.resolve()), manifest.stat().st_mtime))
        return str(path)
    if path.exists():
        raise ValueError(f"--model {name}: a file; give the directory that holds config.json and the weights")
    short = str(name)
    if short.startswith("dapft/"):
        if (BUNDLED_DIR / short.split("/", 1)[1]).is_dir():
            return str(BUNDLED_DIR / short.split("/", 1)[1])
        close = difflib.get_close_matches(short, bundled_models(), n=1)
        raise ValueError(f"--model {name}: no bundled detector of that name"
                         + (f"; did you mean {close[0]}?" if close else "")
                         + f" (bundled: {', '.join(bundled_models()) or 'none'})")
    local_parent = Path(short).parent != Path(".") and Path(short).parent.is_dir()  # 'runs/x' with runs/ here
    if short.startswith(("/", ".", "~")) or short.count("/") > 1 or "\\" in short or local_parent:
        raise ValueError(f"--model {name}: no such directory (a Hub id is 'organisation/name')")
    return short


def bundled_models() -> list[str]:
    """Short names of the tiny detectors shipped in the package (see scripts/train_tiny_detectors.py)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(f"dapft/{p.name}" for p in BUNDLED_DIR.iterdir() if (p / "bundled.json").is_file())


def load_processor(path: str, family: Family):
    """The checkpoint's image processor. A local checkpoint must carry its preprocessor_config.json:
    the family's default processor (800 px, ImageNet normalisation) is not what a model trained at
    another size or normalisation was trained on, and scores near zero without a word. A Hub id
    keeps transformers' behaviour (the family's defaults where the repository has no config)."""
    import transformers

    if Path(path).is_dir() and not (Path(path) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path}: no preprocessor_config.json (the checkpoint's image processor: resize, "
                                "normalisation, padding); save it with processor.save_pretrained() into that folder, "
                                "or copy it from the checkpoint the model came from")
    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        return getattr(transformers, family.processor)()


def _offline(config):
    """A copy of `config` that builds without downloading a pretrained backbone."""
    import copy

    config = copy.deepcopy(config)
    if getattr(config, "use_pretrained_backbone", False):
        config.use_pretrained_backbone = False
    return config


def _class_indexed(detector) -> list[str]:
    """Names of the detector's tensors indexed by class: those whose shape follows the number of
    labels, found by building the same architecture with one label more on the meta device (no
    memory, no weights)."""
    from transformers import AutoModelForObjectDetection

    config = _offline(detector.config)
    labels = {int(k): v for k, v in config.id2label.items()}
    labels[len(labels)] = "__probe__"
    config.id2label, config.label2id = labels, {v: k for k, v in labels.items()}
    with torch.device("meta"):
        probe = AutoModelForObjectDetection.from_config(config).state_dict()
    return [k for k, v in detector.state_dict().items() if k in probe and probe[k].shape != v.shape]


def load_detector(model: str | Path, *, id2label: dict[int, str] | None = None, log: Callable[[str], None] = print):
    """Load a detector, its image processor and its family adapter.

    With `id2label` different from the checkpoint's, the classifier is resized and re-initialised
    (and the user told so); classes present in both label sets (same name) keep their trained rows.
    """
    from transformers import AutoConfig, AutoModelForObjectDetection

    from dapft.data.labels import match_names, normalize_name

    path = resolve_model(model)
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    original = AutoModelForObjectDetection.from_pretrained(path)
    old_labels = {int(k): v for k, v in config.id2label.items()}
    same = id2label is not None and {int(k): normalize_name(v) for k, v in id2label.items()} == {
        k: normalize_name(v) for k, v in old_labels.items()}
    if id2label is None or same:
        return original, load_processor(path, family), family
    new_labels = {int(k): v for k, v in id2label.items()}
    detector = AutoModelForObjectDetection.from_pretrained(
        path, id2label=new_labels, label2id={v: k for k, v in new_labels.items()}, ignore_mismatched_sizes=True)
    rows = match_names(new_labels, old_labels)  # new class index -> old one, by name
    old_state, state = original.state_dict(), detector.state_dict()
    n_old, n_new = len(old_labels), len(new_labels)
    class_keys = _class_indexed(detector)
    if n_old == n_new:
        # Same shapes: from_pretrained kept every class row by position, under the new names. Start
        # the class-indexed tensors afresh, as it does when the number of classes changes.
        fresh = AutoModelForObjectDetection.from_config(_offline(detector.config)).state_dict()
        with torch.no_grad():
            for name in class_keys:
                state[name].copy_(fresh[name])
    copied = 0
    with torch.no_grad():
        for name in class_keys:
            param, old = state[name], old_state.get(name)
            extra = old.shape[0] - n_old if old is not None else -1  # DETR's no-object row, RT-DETR's padding row
            if extra < 0 or param.shape[0] - n_new != extra or old.shape[1:] != param.shape[1:]:
                continue
            for new_i, old_i in rows.items():
                param[new_i] = old[old_i]
            for k in range(extra):
                param[n_new + k] = old[n_old + k]
            copied += 1
    from rich.markup import escape  # class names are user text: "[bracketed]" names must print as they are

    kept = escape(", ".join(new_labels[i] for i in sorted(rows)) or "none")
    log(f"label set changed ({n_old} -> {n_new} classes): the classifier was "
        f"{'resized and ' if n_old != n_new else ''}re-initialised; "
        f"classes kept from the checkpoint by name: {kept} ({copied} class-indexed tensors carried over)")
    return detector, load_processor(path, family), family
