"""How the six loss terms are combined into the one that is minimised.

The EfficientPS replication suspected the CABB box term was drowned out by the others, so the
weighting is explicit and searchable, and its effect is logged: ``forward`` returns, besides
the total, each term's raw magnitude and the effective weight it was multiplied by.

* ``fixed``: sum of ``loss.weights[term] * term``.
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): a learned log-variance s per term,
  total = sum(exp(-s) * term + s); the effective weight is exp(-s). The log-variances are
  parameters of this module and train with the network.
* ``normalized``: each term divided by a running mean of its own (detached) magnitude, then
  multiplied by its fixed weight, so every term contributes on the same scale whatever its
  natural size. Under DDP the running means are updated from the mean over ranks, so all ranks
  use the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cabb_ray.config import LOSS_TERMS, LossConfig

EPS = 1e-8


class LossBalancer(nn.Module):
    """Combine named loss terms according to ``loss.balancing``."""

    def __init__(self, cfg: LossConfig, terms: tuple[str, ...] = LOSS_TERMS):
        super().__init__()
        self.mode = cfg.balancing
        self.terms = terms
        self.momentum = cfg.normalized_momentum
        self.register_buffer("fixed", torch.tensor([getattr(cfg.weights, t) for t in terms]))
        self.log_vars = (
            nn.Parameter(torch.zeros(len(terms))) if self.mode == "uncertainty" else None
        )
        self.register_buffer("running", torch.zeros(len(terms)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def effective_weights(self) -> Tensor:
        if self.mode == "uncertainty":
            return torch.exp(-self.log_vars.detach())
        if self.mode == "normalized":
            return self.fixed / (self.running + EPS) if self.seen > 0 else self.fixed.clone()
        return self.fixed.clone()

    @torch.no_grad()
    def _update_running(self, raw: Tensor) -> None:
        import torch.distributed as dist

        raw = raw.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(raw)
            raw /= dist.get_world_size()
        if self.seen == 0:
            self.running.copy_(raw)
        else:
            self.running.mul_(self.momentum).add_((1 - self.momentum) * raw)
        self.seen += 1

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """(total loss, {"raw/<term>": magnitude, "weight/<term>": effective weight})."""
        missing = [t for t in self.terms if t not in losses]
        if missing:
            raise KeyError(f"loss terms missing from the model output: {missing}")
        stacked = torch.stack([losses[t] for t in self.terms])
        raw = stacked.detach().float()
        if self.mode == "normalized" and self.training and bool(torch.isfinite(raw).all()):
            self._update_running(raw)
        if self.mode == "uncertainty":
            total = (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()
        else:
            total = (self.effective_weights().to(stacked.dtype) * stacked).sum()
        weights = self.effective_weights()
        info = {f"raw/{t}": float(raw[k]) for k, t in enumerate(self.terms)}
        info.update({f"weight/{t}": float(weights[k]) for k, t in enumerate(self.terms)})
        return total, info
