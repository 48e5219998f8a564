"""``python -m cabb_ray.train``: one data-parallel training run on Ray Train, tracked in MLflow.

    python -m cabb_ray.train --config cpu_quickstart [--set optim.lr=0.02 ...] [--workers 2]
        [--gpu] [--mlflow-uri sqlite:///mlflow.db] [--experiment NAME] [--resume CHECKPOINT]
        [--name NAME] [--address ADDR]

The driver checks the inputs (config, workers, GPU, MLflow), prepares the dataset (generating
the synthetic one on first use), creates the MLflow run and starts a ``TorchTrainer`` (Ray 2.60
Train V2). Each worker trains the panoptic network under DDP (gloo on CPU, NCCL on GPU) on its
own crop stream, evaluates its shard of the validation images every ``eval.every`` epochs, and
the merged metrics are reported with a checkpoint. Rank 0 logs to MLflow. After a worker
failure Ray restarts the workers from the last checkpoint (``run.max_failures`` times).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cabb_ray.config import ExperimentConfig, config_from_dict, load_config
from cabb_ray.errors import CabbRayError, run_cli
from cabb_ray.launch import on_cluster
from cabb_ray.metrics.evaluator import METRIC_NAMES

# Reported to Ray (and a search's Tune) in this order, which Tune's progress table follows;
# size-bin APs and counts go to MLflow only.
REPORT_FIRST = ("pq", "pc", "pq_th", "pq_st")


def _maybe_die(fault: dict[str, Any] | None, rank: int, step: int) -> None:
    """Fault injection for tests: the given rank's process dies abruptly at the given step,
    once (a marker file remembers), as a crashed or preempted worker would. It first waits
    ``delay_s``: Ray Train V2 registers a report when its controller next polls the workers
    (every 2 s), so a crash right after a report would lose that checkpoint, which is not the
    situation under test."""
    if not fault or rank != fault["rank"] or step != fault["step"]:
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text("killed\n")
        time.sleep(float(fault.get("delay_s", 5.0)))
        os._exit(1)


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: the whole training run as seen by one rank."""
    import ray.train
    import ray.train.torch

    from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.engine import evaluate, train_step
    from cabb_ray.losses.balancing import host_values
    from cabb_ray.model.checkpoint import load_checkpoint, save_checkpoint
    from cabb_ray.run_state import build_training, checkpoint_payload
    from cabb_ray.tracking import RunLogger

    cfg = config_from_dict(loop["config"])
    if not loop.get("verbose"):
        # Train's INFO lines in this worker; its per-report "Reporting training result" line
        # comes from a logger named after its file, so under the root logger.
        logging.getLogger("ray.train").setLevel(logging.ERROR)
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    val = load_split(loop["root"], cfg.data.val_split)
    payload = None
    resume = ray.train.get_checkpoint()
    if resume is not None:  # Ray Train's own restart after a failure
        with resume.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / "checkpoint.pt")
    elif loop.get("resume"):
        payload = load_checkpoint(loop["resume"])
    parts = build_training(cfg, val.categories, device, payload)
    module, optimizer, scheduler, scaler, state = parts
    module = ray.train.torch.prepare_model(module)
    inner = module.module if hasattr(module, "module") else module
    logger = RunLogger(loop["mlflow_uri"], loop["run_id"]) if rank == 0 else None
    dataset = CropDataset(loop["root"], cfg, split=cfg.data.train_split, rank=rank)
    steps = cfg.optim.steps_per_epoch
    started_at = loop.get("started_at")
    loader = crop_loader(dataset, pin_memory=device.type == "cuda")
    copy = {"non_blocking": device.type == "cuda"}  # from pinned memory
    for epoch in range(state.epoch, cfg.optim.epochs):
        start = time.perf_counter()
        for i, (images, targets, _) in enumerate(epoch_batches(loader, epoch)):
            _maybe_die(loop.get("fault"), rank, state.step)
            if rank == 0 and started_at is not None:  # from the search trial's start
                logger.metrics({"time/startup_s": time.time() - started_at}, state.step)
                started_at = None
            step_start = time.perf_counter()
            images = [img.to(device, **copy) for img in images]
            targets = [{k: v.to(device, **copy) for k, v in t.items()} for t in targets]
            values = train_step(module, optimizer, scheduler, scaler, images, targets, state, cfg)
            state.train_seconds += time.perf_counter() - step_start
            if rank == 0 and values is not None and state.step % cfg.run.log_every == 0:
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
        phases = _PhaseClock(start, "steps")
        evaluating = _evaluates(state, cfg, loop.get("eval_epochs"))
        kept = []
        if evaluating:
            result, kept = evaluate(
                inner.model, val, cfg, device, rank, world, keep=cfg.run.overlays
            )
            state.last_metrics = result.scalars()
            phases.done("eval")
        pq = state.last_metrics.get("pq", float("nan"))
        improved = evaluating and pq == pq and pq > state.best_pq
        if improved:  # before saving, so that the checkpoint knows its own best
            state.best_pq = pq
        # Every report carries the same keys: the last evaluated metrics (a search's scheduler
        # and searcher read them at any epoch), the best PQ so far and the counters.
        metrics: dict[str, Any] = {
            **{k: state.last_metrics[k] for k in REPORT_FIRST if k in state.last_metrics},
            **{k: v for k, v in state.last_metrics.items() if k in METRIC_NAMES},
            "best_pq": state.best_pq if state.best_pq >= 0 else float("nan"),
            "epoch": state.epoch,
            "step": state.step,
            "evaluated": int(evaluating),
        }
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
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
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
            phases.done("report")
        if rank == 0:  # where the epoch's wall time went
            logger.metrics(phases.metrics(), state.step)


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


