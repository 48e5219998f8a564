"""Ray's environment, for the launchers and the search driver (a leaf: no training code).

Cluster detection, what a run asks Ray for (checked before Ray starts: a request that can
never fit would otherwise make Ray wait or retry forever), Ray's start-up, and quiet logs.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from cabb_ray.config import ExperimentConfig
from cabb_ray.errors import CabbRayError


@dataclass(frozen=True)
class WorkerResources:
    """What one training run asks Ray for."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def ray_resources(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster this process joins: ``address``, else ``RAY_ADDRESS``, else one that
    ``ray start`` runs on this node (the head node of ``ray up``), which ``ray.init()`` joins
    by itself; None for a private local Ray."""
    if address or os.environ.get("RAY_ADDRESS"):
        return address or os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # a Ray without this helper: only explicit addresses count
        return None
    return read_ray_address() or None


def on_cluster(address: str | None = None) -> bool:
    """Whether resources are the cluster's, not this machine's (a head node may have no GPU)."""
    return cluster_address(address) is not None


def run_name_taken(storage: str | Path, name: str) -> bool:
    """Whether ``storage/name`` already holds a Ray Train run (local folder or s3:// etc.):
    starting a run of that name would silently continue the old run's checkpoints."""
    import pyarrow.fs

    storage = str(storage)
    if "://" not in storage:
        folder = Path(storage).expanduser() / name
        return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    filesystem, path = pyarrow.fs.FileSystem.from_uri(storage.rstrip("/") + "/" + name)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def worker_resources(cfg: ExperimentConfig, share: int = 1) -> WorkerResources:
    """Per-worker CPUs and GPUs. Unset CPUs on a local machine: its cores are shared out among
    the workers of ``share`` concurrent runs (Ray sets each worker's torch threads to its CPU
    count, so one core each would leave the rest idle); on a cluster, one each."""
    cpus = cfg.run.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if on_cluster() else max(1, (os.cpu_count() or 1) // (cfg.run.workers * share))
    return WorkerResources(cfg.run.workers, float(cpus), cfg.run.gpus_per_worker * cfg.run.gpu)


def check_fits_locally(need_cpus: float, need_gpus: float, what: str) -> None:
    """Fail before Ray starts when a local request can never be granted."""
    have_cpus = os.cpu_count() or 1
    have_gpus = _local_gpus()
    if need_cpus > have_cpus + 1e-9:
        raise CabbRayError(
            f"{what} need {need_cpus:g} CPUs but this machine has {have_cpus}; lower the workers "
            "or CPUs per worker"
        )
    if need_gpus > have_gpus + 1e-9:
        raise CabbRayError(
            f"{what} need {need_gpus:g} GPUs but this machine has {have_gpus}; lower the workers "
            "or GPUs per worker, or train on CPU"
        )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def quiet_ray(verbose: bool) -> None:
    """Keep the console to Ray's progress table and our own lines unless ``verbose``."""
    # Ray Train's print patch would echo every worker progress line twice on the driver.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # MLflow's artifact download progress bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A reused trial process waits this long for the previous trial's training thread to end
    # (ASHA stopped it mid-report); Ray's 2 s is less than unwinding a DataLoader takes, and a
    # reset that times out fails the next trial without a retry.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    if verbose:
        return
    if not on_cluster():  # no preemption on a local machine; its watcher logs an error line
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray.train", "ray.tune", "ray.data", "ray.util.state", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


# A search trial's driver (the Tune function that waits on its TorchTrainer) computes nothing,
# and Ray cannot schedule an actor that asks for no resource at all: it asks for one unit of
# this custom resource instead, so that on 2 cores the trial's worker can have both. A local
# Ray declares plenty of it; a cluster declares it on the nodes that may host trial drivers
# (the head node in cluster/*.yaml), which also keeps drivers off spot workers.
TRIAL_SLOT = "trial_slot"


# Set by quiet_ray, and handed to a cluster's worker processes by init_ray
WORKER_ENV = ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "RAY_TRAIN_ENABLE_PRINT_PATCH")


def init_ray(address: str | None = None, verbose: bool = False, dashboard: bool = True) -> None:
    """Join the cluster, or start a private local Ray. ``dashboard=False`` leaves the local
    dashboard out: idle, it keeps 7.7% of a 2-core machine busy (4.2% without it), time that
    in-process trials would otherwise train in."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray(verbose)
    address = cluster_address(address)
    ray.init(
        address=address,
        log_to_driver=True,
        logging_level=logging.INFO if verbose else logging.ERROR,
        # Python log level in every Ray process (workers' "Reporting training result" lines)
        logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        resources=None if address else {TRIAL_SLOT: 1000},
        include_dashboard=None if address or dashboard else False,
        # processes of a cluster started by `ray start` do not inherit this one's environment
        runtime_env={"env_vars": {k: os.environ[k] for k in WORKER_ENV}} if address else None,
    )
