"""Dataset categories and a model's labels: matched by name, or by a --label-map file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dapft.data.coco_file import DataError


def normalize_name(name: str) -> str:
    """Class names compare case-, space-, '_'- and '-'-insensitively ('traffic_light' = 'Traffic light')."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def match_names(names: dict[int, str], candidates: dict[int, str]) -> dict[int, int]:
    """id in `names` -> id in `candidates` with the same (normalised) name; the first such candidate
    wins, and names without a match are left out."""
    by_name: dict[str, int] = {}
    for idx, name in candidates.items():
        by_name.setdefault(normalize_name(name), idx)
    return {i: by_name[normalize_name(n)] for i, n in names.items() if normalize_name(n) in by_name}


def read_label_map(path: str | Path) -> dict[int, int]:
    """A --label-map file: {"dataset category id": model label index}, integers both."""
    expected = 'expected a JSON object {"dataset category id": model label index}, e.g. {"1": 0, "7": 1}'
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label map ({exc.strerror or exc}); {expected}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not JSON ({exc}); {expected}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a JSON {type(raw).__name__}; {expected}")
    mapping = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}: category {key!r} maps to {json.dumps(value)}, not a model label index; {expected}")
        try:
            mapping[int(key)] = value
        except ValueError:
            raise DataError(f"{path}: key {key!r} is not a dataset category id; {expected}") from None
    return mapping


@dataclass(frozen=True)
class LabelMap:
    """dataset category id <-> model label index."""

    to_model: dict[int, int]

    @property
    def to_dataset(self) -> dict[int, int]:
        return {v: k for k, v in self.to_model.items()}

    @classmethod
    def build(cls, categories: list[dict], id2label: dict, mapping_file: str | Path | None = None,
              *, where: str = "the dataset") -> "LabelMap":
        """By name (DETR's 91-slot COCO ids and RT-DETR's 80 contiguous classes both map), or from an
        explicit JSON file {"dataset category id": model label index}."""
        id2label = {int(k): v for k, v in id2label.items()}
        if mapping_file is not None:
            mapping = read_label_map(mapping_file)
            unknown = [v for v in mapping.values() if v not in id2label]
            if unknown:
                raise DataError(f"{mapping_file}: model label indices {unknown} do not exist in the model "
                                f"(it has {len(id2label)} labels)")
            missing = [c["id"] for c in categories if c["id"] not in mapping]
            if missing:
                raise DataError(f"{mapping_file}: no entry for dataset category ids {missing}")
            strangers = sorted(set(mapping) - {c["id"] for c in categories})
            if strangers:
                raise DataError(f"{mapping_file}: category ids {strangers} are not in {where}'s categories; "
                                "remove them or fix the ids")
            by_label: dict[int, list[int]] = {}
            for category, label in sorted(mapping.items()):
                by_label.setdefault(label, []).append(category)
            shared = [(label, ids) for label, ids in sorted(by_label.items()) if len(ids) > 1]
            if shared:
                label, ids = shared[0]
                raise DataError(f"{mapping_file}: dataset categories {ids} all map to model label {label}; "
                                "each category needs a label of its own (AP is computed per category)")
            return cls(mapping)
        mapping = match_names({c["id"]: c["name"] for c in categories}, id2label)
        missing = [c["name"] for c in categories if c["id"] not in mapping]
        if missing:
            raise DataError(
                f"{where}: categories {missing[:10]}{' ...' if len(missing) > 10 else ''} are not among the "
                f"model's labels (e.g. {list(id2label.values())[:5]}). Pass a label-map JSON "
                "{dataset_category_id: model_label_index}, or fine-tune, which resizes the classifier")
        return cls(mapping)
