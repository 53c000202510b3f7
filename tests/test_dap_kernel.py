"""The histogram-kernel soft tail sum (the default) held to the exact formula and to a naive dense
float64 implementation: values, gradients, dtypes, edge scores and the small-sigma fallback."""

from __future__ import annotations

import pytest
import torch

from dapft import ap_matching_cost, differentiable_ap
from dapft.objective import dap as dap_module
from dapft.objective.dap import soft_tail_sum


def naive_tail_sum(scores: torch.Tensor, labels: torch.Tensor | None, num_classes: int, num_bins: int,
                   sigma: float) -> torch.Tensor:
    """Eq. 7 written out densely in float64: tail_b(i) = Pr(x >= i/N), x ~ N(s_b, sigma), tail(0) = 1."""
    x = torch.arange(num_bins, dtype=torch.float64) / num_bins
    tail = 1 - torch.distributions.Normal(scores.double()[:, None], sigma).cdf(x[None, :])
    tail = torch.cat([torch.ones_like(tail[:, :1]), tail[:, 1:]], 1)
    labels = torch.zeros(len(scores), dtype=torch.long) if labels is None else labels
    return torch.zeros(num_classes, num_bins, dtype=torch.float64).index_add(0, labels, tail)


def _scores(m: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Detection-like: most candidates near 0, some spread up to 1.
    return (torch.rand(m, generator=g, dtype=torch.float64) ** 4).to(dtype)


@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.05, 0.2])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_kernel_matches_the_naive_formula_in_value_and_gradient(sigma, num_classes):
    m, n = 20000, 256
    s = _scores(m, 0)
    labels = torch.randint(0, num_classes, (m,), generator=torch.Generator().manual_seed(1)) if num_classes > 1 else None
    upstream = torch.randn(num_classes, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kernel_s, naive_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = soft_tail_sum(kernel_s, labels, num_classes, num_bins=n, sigma=sigma)
    ref = naive_tail_sum(naive_s, labels, num_classes, n, sigma)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    # The bound: 1e-5 of the largest value; measured ~3e-7.
    assert float((out - ref).detach().abs().max() / ref.abs().max()) < 1e-5
    grad_err = (kernel_s.grad - naive_s.grad).abs().max() / naive_s.grad.abs().max()
    assert float(grad_err) < 2e-5
    assert float(torch.nn.functional.cosine_similarity(kernel_s.grad, naive_s.grad, 0)) > 0.99999


def test_kernel_and_exact_paths_agree_on_dap_and_its_gradients_in_float32():
    g = torch.Generator().manual_seed(3)
    m = 50000
    s = _scores(m, 4, torch.float32)
    positive = torch.rand(m, generator=g) < 0.01
    ious = torch.rand(m, generator=g) * 0.5 + 0.5
    grads = []
    values = []
    for exact in (False, True):
        si, ii = s.clone().requires_grad_(True), ious.clone().requires_grad_(True)
        dap = differentiable_ap(si, positive, ii, int(positive.sum()) + 10, exact=exact)
        dap.backward()
        values.append(float(dap))
        grads.append(torch.cat([si.grad, ii.grad]))
    assert values[0] == pytest.approx(values[1], abs=2e-6)
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], 0)) > 0.9999


def test_many_scores_in_one_cell_are_all_counted():
    # Background queries pile up near 0; a float32 running sum stops counting past 2^24 / cell.
    s = torch.full((3_000_000,), 1e-3)
    out = soft_tail_sum(s, sigma=0.05)
    assert float(out[0, 0]) == 3_000_000
    ref = naive_tail_sum(s[:1], None, 1, 256, 0.05) * 3_000_000
    assert float((out.double() - ref).abs().max() / ref.max()) < 1e-5


def test_scores_outside_the_unit_interval_are_exact_too():
    s = torch.tensor([-3.0, -0.2, -0.01, 0.0, 1.0, 1.01, 1.3, 7.0], dtype=torch.float64, requires_grad=True)
    out = soft_tail_sum(s, sigma=0.05)
    ref = naive_tail_sum(s.detach(), None, 1, 256, 0.05)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad >= 0).all()


def test_bf16_scores_get_a_bf16_gradient_computed_in_float32():
    s = _scores(1000, 5, torch.bfloat16).requires_grad_(True)
    positive = torch.zeros(1000, dtype=torch.bool)
    positive[:50] = True
    dap = differentiable_ap(s, positive, torch.full((1000,), 0.9, dtype=torch.bfloat16), 60)
    assert dap.dtype == torch.float32
    dap.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_sigma_too_small_for_the_grid_falls_back_to_the_exact_formula():
    sigma = 0.001
    assert dap_module._grid_size(sigma) > dap_module._MAX_GRID
    s = _scores(500, 6)
    torch.testing.assert_close(soft_tail_sum(s, sigma=sigma), soft_tail_sum(s, sigma=sigma, exact=True))


def test_kernel_is_cached_per_setting():
    dap_module._kernel.cache_clear()
    s = _scores(100, 7, torch.float32)
    soft_tail_sum(s, sigma=0.05)
    soft_tail_sum(s, sigma=0.05)
    soft_tail_sum(s, sigma=0.02)
    info = dap_module._kernel.cache_info()
    assert (info.hits, info.misses) == (1, 2)


def test_constant_matching_cost_is_the_interpolated_iou_term_exactly():
    g = torch.Generator().manual_seed(8)
    scores = torch.rand(30, 7, generator=g, dtype=torch.float64)
    ious = torch.rand(30, 7, generator=g, dtype=torch.float64)
    ones = torch.ones(10, 256, dtype=torch.float64)
    torch.testing.assert_close(ap_matching_cost(scores, ious), ap_matching_cost(scores, ious, ones, exact=True))


def test_momentum_matching_cost_on_the_grid_matches_the_exact_cost():
    g = torch.Generator().manual_seed(9)
    scores = torch.rand(300, 40, generator=g, dtype=torch.float64)  # more pairs than grid points
    ious = torch.rand(300, 40, generator=g, dtype=torch.float64)
    precision = torch.rand(10, 256, generator=g, dtype=torch.float64).cummax(-1).values
    fast = ap_matching_cost(scores, ious, precision)
    exact = ap_matching_cost(scores, ious, precision, exact=True)
    assert float((fast - exact).abs().max() / exact.abs().max()) < 1e-5
    assert not torch.equal(fast, exact)  # the grid path did run
