"""Exact, vectorised crop-aware bounding-box (CABB) targets and loss.

Porzi et al., *Improving Panoptic Segmentation at All Scales* (CVPR 2021), Sec. 2.3-2.4 and
Appendices A-B, generalised to torchvision's weighted box encoding. The derivation is in
``docs/cabb.md``; in short:

* The objective separates into an x and a y problem. On an axis whose two sides are uncut the
  feasible set is a single point: the target is returned unchanged, bit for bit.
* With one side cut, the other edge stays fixed and the box is parametrised by its log-size
  ``y >= y0`` (``y0`` = the cropped box's log-size). With both sides cut the prediction itself
  is the answer when it contains the cropped box; otherwise the solution lies on one of the
  two edges of the feasible set (the only stationary point of the objective is the
  prediction), which are the two one-sided problems.
* Each one-sided problem is ``g(y) = h(a + c e^y) + h(p - w y)`` (``h`` = smooth-L1 with the
  loss's beta, ``c = w_center / 2``, ``w = w_size``). Its derivative is ``F(y) - G(y)`` where
  ``G`` is non-increasing and ``F`` is decreasing then increasing. That splits ``[y0, inf)``
  into at most four brackets on which ``g'`` is non-decreasing (bounds in closed form) and
  regions where ``g`` cannot have a local minimum. Each bracket holds at most one minimum,
  found by a fixed number of safeguarded Newton steps; the answer is the best of these
  candidates and ``y0``.

Everything is elementwise torch with fixed iteration counts: no Python loop over boxes, no
data-dependent host synchronisation on CUDA. On CPU the root finding runs only on the brackets
that contain a sign change (compaction is cheap there and saves most of the work).

Non-finite inputs pass through: a box whose prediction or target has a NaN or inf keeps its
target, so the loss comes out non-finite and the training loop's non-finite guard sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from cabb_ray.config import DEFAULT_BETA  # the smooth-L1 default, defined once

NEWTON_STEPS = 12
COMPACT_EVERY = 3


def _huber(z: Tensor, beta: float) -> Tensor:
    """Elementwise smooth-L1 exactly as ``torch.nn.functional.smooth_l1_loss`` computes it."""
    az = z.abs()
    return torch.where(az < beta, 0.5 * z * z / beta, az - 0.5 * beta)


@dataclass
class _OneSided:
    """``g(y) = h(alpha + gamma e^y) + h(ps - ws y)`` for ``y >= y0``; all fields same shape.

    One row per one-sided problem; ``gamma`` (half the centre weight) and ``ws`` (the size
    weight) are per row so that both axes, whatever their weights, are solved in one pass.
    """

    alpha: Tensor
    ps: Tensor
    y0: Tensor
    gamma: Tensor
    ws: Tensor
    beta: float

    def map(self, fn) -> _OneSided:
        """Apply ``fn`` (an index, an expand...) to every per-row field."""
        fields = (self.alpha, self.ps, self.y0, self.gamma, self.ws)
        return _OneSided(*(fn(t) for t in fields), self.beta)

    def value(self, y: Tensor) -> Tensor:
        return _huber(self.alpha + self.gamma * torch.exp(y), self.beta) + _huber(
            self.ps - self.ws * y, self.beta
        )

    def slope(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(g'(y), g''(y))."""
        beta, ws = self.beta, self.ws
        u = self.gamma * torch.exp(y)
        z = self.alpha + u
        r = self.ps - ws * y
        clip_z = torch.clamp(z / beta, -1.0, 1.0)
        d1 = u * clip_z - ws * torch.clamp(r / beta, -1.0, 1.0)
        zero = torch.zeros_like(u)
        d2 = (
            u * clip_z
            + torch.where(z.abs() < beta, u * u / beta, zero)
            + torch.where(r.abs() < beta, ws * ws / beta, zero)
        )
        return d1, d2

    def log_u(self, u: Tensor) -> Tensor:
        """The y at which gamma e^y = u; -inf for u <= 0."""
        return torch.log(torch.clamp(u, min=0.0) / self.gamma)

    def brackets(self) -> tuple[Tensor, Tensor]:
        """[M, 4] lower and upper ends of the brackets on which g' is non-decreasing."""
        alpha, ps, y0, ws, beta = self.alpha, self.ps, self.y0, self.ws, self.beta
        # F(y) = u h'(alpha + u) decreases up to u_m, then increases (u_m = 0 if alpha >= 0).
        u_m = torch.where(alpha < 0, torch.maximum(-alpha / 2, -alpha - beta), 0.0 * alpha)
        y_m = self.log_u(u_m)
        # Right of y_m, g' = F - G is non-decreasing, and g' >= 0 from min(hi_a, hi_b) on.
        lo_right = torch.maximum(y0, y_m)
        hi_a = torch.maximum(ps / ws, self.log_u(-alpha))
        hi_b = self.log_u(torch.maximum(beta - alpha, ws))
        # (+ log 2: doubling u keeps g' >= 0 there robustly, rounding of log/exp included)
        hi_right = torch.maximum(lo_right, torch.minimum(hi_a, hi_b) + math.log(2.0))
        # Left of y_m a local minimum needs G in its quadratic zone (ps/ws, (ps+beta)/ws).
        r_lo = torch.maximum(y0, ps / ws)
        r_hi = torch.minimum(y_m, (ps + beta) / ws)
        y_lq = self.log_u(-alpha - beta)  # F linear below, quadratic above
        b1 = torch.minimum(torch.minimum(r_hi, y_lq), self.log_u(ws * ws / beta))
        q_lo = torch.maximum(r_lo, y_lq)
        disc = alpha * alpha - 8.0 * ws * ws
        root = torch.sqrt(torch.clamp(disc, min=0.0))
        has = disc > 0
        b2 = torch.where(has, torch.minimum(r_hi, self.log_u((-alpha - root) / 4)), r_hi)
        a3 = torch.where(has, torch.maximum(q_lo, self.log_u((-alpha + root) / 4)), torch.inf)
        lower = torch.stack([r_lo, q_lo, a3, lo_right], dim=-1)
        upper = torch.stack([b1, b2, r_hi, hi_right], dim=-1)
        return lower, upper

    def minimise(self, compact: bool) -> tuple[Tensor, Tensor]:
        """Global minimiser and minimum of g over y >= y0, per row."""
        lower, upper = self.brackets()
        if compact:
            return self._minimise_compact(lower, upper)
        rows = self.map(lambda t: t.unsqueeze(-1).expand_as(lower))
        fa, _ = rows.slope(lower)
        fb, _ = rows.slope(upper)
        search = (lower < upper) & (fa < 0) & (fb >= 0)
        start = torch.where(lower <= upper, lower, rows.y0)
        cand = torch.where(search, rows.find_root(lower, upper, fa, fb, compact=False), start)
        ends = torch.where(lower <= upper, upper, rows.y0)
        cand = torch.cat([self.y0.unsqueeze(-1), cand, ends], dim=-1)
        values = self.map(lambda t: t.unsqueeze(-1)).value(cand)
        best, arg = values.min(dim=-1)
        return cand.gather(-1, arg.unsqueeze(-1)).squeeze(-1), best

    def _minimise_compact(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """CPU variant: work only on non-empty brackets, and root-find only where g' changes
        sign (most brackets are empty, so this skips most of the arithmetic)."""
        row, col = (lower < upper).nonzero(as_tuple=True)
        sub = self.map(lambda t: t[row])
        a, b = lower[row, col], upper[row, col]
        fa, _ = sub.slope(a)
        fb, _ = sub.slope(b)
        search = ((fa < 0) & (fb >= 0)).nonzero(as_tuple=True)[0]
        roots = sub.map(lambda t: t[search]).find_root(
            a[search], b[search], fa[search], fb[search], compact=True
        )
        # Candidates: the root (or the lower end) and the upper end of every non-empty bracket;
        # the upper end guards brackets whose end slope rounding made look sign-less.
        cand = torch.cat([a.index_put((search,), roots), b])
        row = torch.cat([row, row])
        sub = sub.map(lambda t: torch.cat([t, t]))
        values = sub.value(cand)
        best = self.value(self.y0)
        y = self.y0.clone()
        best_row = best.scatter_reduce(0, row, values, reduce="amin")
        wins = (values < best[row]) & (values == best_row[row])
        y.index_put_((row[wins],), cand[wins])
        return y, best_row

    def narrow_to_smooth_piece(
        self, a: Tensor, b: Tensor, fa: Tensor, fb: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Shrink [a, b] to the piece between smooth-L1 breakpoints that holds the root.

        With a small beta, a quadratic zone can be a sliver of the bracket where g' rises
        steeply; Newton steps from either side then crawl towards it. Between breakpoints g'
        is smooth, so one evaluation per breakpoint buys fast convergence afterwards.
        """
        beta, alpha = self.beta, self.alpha
        knots = torch.stack(
            [
                (self.ps - beta) / self.ws,
                (self.ps + beta) / self.ws,
                self.log_u(-alpha - beta),
                self.log_u(beta - alpha),
            ],
            dim=-1,
        )
        knots = torch.minimum(torch.maximum(knots, a.unsqueeze(-1)), b.unsqueeze(-1))
        f, _ = self.map(lambda t: t.unsqueeze(-1)).slope(knots)
        points = torch.cat([a.unsqueeze(-1), knots, b.unsqueeze(-1)], dim=-1)
        values = torch.cat([fa.unsqueeze(-1), f, fb.unsqueeze(-1)], dim=-1)
        neg = values < 0
        left = torch.where(neg, points, -torch.inf).argmax(dim=-1, keepdim=True)
        right = torch.where(neg, torch.inf, points).argmin(dim=-1, keepdim=True)
        return (
            points.gather(-1, left).squeeze(-1),
            points.gather(-1, right).squeeze(-1),
            values.gather(-1, left).squeeze(-1),
            values.gather(-1, right).squeeze(-1),
        )

    def find_root(self, a: Tensor, b: Tensor, fa: Tensor, fb: Tensor, compact: bool) -> Tensor:
        """Root of a non-decreasing g' in [a, b] (fa < 0 <= fb).

        Newton in y suits pieces dominated by the linear-in-y term, Newton in u = e^y those
        dominated by the exponential; each step takes the shorter proposal that lands inside
        the shrinking bracket, else Illinois false position. With ``compact`` (CPU), entries
        whose iterate stopped moving are set aside every few steps.
        """
        a, b, fa, fb = self.narrow_to_smooth_piece(a, b, fa, fb)
        x = _false_position(a, b, fa, fb)
        if not compact:
            state = (x, a, b, fa, fb)
            for _ in range(NEWTON_STEPS):
                state = self._newton_step(*state)
            return state[0]
        result = x.clone()
        live = torch.arange(x.shape[0], device=x.device)
        rows, state = self, (x, a, b, fa, fb)
        tiny = 16 * torch.finfo(x.dtype).eps
        for done_steps in range(0, NEWTON_STEPS, COMPACT_EVERY):
            before = state[0]
            for _ in range(min(COMPACT_EVERY, NEWTON_STEPS - done_steps)):
                state = rows._newton_step(*state)
            x = state[0]
            result[live] = x
            moving = ((x - before).abs() > tiny * x.abs().clamp(min=1.0)).nonzero(as_tuple=True)[0]
            if moving.numel() == 0:
                break
            if moving.numel() < 0.75 * x.numel():
                live = live[moving]
                rows = rows.map(lambda t, k=moving: t[k])
                state = tuple(t[moving] for t in state)
        return result

    def _newton_step(self, x: Tensor, a: Tensor, b: Tensor, fa: Tensor, fb: Tensor):
        f, df = self.slope(x)
        neg = f < 0
        fa = torch.where(neg, f, 0.5 * fa)
        fb = torch.where(neg, 0.5 * fb, f)
        a = torch.where(neg, x, a)
        b = torch.where(neg, b, x)
        safe_df = torch.where(df > 0, df, 1.0)
        step_y = x - f / safe_df
        ratio = 1.0 - f / safe_df  # Newton in u: u_new / u = 1 - f / (u dg'/du)
        step_u = x + torch.log(torch.where(ratio > 0, ratio, 1.0))
        ok_y = (df > 0) & (step_y >= a) & (step_y <= b)
        ok_u = (df > 0) & (ratio > 0) & (step_u >= a) & (step_u <= b)
        pick_u = ok_u & (~ok_y | ((step_u - x).abs() < (step_y - x).abs()))
        fallback = _false_position(a, b, fa, fb)
        x = torch.where(pick_u, step_u, torch.where(ok_y, step_y, fallback))
        return x, a, b, fa, fb


def _false_position(a: Tensor, b: Tensor, fa: Tensor, fb: Tensor) -> Tensor:
    """Secant point of the bracket, or its midpoint where that degenerates."""
    span = fb - fa
    x = a - fa * (b - a) / torch.where(span > 0, span, 1.0)
    inside = (span > 0) & (x > a) & (x < b)
    return torch.where(inside, x, 0.5 * (a + b))


def _check_inputs(pred: Tensor, target: Tensor, cut: Tensor, weights, beta: float) -> None:
    if pred.ndim != 2 or pred.shape[-1] != 4 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be [N, 4] deltas, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if cut.shape != pred.shape or cut.dtype != torch.bool:
        raise ValueError(f"cut must be a bool [N, 4] tensor, got {cut.dtype} {tuple(cut.shape)}")
    if len(weights) != 4 or min(float(w) for w in weights) <= 0:
        raise ValueError(f"weights must be 4 positive numbers, got {tuple(weights)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _solve(p: Tensor, t: Tensor, cut: Tensor, weights, beta: float, compact: bool) -> Tensor:
    """Crop-aware targets for both axes at once; [N, 2] views are (x, y) columns."""
    wc = p.new_tensor([float(weights[0]), float(weights[1])]).expand(p.shape[0], 2)
    ws = p.new_tensor([float(weights[2]), float(weights[3])]).expand(p.shape[0], 2)
    pc, ps, tc, ts = p[:, :2], p[:, 2:], t[:, :2], t[:, 2:]
    cut_lo, cut_hi = cut[:, :2], cut[:, 2:]
    y0 = ts / ws
    half = 0.5 * torch.exp(y0)
    center = tc / wc
    edge_lo, edge_hi = center - half, center + half
    # Low side cut: the high edge stays and the box grows towards low; the centre residual is
    # pc - wc (edge_hi - v/2) = alpha + (wc/2) v. High side cut: the mirror image (h is even).
    problem = _OneSided(
        torch.stack([pc - wc * edge_hi, wc * edge_lo - pc]),
        torch.stack([ps, ps]),
        torch.stack([y0, y0]),
        0.5 * torch.stack([wc, wc]),
        torch.stack([ws, ws]),
        beta,
    )
    active = torch.stack([cut_lo, cut_hi])
    if compact:
        idx = active.nonzero(as_tuple=True)
        y_sub, g_sub = problem.map(lambda v: v[idx]).minimise(compact=True)
        y = problem.y0.index_put(idx, y_sub)
        g = torch.full_like(y, torch.inf).index_put(idx, g_sub)
    else:
        y, g = problem.minimise(compact=False)
    use_hi = cut_hi & ~(cut_lo & (g[0] <= g[1]))
    new_c = torch.where(
        use_hi, wc * (edge_lo + 0.5 * torch.exp(y[1])), wc * (edge_hi - 0.5 * torch.exp(y[0]))
    )
    new_s = ws * torch.where(use_hi, y[1], y[0])
    # Both sides cut and the prediction contains the cropped box: the prediction is optimal.
    pred_half = 0.5 * torch.exp(ps / ws)
    pred_center = pc / wc
    contains = (pred_center - pred_half <= edge_lo) & (pred_center + pred_half >= edge_hi)
    free = cut_lo & cut_hi & contains
    new_c = torch.where(free, pc, new_c)
    new_s = torch.where(free, ps, new_s)
    # Uncut axes keep the target bit for bit; rounding never makes a cut axis worse.
    old = _huber(pc - tc, beta) + _huber(ps - ts, beta)
    new = _huber(pc - new_c, beta) + _huber(ps - new_s, beta)
    keep = ~(cut_lo | cut_hi) | ~(new < old)
    return torch.cat([torch.where(keep, tc, new_c), torch.where(keep, ts, new_s)], dim=1)


def crop_aware_targets(
    pred: Tensor,
    target: Tensor,
    cut: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    beta: float = DEFAULT_BETA,
) -> Tensor:
    """Encoded box closest to ``pred`` in smooth-L1 among boxes whose crop equals the target's.

    ``pred``, ``target``: [N, 4] deltas (dx, dy, dw, dh) in torchvision's ``BoxCoder``
    encoding with ``weights``; ``cut``: bool [N, 4] (left, top, right, bottom), True where the
    object extends beyond the crop on that side. A cut side may move outward freely, an uncut
    side stays. Returned without gradient; rows with nothing cut are ``target`` bit for bit.
    """
    _check_inputs(pred, target, cut, weights, beta)
    with torch.no_grad():
        work = torch.float32 if pred.dtype in (torch.float16, torch.bfloat16) else pred.dtype
        p, t = pred.detach().to(work), target.detach().to(work)
        out = _solve(p, t, cut, weights, float(beta), compact=p.device.type == "cpu")
        finite = torch.isfinite(p).all(dim=1) & torch.isfinite(t).all(dim=1)
        out = torch.where(finite.unsqueeze(1), out, t)
        return out.to(target.dtype)


def crop_aware_smooth_l1(
    pred: Tensor,
    target: Tensor,
    cut: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    beta: float = DEFAULT_BETA,
    reduction: str = "sum",
) -> Tensor:
    """Smooth-L1 of ``pred`` against the crop-aware target.

    By the envelope theorem (paper Prop. 1) the gradient of the CABB loss is the gradient of
    smooth-L1 at the detached optimal target, which is exactly what autograd gives here.
    """
    best = crop_aware_targets(pred, target, cut, weights, beta)
    return F.smooth_l1_loss(pred, best, beta=beta, reduction=reduction)
