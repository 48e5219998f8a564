"""The training and evaluation steps, independent of Ray.

The training loop (``training/loop.py``) runs these wherever it runs (a Tune trial's process, a
Ray Train worker, a plain process); ``benchmarks/ray_overhead.py`` runs the same code in a plain
loop to measure what Ray costs. Distributed behaviour (DDP gradient
averaging, agreeing on skipped steps, merging evaluation sums) only uses ``torch.distributed``
when it is initialised.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from cabb_ray.config import ExperimentConfig
from cabb_ray.data.panoptic_format import PanopticSplit, segments_from_ids
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.balancing import LossBalancer, host_values
from cabb_ray.metrics import PanopticEvaluator
from cabb_ray.model.fusion import PanopticPrediction, panoptic_fusion
from cabb_ray.model.network import PanopticNet
from cabb_ray.structures.classes import ClassMapping


class TrainModule(nn.Module):
    """Network and loss balancer in one module, so DDP also averages the balancer's learned
    log-variances and one state dict holds both."""

    def __init__(self, model: PanopticNet, balancer: LossBalancer):
        super().__init__()
        self.model = model
        self.balancer = balancer

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]):
        return self.balancer(self.model(images, targets))


def lr_lambda(cfg: ExperimentConfig):
    """The paper's schedule (App. D), literally: lr_i = lr0 i / w for the first w warm-up
    steps (step 0 at lr 0), then lr_i = lr0 (1 - i / total_steps), which starts just below
    lr0 (1 - w / T) instead of continuing the ramp to lr0."""
    total = cfg.optim.epochs * cfg.optim.steps_per_epoch
    warmup = cfg.optim.warmup_steps

    def scale(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, 1.0 - step / total)

    return scale


def make_optimizer(module: nn.Module, cfg: ExperimentConfig):
    """SGD over the trainable parameters; the loss balancer's log-variances get no weight
    decay (decay would pull every learned weight towards 1 regardless of the losses)."""
    decayed, undecayed = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (undecayed if name.endswith("log_vars") else decayed).append(param)
    groups = [{"params": decayed}]
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(
        groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


@dataclass
class TrainState:
    """Counters that a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    best_pq: float = -1.0
    # the run's objective (a search's metric, PQ otherwise) at its best evaluation: the
    # epoch whose weights-only checkpoint is kept as best/
    best_score: float = math.nan
    last_metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    train_seconds: float = 0.0  # wall time inside train_step, over restarts


def _all_ranks_finite(total: Tensor) -> bool:
    flag = torch.isfinite(total).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


# A GradScaler starts at 2**16 and halves its scale after each step whose scaled gradients
# overflow: before the run's first step those skips are how it finds its scale, not
# divergence, and count toward optim.max_nonfinite_steps only once the scale is down to this.
# After the first step every skip counts (the scaler's occasional overflow once it has grown
# is a single skip; a streak is divergence).
AMP_SETTLED_SCALE = 1.0


class DivergedError(CabbRayError):
    """Training produced non-finite values too many steps in a row. Every rank raises it at
    the same step (the finiteness checks are all-reduced), and a restart from the last
    checkpoint would diverge again: a search records the trial as failed without retrying."""


def _skip(
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: ExperimentConfig,
    info: dict,
    what: str,
    counted: bool = True,
) -> None:
    """Count a skipped step; too many ``counted`` ones in a row stop the run with the last
    loss terms."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_total += 1
    if counted:
        state.nonfinite_streak += 1
    if state.nonfinite_streak >= cfg.optim.max_nonfinite_steps:
        values = host_values(info)
        raw = ", ".join(f"{k[4:]}={v:.3g}" for k, v in values.items() if k.startswith("raw/"))
        raise DivergedError(
            f"{state.nonfinite_streak} non-finite {what} in a row at step {state.step} "
            f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); last terms: "
            f"{raw}; lower optim.lr or enable optim.grad_clip_norm"
        )


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    state: TrainState,
    cfg: ExperimentConfig,
) -> dict[str, Tensor | float] | None:
    """One optimisation step; returns the values to log (0-d tensors still on the device:
    ``host_values`` turns them into numbers in one transfer, on logging steps only), or None
    when the step was skipped: because some rank's loss was not finite (all ranks skip
    together, so DDP stays in step), or because the gradient norm was not finite (DDP's
    averaged gradients make it equal on every rank). With AMP the GradScaler skips the latter
    itself and lowers its scale; such steps are skipped too and count, so a scale that never
    recovers stops the run after ``optim.max_nonfinite_steps`` instead of training nothing;
    only the scaler's warm-up (no step taken yet, scale above ``AMP_SETTLED_SCALE``) does not
    count.

    Two host synchronisations per step, the two finiteness decisions (with AMP a third: the
    GradScaler's own check of its inf flag)."""
    device = images[0].device
    with torch.autocast(device.type, enabled=scaler is not None):
        total, info = module(images, targets)
    if not _all_ranks_finite(total.detach()):
        _skip(optimizer, state, cfg, info, "losses")
        return None
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if cfg.optim.grad_clip_norm is not None:
        norm = nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip_norm)
    else:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm(grads)
    finite_norm = bool(torch.isfinite(norm))
    # the scaler's warm-up: no step taken yet, its scale still coming down from 2**16
    settling = (
        scaler is not None
        and not finite_norm
        and state.step == 0
        and scaler.get_scale() > AMP_SETTLED_SCALE
    )
    if scaler is not None:
        scaler.step(optimizer)  # a no-op when the unscaled gradients hold inf or NaN
        scaler.update()
    elif finite_norm:
        optimizer.step()
    if not finite_norm:
        _skip(optimizer, state, cfg, info, "gradient norms", counted=not settling)
        return None
    state.nonfinite_streak = 0
    scheduler.step()
    state.step += 1
    return {"loss": total.detach(), "lr": optimizer.param_groups[0]["lr"], **info}


