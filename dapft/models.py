"""Model families: loading any supported Hugging Face DETR-family detector, and the small adapters
that hold everything that differs between families.

A family adapter answers five questions, and the engine asks nothing else of a model:
  * how the model scores a (query, class) candidate (softmax over real classes, or sigmoid);
  * which of the model's own loss terms are matched detection terms of its decoder layers (what
    DAP replaces) and which stay (denoising groups, encoder / two-stage proposals);
  * how to compute only the terms that stay, with the model's own loss code, when DAP replaces the
    rest (so a `dap` step does not pay for matching and scoring every decoder layer twice);
  * how to list the decoder layers' outputs the model's own loss supervises;
  * the model's own Hungarian matcher (for matcher mode 'original') and query groups (Group DETR).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

SUPPORTED = ("detr", "conditional_detr", "dab-detr", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine",
             "lw_detr", "rf_detr")

# Model types that AutoModelForObjectDetection loads but DAP cannot train, and why.
UNSUPPORTED_WHY = {
    "yolos": "YOLOS has no decoder: its loss is DETR's, but dapft's adapters cover encoder-decoder DETRs only",
    "owlvit": "OWL-ViT is an open-vocabulary detector trained with text queries, not a one-to-one set predictor",
    "owlv2": "OWLv2 is an open-vocabulary detector trained with text queries, not a one-to-one set predictor",
    "grounding-dino": "Grounding DINO's classes come from a text prompt; DAP needs a fixed label set",
    "mm-grounding-dino": "MM Grounding DINO's classes come from a text prompt; DAP needs a fixed label set",
    "omdet-turbo": "OmDet-Turbo is an open-vocabulary detector with no fixed label set",
    "table-transformer": "Table Transformer is DETR-shaped but untested here; convert it to a DETR checkpoint",
    "deimv2": "DEIMv2 trains with one-to-many auxiliary matching (dense O2M), outside DAP's one-to-one scope",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    score: Literal["softmax", "sigmoid"]
    processor: str  # image processor class when a checkpoint ships none
    weights: Callable[[object], dict[str, float]]  # weight of each base loss term in the model's sum
    encoder_in_aux: bool = False  # the RT-DETR family appends the encoder proposals to its aux list
    denoising: bool = False
    grouped: bool = False  # Group DETR: several independent query groups in training
    keep: tuple[str, ...] = field(default=())  # regexes of loss keys kept as the model computes them
    clamp_boxes: bool = False  # the model's own loss clamps predicted boxes to [0, 1] (D-FINE)
    # (config, labels, device, *model loss args, **kwargs) -> (kept terms keyed as the model's loss
    # keys them, unweighted as it returns them; auxiliary outputs as its loss function returns them)
    kept_loss: Callable[..., tuple[dict, list | None]] = field(default=None)

    def scores(self, logits: Tensor) -> Tensor:
        """The model's own ranking score of every (query, class) pair, real classes only."""
        if self.score == "softmax":
            return logits.float().softmax(-1)[..., :-1]
        return logits.float().sigmoid()

    def num_groups(self, config, training: bool) -> int:
        return int(getattr(config, "group_detr", 1)) if (self.grouped and training) else 1

    def decoder_outputs(self, logits, pred_boxes, auxiliary_outputs, kwargs) -> list[dict]:
        """The decoder layers the model's own loss supervises, last layer last; denoising queries
        removed. `auxiliary_outputs` is the list the model's loss function returned."""
        meta = kwargs.get("denoising_meta_values")
        if self.denoising and meta is not None:
            logits = logits.split(meta["dn_num_split"], dim=1)[1]
            pred_boxes = pred_boxes.split(meta["dn_num_split"], dim=1)[1]
        aux = list(auxiliary_outputs or [])
        if self.encoder_in_aux and aux:
            aux = aux[:-1]
        if self.clamp_boxes:  # the auxiliary boxes come from the model's loss, already clamped
            pred_boxes = pred_boxes.clamp(0, 1)
        return [{"logits": a["logits"], "pred_boxes": a["pred_boxes"]} for a in aux] + [
            {"logits": logits, "pred_boxes": pred_boxes}
        ]

    def is_kept(self, key: str, num_aux: int) -> bool:
        patterns = [p.replace("{enc}", str(num_aux)) for p in self.keep]
        return any(re.search(p, key) for p in patterns)

    def original_matcher(self, config) -> Callable[[dict, list[dict]], list]:
        from transformers.loss import loss_deformable_detr, loss_for_object_detection, loss_lw_detr, loss_rt_detr

        if self.name in ("rt_detr", "rt_detr_v2", "d_fine"):
            return loss_rt_detr.RTDetrHungarianMatcher(config)
        costs = dict(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)
        if self.name == "detr":
            return loss_for_object_detection.HungarianMatcher(**costs)
        if self.grouped:
            matcher = loss_lw_detr.LwDetrHungarianMatcher(**costs)
            return lambda outputs, targets: matcher(outputs, targets, 1)  # called per group
        return loss_deformable_detr.DeformableDetrHungarianMatcher(**costs)


