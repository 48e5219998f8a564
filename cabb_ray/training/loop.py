"""The one training loop: every run, in whatever process it runs, trains through ``train_loop``.

Where it runs and how it reports is a ``Session`` (``training/sessions.py``): a Tune trial's own
process (one worker: ``ray.tune.report`` with a ``ray.tune.Checkpoint``), a Ray Train worker
(several workers under DDP: ``ray.train.report``), or a plain process (``cabb_ray.train`` with
one worker: checkpoints in the run's folder). The loop itself only trains, evaluates, logs to
MLflow on rank 0 and hands each epoch's metrics and checkpoint folder to its session.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from cabb_ray.config import ExperimentConfig, config_from_dict
from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
from cabb_ray.data.panoptic_format import PanopticSplit, load_split
from cabb_ray.losses.balancing import host_values
from cabb_ray.metrics.names import METRIC_NAMES
from cabb_ray.model.checkpoint import load_checkpoint, save_checkpoint
from cabb_ray.tracking import RunLogger, per_class_table, size_bin_plot
from cabb_ray.training.engine import TrainState, evaluate, train_step
from cabb_ray.training.state import build_training, checkpoint_payload
from cabb_ray.viz import category_colors, overlay

# Reported (to Ray, a search's Tune, the session) in this order, which Tune's progress table
# follows; size-bin APs and counts go to MLflow only.
REPORT_FIRST = ("pq", "pc", "pq_th", "pq_st")


@dataclass
class LoopArgs:
    """What a training run needs besides its process (plain values: it travels to Ray)."""

    config: dict[str, Any]  # config_to_dict of the run's ExperimentConfig
    root: str  # dataset root
    run_id: str  # the MLflow run that rank 0 logs to
    mlflow_uri: str
    resume: str | None = None  # a training checkpoint.pt to continue from (cabb_ray.train)
    fault: dict[str, Any] | None = None  # test hook, see _maybe_die
    eval_epochs: tuple[int, ...] = ()  # epochs a search's scheduler decides on
    verbose: bool = False
    started_at: float | None = None  # a trial's start (time.time()), for its start-up time
    threads: int | None = None  # torch threads: the CPUs this process holds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopArgs:
        return cls(**{**values, "eval_epochs": tuple(values.get("eval_epochs") or ())})


class Session(Protocol):
    """Where the loop runs: its rank, device, restart checkpoint and how it reports."""

    launcher: str  # tagged on the MLflow run: local | tune_trial | ray_train
    rank: int
    world: int
    device: torch.device

    def restored(self) -> dict[str, Any] | None:
        """The payload of the checkpoint this run restarts from after a failure, if any."""

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module that trains (DDP-wrapped under Ray Train)."""

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        """One epoch's metrics, with rank 0's checkpoint folder (copied away before return)."""


def _maybe_die(fault: dict[str, Any] | None, rank: int, step: int) -> None:
    """Fault injection for tests: the given rank's process dies abruptly at the given step,
    once (a marker file remembers), as a crashed or preempted worker would. It first waits
    ``delay_s``: Ray registers a report asynchronously (Train's controller polls its workers
    every 2 s), so a crash right after a report would lose that checkpoint, which is not the
    situation under test."""
    if not fault or rank != fault["rank"] or step != fault["step"]:
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text("killed\n")
        time.sleep(float(fault.get("delay_s", 5.0)))
        os._exit(1)


def set_threads(threads: int | None) -> int:
    """Torch's intra-op threads = the CPUs this process holds (Ray sets OMP_NUM_THREADS to a
    worker's integer CPU count, 1 for fractions, which would leave cores idle or oversubscribe
    them); returns the count in use."""
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def train_loop(args: LoopArgs, session: Session) -> None:
    """The whole training run as seen by one rank."""
    cfg = config_from_dict(args.config)
    if not args.verbose:
        logging.getLogger("ray.train").setLevel(logging.ERROR)
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
    threads = set_threads(args.threads)
    rank, device = session.rank, session.device
    val = load_split(args.root, cfg.data.val_split)
    payload = session.restored()
    if payload is None and args.resume:
        payload = load_checkpoint(args.resume)
    parts = build_training(cfg, val.categories, device, payload)
    module, optimizer, scheduler, scaler, state = parts
    module = session.prepare(module)
    inner = module.module if hasattr(module, "module") else module
    logger = RunLogger(args.mlflow_uri, args.run_id) if rank == 0 else None
    if logger is not None:
        logger.tags(
            {
                "cabb_ray.launcher": session.launcher,
                "cabb_ray.world_size": str(session.world),
                "cabb_ray.torch_threads": str(threads),
            }
        )
        print(
            f"training ({session.launcher}, {session.world} process(es)) with {threads} torch "
            f"thread(s) each on {device}",
            flush=True,
        )
    dataset = CropDataset(args.root, cfg, split=cfg.data.train_split, rank=rank)
    loader = crop_loader(dataset, pin_memory=device.type == "cuda")
    copy = {"non_blocking": device.type == "cuda"}  # from pinned memory
    steps = cfg.optim.steps_per_epoch
    started_at = args.started_at
    for epoch in range(state.epoch, cfg.optim.epochs):
        start = time.perf_counter()
        for i, (images, targets, _) in enumerate(epoch_batches(loader, epoch)):
            _maybe_die(args.fault, rank, state.step)
            if logger is not None and started_at is not None:  # from the trial's start
                logger.metrics({"time/startup_s": time.time() - started_at}, state.step)
                started_at = None
            step_start = time.perf_counter()
            images = [img.to(device, **copy) for img in images]
            targets = [{k: v.to(device, **copy) for k, v in t.items()} for t in targets]
            values = train_step(module, optimizer, scheduler, scaler, images, targets, state, cfg)
            state.train_seconds += time.perf_counter() - step_start
            if logger is not None and values is not None and state.step % cfg.run.log_every == 0:
                values = host_values(values)
                rate = (i + 1) / (time.perf_counter() - start)
                print(
                    f"epoch {epoch + 1}/{cfg.optim.epochs} step {i + 1}/{steps} "
                    f"loss {values['loss']:.3f} lr {values['lr']:.4g} ({rate:.2f} steps/s)",
                    flush=True,
                )
                logger.metrics(
                    {
                        **values,
                        "nonfinite_steps": state.nonfinite_total,
                        "time/train_s": state.train_seconds,
                    },
                    state.step,
                )
        state.epoch = epoch + 1
        _end_of_epoch(args, session, parts, inner, logger, val, cfg, start)


