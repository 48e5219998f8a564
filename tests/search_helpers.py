"""Tiny searches for the tests that run real ones (Ray Tune, Optuna, MLflow): a space file on
the smallest scenes and schedule that still train, the CLI arguments that keep every record
under the test's folder, and the MLflow runs a search left."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_FIXED = {
    "data.synthetic.num_train": 6,
    "data.synthetic.num_val": 2,
    "data.synthetic.height": 128,
    "data.synthetic.width": 256,
    "data.crop_size": [64, 96],
    "data.shortest_side": 128,
    "model.canonical_scale": 28,
    "data.batch_size": 2,
    "optim.epochs": 2,
    "optim.steps_per_epoch": 3,
    "optim.warmup_steps": 1,
    "data.loader_workers": 0,
    "run.log_every": 1,
    "run.overlays": 1,
    "eval.max_images": 2,
}


def tiny_space(tmp_path: Path, name: str, **top) -> Path:
    data = {
        "base": "cpu_quickstart",
        "fixed": {**TINY_FIXED, "data.cache_dir": str(tmp_path / "cache")},
        "metric": "pq",
        "mode": "max",
        "resources": {"workers": 1, "cpus_per_worker": 1},
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def common_args(tmp_path: Path) -> list[str]:
    return [
        "--storage",
        str(tmp_path / "runs"),
        "--mlflow-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def children(tmp_path: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("cabb_ray.kind") == "search"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, kids