# ----------------------------------------------------------------------------------------------
# The kept terms alone. Each function receives what the model passes its loss function (after
# logits and pred_boxes) and uses the model's own loss classes, handing them only the outputs whose
# terms are kept: the kept outputs go where the criterion expects the final layer's, so its forward
# computes exactly their terms and nothing else, which are then renamed to the keys the full loss
# gives them. tests/test_models.py holds each to the model's full loss.


def _decoder_aux(outputs_class, outputs_coord) -> list[dict]:
    """Every decoder layer but the last, from (L, B, Q, ...) stacks: the list DETR-like losses return."""
    return [{"logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]


def _kept_nothing(config, labels, device, outputs_class=None, outputs_coord=None, *args, **kwargs):
    aux = None if outputs_class is None else _decoder_aux(outputs_class, outputs_coord)
    return {}, aux


def _kept_rt_detr(config, labels, device, outputs_class=None, outputs_coord=None, *, d_fine: bool = False,
                  **kwargs):
    """RT-DETR, RT-DETRv2, D-FINE: the encoder's top-k proposals and the denoising groups of every
    decoder layer (as RTDetrForObjectDetectionLoss / DFineForObjectDetectionLoss build them)."""
    if not config.auxiliary_loss or outputs_class is None:
        return {}, None
    from transformers.loss.loss_d_fine import DFineLoss, _set_aux_loss2
    from transformers.loss.loss_rt_detr import RTDetrLoss, _set_aux_loss

    meta = kwargs.get("denoising_meta_values")

    def split(t):  # (denoising queries, matched queries), stacks of (B, layers, queries, ...)
        return t.split(meta["dn_num_split"], dim=2) if meta is not None else (None, t)

    def layers(cls, box, corners=None, refs=None, teacher=()):  # (B, L, ...) stacks -> a dict per layer
        if not d_fine:
            return _set_aux_loss(cls.transpose(0, 1), box.transpose(0, 1))
        # D-FINE pairs logits, boxes, corners and references layer by layer and zip stops at the
        # shortest (its logits stack has one more entry, the pre-head layer's): kept as its loss has it.
        return _set_aux_loss2(cls.transpose(0, 1), box.transpose(0, 1), corners.transpose(0, 1),
                              refs.transpose(0, 1), *teacher)

    dn_class, out_class = split(outputs_class)
    dn_coord, out_coord = split(outputs_coord.clamp(min=0, max=1) if d_fine else outputs_coord)
    enc_boxes = kwargs["enc_topk_bboxes"]
    enc = {"logits": kwargs["enc_topk_logits"], "pred_boxes": enc_boxes.clamp(min=0, max=1) if d_fine else enc_boxes}
    dn_extra, aux_extra = {}, {}
    if d_fine:
        (dn_corners, out_corners), (dn_refs, out_refs) = split(kwargs["predicted_corners"]), split(
            kwargs["initial_reference_points"])
        aux_extra = dict(corners=out_corners[:, :-1], refs=out_refs[:, :-1], teacher=(out_corners[:, -1], out_class[:, -1]))
        if meta is not None:
            dn_extra = dict(corners=dn_corners, refs=dn_refs, teacher=(dn_corners[:, -1], dn_class[:, -1]))
    aux = layers(out_class[:, :-1], out_coord[:, :-1], **aux_extra) + [enc]
    outputs = dict(enc)  # in the final layer's place: the criterion's forward scores it alone
    if meta is not None:
        outputs.update(dn_auxiliary_outputs=layers(dn_class, dn_coord, **dn_extra), denoising_meta_values=meta)
    criterion = (DFineLoss if d_fine else RTDetrLoss)(config).to(device)
    enc_suffix = f"_aux_{len(aux) - 1}"  # the encoder comes after the decoder layers in the aux list
    terms = {(k if "_dn_" in k else k + enc_suffix): v for k, v in criterion(outputs, labels).items()}
    return terms, aux


def _kept_lw_detr(config, labels, device, outputs_class=None, outputs_coord=None, enc_outputs_class=None,
                  enc_outputs_coord=None, *args, **kwargs):
    """LW-DETR, RF-DETR: the two-stage encoder proposals (as LwDetrForObjectDetectionLoss builds them)."""
    from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss

    matcher = LwDetrHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                     giou_cost=config.giou_cost)
    criterion = LwDetrImageLoss(matcher=matcher, num_classes=config.num_labels, focal_alpha=config.focal_alpha,
                                losses=["labels", "boxes", "cardinality"], group_detr=config.group_detr).to(device)
    enc = {"logits": enc_outputs_class, "pred_boxes": enc_outputs_coord}
    terms = {k + "_enc": v for k, v in criterion(enc, labels).items()}
    aux = _decoder_aux(outputs_class, outputs_coord) if config.auxiliary_loss else None
    return terms, aux


def _detr_weights(config) -> dict[str, float]:
    return {"loss_ce": 1.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}


def _lw_weights(config) -> dict[str, float]:
    return {"loss_ce": config.class_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
            "loss_giou": config.giou_loss_coefficient}


def _preweighted(config) -> dict[str, float]:
    # RT-DETR and D-FINE weight their terms inside the criterion already.
    return {"loss_vfl": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0, "loss_fgl": 1.0, "loss_ddf": 1.0}


_RT_KEEP = (r"_dn_\d+$", r"_aux_{enc}$")  # denoising groups, and the encoder top-k proposals
_RT = dict(encoder_in_aux=True, denoising=True, keep=_RT_KEEP, kept_loss=_kept_rt_detr)
_LW = dict(grouped=True, keep=(r"_enc$",), kept_loss=_kept_lw_detr)
FAMILIES: dict[str, Family] = {
    "detr": Family("detr", "softmax", "DetrImageProcessor", _detr_weights, kept_loss=_kept_nothing),
    "conditional_detr": Family("conditional_detr", "sigmoid", "ConditionalDetrImageProcessor", _detr_weights,
                               kept_loss=_kept_nothing),
    "dab-detr": Family("dab-detr", "sigmoid", "ConditionalDetrImageProcessor", _detr_weights,
                       kept_loss=_kept_nothing),
    "deformable_detr": Family("deformable_detr", "sigmoid", "DeformableDetrImageProcessor", _detr_weights,
                              kept_loss=_kept_nothing),
    "rt_detr": Family("rt_detr", "sigmoid", "RTDetrImageProcessor", _preweighted, **_RT),
    "rt_detr_v2": Family("rt_detr_v2", "sigmoid", "RTDetrImageProcessor", _preweighted, **_RT),
    "d_fine": Family("d_fine", "sigmoid", "RTDetrImageProcessor", _preweighted, clamp_boxes=True,
                     **{**_RT, "kept_loss": partial(_kept_rt_detr, d_fine=True)}),
    "lw_detr": Family("lw_detr", "sigmoid", "DeformableDetrImageProcessor", _lw_weights, **_LW),
    "rf_detr": Family("rf_detr", "sigmoid", "RfDetrImageProcessor", _lw_weights, **_LW),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = UNSUPPORTED_WHY.get(model_type, "it is not a DETR-family one-to-one detector dapft has an adapter for")
    raise UnsupportedModelError(
        f"model type '{model_type}' is not supported: {why}. Supported: {', '.join(SUPPORTED)}")


# ----------------------------------------------------------------------------------------------
# Loading


BUNDLED_DIR = Path(__file__).parent / "checkpoints"


_VERIFIED: set[tuple[str, float]] = set()


def resolve_model(name: str | Path) -> str:
    """A local `save_pretrained` directory, a bundled short name ('dapft/tiny-rtdetr-shapes'), or a
    Hub id (as transformers resolves it). A local checkpoint that carries dapft's SHA-256 manifest
    (every checkpoint dapft writes) is verified before anything loads from it; a name that can only
    be a local path or a bundled model, and is neither, is refused here rather than after the Hub's
    retries."""
    import difflib

    from dapft.checkpoint import MANIFEST, verify_checkpoint

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

    from dapft.data import match_names, normalize_name

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
