"""Loss balancing: fixed, uncertainty and normalized weighting."""

from __future__ import annotations

import math
import time

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
    # bias-corrected running mean: (0.25 * 1 + 0.5 * 3) / (1 - 0.5^2) = 7/3 of each term
    total, info = balancer(_losses(scale=3.0))
    assert float(total.detach()) == pytest.approx(6 * 3 / (7 / 3))
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


def test_normalized_floor_bounds_the_weight_of_a_term_that_starts_at_zero():
    cfg = load_config("cpu_quickstart", ["loss.balancing=normalized", "loss.normalized_floor=0.1"])
    balancer = LossBalancer(cfg.loss)
    losses = _losses()
    losses["roi_mask"] = torch.tensor(0.0, requires_grad=True)  # no things in the first crops
    _, info = balancer(losses)
    assert float(info["weight/roi_mask"]) == pytest.approx(1 / 0.1)
    # bias-corrected, not seeded from the first batch: after 0 then 2 the mean is ~1, not 0.02
    losses["roi_mask"] = torch.tensor(2.0, requires_grad=True)
    _, info = balancer(losses)
    m = cfg.loss.normalized_momentum
    mean = (1 - m) * 2.0 / (1 - m**2)
    assert float(info["weight/roi_mask"]) == pytest.approx(1 / mean, rel=1e-5)


def test_normalized_ignores_a_batch_with_a_non_finite_term():
    cfg = load_config("cpu_quickstart", ["loss.balancing=normalized"])
    balancer = LossBalancer(cfg.loss)
    balancer(_losses())
    before = balancer.running.clone()
    losses = _losses()
    losses["rpn_box"] = torch.tensor(math.nan)
    balancer(losses)
    assert torch.equal(balancer.running, before) and int(balancer.seen) == 1


def test_uncertainty_log_variances_are_clamped_and_not_decayed():
    from cabb_ray.training.engine import TrainModule, make_optimizer

    cfg = load_config("cpu_quickstart", ["loss.balancing=uncertainty", "loss.log_var_limit=2"])
    balancer = LossBalancer(cfg.loss)
    module = TrainModule(torch.nn.Linear(1, 1), balancer)
    optimizer, _ = make_optimizer(module, cfg)
    for group in optimizer.param_groups:  # no warm-up here
        group["lr"] = 1.0
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(balancer.log_vars)] == 0.0
    assert decay[id(module.model.weight)] == cfg.optim.weight_decay
    zero = {t: torch.tensor(0.0) for t in LOSS_TERMS}  # gradient 1 in every s: s falls
    for _ in range(50):
        optimizer.zero_grad()
        total, info = balancer(zero)
        total.backward()
        optimizer.step()
    # projected back into the bounds before every use: s sits at -2 (weight e^2) ...
    _, info = balancer(zero)
    assert balancer.log_vars.detach().tolist() == [-2.0] * len(LOSS_TERMS)
    assert float(info["weight/rpn_box"]) == pytest.approx(math.exp(2))
    # ... and still follows the loss back up when the term grows (gradient 1 - e^2 * 10 < 0)
    large = {t: torch.tensor(10.0) for t in LOSS_TERMS}
    for _ in range(30):
        optimizer.zero_grad()
        balancer(large)[0].backward()
        optimizer.step()
    assert float(balancer.log_vars.detach().min()) > 0


def _nan_on_one_rank(rank, world, port, mode, out):
    from datetime import timedelta

    import torch.distributed as dist

    from cabb_ray.training.engine import _all_ranks_finite

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    balancer = LossBalancer(load_config("cpu_quickstart", [f"loss.balancing={mode}"]).loss)
    finite = []
    for step in range(3):
        losses = _losses(scale=1.0 + rank + step)
        if rank == 1 and step == 1:
            losses["roi_box"] = torch.tensor(math.nan)
        total, info = balancer(losses)
        finite.append(_all_ranks_finite(total.detach()))  # what train_step decides on
    weights = [float(info[f"weight/{t}"]) for t in LOSS_TERMS]
    out.put((rank, finite, balancer.running.tolist(), int(balancer.seen), weights))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["normalized", "uncertainty", "fixed"])
def test_a_nan_term_on_one_of_two_ranks_neither_hangs_nor_desynchronises(mode):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _nan_on_one_rank, args=(2, port, mode, queue), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{mode}: ranks hung on a NaN term of one rank")
    results = sorted(queue.get() for _ in range(2))
    (_, finite0, running0, seen0, weights0), (_, finite1, running1, seen1, weights1) = results
    assert finite0 == finite1 == [True, False, True]  # both ranks skip step 2 together
    assert running0 == running1 and seen0 == seen1 and weights0 == weights1
    if mode == "normalized":
        assert seen0 == 2  # the NaN step updated no rank's running means
        m = 0.99
        mean_step0, mean_step2 = sum([1.0, 2.0]) / 2, sum([3.0, 4.0]) / 2  # rank means
        expected = (m * (1 - m) * mean_step0 + (1 - m) * mean_step2) * 1  # term k = 0
        assert running0[0] == pytest.approx(expected)