def rng_state() -> dict[str, Any]:
    """The random states of this process. On CUDA only the current device's: Ray Train shows
    every worker all GPUs of its node, and a restart may land on a node with fewer of them."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # as a tensor and plain values: a checkpoint loads with torch.load(weights_only=True)
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": random.getstate(),
    }


def _numpy_state_plain(saved: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = saved
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def _numpy_state(saved: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = saved
    keys = keys.numpy() if isinstance(keys, Tensor) else np.asarray(keys)  # older: an array
    return (kind, keys.astype(np.uint32), pos, has_gauss, gauss)


def set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    cuda = saved.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # older checkpoints: one state per visible device
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    np.random.set_state(_numpy_state(saved["numpy"]))
    random.setstate(saved["python"])


def _rescaled(image: Tensor, scale: float) -> Tensor:
    if abs(scale - 1.0) < 1e-6:
        return image
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _upsampled_ids(ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if ids.shape == shape:
        return ids
    rows = np.minimum((np.arange(shape[0]) + 0.5) * ids.shape[0] / shape[0], ids.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * ids.shape[1] / shape[1], ids.shape[1] - 1)
    return ids[np.ix_(rows.astype(int), cols.astype(int))]


def predict_image(
    model: PanopticNet,
    image: np.ndarray,
    cfg: ExperimentConfig,
    classes: ClassMapping,
    device: torch.device,
) -> PanopticPrediction:
    """Full-image prediction at the training scale (shortest side s0), returned at the
    image's own resolution (ids nearest-upsampled, instance masks too). The image travels to
    the device as uint8 and is converted and resized there; fusion copies back only the
    semantic argmax, the thresholded masks, scores and labels."""
    scale = cfg.data.shortest_side / min(image.shape[:2])
    pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)  # a writable copy
    with torch.no_grad():
        (detection,) = model([_rescaled(pixels.float().div(255), scale)])
    prediction = panoptic_fusion(detection, classes, cfg.eval)
    shape = image.shape[:2]
    if prediction.ids.shape != shape:
        sy, sx = shape[0] / prediction.ids.shape[0], shape[1] / prediction.ids.shape[1]
        prediction.ids = _upsampled_ids(prediction.ids, shape)
        for inst in prediction.instances:
            inst["mask"] = _upsampled_ids(inst["mask"], shape)
            x0, y0, x1, y1 = inst["box"]
            inst["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        # areas and boxes of the upsampled map (scores and categories carry over)
        meta = {s["id"]: s for s in prediction.segments}
        prediction.segments = [
            {**meta[s["id"]], "area": s["area"], "bbox": s["bbox"]}
            for s in segments_from_ids(prediction.ids, meta)
        ]
    return prediction


def shard(items: list, rank: int, world: int) -> Iterator:
    """Every ``world``-th item starting at ``rank``: disjoint shards covering the list."""
    return iter(items[rank::world])


def evaluate(
    model: PanopticNet,
    split: PanopticSplit,
    cfg: ExperimentConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    keep: int = 0,
) -> tuple[Any, list[tuple[dict, np.ndarray, PanopticPrediction]]]:
    """Evaluate this rank's shard of the validation images, merge over ranks, and return the
    result plus the first ``keep`` (image, rgb, prediction) of this rank for overlays."""
    classes = ClassMapping.from_categories(split.categories)
    images = split.images[: cfg.eval.max_images] if cfg.eval.max_images else split.images
    crop = cfg.eval.over_crop_bin or cfg.data.crop_size
    crop_fraction = (crop[0] / cfg.data.shortest_side, crop[1] / cfg.data.shortest_side)
    evaluator = PanopticEvaluator(split.categories, crop_fraction=crop_fraction)
    kept = []
    was_training = model.training
    model.eval()
    for image in shard(images, rank, world):
        rgb = split.read_image(image)
        prediction = predict_image(model, rgb, cfg, classes, device)
        gt = split.read_panoptic(image, verify=False)
        evaluator.update(
            image["id"],
            gt,
            split.annotations[image["id"]]["segments_info"],
            prediction.ids,
            prediction.segments,
            split.panoptic_path(image),
            "prediction",
            prediction.instances,
        )
        if len(kept) < keep:
            kept.append((image, rgb, prediction))
    model.train(was_training)
    evaluator.all_reduce()
    return evaluator.compute(), kept
