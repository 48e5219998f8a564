"""Everything a training run carries from step to step, built and checkpointed in one place.

The Ray Train worker, the local loop and ``benchmarks/gpu_smoke.py`` build their module,
optimizer, schedule and GradScaler here, so that the order that matters on a GPU holds for
all of them: the module is moved to the device before the optimizer exists and before a
checkpoint is restored, so restored momentum buffers land next to their parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cabb_ray.config import ExperimentConfig
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.balancing import LossBalancer
from cabb_ray.model.network import build_model
from cabb_ray.training.engine import (
    TrainModule,
    TrainState,
    make_optimizer,
    rng_state,
    set_rng_state,
)

# TrainState fields checkpointed
STATE_KEYS = (
    "step",
    "epoch",
    "nonfinite_total",
    "best_pq",
    "best_score",
    "last_metrics",
    "train_seconds",
)


@dataclass
class TrainingParts:
    module: TrainModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    state: TrainState

    def __iter__(self):
        """Unpack as ``module, optimizer, scheduler, scaler, state = parts``."""
        return iter((self.module, self.optimizer, self.scheduler, self.scaler, self.state))


def build_training(
    cfg: ExperimentConfig,
    categories: list[dict[str, Any]],
    device: torch.device,
    payload: dict[str, Any] | None = None,
) -> TrainingParts:
    """Network + balancer on ``device``, SGD and schedule, a GradScaler for AMP on CUDA, and
    the counters; restored from a training checkpoint's ``payload`` when given (its weights
    replace the starting weights, which are then not read)."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, categories, starting_weights=payload is None)
    module = TrainModule(model, LossBalancer(cfg.loss)).to(device)
    optimizer, scheduler = make_optimizer(module, cfg)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.optim.amp else None
    parts = TrainingParts(module, optimizer, scheduler, scaler, TrainState())
    if payload is not None:
        restore(parts, payload)
    return parts


def restore(parts: TrainingParts, payload: dict[str, Any]) -> None:
    parts.module.model.load_state_dict(payload["model"])
    parts.module.balancer.load_state_dict(payload["balancer"])
    saved_groups = len(payload["optimizer"]["param_groups"])
    if saved_groups != len(parts.optimizer.param_groups):
        raise CabbRayError(
            f"checkpoint: its optimizer has {saved_groups} parameter group(s), this version "
            f"{len(parts.optimizer.param_groups)} (the uncertainty log-variances now train "
            "without weight decay); it still predicts and evaluates, but cannot resume training"
        )
    parts.optimizer.load_state_dict(payload["optimizer"])  # casts its state to the params'
    parts.scheduler.load_state_dict(payload["scheduler"])
    if parts.scaler is not None and payload.get("scaler"):
        parts.scaler.load_state_dict(payload["scaler"])
    for key in STATE_KEYS:
        if key in payload["state"]:  # checkpoints written before a key existed lack it
            setattr(parts.state, key, payload["state"][key])
    set_rng_state(payload["rng"])


def checkpoint_payload(parts: TrainingParts) -> dict[str, Any]:
    """What a training checkpoint holds besides the weights (``save_checkpoint`` adds them)."""
    return {
        "balancer": parts.module.balancer.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "state": {key: getattr(parts.state, key) for key in STATE_KEYS},
        "rng": rng_state(),
    }
