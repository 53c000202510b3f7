from __future__ import annotations

import pytest
import torch

from dapft import APCostMatcher, ap_matching_cost, differentiable_ap


def _targets(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "class_labels": torch.tensor(labels)}


def _obvious_case():
    # Image 0: two ground truths, three queries; query 2 sits on gt 0, query 0 on gt 1.
    pred = torch.tensor([
        [[0.70, 0.70, 0.2, 0.2], [0.10, 0.90, 0.1, 0.1], [0.30, 0.30, 0.2, 0.2]],
        [[0.50, 0.50, 0.4, 0.4], [0.20, 0.20, 0.1, 0.1], [0.80, 0.20, 0.1, 0.1]],
    ])
    scores = torch.full((2, 3, 4), 0.5)
    targets = [
        _targets([[0.31, 0.30, 0.2, 0.2], [0.70, 0.69, 0.2, 0.2]], [1, 3]),
        _targets([[0.21, 0.2, 0.1, 0.1]], [0]),
    ]
    return scores, pred, targets


@pytest.mark.parametrize("mode", ["constant", "momentum"])
def test_finds_the_obvious_assignment(mode):
    scores, pred, targets = _obvious_case()
    indices = APCostMatcher(mode)(scores, pred, targets)
    assert [q.tolist() for q, _ in indices] == [[0, 2], [1]]
    assert [g.tolist() for _, g in indices] == [[1, 0], [0]]


def test_zero_ground_truth_and_more_ground_truths_than_queries():
    scores, pred, _ = _obvious_case()
    many = _targets([[0.1 * k + 0.05, 0.5, 0.05, 0.05] for k in range(5)], [0, 1, 2, 3, 0])
    empty = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)}
    indices = APCostMatcher("constant")(scores, pred, [many, empty])
    assert len(indices[0][0]) == 3 and len(set(indices[0][1].tolist())) == 3  # every query used once
    assert indices[1][0].numel() == 0


def test_momentum_mode_prefers_the_score_that_precision_rewards():
    # Two queries on the same ground truth with equal IoU: constant mode cannot tell them apart
    # (the bin masses sum to one); with an estimated precision that rises with the score, momentum
    # mode must pick the higher-scored one.
    ious = torch.tensor([[0.8], [0.8]])
    scores = torch.tensor([[0.9], [0.3]])
    const = ap_matching_cost(scores, ious)
    assert torch.allclose(const[0], const[1])
    rising = torch.linspace(0.2, 1.0, 256).expand(10, 256)
    mom = ap_matching_cost(scores, ious, rising)
    assert mom[0, 0] < mom[1, 0]


def test_momentum_matcher_reads_the_ground_truths_class_score_and_its_estimate():
    # Two queries on the same box. Query 0 is confident about the wrong class (0.95 for class 1,
    # 0.1 for class 0); query 1 scores the ground truth's class 0 at 0.9. With an estimated
    # precision rising with the score, the ground truth (class 0) must go to query 1; a matcher
    # that read each query's best class, or ignored its estimate, could not tell.
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    scores = torch.tensor([[[0.1, 0.95], [0.9, 0.05]]])
    targets = [_targets([[0.5, 0.5, 0.2, 0.2]], [0])]
    matcher = APCostMatcher("momentum")
    with torch.no_grad():
        matcher.precision_ema.copy_(torch.linspace(0.05, 1.0, matcher.precision_ema.shape[-1]).expand_as(
            matcher.precision_ema))
    assert matcher(scores, pred, targets)[0][0].tolist() == [1]
    scores_swapped = scores.flip(1)  # the same queries in the other order: the choice follows the score
    assert matcher(scores_swapped, pred, targets)[0][0].tolist() == [0]


def test_momentum_state_round_trips_through_the_state_dict():
    m = APCostMatcher("momentum", momentum=0.9)
    _, _, precision = differentiable_ap(torch.rand(50), torch.rand(50) < 0.5, torch.rand(50), 30,
                                         return_curves=True)
    m.update(precision)
    assert not torch.allclose(m.precision_ema, torch.ones_like(m.precision_ema))
    restored = APCostMatcher("momentum", momentum=0.9)
    restored.load_state_dict(m.state_dict())
    torch.testing.assert_close(restored.precision_ema, m.precision_ema)
    # and it is the EMA of Eq. 13
    torch.testing.assert_close(m.precision_ema, 0.9 + 0.1 * precision[0])


def test_original_mode_delegates():
    calls = []

    def original(outputs, targets):
        calls.append(outputs["logits"].shape)
        return [(torch.tensor([0]), torch.tensor([0]))]

    scores, pred, targets = _obvious_case()
    out = APCostMatcher("original", original=original)(scores, pred, targets, logits=torch.zeros(2, 3, 5))
    assert calls == [torch.Size([2, 3, 5])] and out[0][0].tolist() == [0]
    with pytest.raises(ValueError, match="original"):
        APCostMatcher("original")


def test_disagreement_with_another_matching_counts_ground_truths_assigned_elsewhere():
    from dapft.objective.matcher import disagreement_with

    ours = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([4]), torch.tensor([0]))]
    theirs = [(torch.tensor([2, 3]), torch.tensor([1, 0])), (torch.tensor([4]), torch.tensor([0]))]
    # image 0: gt 1 -> query 0 vs 2, gt 0 -> query 2 vs 3 (both differ); image 1: the same query
    assert disagreement_with(ours, theirs) == (2, 3)
    assert disagreement_with(theirs, theirs) == (0, 3)


def test_disagreement_with_the_top_query_counts_only_overlapped_ground_truths():
    from dapft.objective.matcher import disagreement_with_top_query

    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])  # cxcywh; nothing overlaps the second
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2],      # query 0: the ground truth itself, score 0.9
                           [0.31, 0.31, 0.2, 0.2],    # query 1: IoU ~0.82, score 0.2
                           [0.3, 0.3, 0.02, 0.02]]])  # query 2: IoU 0.01, score 0.95 (not overlapping)
    scores = torch.tensor([[[0.0, 0.9], [0.0, 0.2], [0.0, 0.95]]])  # class 1 is the ground truth's
    targets = [{"class_labels": torch.tensor([1, 0]), "boxes": gt}]
    to_query1 = [(torch.tensor([1]), torch.tensor([0]))]
    to_query0 = [(torch.tensor([0]), torch.tensor([0]))]
    assert disagreement_with_top_query(to_query1, scores, boxes, targets) == (1, 1)
    assert disagreement_with_top_query(to_query0, scores, boxes, targets) == (0, 1)


def test_the_models_own_matcher_names_the_image_whose_outputs_are_not_finite():
    from transformers.loss.loss_for_object_detection import HungarianMatcher

    from dapft.objective.matcher import NonFiniteCostError

    matcher = APCostMatcher("original", original=HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2))
    boxes = torch.rand(3, 10, 4) * 0.2 + 0.4
    logits = torch.randn(3, 10, 4)
    boxes[2, 7] = float("nan")
    targets = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 3
    with pytest.raises(NonFiniteCostError) as caught:
        matcher(logits.softmax(-1)[..., :-1], boxes, targets, logits=logits)
    assert caught.value.image == 2
