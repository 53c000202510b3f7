"""The DAP criterion against an independent oracle: for real tiny models, each decoder layer's
(and each Group DETR query group's) matching is taken from the matcher alone, the candidates
(scores, positive, IoU, class, number of ground truths) are built by hand from the model's outputs,
and `differentiable_ap` on them must give the criterion's DAP, value and gradient."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from dapft import APCostMatcher, differentiable_ap
from dapft.modeling.families import family_of
from dapft.modeling.tiny import tiny_model
from dapft.objective.criterion import DAPCriterion
from dapft.objective.detection_loss import install_loss

LABELS = {i: f"c{i}" for i in range(5)}


class Recording(DAPCriterion):
    """Keeps what the model's loss handed the criterion, and what it answered."""

    def forward(self, layers, targets, groups=1):
        self.seen = (layers, targets, groups)
        self.answer = super().forward(layers, targets, groups)
        return self.answer


def _oracle_dap(family, logits, boxes, targets, average, matcher, curves=False):
    """differentiable_ap of one set of detections, built by hand from the model's outputs."""
    scores = family.scores(logits)  # (B, Q, C)
    batch, queries, num_classes = scores.shape
    indices = matcher(scores.detach(), boxes.detach(), targets)
    flat, positive, ious, labels = [], [], [], []
    for b, ((q_idx, g_idx), t) in enumerate(zip(indices, targets)):
        for q in range(queries):
            for c in range(num_classes):
                flat.append(scores[b, q, c])
                labels.append(c)
                hit = [g for qq, g in zip(q_idx.tolist(), g_idx.tolist()) if qq == q and int(t["class_labels"][g]) == c]
                positive.append(bool(hit))
                if hit:
                    pred = box_convert(boxes[b, q][None], "cxcywh", "xyxy")
                    gt = box_convert(t["boxes"][hit[0]][None], "cxcywh", "xyxy")
                    ious.append(box_iou(pred, gt)[0, 0])
                else:
                    ious.append(torch.zeros(()))
    all_labels = torch.cat([t["class_labels"] for t in targets])
    num_gt = torch.bincount(all_labels, minlength=num_classes) if average == "per_class" else len(all_labels)
    return differentiable_ap(torch.stack(flat), torch.tensor(positive), torch.stack(ious), num_gt,
                             labels=torch.tensor(labels), average=average, return_curves=curves)


def _targets(model, x):
    """Ground truths the untrained model nearly predicts (its first queries' boxes, shrunk to IoUs
    0.94 / 0.72 / 0.55): at random initialisation no match reaches IoU 0.5 otherwise, and DAP is flat."""
    with torch.no_grad():
        out = model.eval()(pixel_values=x)
    model.train()
    shrink = torch.tensor([0.97, 0.85, 0.74])[:, None]
    first = out.pred_boxes[0, :3].clone()
    first[:, 2:] *= shrink
    return [{"class_labels": torch.tensor([1, 3, 1]), "boxes": first},
            {"class_labels": torch.tensor([0]), "boxes": out.pred_boxes[1, 4:5].clone()}]


