"""Model families: loading any supported Hugging Face DETR-family detector, and the small adapters
that hold everything that differs between families.

A family adapter answers five questions, and the engine asks nothing else of a model:
  * how the model scores a (query, class) candidate (softmax over real classes, or sigmoid);
  * which of the model's own loss terms are matched detection terms of its decoder layers (what
    DAP replaces) and which stay (denoising groups, encoder / two-stage proposals);
  * how to compute only the terms that stay, with the model's own loss code, when DAP replaces the
    rest (so a `dap` step does not pay for matching and scoring every decoder layer twice);
  * how to list the decoder layers' outputs the model's own loss supervises;
  * the model's own Hungarian matcher (for matcher mode 'original') and query groups (Group DETR)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal

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