def _evaluates(state, cfg: ExperimentConfig, eval_epochs: list[int] | None) -> bool:
    """Evaluate every ``eval.every`` epochs, at the last epoch, at the epochs a search's
    scheduler decides on, and whenever nothing has been evaluated yet (so that no report
    lacks its metrics)."""
    return (
        state.epoch % cfg.eval.every == 0
        or state.epoch == cfg.optim.epochs
        or state.epoch in (eval_epochs or ())
        or not state.last_metrics
    )


def _log_evaluation(logger, result, kept, state, best: Path | None, val) -> None:
    """Rank 0: metrics, per-class table, size-bin plot, overlays, and the weights-only
    checkpoint ``best`` when PQ improved."""
    from PIL import Image

    from cabb_ray.predict import category_colors, overlay
    from cabb_ray.tracking import per_class_table, size_bin_plot

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


# ---------------------------------------------------------------------------------------------
# Driver


def prepare(cfg: ExperimentConfig, mlflow_uri: str | None, experiment: str | None):
    """Checks that fail fast, before Ray or any training starts; returns (cfg, uri, root)."""
    import dataclasses

    from cabb_ray.data.resolve import resolve_dataset_root
    from cabb_ray.tracking import check_tracking

    run = dataclasses.replace(
        cfg.run,
        mlflow_uri=mlflow_uri or cfg.run.mlflow_uri,
        experiment=experiment or cfg.run.experiment,
    )
    cfg = dataclasses.replace(cfg, run=run)
    if cfg.run.gpu and not torch.cuda.is_available() and not on_cluster():
        raise CabbRayError("--gpu: no CUDA device on this machine (drop --gpu to train on CPU)")
    uri = check_tracking(cfg.run.mlflow_uri)
    root = resolve_dataset_root(cfg.data)
    return cfg, uri, root


