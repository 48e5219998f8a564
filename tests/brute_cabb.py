"""Brute-force crop-aware targets, independent of the solver's case analysis.

It searches the feasible set directly in box-edge coordinates (left edge moved out by a >= 0
where cut, right edge by b >= 0 where cut) on a dense log-spaced grid, then refines the best
grid point locally with scipy. It knows nothing of one-sided problems or brackets.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize, minimize_scalar

GRID = np.concatenate([[0.0], np.geomspace(1e-9, 1e7, 4000)])
GRID_2D = np.concatenate([[0.0], np.geomspace(1e-9, 1e7, 500)])


def huber(z, beta):
    a = np.abs(z)
    return np.where(a < beta, 0.5 * z * z / beta, a - 0.5 * beta)


def axis_objective(pc, ps, tc, ts, wc, ws, beta):
    """Objective as a function of how far each edge moves outward, and the cropped edges."""
    u, v = tc / wc, math.exp(ts / ws)
    lg, rg = u - v / 2, u + v / 2

    def obj(a, b):
        left, right = lg - a, rg + b
        with np.errstate(divide="ignore", invalid="ignore"):
            return huber(pc - wc * (left + right) / 2, beta) + huber(
                ps - ws * np.log(right - left), beta
            )

    return obj, lg, rg


def brute_axis(pc, ps, tc, ts, cut_lo, cut_hi, wc, ws, beta) -> float:
    """Minimum of the axis objective over the feasible set."""
    obj, _, _ = axis_objective(pc, ps, tc, ts, wc, ws, beta)
    if not cut_lo and not cut_hi:
        return float(obj(0.0, 0.0))
    if cut_lo and cut_hi:
        aa, bb = np.meshgrid(GRID_2D, GRID_2D, indexing="ij")
        values = obj(aa, bb)
        i = np.unravel_index(np.nanargmin(values), values.shape)
        best = float(values[i])
        x0 = np.array([aa[i], bb[i]])
        fun = lambda x: float(obj(max(x[0], 0.0), max(x[1], 0.0)))  # noqa: E731
        for method in ("L-BFGS-B", "Nelder-Mead"):
            opts = (
                {"xatol": 1e-13, "fatol": 1e-15, "maxiter": 4000} if method == "Nelder-Mead" else {}
            )
            bounds = [(0, None), (0, None)] if method == "L-BFGS-B" else None
            res = minimize(fun, x0, method=method, bounds=bounds, options=opts)
            best = min(best, float(res.fun))
        return best
    one = (lambda s: obj(s, 0.0)) if cut_lo else (lambda s: obj(0.0, s))
    values = one(GRID)
    k = int(np.nanargmin(values))
    best = float(values[k])
    lo, hi = GRID[max(k - 1, 0)], GRID[min(k + 1, len(GRID) - 1)]
    if hi > lo:
        res = minimize_scalar(
            lambda s: float(one(s)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-14 * max(hi, 1e-300)},
        )
        best = min(best, float(res.fun))
    return best


def brute_one_sided_bulk(pc, ps, tc, ts, cut_lo, wc, ws, beta, grid_points=1500):
    """Vectorised brute force for many axes with exactly one side cut (numpy arrays).

    Dense log grid over how far the free edge moves, then golden-section refinement between
    the best grid point's neighbours. Returns the minimum objective per axis.
    """
    u, v = tc / wc, np.exp(ts / ws)
    lg, rg = u - v / 2, u + v / 2

    def obj(s):  # s: [K, G] outward move of the free edge
        left = lg[:, None] + np.where(cut_lo, -1.0, 0.0)[:, None] * s
        right = rg[:, None] + np.where(cut_lo, 0.0, 1.0)[:, None] * s
        return huber(pc[:, None] - wc * (left + right) / 2, beta) + huber(
            ps[:, None] - ws * np.log(right - left), beta
        )

    grid = np.concatenate([[0.0], np.geomspace(1e-9, 1e7, grid_points)])
    values = obj(np.broadcast_to(grid, (len(pc), len(grid))))
    k = values.argmin(axis=1)
    best = values[np.arange(len(pc)), k]
    lo = grid[np.maximum(k - 1, 0)]
    hi = grid[np.minimum(k + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(120):
        x1 = hi - ratio * (hi - lo)
        x2 = lo + ratio * (hi - lo)
        f1 = obj(x1[:, None])[:, 0]
        f2 = obj(x2[:, None])[:, 0]
        left_better = f1 < f2
        hi = np.where(left_better, x2, hi)
        lo = np.where(left_better, lo, x1)
        best = np.minimum(best, np.minimum(f1, f2))
    return best
