"""Properties of the DAP objective the paper proves or relies on, on random draws."""

from __future__ import annotations

import pytest
import torch

from dapft import COCO_IOU_THRESHOLDS, dap_from_statistics, dap_statistics, differentiable_ap
from dapft.objective import dap as dap_module
from dapft.objective.smooth_ap import smooth_ap


def _draw(seed: int, m: int = 200, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(m, generator=g, dtype=dtype)
    positive = torch.rand(m, generator=g) < 0.3
    ious = torch.rand(m, generator=g, dtype=dtype) * 0.6 + 0.4
    return scores, positive, ious, int(positive.sum()) + 5


@pytest.mark.parametrize("seed", range(20))
def test_sign_consistency(seed):
    scores, positive, ious, num_gt = _draw(seed)
    scores.requires_grad_(True)
    differentiable_ap(scores, positive, ious, num_gt).backward()
    grad = scores.grad
    assert (grad[~positive] < 0).all(), "an unmatched candidate's score must be pushed down"
    tp_everywhere = positive & (ious >= max(COCO_IOU_THRESHOLDS))
    assert tp_everywhere.any()
    assert (grad[tp_everywhere] > 0).all(), "a true positive at every threshold must be pushed up"


def test_paper_toy_case_smooth_ap_pushes_a_positive_down_dap_does_not():
    scores = torch.tensor([0.2, 0.1, 0.99], dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([True, True, False])
    smooth_ap(scores, positive, tau=0.01).backward()
    assert scores.grad[0] < 0
    for sigma in (0.05, 0.01):
        scores.grad = None
        differentiable_ap(scores, positive, torch.ones(3, dtype=torch.float64), 2, sigma=sigma).backward()
        # The interpolated AP is flat here (the best precision, 2/3, is reached at full recall):
        # DAP's gradient is zero or positive for the positives, never negative.
        assert scores.grad[0] >= 0 and scores.grad[1] >= 0 and scores.grad[2] <= 0
    # Without interpolation the soft AP is not sign-consistent either: why the paper interpolates.
    scores.grad = None
    differentiable_ap(scores, positive, torch.ones(3, dtype=torch.float64), 2, interpolate=False).backward()
    assert scores.grad[0] < 0


@pytest.mark.parametrize("seed", range(5))
def test_gradient_reaches_ious_and_is_non_negative(seed):
    scores, positive, ious, num_gt = _draw(seed)
    ious.requires_grad_(True)
    differentiable_ap(scores, positive, ious, num_gt).backward()
    assert (ious.grad[positive] >= 0).all()
    assert (ious.grad[positive] > 0).any()
    assert (ious.grad[~positive] == 0).all()


@pytest.mark.parametrize("interpolate", [False, True])
@pytest.mark.parametrize("average", ["pooled", "per_class"])
def test_gradcheck_float64(average, interpolate):
    g = torch.Generator().manual_seed(0)
    m = 30
    scores = (torch.rand(m, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    # IoUs away from the interpolation anchors, where L_int has kinks
    ious = (torch.tensor([0.52, 0.61, 0.77, 0.83, 0.97, 0.33] * 5, dtype=torch.float64)).requires_grad_(True)
    positive = torch.rand(m, generator=g) < 0.5
    labels = torch.randint(0, 3, (m,), generator=g)
    num_gt = torch.bincount(labels[positive], minlength=3) + 1

    def fn(s, i):
        return differentiable_ap(s, positive, i, num_gt, labels=labels, sigma=0.1, num_bins=32,
                                 average=average, interpolate=interpolate, exact=True)

    assert torch.autograd.gradcheck(fn, (scores, ious))


def test_chunked_tail_sum_matches_dense_reference(monkeypatch):
    monkeypatch.setattr(dap_module, "_CHUNK", 7)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (50,), generator=g)
    out = dap_module.soft_tail_sum(scores, labels, 3, num_bins=16, sigma=0.1, exact=True)
    weight = torch.randn(3, 16, generator=g, dtype=torch.float64)
    (out * weight).sum().backward()
    x = torch.arange(16, dtype=torch.float64) / 16
    s2 = scores.detach().clone().requires_grad_(True)
    tail = 1 - torch.distributions.Normal(s2[:, None], 0.1).cdf(x[None, :])
    tail = torch.cat([torch.ones(50, 1, dtype=torch.float64), tail[:, 1:]], 1)
    ref = torch.zeros(3, 16, dtype=torch.float64).index_add(0, labels, tail)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(scores.grad, s2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    scores, positive, ious, num_gt = _draw(3, dtype=torch.float64)
    ref = differentiable_ap(scores, positive, ious, num_gt)
    s = scores.to(dtype).requires_grad_(True)
    dap = differentiable_ap(s, positive, ious.to(dtype), num_gt)
    assert dap.dtype == torch.float32
    dap.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    assert abs(float(dap) - float(ref)) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_output_is_in_unit_interval_and_perfect_detections_score_near_one():
    g = 50
    scores = torch.full((g,), 0.99)
    perfect = differentiable_ap(scores, torch.ones(g, dtype=torch.bool), torch.ones(g), g,
                                sigma=0.01, localization="step")
    assert float(perfect) == pytest.approx(1.0, abs=1e-3)
    for seed in range(5):
        assert 0.0 <= float(differentiable_ap(*_draw(seed))) <= 1.0


def test_missed_ground_truths_lower_ap_through_num_gt():
    scores = torch.tensor([0.9, 0.8])
    kw = dict(sigma=1e-4, num_bins=1024, localization="step")
    one = differentiable_ap(scores, torch.tensor([True, True]), torch.ones(2), 2, **kw)
    half = differentiable_ap(scores, torch.tensor([True, True]), torch.ones(2), 4, **kw)
    assert float(half) == pytest.approx(float(one) / 2, abs=1e-4)


def test_per_class_leaves_out_classes_without_ground_truth():
    scores = torch.tensor([0.9, 0.8, 0.7])
    positive = torch.tensor([True, False, False])
    labels = torch.tensor([0, 1, 1])  # class 1 has detections but no ground truth
    kw = dict(sigma=1e-4, num_bins=1024, localization="step", average="per_class", labels=labels)
    dap = differentiable_ap(scores, positive, torch.ones(3), torch.tensor([1, 0]), **kw)
    assert float(dap) == pytest.approx(1.0, abs=1e-4)


def test_no_ground_truth_contributes_nothing():
    scores = torch.rand(10, requires_grad=True)
    dap = differentiable_ap(scores, torch.zeros(10, dtype=torch.bool), torch.zeros(10), 0)
    (1 - dap).backward()
    assert float(dap) == 1.0 and (scores.grad == 0).all()


def test_statistics_of_two_halves_sum_to_the_whole():
    # What distributed training relies on: all-reducing the statistics gives the global-batch DAP.
    scores, positive, ious, _ = _draw(7, m=120)
    whole = differentiable_ap(scores, positive, ious, 40)
    a = dap_statistics(scores[:60], positive[:60], ious[:60], 15)
    b = dap_statistics(scores[60:], positive[60:], ious[60:], 25)
    summed = type(a)(**{k: getattr(a, k) + getattr(b, k) for k in ("all_tail", "tp_tail", "hist", "num_gt")})
    torch.testing.assert_close(dap_from_statistics(summed), whole)


def test_bad_arguments_are_named():
    s = torch.rand(4)
    with pytest.raises(ValueError, match="same length"):
        differentiable_ap(s, torch.ones(3, dtype=torch.bool), torch.rand(4), 1)
    with pytest.raises(ValueError, match="per_class"):
        differentiable_ap(s, torch.ones(4, dtype=torch.bool), torch.rand(4), 1, average="per_class")
    with pytest.raises(ValueError, match="localization"):
        differentiable_ap(s, torch.ones(4, dtype=torch.bool), torch.rand(4), 1, localization="x")
    with pytest.raises(ValueError, match="iou_thresholds"):
        differentiable_ap(s, torch.ones(4, dtype=torch.bool), torch.rand(4), 1, iou_thresholds=[0.7, 0.5])
