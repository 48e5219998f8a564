"""notebooks/analyze_search.ipynb, executed (nbclient) against a tiny search run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.search_helpers import common_args, tiny_space

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_search.ipynb"


def _execute(env: dict[str, str], cwd: Path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return notebook


def _outputs(notebook) -> str:
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            text.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.integration
def test_notebook_shows_every_section_of_a_real_search(tmp_path, monkeypatch):
    from cabb_ray.tune.cli import main as tune_main

    monkeypatch.chdir(tmp_path)
    space = tiny_space(
        tmp_path,
        "nb",
        metric=["pq", "pc"],
        mode=["max", "max"],
        num_samples=3,
        searcher={"type": "random", "seed": 0},
        space={
            "loss.balancing": {"choice": ["fixed", "normalized"]},
            "loss.weights.roi_box": {"loguniform": [0.5, 5.0]},
            "data.crop_size": {"choice": [[64, 96], [96, 96]]},
        },
    )
    import ray

    try:
        assert tune_main(["--space", str(space), *common_args(tmp_path), "--name", "nb1"]) == 0
    finally:
        ray.shutdown()  # the in-process search leaves Ray up; later tests start their own
    notebook = _execute(
        {
            "CABB_RAY_MLFLOW_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "CABB_RAY_EXPERIMENT": "nb",
            "CABB_RAY_SEARCH": "nb1",
        },
        tmp_path,
        monkeypatch,
    )
    text = _outputs(notebook)
    assert "search nb1: 3 trials, 3 evaluated" in text
    assert "importance for pq:" in text and "importance for pc:" in text
    assert "the CABB box terms carry" in text
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    # PQ/PC grid, 2 importances, parallel coordinates, loss terms, Pareto, overlays
    assert images >= 7


@pytest.mark.integration
def test_notebook_fails_loudly_without_a_search(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    from cabb_ray.config import load_config
    from cabb_ray.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_run(load_config("cpu_quickstart"), uri, "plain")  # a training run, no search
    with pytest.raises(CellExecutionError, match="no search in experiment 'plain'"):
        _execute(
            {"CABB_RAY_MLFLOW_URI": uri, "CABB_RAY_EXPERIMENT": "plain"}, tmp_path, monkeypatch
        )
