"""CABB targets: exact against brute force, feasible, never worse than smooth-L1, cheap paths."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from cabb_ray.losses import cabb
from cabb_ray.losses.cabb import crop_aware_smooth_l1, crop_aware_targets
from tests.brute_cabb import axis_objective, brute_axis, huber

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
AXES = ((0, 2, 0, 2), (1, 3, 1, 3))  # centre, size, low cut, high cut


@st.composite
def cases(draw, max_log_size: float = math.log(1e4)):
    """One box: target encoded from a cropped GT box, a prediction near or far, cut flags."""
    weights = draw(st.sampled_from([RPN_WEIGHTS, ROI_WEIGHTS]))
    beta = math.exp(draw(st.floats(math.log(1e-3), math.log(10.0))))
    log_size = [draw(st.floats(math.log(1e-3), max_log_size)) for _ in range(2)]
    centre = [draw(st.floats(-3.0, 3.0)) for _ in range(2)]
    target = [
        weights[0] * centre[0],
        weights[1] * centre[1],
        weights[2] * log_size[0],
        weights[3] * log_size[1],
    ]
    spread = draw(st.sampled_from([0.01, 0.3, 3.0, 30.0]))
    noise = [draw(st.floats(-1.0, 1.0)) * spread for _ in range(4)]
    pred = [t + n for t, n in zip(target, noise, strict=True)]
    cut = [draw(st.booleans()) for _ in range(4)]
    return np.array(pred), np.array(target), np.array(cut), weights, beta


def _solve(pred, target, cut, weights, beta, dtype=torch.float64, compact=None):
    p = torch.tensor(pred[None], dtype=dtype)
    t = torch.tensor(target[None], dtype=dtype)
    c = torch.tensor(cut[None])
    if compact is None:
        return crop_aware_targets(p, t, c, weights, beta)[0].numpy()
    return cabb._solve(p, t, c, weights, beta, compact=compact)[0].numpy()


def _axis_loss(pred, t, ci, si, beta):
    return float(huber(pred[ci] - t[ci], beta) + huber(pred[si] - t[si], beta))


# CABB_EXAMPLES=2000 pytest tests/test_cabb.py for a thorough hunt; CI runs the default.
SETTINGS = settings(
    max_examples=int(os.environ.get("CABB_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(cases())
def test_matches_brute_force_and_is_feasible(case):
    pred, target, cut, weights, beta = case
    solved = _solve(pred, target, cut, weights, beta)
    assert np.isfinite(solved).all()
    for ci, si, lo, hi in AXES:
        wc, ws = weights[ci], weights[si]
        ours = _axis_loss(pred, solved, ci, si, beta)
        brute = brute_axis(
            pred[ci], pred[si], target[ci], target[si], cut[lo], cut[hi], wc, ws, beta
        )
        assert ours <= brute + 1e-6 * abs(brute) + 1e-12, (ours, brute)
        # Feasible: decoded edges move outward only on cut sides.
        _, lg, rg = axis_objective(pred[ci], pred[si], target[ci], target[si], wc, ws, beta)
        u, v = solved[ci] / wc, math.exp(solved[si] / ws)
        left, right = u - v / 2, u + v / 2
        tol = 1e-9 * max(1.0, abs(lg), abs(rg), v)
        assert left <= lg + tol if cut[lo] else abs(left - lg) <= tol
        assert right >= rg - tol if cut[hi] else abs(right - rg) <= tol


@SETTINGS
@given(cases())
def test_never_above_smooth_l1_and_exact_when_uncut(case):
    pred, target, cut, weights, beta = case
    p, t = torch.tensor(pred[None]), torch.tensor(target[None])
    c = torch.tensor(cut[None])
    cabb_loss = crop_aware_smooth_l1(p, t, c, weights, beta)
    plain = F.smooth_l1_loss(p, t, beta=beta, reduction="sum")
    assert cabb_loss <= plain
    solved = crop_aware_targets(p, t, c, weights, beta)
    for ci, si, lo, hi in AXES:
        if not (cut[lo] or cut[hi]):
            assert torch.equal(solved[0, [ci, si]], t[0, [ci, si]])
    none = torch.zeros_like(c)
    assert torch.equal(crop_aware_targets(p, t, none, weights, beta), t)
    assert crop_aware_smooth_l1(p, t, none, weights, beta) == plain


@SETTINGS
@given(cases())
def test_gradient_is_smooth_l1_gradient_at_the_solution(case):
    pred, target, cut, weights, beta = case
    p = torch.tensor(pred[None], requires_grad=True)
    t, c = torch.tensor(target[None]), torch.tensor(cut[None])
    crop_aware_smooth_l1(p, t, c, weights, beta).backward()
    solution = crop_aware_targets(p.detach(), t, c, weights, beta)
    q = p.detach().clone().requires_grad_(True)
    F.smooth_l1_loss(q, solution, beta=beta, reduction="sum").backward()
    assert torch.equal(p.grad, q.grad)


@SETTINGS
@given(cases())
def test_float32_and_masked_path_agree_with_float64(case):
    """The CUDA path (no compaction) and float32 reach the float64 optimum's objective, float32
    to within its resolution: box edges are computed in pixels, so a box v anchors wide has its
    edges (and hence its centre) placed only to within about eps32 * v."""
    pred, target, cut, weights, beta = case
    eps32 = float(np.finfo(np.float32).eps)
    exact = _solve(pred, target, cut, weights, beta)
    masked = _solve(pred, target, cut, weights, beta, compact=False)
    single = _solve(pred, target, cut, weights, beta, dtype=torch.float32).astype(np.float64)
    for ci, si, *_ in AXES:
        best = _axis_loss(pred, exact, ci, si, beta)
        assert _axis_loss(pred, masked, ci, si, beta) <= best + 1e-9 * abs(best) + 1e-12
        scale = max(1.0, abs(pred[ci]), abs(pred[si]), abs(target[ci]), abs(target[si]))
        width = math.exp(max(pred[si], target[si], exact[si]) / weights[si])
        edges = 32 * eps32 * weights[ci] * width
        assert _axis_loss(pred, single, ci, si, beta) <= best + 1e-4 * scale + edges


def test_worked_example_one_side_cut():
    """RPN weights, a box cut on the right: the prediction extends past the crop to the right
    and keeps its left edge, so the optimum is the prediction itself (zero loss on x)."""
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # the anchor, width 1: edges -0.5, 0.5
    pred = torch.tensor([[0.5, 0.0, math.log(2.0), 0.0]])  # edges -0.5 .. 1.5
    cut = torch.tensor([[False, False, True, False]])
    solved = crop_aware_targets(pred, target, cut, RPN_WEIGHTS, beta=1 / 9)
    torch.testing.assert_close(solved, pred)
    # Cut on the left instead: the right edge must stay at 0.5, so the box cannot follow.
    solved = crop_aware_targets(pred, target, cut[:, [2, 1, 0, 3]], RPN_WEIGHTS, beta=1 / 9)
    assert solved[0, 0] + 0.5 * math.exp(solved[0, 2]) == pytest.approx(0.5)


def test_float32_rounding_at_bracket_end():
    """Regression: in float32, log/exp rounding made g' look negative at the end of the last
    bracket, and the minimum (a box 0.03% taller) was missed."""
    p = torch.tensor([[0.0, -0.3, 0.0, 8.0]])
    t = torch.tensor([[0.0, 0.0, 0.0, 8.0]])
    c = torch.tensor([[False, True, False, False]])
    for compact in (True, False):
        solved = cabb._solve(p, t, c, RPN_WEIGHTS, 1.0, compact=compact)
        assert F.smooth_l1_loss(p, solved, beta=1.0, reduction="sum") < 1e-6


def test_vectorised_batch_equals_rowwise():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 2
    p = t + torch.randn(500, 4, generator=gen, dtype=torch.float64) * 3
    c = torch.rand(500, 4, generator=gen) < 0.4
    batch = crop_aware_targets(p, t, c, ROI_WEIGHTS, 0.5)
    rows = torch.cat(
        [
            crop_aware_targets(p[i : i + 1], t[i : i + 1], c[i : i + 1], ROI_WEIGHTS, 0.5)
            for i in range(0, 500, 37)
        ]
    )
    torch.testing.assert_close(batch[::37], rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(dtype):
    gen = torch.Generator().manual_seed(0)
    n = 20000
    log_sizes = torch.empty(n, 2, dtype=dtype).uniform_(
        math.log(1e-3), math.log(1e4), generator=gen
    )
    t = torch.cat([torch.randn(n, 2, generator=gen, dtype=dtype) * 30, 5 * log_sizes], dim=1)
    p = (
        t
        + torch.randn(n, 4, generator=gen, dtype=dtype)
        * torch.logspace(-3, 2, n, dtype=dtype)[:, None]
    )
    c = torch.rand(n, 4, generator=gen) < 0.5
    for beta in (1e-3, 1 / 9, 10.0):
        for weights in (RPN_WEIGHTS, ROI_WEIGHTS):
            out = crop_aware_targets(p, t, c, weights, beta)
            assert torch.isfinite(out).all()
            loss = F.smooth_l1_loss(p, out, beta=beta, reduction="none").sum(1)
            plain = F.smooth_l1_loss(p, t, beta=beta, reduction="none").sum(1)
            assert (loss <= plain).all()


def test_non_finite_rows_pass_through():
    t = torch.zeros(3, 4)
    p = torch.tensor([[float("nan"), 0, 0, 0], [0.3, 0, 0.5, 0], [0, float("inf"), 0, 0]])
    c = torch.ones(3, 4, dtype=torch.bool)
    out = crop_aware_targets(p, t, c)
    assert torch.equal(out[0], t[0]) and torch.equal(out[2], t[2])
    assert torch.equal(out[1], p[1])  # both sides cut, prediction contains the box
    assert torch.isnan(crop_aware_smooth_l1(p, t, c))


def test_half_precision_inputs_are_solved_in_float32():
    t = torch.zeros(4, 4, dtype=torch.float16)
    p = torch.full((4, 4), 0.25, dtype=torch.float16)
    c = torch.tensor([[True, False, False, False]] * 4)
    out = crop_aware_targets(p, t, c)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_empty_batch():
    empty = torch.zeros(0, 4)
    assert crop_aware_targets(empty, empty, empty.bool()).shape == (0, 4)
    assert crop_aware_smooth_l1(empty, empty, empty.bool()) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(3, 4), torch.zeros(3, 3), torch.zeros(3, 4, dtype=torch.bool)), "\\[N, 4\\]"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4)), "cut must be a bool"),
        (
            (
                torch.zeros(3, 4),
                torch.zeros(3, 4),
                torch.zeros(3, 4, dtype=torch.bool),
                (1, 1, 0, 1),
            ),
            "weights",
        ),
        (
            (
                torch.zeros(3, 4),
                torch.zeros(3, 4),
                torch.zeros(3, 4, dtype=torch.bool),
                RPN_WEIGHTS,
                0.0,
            ),
            "beta",
        ),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        crop_aware_targets(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4096, 4, generator=gen) * 2
    p = t + torch.randn(4096, 4, generator=gen) * 3
    c = torch.rand(4096, 4, generator=gen) < 0.4
    cpu = crop_aware_targets(p, t, c, ROI_WEIGHTS, 1 / 9)
    gpu = crop_aware_targets(p.cuda(), t.cuda(), c.cuda(), ROI_WEIGHTS, 1 / 9).cpu()
    lc = F.smooth_l1_loss(p, cpu, beta=1 / 9, reduction="none").sum(1)
    lg = F.smooth_l1_loss(p, gpu, beta=1 / 9, reduction="none").sum(1)
    torch.testing.assert_close(lg, lc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights", [RPN_WEIGHTS, ROI_WEIGHTS])
@pytest.mark.parametrize("beta", [1e-3, 1 / 9, 1.0, 10.0])
def test_bulk_one_sided_cases_match_brute_force(weights, beta):
    """Thousands of single-cut axes at once: hard cases that a few examples could miss."""
    from tests.brute_cabb import brute_one_sided_bulk

    rng = np.random.default_rng(int(beta * 1000) + int(weights[0]))
    n = 3000
    log_size = rng.uniform(math.log(1e-3), math.log(1e4), n)
    t = np.stack(
        [weights[0] * rng.normal(0, 3, n), np.zeros(n), weights[2] * log_size, np.zeros(n)], 1
    )
    spread = rng.choice([0.01, 0.3, 3.0, 30.0], size=(n, 1))
    p = t + rng.normal(0, 1, (n, 4)) * spread
    p[:, [1, 3]] = 0.0
    cut_lo = rng.random(n) < 0.5
    cut = np.zeros((n, 4), dtype=bool)
    cut[:, 0], cut[:, 2] = cut_lo, ~cut_lo
    solved = crop_aware_targets(
        torch.tensor(p), torch.tensor(t), torch.tensor(cut), weights, beta
    ).numpy()
    ours = huber(p[:, 0] - solved[:, 0], beta) + huber(p[:, 2] - solved[:, 2], beta)
    brute = brute_one_sided_bulk(
        p[:, 0], p[:, 2], t[:, 0], t[:, 2], cut_lo, weights[0], weights[2], beta
    )
    excess = (ours - brute) / np.maximum(np.abs(brute), 1e-12)
    assert excess.max() <= 1e-6, (
        f"worst case {excess.argmax()}: {ours[excess.argmax()]} vs {brute[excess.argmax()]}"
    )
