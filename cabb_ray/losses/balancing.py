"""How the six loss terms are combined into the one that is minimised.

The EfficientPS replication suspected the CABB box term was drowned out by the others, so the
weighting is explicit and searchable, and its effect is logged: ``forward`` returns, besides
the total, each term's raw magnitude and the effective weight it was multiplied by, as
detached tensors (turned into numbers only when they are logged, in one transfer).

* ``fixed``: total = sum_i w_i L_i with ``loss.weights``.
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): a learned log-variance
  s_i = log sigma_i^2 per term, total = sum_i exp(-s_i) L_i + s_i. Kendall et al.'s Eq. 7
  writes the regression form as 1/(2 sigma^2) L + log sigma = (exp(-s) L + s) / 2; we drop the
  common factor 1/2, which scales every gradient by 2 and leaves the optimum exp(-s_i) = 1/L_i
  unchanged. The effective weight is exp(-s_i). The s_i are parameters of this module that
  train with the network, without weight decay (``engine.make_optimizer``), and are
  projected into [-``loss.log_var_limit``, +limit] before every use: a term that is 0 on a
  batch has gradient 1 in s and would otherwise push its s down without bound.
* ``normalized``: total = sum_i w_i L_i / max(m_i, ``loss.normalized_floor``), where m_i is a
  bias-corrected exponential running mean of L_i (as in Adam: zero-initialised, divided by
  1 - momentum^t), so every term above the floor contributes on the scale of its weight.
  Under DDP the running means are updated from the mean over ranks: every rank all-reduces on
  every step (a rank with a non-finite term sends a flag instead of skipping the collective),
  and no rank updates when any rank's terms are not finite, so all ranks keep the same
  weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cabb_ray.config import LOSS_TERMS, LossConfig


class LossBalancer(nn.Module):
    """Combine named loss terms according to ``loss.balancing``."""

    def __init__(self, cfg: LossConfig, terms: tuple[str, ...] = LOSS_TERMS):
        super().__init__()
        self.mode = cfg.balancing
        self.terms = terms
        self.momentum = cfg.normalized_momentum
        self.floor = cfg.normalized_floor
        self.log_var_limit = cfg.log_var_limit
        self.register_buffer("fixed", torch.tensor([getattr(cfg.weights, t) for t in terms]))
        self.log_vars = (
            nn.Parameter(torch.zeros(len(terms))) if self.mode == "uncertainty" else None
        )
        self.register_buffer("running", torch.zeros(len(terms)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def _clamped_log_vars(self) -> Tensor:
        """The log-variances, projected back into [-limit, limit] in place before use. (A
        clamp inside the graph would zero their gradient outside the bounds and freeze them
        there for good; projected, they still follow the losses back.)"""
        with torch.no_grad():
            self.log_vars.clamp_(-self.log_var_limit, self.log_var_limit)
        return self.log_vars

    def running_mean(self) -> Tensor:
        """Bias-corrected running mean of each term (zeros before the first update)."""
        correction = 1 - self.momentum**self.seen  # a float base: no host-to-device copy
        return torch.where(self.seen > 0, self.running / correction.clamp_min(1e-12), self.running)

    def effective_weights(self) -> Tensor:
        if self.mode == "uncertainty":
            return torch.exp(-self.log_vars.detach())
        if self.mode == "normalized":
            mean = self.running_mean().clamp_min(self.floor)
            return torch.where(self.seen > 0, self.fixed / mean, self.fixed)
        return self.fixed.clone()

    @torch.no_grad()
    def _update_running(self, raw: Tensor) -> None:
        """One collective on every rank and step; no host synchronisation."""
        finite = torch.isfinite(raw)
        payload = torch.cat([torch.where(finite, raw, 0.0), (~finite.all()).float()[None]])
        world = 1
        if dist.is_available() and dist.is_initialized():  # on the loss's device: CUDA on NCCL
            dist.all_reduce(payload)
            world = dist.get_world_size()
        ok = payload[-1] == 0
        updated = self.momentum * self.running + (1 - self.momentum) * payload[:-1] / world
        self.running.copy_(torch.where(ok, updated, self.running))
        self.seen.add_(ok.long())

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {"raw/<term>": magnitude, "weight/<term>": effective weight}), the
        values as detached 0-d tensors."""
        missing = [t for t in self.terms if t not in losses]
        if missing:
            raise KeyError(f"loss terms missing from the model output: {missing}")
        stacked = torch.stack([losses[t] for t in self.terms])
        raw = stacked.detach().float()
        if self.mode == "normalized" and self.training:
            self._update_running(raw)
        if self.mode == "uncertainty":
            log_vars = self._clamped_log_vars()
            total = (torch.exp(-log_vars) * stacked + log_vars).sum()
        else:
            total = (self.effective_weights().to(stacked.dtype) * stacked).sum()
        weights = self.effective_weights()
        info = {f"raw/{t}": raw[k] for k, t in enumerate(self.terms)}
        info.update({f"weight/{t}": weights[k] for k, t in enumerate(self.terms)})
        return total, info


def host_values(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Numbers of a dict of 0-d tensors and floats, with one device-to-host transfer."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    numbers = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if keys:
        moved = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        numbers.update(zip(keys, moved, strict=True))
    return {k: numbers[k] for k in values}
