"""``python -m cabb_ray.train``: one training run, tracked in MLflow.

    python -m cabb_ray.train --config cpu_quickstart [--set optim.lr=0.02 ...] [--workers 2]
        [--gpu] [--mlflow-uri sqlite:///mlflow.db] [--experiment NAME] [--resume CHECKPOINT]
        [--name NAME] [--address ADDR]

The driver checks the inputs (config, workers, GPU, MLflow), prepares the dataset (generating
the synthetic one on first use) and creates the MLflow run. One worker trains in this process
(no Ray: checkpoints in ``run.output_dir/NAME/checkpoint_NNNNNN``); ``--workers N`` starts a
``TorchTrainer`` (Ray 2.60 Train V2) whose workers train under DDP (gloo on CPU, NCCL on GPU)
on their own crop streams and evaluate their shards of the validation images; after a worker
failure Ray restarts them from the last checkpoint (``run.max_failures`` times). Both run the
same loop (``cabb_ray.training.loop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cabb_ray.config import ExperimentConfig, config_to_dict, load_config
from cabb_ray.data.resolve import resolve_dataset_root
from cabb_ray.data.samplers import load_sampler
from cabb_ray.errors import ERROR_REPORT_KEY, ArgumentParser, CabbRayError, check_name, run_cli
from cabb_ray.model.checkpoint import check_same_classes, load_checkpoint, load_weights_strictly
from cabb_ray.tracking import RunLogger, check_tracking, start_run
from cabb_ray.tracking_relay import worker_tracking_uri
from cabb_ray.training.loop import LoopArgs, train_loop
from cabb_ray.training.ray_env import (
    check_fits_locally,
    init_ray,
    on_cluster,
    run_name_taken,
    worker_resources,
)
from cabb_ray.training.sessions import LocalSession, local_device

# ---------------------------------------------------------------------------------------------
# Driver


def prepare(cfg: ExperimentConfig, mlflow_uri: str | None, experiment: str | None):
    """Checks that fail fast, before Ray or any training starts; returns (cfg, uri, root)."""
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
    # what each worker would otherwise find out after Ray started (and retry): the split and
    # its index readable and consistent, crops that fit, ISUS with things to centre on
    load_sampler(root, cfg.data.train_split, cfg)
    return cfg, uri, root


def check_resume(payload: dict[str, Any], path: Path, cfg: ExperimentConfig, root: Path) -> None:
    """``--resume`` with a checkpoint of another network or class set fails here, in one
    line, not in every worker's ``load_state_dict``."""
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.model.network import build_model

    categories = load_split(root, cfg.data.val_split).categories
    where = f"--resume {path}"
    check_same_classes(where, payload.get("categories", []), categories)
    model = build_model(cfg, categories, starting_weights=False)
    load_weights_strictly(model, payload["model"], where, cfg.model.preset)


@dataclass
class RunResult:
    """How a run ended: its last reported metrics and its last checkpoint folder."""

    metrics: dict[str, Any]
    checkpoint: Path | None


def run_training(
    cfg: ExperimentConfig,
    uri: str,
    root: Path,
    run_id: str,
    name: str,
    resume: str | None = None,
    fault: dict[str, Any] | None = None,
    verbose: bool = False,
) -> RunResult:
    """Train one worker in this process, or start a TorchTrainer for several and wait for it.
    ``fault`` is a test hook ({rank, step, marker}: that worker exits at that step, once)."""
    resources = worker_resources(cfg)
    if not on_cluster():
        check_fits_locally(resources.cpus, resources.gpus, f"{resources.workers} workers")
    args = LoopArgs(
        config=config_to_dict(cfg),
        root=str(Path(root).resolve()),
        run_id=run_id,
        mlflow_uri=uri,
        resume=resume,
        fault=fault,
        verbose=verbose,
    )
    if resources.workers == 1 and not on_cluster():
        run_dir = Path(cfg.run.output_dir).expanduser().resolve() / name
        session = LocalSession(local_device(cfg.run.gpu), run_dir, cfg.run.keep_checkpoints)
        args.threads = int(cfg.run.cpus_per_worker) if cfg.run.cpus_per_worker else None
        train_loop(args, session)
        return RunResult(session.metrics, session.checkpoint)
    # Ray Train's import costs ~2 s (measured with -X importtime) that one-worker runs skip
    from cabb_ray.training.ray_train import build_trainer

    init_ray(verbose=verbose)
    args.mlflow_uri = worker_tracking_uri(
        uri, on_cluster()
    )  # a relay where workers cannot reach it
    trainer = build_trainer(cfg, args, name, resources, cfg.run.output_dir)
    result = trainer.fit()
    if ERROR_REPORT_KEY in (result.metrics or {}):  # diverged: ended without Train's retries
        raise CabbRayError(str(result.metrics[ERROR_REPORT_KEY]))
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return RunResult(result.metrics or {}, checkpoint)


def _run_name(storage: str, requested: str | None) -> str:
    """A run name that is new in ``storage``: Ray Train continues the checkpoints of a run
    whose storage and name repeat, so a reused name would silently resume an older run."""
    if requested is not None:
        check_name("--name", requested)
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
    parser = ArgumentParser(
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
    resume, resumed = None, None
    if args.resume:
        resume = Path(args.resume)
        resume = resume / "checkpoint.pt" if resume.is_dir() else resume
        if not resume.is_file():
            raise CabbRayError(f"--resume {args.resume}: no checkpoint.pt there")
        resumed = load_checkpoint(resume)  # raises for files that are no checkpoint
        if "optimizer" not in resumed:
            raise CabbRayError(f"--resume {resume}: a model-only checkpoint cannot resume training")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    name = _run_name(cfg.run.output_dir, args.name)
    cfg, uri, root = prepare(cfg, args.mlflow_uri, args.experiment)
    if resumed is not None:
        check_resume(resumed, resume, cfg, root)
        resume = str(resume.resolve())

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
    metrics = result.metrics
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("pq", "pc", "miou", "map") if k in metrics)
    print(f"finished: epoch {metrics.get('epoch')}, step {metrics.get('step')}; {shown}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    run_cli(main)
