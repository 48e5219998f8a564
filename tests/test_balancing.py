"""Loss balancing: fixed, uncertainty and normalized weighting."""

from __future__ import annotations

import math

import pytest
import torch

from cabb_ray.config import LOSS_TERMS, load_config
from cabb_ray.losses.balancing import LossBalancer


def _losses(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {t: torch.tensor((k + 1) * scale, requires_grad=True) for k, t in enumerate(LOSS_TERMS)}


def test_fixed_weights():
    cfg = load_config("cpu_quickstart", ["loss.weights.roi_box=3", "loss.weights.semantic=0.5"])
    total, info = LossBalancer(cfg.loss)(_losses())
    expected = sum(
        (k + 1) * (3 if t == "roi_box" else 0.5 if t == "semantic" else 1)
        for k, t in enumerate(LOSS_TERMS)
    )
    assert float(total.detach()) == pytest.approx(expected)
    assert info["weight/roi_box"] == 3 and info["raw/semantic"] == 6


def test_uncertainty_weights_are_learned():
    cfg = load_config("cpu_quickstart", ["loss.balancing=uncertainty"])
    balancer = LossBalancer(cfg.loss)
    losses = _losses()
    total, _ = balancer(losses)
    assert float(total.detach()) == pytest.approx(sum(range(1, 7)))  # s = 0 at start
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - L at s = 0: positive for L < 1, negative above.
    assert balancer.log_vars.grad.tolist() == pytest.approx([1 - (k + 1) for k in range(6)])
    with torch.no_grad():
        balancer.log_vars.fill_(math.log(2.0))
    assert balancer(_losses())[1]["weight/rpn_box"] == pytest.approx(0.5)


def test_normalized_puts_terms_on_one_scale():
    cfg = load_config(
        "cpu_quickstart", ["loss.balancing=normalized", "loss.normalized_momentum=0.5"]
    )
    balancer = LossBalancer(cfg.loss)
    total, info = balancer(_losses())
    assert float(total.detach()) == pytest.approx(6.0)  # every term divided by itself
    assert info["weight/roi_cls"] == pytest.approx(1 / 3)
    total, info = balancer(_losses(scale=3.0))  # running mean -> 2x each term
    assert float(total.detach()) == pytest.approx(6 * 1.5)
    state = balancer.state_dict()
    again = LossBalancer(cfg.loss)
    again.load_state_dict(state)
    assert torch.equal(again.running, balancer.running)


def test_missing_term_is_named():
    balancer = LossBalancer(load_config("cpu_quickstart").loss)
    losses = _losses()
    del losses["roi_mask"]
    with pytest.raises(KeyError, match="roi_mask"):
        balancer(losses)