def run_training(
    cfg: ExperimentConfig,
    uri: str,
    root: Path,
    run_id: str,
    name: str,
    resume: str | None = None,
    fault: dict[str, Any] | None = None,
    verbose: bool = False,
):
    """Start the TorchTrainer and wait for it; returns Ray's result. ``fault`` is a test hook
    ({rank, step, marker}: that worker process exits at that step, once)."""
    from cabb_ray.launch import build_trainer, check_fits_locally, init_ray, worker_resources

    resources = worker_resources(cfg)
    if not on_cluster():
        check_fits_locally(resources.cpus, resources.gpus, f"{resources.workers} workers")
    init_ray(verbose=verbose)
    trainer = build_trainer(
        cfg,
        uri,
        root,
        run_id,
        name,
        resources,
        cfg.run.output_dir,
        resume=resume,
        fault=fault,
        verbose=verbose,
    )
    return trainer.fit()


def _run_name(storage: str, requested: str | None) -> str:
    """A run name that is new in ``storage``: Ray Train continues the checkpoints of a run
    whose storage and name repeat, so a reused name would silently resume an older run."""
    from cabb_ray.launch import run_name_taken

    if requested is not None:
        if run_name_taken(storage, requested):
            raise CabbRayError(
                f"--name {requested}: {storage}/{requested} already holds a run (Ray Train would "
                "continue its checkpoints); choose a new --name (with --resume CHECKPOINT to "
                "continue from one of its checkpoints)"
            )
        return requested
    stamp = time.strftime("train-%Y%m%d-%H%M%S")
    name, suffix = stamp, 1
    while run_name_taken(storage, name):  # several runs started within one second
        suffix += 1
        name = f"{stamp}-{suffix}"
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cabb_ray.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="cpu_quickstart", help="preset name or YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, help="Ray Train workers (run.workers)")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (run.gpu)")
    parser.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else run.mlflow_uri)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (run.experiment)")
    parser.add_argument("--resume", help="checkpoint.pt (or its folder) to continue from")
    parser.add_argument("--name", help="run name, new in run.output_dir (default: a timestamp)")
    parser.add_argument("--address", help="Ray cluster to join ('auto'; default: RAY_ADDRESS)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines")
    args = parser.parse_args(argv)

    # on a cluster head (cluster/*.yaml) results go to the shared storage unless --set says so
    storage = os.environ.get("CABB_RAY_STORAGE")
    overrides = [*([f"run.output_dir={storage}"] if storage else []), *args.set]
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if args.gpu:
        overrides.append("run.gpu=true")
    cfg = load_config(args.config, overrides)
    resume = None
    if args.resume:
        resume = Path(args.resume)
        resume = resume / "checkpoint.pt" if resume.is_dir() else resume
        if not resume.is_file():
            raise CabbRayError(f"--resume {args.resume}: no checkpoint.pt there")
        from cabb_ray.model.checkpoint import load_checkpoint

        if "optimizer" not in load_checkpoint(resume):  # raises for files that are no checkpoint
            raise CabbRayError(f"--resume {resume}: a model-only checkpoint cannot resume training")
        resume = str(resume.resolve())
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    name = _run_name(cfg.run.output_dir, args.name)
    cfg, uri, root = prepare(cfg, args.mlflow_uri, args.experiment)

    from cabb_ray.tracking import RunLogger, start_run

    run_id = start_run(cfg, uri, cfg.run.experiment, name)
    print(f"MLflow run {run_id} in experiment {cfg.run.experiment!r} at {uri}", flush=True)
    try:
        result = run_training(cfg, uri, root, run_id, name, resume, verbose=args.verbose)
    except KeyboardInterrupt:
        RunLogger(uri, run_id).finish("KILLED")
        raise
    except BaseException:
        RunLogger(uri, run_id).finish("FAILED")
        raise
    RunLogger(uri, run_id).finish("FINISHED")
    metrics = result.metrics or {}
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("pq", "pc", "miou", "map") if k in metrics)
    print(f"finished: epoch {metrics.get('epoch')}, step {metrics.get('step')}; {shown}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
