"""Every supported family, as a tiny real transformers model: DAP trains it, the kept losses are
the model's own, and checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from dapft.modeling.families import UnsupportedModelError, family_of
from dapft.modeling.loading import load_detector
from dapft.modeling.tiny import TINY_FAMILIES, tiny_model, tiny_processor
from dapft.objective.criterion import DAPCriterion
from dapft.objective.detection_loss import LOSS_CONFIGS, install_loss

LABELS = {i: f"c{i}" for i in range(5)}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 96, 96, generator=g)
    targets = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.25, 0.3, 0.2, 0.25]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.7, 0.6, 0.2, 0.4]])},
    ]
    return x, targets


def _self_targets(model, x, per_image=2):
    """Targets the model already nearly predicts: its top-scored queries' boxes (shrunk a little) and
    classes. DAP is meant for fine-tuning: at random initialisation no match reaches IoU 0.5 and
    positives do not outrank negatives, so the interpolated AP is flat and gives no gradient."""
    family = family_of(model.config)
    with torch.no_grad():
        out = model(pixel_values=x)
    scores = family.scores(out.logits)[:, : model.config.num_queries]
    targets = []
    for s, boxes in zip(scores, out.pred_boxes):
        best, cls = s.max(-1)
        q = best.topk(per_image).indices
        b = boxes[q].clone()
        # IoUs about 0.94 and 0.72: L_int's slope at an IoU is the precision at the next threshold
        # up, so the box gradient needs a match above the other one.
        b[:, 2:] *= torch.tensor([0.97, 0.85])[:per_image, None]
        targets.append({"class_labels": cls[q].clone(), "boxes": b})
    return targets


def _model(family, loss="dap", matcher="constant"):
    torch.manual_seed(0)
    model = tiny_model(family, LABELS)
    fam = family_of(model.config)
    crit = DAPCriterion(fam, model.config, matcher=matcher) if loss != "original" else None
    install_loss(model, fam, loss, crit)
    model.train()
    return model, crit


def _grad_norm(model, words):
    total = 0.0
    for name, p in model.named_parameters():
        if p.grad is not None and any(w in name for w in words):
            total += float(p.grad.abs().sum())
    return total


CLASS_HEAD = ("class_labels_classifier", "class_embed")
BOX_HEAD = ("bbox_predictor", "bbox_embed")


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("loss", LOSS_CONFIGS)
def test_every_loss_trains_every_part_of_the_model(family, loss):
    for matcher in (("constant", "momentum", "original") if loss != "original" else ("constant",)):
        model, _ = _model(family, loss, matcher)
        x, _ = _batch()
        targets = _self_targets(model, x)
        out = model(pixel_values=x, labels=targets)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert _grad_norm(model, CLASS_HEAD) > 0, f"{family}/{loss}/{matcher}: no gradient in the class head"
        assert _grad_norm(model, BOX_HEAD) > 0, f"{family}/{loss}/{matcher}: no gradient in the box head"
        assert _grad_norm(model, ("backbone",)) > 0, f"{family}/{loss}/{matcher}: no gradient in the backbone"
        if loss != "original":
            assert "loss_dap" in out.loss_dict and 0 <= float(out.loss_dict["dap"]) <= 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_original_terms_are_the_models_own(family):
    x, targets = _batch()
    model, _ = _model(family, "original")
    torch.manual_seed(1)  # denoising queries are random
    own = model(pixel_values=x, labels=targets)
    install_loss(model, family_of(model.config), "dap+original", DAPCriterion(family_of(model.config), model.config))
    torch.manual_seed(1)
    mixed = model(pixel_values=x, labels=targets)
    dap = sum(v for k, v in mixed.loss_dict.items() if k.startswith("loss_dap"))
    torch.testing.assert_close(mixed.loss - dap, own.loss)
    # and with the hook removed the model's own loss is back, untouched
    install_loss(model, family_of(model.config), "original", None)
    torch.manual_seed(1)
    torch.testing.assert_close(model(pixel_values=x, labels=targets).loss, own.loss)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dap_plus_box_adds_exactly_the_models_own_box_terms(family):
    # `dap+box`: DAP, the terms DAP keeps anyway, and the model's own L1 and GIoU box terms of every
    # decoder layer, weighted as the model weights them; none of its classification terms.
    x, targets = _batch()
    model, _ = _model(family, "original")
    fam = family_of(model.config)
    torch.manual_seed(1)
    own = model(pixel_values=x, labels=targets).loss_dict
    install_loss(model, fam, "dap+box", DAPCriterion(fam, model.config))
    torch.manual_seed(1)
    mixed = model(pixel_values=x, labels=targets)
    weights = fam.weights(model.config)
    expected = sum(v for k, v in mixed.loss_dict.items() if k.startswith("loss_dap"))
    box_terms = 0
    for k, v in own.items():
        base = next((b for b in weights if k.startswith(b)), None)
        if base is None or weights[base] == 0:
            continue
        if base in ("loss_bbox", "loss_giou") or fam.is_kept(k, model.config.decoder_layers - 1):
            expected = expected + weights[base] * v
            box_terms += base in ("loss_bbox", "loss_giou")
    assert box_terms >= model.config.decoder_layers * 2  # both box terms of every decoder layer at least
    torch.testing.assert_close(mixed.loss, expected)


@pytest.mark.parametrize("family", ["rt_detr", "rt_detr_v2", "d_fine", "lw_detr", "rf_detr"])
def test_denoising_and_encoder_losses_unchanged_under_dap(family):
    x, targets = _batch()
    model, _ = _model(family, "original")
    torch.manual_seed(3)
    own = model(pixel_values=x, labels=targets).loss_dict
    install_loss(model, family_of(model.config), "dap", DAPCriterion(family_of(model.config), model.config))
    torch.manual_seed(3)
    with_dap = model(pixel_values=x, labels=targets).loss_dict
    kept = [k for k in with_dap if k.startswith("loss_") and not k.startswith("loss_dap")]  # not DAP, not diagnostics
    assert kept, "this family keeps denoising or encoder terms"
    assert all(("_dn_" in k) or k.endswith("_enc") or "_aux_" in k for k in kept)
    fam = family_of(model.config)
    weights = fam.weights(model.config)
    own_kept = [k for k in own if k.startswith("loss_") and fam.is_kept(k, model.config.decoder_layers - 1)]
    assert sorted(kept) == sorted(own_kept), "every kept term of the model's loss, and only those"
    for k in kept:
        base = next(b for b in weights if k.startswith(b))
        torch.testing.assert_close(with_dap[k], weights[base] * own[k])
    # the decoder layers' matched detection terms are gone
    assert not any(k in with_dap for k in ("loss_vfl", "loss_ce", "loss_bbox", "loss_giou"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_and_reload_give_the_same_outputs(family, tmp_path):
    model, _ = _model(family, "dap")
    x, targets = _batch()
    model(pixel_values=x, labels=targets).loss.backward()  # a training step's hook must not leak into the files
    model.eval()
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForObjectDetection

    again = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(pixel_values=x), again(pixel_values=x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes)


def test_changing_the_label_set_keeps_classes_with_the_same_name(tmp_path):
    torch.manual_seed(0)
    tiny_model("detr", {0: "cat", 1: "dog", 2: "bird"}).save_pretrained(tmp_path)
    tiny_processor("detr").save_pretrained(tmp_path)  # a checkpoint comes with its processor
    from transformers import AutoModelForObjectDetection

    old = AutoModelForObjectDetection.from_pretrained(tmp_path)
    messages = []
    new, _, _ = load_detector(tmp_path, id2label={0: "dog", 1: "fish", 2: "cat", 3: "horse"}, log=messages.append)
    assert "resized" in messages[0] and "dog" in messages[0] and "cat" in messages[0]
    w_old, w_new = old.class_labels_classifier.weight, new.class_labels_classifier.weight
    assert w_new.shape[0] == 5  # four classes and DETR's no-object
    torch.testing.assert_close(w_new[0], w_old[1])  # dog
    torch.testing.assert_close(w_new[2], w_old[0])  # cat
    torch.testing.assert_close(w_new[4], w_old[3])  # no-object
    assert new.config.id2label[1] == "fish"


@pytest.mark.parametrize("family", ["detr", "rt_detr", "deformable_detr_box_refine"])
def test_a_new_label_set_of_the_same_size_is_not_kept_by_position(tmp_path, family):
    # Same number of classes, other names: from_pretrained would keep every class row by position
    # (a 'cat' row answering for 'fish'). Only rows whose class name is in both sets may be kept.
    torch.manual_seed(0)
    trained = tiny_model(family, {0: "cat", 1: "dog", 2: "bird"})
    with torch.no_grad():  # as if trained: no row equals what a fresh initialisation gives
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    trained.save_pretrained(tmp_path)
    tiny_processor(family).save_pretrained(tmp_path)
    from transformers import AutoModelForObjectDetection

    from dapft.modeling.loading import _class_indexed

    old = AutoModelForObjectDetection.from_pretrained(tmp_path)
    new, _, _ = load_detector(tmp_path, id2label={0: "fish", 1: "dog", 2: "cat"}, log=lambda _: None)
    keys = _class_indexed(new)
    assert keys
    before, after = old.state_dict(), new.state_dict()
    for k in keys:
        torch.testing.assert_close(after[k][1], before[k][1])  # dog: same row
        torch.testing.assert_close(after[k][2], before[k][0])  # cat: moved from row 0
        assert not torch.equal(after[k][0], before[k][0]), k  # fish: not cat's old row
        if after[k].shape[0] > 3:  # DETR's no-object, RT-DETR's denoising padding
            torch.testing.assert_close(after[k][3:], before[k][3:])
    # 'fish' starts as transformers initialises a class (biases are constants: 0, or a focal
    # prior for RT-DETR), not from any trained row.
    fresh = AutoModelForObjectDetection.from_config(new.config).state_dict()
    for k in (k for k in keys if k.endswith("bias")):
        torch.testing.assert_close(after[k][0], fresh[k][0])


def test_unsupported_family_is_refused_with_the_reason():
    from transformers import YolosConfig

    with pytest.raises(UnsupportedModelError, match="yolos.*not supported"):
        family_of(YolosConfig())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dap_without_the_models_loss_sees_the_same_layers(family):
    # Under `dap` dapft computes only the kept terms of the model's loss (none for DETR-like
    # families); the decoder layers it then lists must be exactly those the model's full loss would
    # have supervised, with the same DAP.
    from dapft.objective.detection_loss import DetectionLoss

    class Always(DetectionLoss):
        def __call__(self, *a, **k):
            self.loss = "dap+original"  # forces the model's own loss to run
            total, terms, aux = super().__call__(*a, **k)
            return total, {k: v for k, v in terms.items() if "dap" in k}, aux

    x, _ = _batch()
    model, crit = _model(family, "dap")
    targets = _self_targets(model, x)
    torch.manual_seed(5)  # denoising queries are random
    fast = {k: v for k, v in model(pixel_values=x, labels=targets).loss_dict.items() if "dap" in k}
    fam = family_of(model.config)
    del model._loss_function
    model.loss_function = Always(fam, model.loss_function, crit, "dap")
    torch.manual_seed(5)
    slow = model(pixel_values=x, labels=targets).loss_dict
    layers = model.config.decoder_layers
    assert fast.keys() == slow.keys() and len([k for k in fast if k.startswith("loss_dap")]) == layers
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k])
