"""CABB solver throughput, and speed-up over a straightforward per-box scalar solver.

    python benchmarks/cabb.py [--sizes 1e3 1e4 1e5 1e6] [--cut 0.4] [--repeats 5]

Boxes: RoI-head encoding (weights 10, 10, 5, 5), beta 1/9, float32, a fraction --cut of the
box sides cut, predictions scattered around the targets. For each N it prints the median
time of `crop_aware_targets` and boxes/s, next to plain `smooth_l1_loss` on the same tensors
(what CABB adds on top of the standard loss). The scalar baseline (scipy's bounded
minimize_scalar per one-sided problem, Python loop over boxes, the way a hand-made
implementation would go) runs on the first --baseline-boxes boxes in the same run; the ratio
is ours over it in boxes/s. On CUDA machines the same table is printed for the GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.nn import functional as F

from cabb_ray.losses.cabb import DEFAULT_BETA, crop_aware_targets

WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BETA = DEFAULT_BETA


def make_boxes(n: int, cut_fraction: float, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, 4, generator=gen) * torch.tensor([1.0, 1.0, 2.0, 2.0])
    pred = target + torch.randn(n, 4, generator=gen) * torch.tensor([2.0, 2.0, 1.0, 1.0])
    cut = torch.rand(n, 4, generator=gen) < cut_fraction
    return pred.to(device), target.to(device), cut.to(device)


def timed(fn, repeats: int, device: str) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _huber(z: float) -> float:
    a = abs(z)
    return 0.5 * z * z / BETA if a < BETA else a - 0.5 * BETA


def _scalar_axis(pc, ps, tc, ts, cut_lo, cut_hi, wc, ws):
    """One axis of one box with scipy's bounded scalar minimiser over each free edge."""
    from scipy.optimize import minimize_scalar

    u, v = tc / wc, math.exp(ts / ws)
    low, high = u - v / 2, u + v / 2
    best_value, best = _huber(pc - tc) + _huber(ps - ts), (tc, ts)
    edges = ([(high, -1.0)] if cut_lo else []) + ([(low, 1.0)] if cut_hi else [])
    for fixed, direction in edges:

        def encode(y, fixed=fixed, direction=direction):
            return wc * (fixed + direction * math.exp(y) / 2), ws * y

        def objective(y, encode=encode):
            c, s = encode(y)
            return _huber(pc - c) + _huber(ps - s)

        y0 = math.log(v)
        res = minimize_scalar(objective, bounds=(y0, y0 + 12.0), method="bounded")
        if res.fun < best_value:
            best_value, best = res.fun, encode(res.x)
    return best


def scalar_baseline(pred, target, cut) -> torch.Tensor:
    """Per-box, per-axis scipy solve: the straightforward implementation to compare with."""
    out = target.clone()
    for i in range(pred.shape[0]):
        for ci, si, lo, hi in ((0, 2, 0, 2), (1, 3, 1, 3)):
            if bool(cut[i, lo]) or bool(cut[i, hi]):
                out[i, ci], out[i, si] = _scalar_axis(
                    float(pred[i, ci]),
                    float(pred[i, si]),
                    float(target[i, ci]),
                    float(target[i, si]),
                    bool(cut[i, lo]),
                    bool(cut[i, hi]),
                    WEIGHTS[ci],
                    WEIGHTS[si],
                )
    return out


def table(sizes, cut_fraction, repeats, device, baseline_rate=None):
    print(
        f"\n{device}: {torch.get_num_threads()} threads"
        if device == "cpu"
        else f"\n{device}: {torch.cuda.get_device_name()}"
    )
    header = f"{'N':>9} {'CABB s':>10} {'boxes/s':>12} {'smooth-L1 s':>12} {'CABB/L1':>8}"
    if baseline_rate:
        header += f" {'vs scalar':>10}"
    print(header)
    for n in sizes:
        pred, target, cut = make_boxes(n, cut_fraction, device)
        t_cabb = timed(
            lambda p=pred, t=target, c=cut: crop_aware_targets(p, t, c, WEIGHTS, BETA),
            repeats,
            device,
        )
        t_l1 = timed(
            lambda p=pred, t=target: F.smooth_l1_loss(p, t, beta=BETA, reduction="sum"),
            repeats,
            device,
        )
        rate = n / t_cabb
        line = f"{n:>9d} {t_cabb:>10.5f} {rate:>12.3e} {t_l1:>12.5f} {t_cabb / t_l1:>8.1f}"
        if baseline_rate:
            line += f" {rate / baseline_rate:>9.0f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--cut", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-boxes", type=int, default=1000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes]

    pred, target, cut = make_boxes(args.baseline_boxes, args.cut, "cpu")
    start = time.perf_counter()
    slow = scalar_baseline(pred.double(), target.double(), cut)
    baseline_seconds = time.perf_counter() - start
    baseline_rate = args.baseline_boxes / baseline_seconds
    fast = crop_aware_targets(pred.double(), target.double(), cut, WEIGHTS, BETA)
    ours_obj = F.smooth_l1_loss(pred.double(), fast, beta=BETA, reduction="sum").item()
    slow_obj = F.smooth_l1_loss(pred.double(), slow, beta=BETA, reduction="sum").item()
    print(
        f"scalar baseline (scipy per box): {args.baseline_boxes} boxes in {baseline_seconds:.2f} s "
        f"= {baseline_rate:.3e} boxes/s; total CABB loss ours {ours_obj:.6f} vs baseline "
        f"{slow_obj:.6f} (lower is better: ours is the exact minimum)"
    )
    print(f"{100 * args.cut:.0f}% of sides cut, RoI weights {WEIGHTS}, beta {BETA:.4f}, float32")
    table(sizes, args.cut, args.repeats, "cpu", baseline_rate)
    if torch.cuda.is_available():
        table(sizes, args.cut, args.repeats, "cuda")


if __name__ == "__main__":
    main()
