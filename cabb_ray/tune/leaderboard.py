"""The search's results as a table: read from the MLflow child runs (the record that survives
resumes), ranked, with the Pareto front for two objectives, written as CSV, Parquet and a plot
and printed for the console."""

from __future__ import annotations

import json
import math
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cabb_ray.metrics.names import METRIC_NAMES
from cabb_ray.tune.tags import TAG_OUTCOME, TAG_SAMPLED, TAG_TRIAL, children_filter

if TYPE_CHECKING:
    import optuna

SHOWN_METRICS = (*METRIC_NAMES, "best_pq")


def child_runs(uri: str, experiment_id: str, search: str) -> list[Any]:
    """Every child run of the search, paged: ``mlflow.search_runs`` pages too, but only on the
    process-wide tracking URI (we pass ours explicitly), and its pandas form is not the Run
    objects that leaderboard() and report.source read tags and run info from."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=children_filter(search),
            max_results=500,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def leaderboard(runs: list[Any], metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """One row per trial, best first by the objectives in order, then best PQ (trials
    without them last)."""
    rows = []
    for run in runs:
        values, tags = run.data.metrics, run.data.tags
        row: dict[str, Any] = {
            "trial": tags.get(TAG_TRIAL),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "outcome": tags.get(TAG_OUTCOME, "running"),
        }
        row.update(json.loads(tags.get(TAG_SAMPLED, "{}")))
        for key in SHOWN_METRICS:
            row[key] = values.get(key, math.nan)
        row["epochs"] = int(values.get("epoch", 0))
        row["wall_h"] = values.get("cost/wall_s", math.nan) / 3600
        row["device_h"] = values.get("cost/device_hours", math.nan)
        row["saved_device_h"] = values.get("cost/saved_device_hours", 0.0)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    keys = [*metrics, *(["best_pq"] if "best_pq" not in metrics else [])]
    ascending = [mode == "min" for mode in modes] + [False] * (len(keys) - len(modes))
    table = table.sort_values(keys, ascending=ascending, na_position="last")
    return table.reset_index(drop=True)


def cost_totals(table: pd.DataFrame) -> tuple[float, float]:
    """The search's device-hours, and those early stopping saved."""
    if table.empty:
        return 0.0, 0.0
    return float(table["device_h"].fillna(0).sum()), float(table["saved_device_h"].fillna(0).sum())


def objective_study(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> optuna.Study:
    """The rows with every objective as an in-memory Optuna study (user attrs ``row``: the
    row's position, ``trial``: its Tune trial id), for Optuna's Pareto front and plot.

    Built from the MLflow table rather than loaded from the search's optuna.db: the study's
    trials carry no Tune trial id or MLflow run id to find their rows by.
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        study = optuna.create_study(
            directions=["maximize" if mode == "max" else "minimize" for mode in modes]
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    values = table[metrics].to_numpy(dtype=float)
    names = table["trial"].astype(str).tolist()
    study.add_trials(
        optuna.trial.create_trial(values=row.tolist(), user_attrs={"row": i, "trial": names[i]})
        for i, row in enumerate(values)
        if not np.isnan(row).any()
    )
    return study


def pareto_front(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Rows not dominated in the objectives (ties kept; rows missing one left out): Optuna's
    ``best_trials`` of objective_study, best first by the first objective."""
    study = objective_study(table, metrics, modes)
    rows = sorted(trial.user_attrs["row"] for trial in study.best_trials)
    return table.iloc[rows].sort_values(metrics[0], ascending=modes[0] == "min")


CONSOLE_WIDTH = 120


def format_table(
    table: pd.DataFrame,
    searched: list[str],
    objectives: list[str],
    top: int = 10,
    width: int = CONSOLE_WIDTH,
) -> str:
    """Console text, at most ``width`` columns: the top trials with the searched values that
    vary between trials (short names), the objectives and the PQ parts. Searched values that
    do not fit are named in a last line; every column is in leaderboard.csv."""
    if table.empty:
        return "(no trials)"
    head = table.head(top)
    varying = [k for k in searched if k in head and head[k].map(_compact).nunique() > 1]
    names = _short_names(varying)
    metrics = list(dict.fromkeys([*objectives, "pq", "pc", "pq_th", "pq_st"]))
    left_out: list[str] = []
    while True:
        text = _render(head, varying, names, metrics)
        if max(len(line) for line in text.splitlines()) <= width or not varying:
            break
        left_out.insert(0, varying.pop())
    if left_out:
        note = f"(not shown: {', '.join(left_out)}; every column is in leaderboard.csv)"
        text += "\n" + textwrap.fill(note, width)
    return text


def _render(head: pd.DataFrame, params: list[str], names: dict[str, str], metrics) -> str:
    shown = head[["trial", "outcome", *params, *metrics, "epochs", "wall_h"]].copy()
    for key in params:
        shown[key] = shown[key].map(_compact)
    shown = shown.rename(columns={**names, "wall_h": "hours"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3g}")


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the last two where the last parts collide."""
    last = [k.split(".")[-1] for k in keys]
    return {
        k: (".".join(k.split(".")[-2:]) if last.count(short) > 1 else short)
        for k, short in zip(keys, last, strict=True)
    }


def _compact(value: Any) -> str:
    """Short text for a searched value: 0.123, 128x128 for sizes, 0.25-4 for ranges."""
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, int) for v in value):
            return f"{value[0]}x{value[1]}"
        return "-".join(_compact(v) for v in value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)
