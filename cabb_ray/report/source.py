"""A search as MLflow recorded it: its parent run and its trials' child runs.

Reports read only MLflow (not Tune's folders), so they work from any machine that reaches the
tracking server, after the cluster that ran the search is gone."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cabb_ray.errors import CabbRayError, check_name
from cabb_ray.tune.tags import TAG_OUTCOME, TAG_SAMPLED, TAG_SEARCH, TAG_TRIAL


@dataclass
class Trial:
    """One finished trial: its run id, searched values and final metrics."""

    run_id: str
    trial_id: str
    sampled: dict[str, Any]
    metrics: dict[str, float]


@dataclass
class SearchRecord:
    uri: str
    experiment: str
    name: str
    parent_run_id: str
    parent_tags: dict[str, str]
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # outcome -> trials left out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        from cabb_ray.tracking import RunLogger

        return RunLogger(self.uri, run_id).history(key)


def load_search(uri: str, experiment: str, search: str | None = None) -> SearchRecord:
    """The named search of ``experiment`` (default: its newest), with its finished trials."""
    from mlflow.tracking import MlflowClient

    from cabb_ray.tune.leaderboard import child_runs

    if search is not None:
        check_name("--search", search)  # it goes into a filter string: no quotes
    try:  # a file that is no MLflow database, a server that does not answer: one line
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
    except Exception as err:
        lines = str(err).strip().splitlines()
        reason = lines[0][:160] if lines else type(err).__name__
        raise CabbRayError(
            f"--mlflow-uri {uri}: cannot read the tracking store ({reason})"
        ) from None
    if found is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise CabbRayError(
            f"--experiment {experiment}: no such experiment at {uri} (there: "
            f"{', '.join(names) or 'none'})"
        )
    where = "tags.`cabb_ray.kind` = 'search'"
    if search is not None:
        where += f" and tags.`{TAG_SEARCH}` = '{search}'"
    parents = client.search_runs(
        [found.experiment_id], filter_string=where, order_by=["start_time DESC"], max_results=1
    )
    if not parents:
        what = f"search {search!r}" if search else "search"
        raise CabbRayError(f"--experiment {experiment}: holds no {what} (at {uri})")
    parent = parents[0]
    name = parent.data.tags[TAG_SEARCH]
    record = SearchRecord(uri, experiment, name, parent.info.run_id, dict(parent.data.tags))
    for run in child_runs(uri, found.experiment_id, name):
        outcome = run.data.tags.get(TAG_OUTCOME, "running")
        if outcome != "finished":
            record.skipped[outcome] = record.skipped.get(outcome, 0) + 1
            continue
        record.trials.append(
            Trial(
                run.info.run_id,
                run.data.tags.get(TAG_TRIAL, ""),
                json.loads(run.data.tags.get(TAG_SAMPLED, "{}")),
                _final_evaluation(client, run),
            )
        )
    if not record.trials:
        raise CabbRayError(
            f"search {name} (experiment {experiment}): no finished trial to report on"
            + (f" ({_counts(record.skipped)})" if record.skipped else "")
        )
    return record


def _final_evaluation(client: Any, run: Any) -> dict[str, float]:
    """The evaluation metrics of the run's last evaluation (NaN for what it did not log).

    A run's latest value of a metric can be from an earlier evaluation: NaN values (an empty
    size bin, say) are not logged, so the final figures are read at the last evaluation's
    step (where ``epoch`` is logged with them)."""
    from cabb_ray.metrics.names import METRIC_NAMES

    epochs = client.get_metric_history(run.info.run_id, "epoch")
    if not epochs:
        return {}
    last = max(m.step for m in epochs)
    values: dict[str, float] = {}
    for key in run.data.metrics:
        if key in METRIC_NAMES or key.startswith(("map_", "box_map_", "things_")):
            history = client.get_metric_history(run.info.run_id, key)
            values[key] = next((m.value for m in history if m.step == last), math.nan)
    return values


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(skipped.items()))


def skipped_line(record: SearchRecord) -> str | None:
    if not record.skipped:
        return None
    return f"left out (not finished): {_counts(record.skipped)}"
