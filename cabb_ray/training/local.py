"""Single-process training without Ray: the same steps as a Ray Train worker, in a plain loop.

Backbone pre-training (``cabb_ray.pretrain``) and the learning benchmark use it: neither needs
a search, and both want every core for the network rather than for Ray's actors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cabb_ray.config import ExperimentConfig
from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
from cabb_ray.data.panoptic_format import load_split
from cabb_ray.losses.balancing import host_values
from cabb_ray.training.engine import TrainModule, evaluate, train_step
from cabb_ray.training.state import build_training


@dataclass
class LocalRun:
    """What a local run leaves: the module, the evaluations by step and the time spent."""

    module: TrainModule
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    step_seconds: dict[int, float] = field(default_factory=dict)  # training time at each
    train_seconds: float = 0.0


def train_locally(
    cfg: ExperimentConfig,
    root: str | Path,
    evaluate_at: set[int] | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> LocalRun:
    """Train ``optim.epochs * optim.steps_per_epoch`` steps on one process, evaluating on the
    validation split after each step number in ``evaluate_at``."""
    device = torch.device("cpu")
    val = load_split(root, cfg.data.val_split)
    module, optimizer, scheduler, _, state = build_training(cfg, val.categories, device)
    run = LocalRun(module)
    total = cfg.optim.epochs * cfg.optim.steps_per_epoch
    dataset = CropDataset(root, cfg, split=cfg.data.train_split)
    loader = crop_loader(dataset)
    epoch = 0
    while state.step < total:  # skipped (non-finite) steps do not count: draw more batches
        for images, targets, _ in epoch_batches(loader, epoch):
            start = time.perf_counter()
            values = train_step(module, optimizer, scheduler, None, images, targets, state, cfg)
            run.train_seconds += time.perf_counter() - start
            if values is None:
                continue
            if log and state.step % log_every == 0:
                values = host_values(values)
                rate = state.step / run.train_seconds
                terms = " ".join(
                    f"{k[4:]} {v:.3f}" for k, v in values.items() if k.startswith("raw/")
                )
                log(
                    f"step {state.step}/{total} loss {values['loss']:.3f} ({terms}) "
                    f"{rate:.2f} steps/s"
                )
            if evaluate_at and state.step in evaluate_at:
                run.step_seconds[state.step] = run.train_seconds
                result, _ = evaluate(module.model, val, cfg, device)
                run.evaluations[state.step] = result.scalars()
                module.train()
            if state.step >= total:
                break
        epoch += 1
    return run
