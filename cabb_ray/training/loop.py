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
import math
import os
import shutil
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
from cabb_ray.tracking import RunLogger, per_class_table
from cabb_ray.training.engine import TrainState, evaluate, train_step
from cabb_ray.training.sessions import BEST_FILE
from cabb_ray.training.state import build_training, checkpoint_payload
from cabb_ray.viz import category_colors, overlay, size_bin_plot, size_bins_of

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
    # the objective whose best evaluation is kept as best/ (a search's first metric)
    objective: str = "pq"
    objective_mode: str = "max"

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
    val = load_split(args.root, cfg.data.val_split)
    with tempfile.TemporaryDirectory(prefix="cabb_ray_best_") as best_folder:
        best_store = Path(best_folder) / BEST_FILE
        payload = session.restored()
        if payload is None and args.resume:
            payload = load_checkpoint(args.resume)
            payload[BEST_FILE] = str(Path(args.resume).parent / BEST_FILE)
        restored_best = Path(payload.get(BEST_FILE) or "") if payload else None
        if restored_best is not None and restored_best.is_file():
            shutil.copyfile(restored_best, best_store)  # the best so far, restored
            if payload.get("best_is_temporary"):
                restored_best.unlink()
        _train(args, session, cfg, val, payload, best_store, threads)


def _train(args, session, cfg, val, payload, best_store: Path, threads: int) -> None:
    rank, device = session.rank, session.device
    parts = build_training(cfg, val.categories, device, payload)
    module, optimizer, scheduler, scaler, state = parts
    carry_best_score(state, args)
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
    transfer = {"non_blocking": device.type == "cuda"}  # from pinned memory
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
            images = [img.to(device, **transfer) for img in images]
            targets = [{k: v.to(device, **transfer) for k, v in t.items()} for t in targets]
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
        _end_of_epoch(args, session, parts, inner, logger, val, cfg, start, best_store)


def _end_of_epoch(args, session, parts, inner, logger, val, cfg, start, best_store) -> None:
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
    if evaluating and pq == pq and pq > state.best_pq:
        state.best_pq = pq
    improved = evaluating and _improves(state, args)
    if improved:  # before saving, so that the checkpoint knows its own best
        state.best_score = state.last_metrics[args.objective]
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
            best = _keep_best(Path(folder), best_store, inner, cfg, val, state, args, improved)
            phases.done("checkpoint")
            if evaluating:
                _log_evaluation(logger, result, kept, state, val)
                phases.done("mlflow")
            if improved or state.epoch == cfg.optim.epochs:
                _upload_best(logger, best)
            checkpoint = Path(folder)
        session.report(metrics, checkpoint)
        phases.done("report")
    if logger is not None:  # where the epoch's wall time went
        logger.metrics(phases.metrics(), state.step)


def carry_best_score(state: TrainState, args: LoopArgs) -> None:
    """A checkpoint written before ``best_score`` existed kept only the best PQ: with PQ as
    the objective that is the best score (else the next evaluation would replace best/ with
    whatever it finds)."""
    if state.best_score != state.best_score and args.objective == "pq" and state.best_pq >= 0:
        state.best_score = state.best_pq


def _improves(state: TrainState, args: LoopArgs) -> bool:
    value = state.last_metrics.get(args.objective, float("nan"))
    if value != value:
        return False
    best = state.best_score
    if best != best:
        return True
    return value > best if args.objective_mode == "max" else value < best


def _keep_best(folder, best_store, inner, cfg, val, state, args, improved: bool) -> Path | None:
    """The best epoch's weights-only checkpoint, in every epoch's checkpoint folder: it
    survives an MLflow outage at the improving epoch, and a restart (it comes back with the
    restored checkpoint). ``best_store`` holds it between epochs."""
    path = folder / BEST_FILE
    if improved:  # weights and config only: no optimizer state
        save_checkpoint(
            path,
            inner.model,
            cfg,
            val.categories,
            best={
                "metric": args.objective,
                "value": state.best_score,
                "pq": state.last_metrics.get("pq", float("nan")),  # this epoch's
                "epoch": state.epoch,
                "step": state.step,
            },
        )
        shutil.copyfile(path, best_store)
        return path
    if best_store.is_file():
        shutil.copyfile(best_store, path)
        return path
    return None


def _upload_best(logger, best: Path | None) -> None:
    """Rank 0: log the best weights as the run's ``best/checkpoint.pt``: when they improve,
    and again at the last epoch (the earlier upload may have been lost to an outage)."""
    if logger is None or best is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / "checkpoint.pt"
        shutil.copyfile(best, named)
        logger.artifact(named, "best")


def failure_report(metric_names, key: str, reason: str) -> dict[str, Any]:
    """A report that ends a run as failed: every metric NaN (Tune insists on a search's
    metrics in each result), and ``key`` with the reason, which a search's searcher and
    callback (or ``cabb_ray.train``) read."""
    return {
        **{metric: math.nan for metric in REPORT_FIRST},  # Tune's table shows these first
        **{metric: math.nan for metric in metric_names},
        "best_pq": math.nan,
        key: reason,
    }


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


def _log_evaluation(logger: RunLogger, result, kept, state: TrainState, val: PanopticSplit) -> None:
    """Rank 0: metrics, per-class table, size-bin plot and overlays."""
    logger.metrics(
        {
            **state.last_metrics,
            "best_pq": state.best_pq,
            "epoch": state.epoch,
            "time/train_s": state.train_seconds,
        },
        state.step,
    )
    logger.text(
        per_class_table(result.to_json()["per_class"]), f"eval/epoch_{state.epoch:03d}/per_class.md"
    )
    with tempfile.TemporaryDirectory() as folder:
        plot = size_bin_plot(size_bins_of(result.metrics), Path(folder) / "ap_by_size.png")
        logger.artifact(plot, f"eval/epoch_{state.epoch:03d}")
        colors = category_colors(val.categories)
        for image, rgb, prediction in kept:
            picture = overlay(rgb, prediction.ids, prediction.segments, colors)
            path = Path(folder) / f"overlay_{image['id']}.jpg"
            Image.fromarray(picture).save(path, quality=85)
            logger.artifact(path, f"eval/epoch_{state.epoch:03d}")
