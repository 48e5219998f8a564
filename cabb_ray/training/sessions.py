"""The three places the training loop runs, each a ``Session`` of ``training/loop.py``.

- ``TuneTrialSession``: a one-worker search trial trains in the Tune trial's own process, as
  Ray's guide recommends for single-process trials: no TorchTrainer and its ~7 actors per trial.
  Checkpoints go through ``ray.tune.report``; Tune's ``FailureConfig`` restarts a failed trial
  from the last one (``ray.tune.get_checkpoint``).
- ``RayTrainSession``: one rank of a multi-worker run under Ray Train (DDP).
- ``LocalSession``: ``cabb_ray.train`` with one worker, no Ray at all; checkpoints are kept in
  the run's folder as Ray Train would lay them out (``checkpoint_NNNNNN/checkpoint.pt``); a
  crashed run is continued with ``--resume`` (no automatic restart).

``ray.tune`` and ``ray.train`` are imported inside the methods that use them: the plain
one-worker run never loads Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cabb_ray.errors import CabbRayError
from cabb_ray.model.checkpoint import load_checkpoint


def local_device(gpu: bool) -> torch.device:
    """The device of a one-process run: the GPU it asked for (Ray's CUDA_VISIBLE_DEVICES makes
    it ``cuda``), never a silent fall-back to the CPU."""
    if gpu and not torch.cuda.is_available():
        raise CabbRayError("run.gpu: this process was given no CUDA device (train on CPU: drop it)")
    return torch.device("cuda" if gpu else "cpu")


BEST_FILE = "best.pt"  # beside checkpoint.pt: the best epoch's weights (training/loop.py)


def _payload(checkpoint: Any, rank: int = 0) -> dict[str, Any] | None:
    """The training checkpoint inside a Ray (Tune or Train) checkpoint, if there is one, with
    the path of a copy of its best weights (the folder may be temporary) under ``best.pt``."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / "checkpoint.pt").is_file():  # a diverged run's last report
            return None
        payload = load_checkpoint(Path(folder) / "checkpoint.pt")
        best = Path(folder) / BEST_FILE
        if best.is_file() and rank == 0:  # only rank 0 keeps and uploads the best weights
            handle, kept = tempfile.mkstemp(prefix="cabb_ray_restored_best_", suffix=".pt")
            os.close(handle)
            shutil.copyfile(best, kept)
            payload[BEST_FILE] = kept
            payload["best_is_temporary"] = True
        return payload


class TuneTrialSession:
    """Rank 0 of 1 inside a Tune function trainable."""

    launcher = "tune_trial"
    rank, world = 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    def restored(self) -> dict[str, Any] | None:
        import ray.tune

        return _payload(ray.tune.get_checkpoint())

    def prepare(self, module: nn.Module) -> nn.Module:
        return module

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(folder) if folder else None
        ray.tune.report(metrics, checkpoint=checkpoint)


class RayTrainSession:
    """One rank of a Ray Train run."""

    launcher = "ray_train"

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restored(self) -> dict[str, Any] | None:
        import ray.train

        return _payload(ray.train.get_checkpoint(), self.rank)

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """A plain process: checkpoints in ``run_dir``, the newest ``keep`` of them kept."""

    launcher = "local"
    rank, world = 0, 1

    def __init__(self, device: torch.device, run_dir: Path, keep: int):
        self.device = device
        self.run_dir = run_dir
        self.keep = keep
        self.metrics: dict[str, Any] = {}
        self.checkpoint: Path | None = None

    def restored(self) -> dict[str, Any] | None:
        return None  # a plain process does not restart itself; --resume names a checkpoint

    def prepare(self, module: nn.Module) -> nn.Module:
        return module

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        self.metrics = metrics
        if folder is None:
            return
        target = self.run_dir / f"checkpoint_{int(metrics['epoch']):06d}"
        partial = target.with_name(target.name + ".tmp")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        partial.replace(target)  # a checkpoint folder is complete or absent
        self.checkpoint = target
        kept = sorted(p for p in self.run_dir.glob("checkpoint_*") if p.suffix != ".tmp")
        for old in kept[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)