@pytest.mark.parametrize("name", ["detr", "deformable_detr", "lw_detr"])  # softmax, sigmoid, Group DETR
@pytest.mark.parametrize("average", ["pooled", "per_class"])
def test_criterion_equals_differentiable_ap_on_hand_built_candidates(name, average):
    torch.manual_seed(0)
    model = tiny_model(name, LABELS, num_queries=6).train()
    family = family_of(model.config)
    criterion = Recording(family, model.config, average=average)
    install_loss(model, family, "dap", criterion)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    model(pixel_values=x, labels=_targets(model, x))
    layers, targets, groups = criterion.seen
    assert groups == (2 if name == "lw_detr" else 1) and len(layers) == model.config.decoder_layers

    matcher = APCostMatcher("constant")
    for i, layer in enumerate(layers):
        logits = layer["logits"].detach().requires_grad_(True)
        boxes = layer["pred_boxes"].detach().requires_grad_(True)
        group_daps = [_oracle_dap(family, lg, bx, targets, average, matcher)
                      for lg, bx in zip(logits.chunk(groups, 1), boxes.chunk(groups, 1))]
        expected = torch.stack(group_daps).mean()  # Group DETR: the mean of its groups' APs
        suffix = "" if i == len(layers) - 1 else f"_{i}"
        torch.testing.assert_close(criterion.answer[f"dap{suffix}"], expected.detach(), atol=1e-6, rtol=0)

        # The same gradient reaches this layer's logits and boxes, and no other layer's.
        expected.backward()
        crit_logits = [lay["logits"].detach().requires_grad_(True) for lay in layers]
        crit_boxes = [lay["pred_boxes"].detach().requires_grad_(True) for lay in layers]
        fresh = DAPCriterion(family, model.config, average=average)
        out = fresh([{"logits": a, "pred_boxes": b} for a, b in zip(crit_logits, crit_boxes)], targets, groups)
        out[f"loss_dap{suffix}"].backward()
        if i == len(layers) - 1:  # the targets are near its boxes: matches above IoU 0.5
            assert logits.grad.abs().sum() + boxes.grad.abs().sum() > 0
        torch.testing.assert_close(-crit_logits[i].grad, logits.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(-crit_boxes[i].grad, boxes.grad, atol=1e-6, rtol=1e-4)
        for j in range(len(layers)):
            if j != i:
                assert crit_logits[j].grad is None or not crit_logits[j].grad.any()


@pytest.mark.parametrize("name", ["deformable_detr_box_refine", "lw_detr"])  # layers whose curves differ
def test_the_momentum_estimate_moves_with_the_last_decoder_layer(name):
    # Eq. 13: MP <- m MP + (1 - m) P, with P the interpolated precision of the last decoder layer's
    # batch (the mean over its query groups), the estimate starting at MP = 1.
    torch.manual_seed(0)
    model = tiny_model(name, LABELS, num_queries=6).train()
    family = family_of(model.config)
    criterion = Recording(family, model.config, matcher="momentum", momentum=0.9)
    install_loss(model, family, "dap", criterion)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    model(pixel_values=x, labels=_targets(model, x))
    layers, targets, groups = criterion.seen
    matcher = APCostMatcher("momentum")  # what the criterion matched with: the estimate at its start
    last = layers[-1]
    curves = [_oracle_dap(family, lg, bx, targets, "pooled", matcher, curves=True)[2]
              for lg, bx in zip(last["logits"].detach().chunk(groups, 1), last["pred_boxes"].detach().chunk(groups, 1))]
    precision = torch.stack([c.reshape(-1, *c.shape[-2:]).mean(0) for c in curves]).mean(0)  # (K, N)
    first = [_oracle_dap(family, lay["logits"].detach(), lay["pred_boxes"].detach(), targets, "pooled", matcher,
                         curves=True)[2].reshape(precision.shape) for lay in layers[:1]][0]
    assert not torch.allclose(first, precision)  # the layers differ, so the choice of layer shows
    torch.testing.assert_close(criterion.matcher.precision_ema, 0.9 + 0.1 * precision, atol=1e-6, rtol=0)


def _layers_and_targets(num_layers: int = 3, batch: int = 2, queries: int = 20, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    boxes = [torch.cat([torch.rand(batch, queries, 2, generator=g) * 0.6 + 0.2,
                        torch.rand(batch, queries, 2, generator=g) * 0.3 + 0.05], -1) for _ in range(num_layers)]
    layers = [{"logits": torch.randn(batch, queries, classes, generator=g), "pred_boxes": b} for b in boxes]
    targets = [{"class_labels": torch.randint(0, classes, (3,), generator=g),
                "boxes": boxes[-1][i, :3] + torch.randn(3, 4, generator=g) * 0.01} for i in range(batch)]
    return layers, targets


def test_the_matching_diagnostic_reads_the_last_decoder_layer_in_float32():
    """match_vs_model and match_vs_top describe the last layer's matching (the one the model's
    predictions come from), computed in float32 even under autocast (bf16 scores tie where float32
    ones do not)."""
    from dapft.objective.matcher import disagreement_with, disagreement_with_top_query

    model = tiny_model("deformable_detr", LABELS)
    family = family_of(model.config)
    criterion = DAPCriterion(family, model.config, matcher="constant")
    layers, targets = _layers_and_targets()
    seen = []
    model_matcher = criterion.model_matcher
    model_matcher.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), args[0]["logits"].dtype)))
    out = criterion(layers, targets)
    last = layers[-1]
    scores = family.scores(last["logits"])
    ours = criterion.matcher(scores, last["pred_boxes"], targets)
    differ, total = disagreement_with(ours, model_matcher(last, targets))
    assert float(out["match_vs_model"]) == pytest.approx(differ / total)
    differ, total = disagreement_with_top_query(ours, scores, last["pred_boxes"], targets)
    assert float(out["match_vs_top"]) == pytest.approx(differ / total)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        criterion(layers, targets)
    assert seen[-1] == (False, torch.float32)


def test_a_dap_loss_without_its_criterion_is_refused():
    from dapft.objective.detection_loss import DetectionLoss

    family = family_of(tiny_model("detr", LABELS).config)
    for loss in ("dap", "dap+original", "dap+box"):
        with pytest.raises(ValueError, match="needs a DAPCriterion"):
            DetectionLoss(family, lambda *a, **k: None, None, loss)
    DetectionLoss(family, lambda *a, **k: None, None, "original")  # the model's own loss needs none


def test_called_without_query_groups_every_decoder_layer_is_one_set():
    """`criterion(layers, targets)`, as a library user calls it for a model without Group DETR's
    query groups: each layer's DAP is that of all its queries as one set of detections."""
    model = tiny_model("deformable_detr", LABELS)
    family = family_of(model.config)
    layers, targets = _layers_and_targets()
    plain = DAPCriterion(family, None, matcher="constant")(layers, targets)
    one_group = DAPCriterion(family, None, matcher="constant")(layers, targets, groups=1)
    assert plain.keys() == one_group.keys() and all(torch.equal(plain[k], one_group[k]) for k in plain)
    halves = DAPCriterion(family, None, matcher="constant")(layers, targets, groups=2)
    assert not torch.equal(plain["dap"], halves["dap"])  # the test tells one set from two
