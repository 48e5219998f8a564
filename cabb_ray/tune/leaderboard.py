"""The search's results as a table: read from the MLflow child runs (the record that survives
resumes), ranked, with the Pareto front for two objectives, written as CSV, Parquet and a plot
and printed for the console."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from cabb_ray.metrics.names import METRIC_NAMES
from cabb_ray.tune.tags import TAG_OUTCOME, TAG_SAMPLED, TAG_TRIAL, children_filter

SHOWN_METRICS = (*METRIC_NAMES, "best_pq")


def child_runs(uri: str, experiment_id: str, search: str) -> list[Any]:
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


def pareto_front(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Rows not dominated in both objectives (ties kept)."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    values = table[metrics].to_numpy(dtype=float) * signs
    keep = []
    for i, row in enumerate(values):
        if any(math.isnan(v) for v in row):
            continue
        dominated = any(
            all(other >= row) and any(other > row)
            for j, other in enumerate(values)
            if j != i and not any(math.isnan(v) for v in other)
        )
        if not dominated:
            keep.append(i)
    return table.iloc[keep].sort_values(metrics[0], ascending=modes[0] == "min")


def pareto_plot(table: pd.DataFrame, front: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = metrics
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(table[x], table[y], color="#999", label="trials")
    ax.plot(front[x], front[y], "o-", color="#c33", label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(str(row["trial"]), (row[x], row[y]), fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("search trials: Pareto front")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
