"""Launcher for runs of several workers: a ``TorchTrainer`` (Ray 2.60 Train V2, DDP over gloo
on CPU or NCCL on GPU) whose workers run the one training loop in a ``RayTrainSession``.

The trainer gets an absolute storage path (Tune changes a trial's working directory) and a run
name unique to the run: Ray Train restores automatically when storage and name repeat, which
is how a restarted search trial continues from its last checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cabb_ray.config import ExperimentConfig
from cabb_ray.errors import ERROR_REPORT_KEY
from cabb_ray.metrics.names import METRIC_NAMES
from cabb_ray.training.engine import DivergedError
from cabb_ray.training.loop import LoopArgs, failure_report, train_loop
from cabb_ray.training.ray_env import WorkerResources
from cabb_ray.training.sessions import RayTrainSession

FAILURE_FILE = "failure.json"  # the checkpoint folder of a run that diverged holds only this


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the loop, as this rank sees it. Divergence ends the
    run with a last report that says so (every rank diverges at the same step), instead of
    ``run.max_failures`` restarts that would diverge again. The report comes with a small
    checkpoint holding the reason: Train V2's result keeps only reports with a checkpoint."""
    import ray.train

    session = RayTrainSession()
    try:
        train_loop(LoopArgs.from_dict(config), session)
    except DivergedError as err:
        report = failure_report(METRIC_NAMES, ERROR_REPORT_KEY, str(err))
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if session.rank == 0:
                Path(folder, FAILURE_FILE).write_text(json.dumps({"error": str(err)}))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(report, checkpoint=checkpoint)


def build_trainer(
    cfg: ExperimentConfig,
    args: LoopArgs,
    name: str,
    resources: WorkerResources,
    storage: str | Path,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one multi-worker run (``args.threads`` is set here: each worker
    holds ``cpus_per_worker`` CPUs)."""
    storage = str(storage)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    args.threads = max(1, int(resources.cpus_per_worker))
    return TorchTrainer(
        train_worker,
        train_loop_config=args.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=resources.ray_resources(),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="INFO" if args.verbose else "ERROR"),
        ),
    )
