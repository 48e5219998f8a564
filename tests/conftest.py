"""Shared fixtures: small generated datasets, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cabb_ray.data.synthetic import write_synthetic_dataset

SMALL = {"num_train": 10, "num_val": 3, "seed": 7, "height": 128, "width": 256}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (128x256) shared read-only by many tests."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, **SMALL)
    return root


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path) -> Path:
    """A private copy that a test may corrupt."""
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(synthetic_root, target)
    return target


@pytest.fixture
def local_ray():
    """A local Ray with 2 CPUs and the trial slots the search asks for, shut down after."""
    import ray

    from cabb_ray.training.ray_env import TRIAL_SLOT, quiet_ray

    quiet_ray(verbose=False)
    ray.init(num_cpus=2, resources={TRIAL_SLOT: 100}, log_to_driver=False)
    yield
    ray.shutdown()