def _end_of_epoch(args, session, parts, inner, logger, val, cfg, start: float) -> None:
    """Evaluate when due, log, checkpoint and report the epoch."""
    state = parts.state
    phases = _PhaseClock(start, "steps")
    evaluating = _evaluates(state, cfg, args.eval_epochs)
    kept, result = [], None
    if evaluating:
        result, kept = evaluate(
            inner.model, val, cfg, session.device, session.rank, session.world,
            keep=cfg.run.overlays,
        )  # fmt: skip
        state.last_metrics = result.scalars()
        phases.done("eval")
    pq = state.last_metrics.get("pq", float("nan"))
    improved = evaluating and pq == pq and pq > state.best_pq
    if improved:  # before saving, so that the checkpoint knows its own best
        state.best_pq = pq
    metrics = epoch_metrics(state, evaluating)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if session.rank == 0:
            save_checkpoint(
                Path(folder) / "checkpoint.pt",
                inner.model,
                cfg,
                val.categories,
                **checkpoint_payload(parts),
            )
            phases.done("checkpoint")
            if evaluating:
                with tempfile.TemporaryDirectory() as best_folder:
                    best = None
                    if improved:  # weights and config only: no optimizer state in MLflow
                        best = save_checkpoint(
                            Path(best_folder) / "checkpoint.pt",
                            inner.model,
                            cfg,
                            val.categories,
                            best={"pq": pq, "epoch": state.epoch, "step": state.step},
                        )
                    _log_evaluation(logger, result, kept, state, best, val)
                phases.done("mlflow")
            checkpoint = Path(folder)
        session.report(metrics, checkpoint)
        phases.done("report")
    if logger is not None:  # where the epoch's wall time went
        logger.metrics(phases.metrics(), state.step)


def epoch_metrics(state: TrainState, evaluating: bool) -> dict[str, Any]:
    """Every report carries the same keys: the last evaluated metrics (a search's scheduler
    and searcher read them at any epoch), the best PQ so far and the counters."""
    return {
        **{k: state.last_metrics[k] for k in REPORT_FIRST if k in state.last_metrics},
        **{k: v for k, v in state.last_metrics.items() if k in METRIC_NAMES},
        "best_pq": state.best_pq if state.best_pq >= 0 else float("nan"),
        "epoch": state.epoch,
        "step": state.step,
        "evaluated": int(evaluating),
    }


class _PhaseClock:
    """Wall seconds of an epoch's phases: steps, eval, checkpoint, mlflow, report."""

    def __init__(self, start: float, first: str):
        self.start = self.last = start
        self.seconds: dict[str, float] = {}
        self.done(first)

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return {
            "time/epoch_s": self.last - self.start,
            **{f"time/epoch_{k}_s": v for k, v in self.seconds.items()},
        }


def _evaluates(state: TrainState, cfg: ExperimentConfig, eval_epochs: tuple[int, ...]) -> bool:
    """Evaluate every ``eval.every`` epochs, at the last epoch, at the epochs a search's
    scheduler decides on, and whenever nothing has been evaluated yet (so that no report
    lacks its metrics)."""
    return (
        state.epoch % cfg.eval.every == 0
        or state.epoch == cfg.optim.epochs
        or state.epoch in eval_epochs
        or not state.last_metrics
    )


def _log_evaluation(
    logger: RunLogger, result, kept, state: TrainState, best: Path | None, val: PanopticSplit
) -> None:
    """Rank 0: metrics, per-class table, size-bin plot, overlays, and the weights-only
    checkpoint ``best`` when PQ improved."""
    logger.metrics(
        {**state.last_metrics, "epoch": state.epoch, "time/train_s": state.train_seconds},
        state.step,
    )
    logger.text(
        per_class_table(result.to_json()["per_class"]), f"eval/epoch_{state.epoch:03d}/per_class.md"
    )
    with tempfile.TemporaryDirectory() as folder:
        plot = size_bin_plot(result.metrics, Path(folder) / "ap_by_size.png")
        logger.artifact(plot, f"eval/epoch_{state.epoch:03d}")
        colors = category_colors(val.categories)
        for image, rgb, prediction in kept:
            picture = overlay(rgb, prediction.ids, prediction.segments, colors)
            path = Path(folder) / f"overlay_{image['id']}.jpg"
            Image.fromarray(picture).save(path, quality=85)
            logger.artifact(path, f"eval/epoch_{state.epoch:03d}")
    if best is not None:
        logger.artifact(best, "best")
        logger.metrics({"best_pq": state.best_pq}, state.step)
