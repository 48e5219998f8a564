"""MLflow tracking: where runs go, what they record, checked before any work starts.

Ray workers change their working directory, so relative tracking URIs and artifact locations
are made absolute in the driver (``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``, and
artifacts under ``mlartifacts/`` next to it). The driver creates the run and logs the config;
training workers (rank 0 only) attach to it by id through ``RunLogger``, so a run restarted
after a worker failure keeps every metric logged before it.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cabb_ray.config import ExperimentConfig, dump_config, flatten_config
from cabb_ray.errors import CabbRayError

MAX_PARAM_LENGTH = 500


def resolve_tracking_uri(uri: str) -> str:
    """Absolute form of a tracking URI (relative sqlite paths are made absolute)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        return f"sqlite:///{path}"
    return uri


def artifact_root(uri: str) -> str | None:
    """Explicit artifact location for experiments on a local sqlite store."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


@contextmanager
def _quick_http():
    """No retries and a short timeout while probing a server that may not be there."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking(uri: str) -> str:
    """Resolve ``uri`` and make sure a run can be recorded there; one-line error otherwise."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise CabbRayError(f"--mlflow-uri {uri}: folder {folder} is missing or not writable")
        return uri
    if not uri.startswith(("http://", "https://", "databricks")):
        raise CabbRayError(
            f"--mlflow-uri {uri}: expected sqlite:///path.db, http(s)://host:port or databricks"
        )
    from mlflow.tracking import MlflowClient

    with _quick_http():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise CabbRayError(
                f"--mlflow-uri {uri}: tracking server unreachable ({reason})"
            ) from None
    return uri


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, token usage);
# marked as model training, it opens on the runs table with their metrics and parent/child
# grouping.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(uri: str, experiment: str) -> str:
    """Id of the named experiment, created with an absolute artifact location if missing, and
    marked as a model-training experiment for the UI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client.create_experiment(
            experiment, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND
        )
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:  # created by an older version or another tool
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def start_run(
    cfg: ExperimentConfig,
    uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create the run in the driver, log the flattened config as params and as a YAML file."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten_config(cfg).items()]
    client.log_batch(run.info.run_id, params=params)  # MLflow splits it into its own batches
    client.log_text(run.info.run_id, dump_config(cfg), "config.yaml")
    return run.info.run_id


# Seconds to wait before each retry of a failed logging call (a locked sqlite database, a
# tracking server restarting); after the last one the record is dropped with a warning.
RETRY_DELAYS_S = (1.0, 4.0)


def with_retries(what: str, call, *args) -> tuple[bool, Any]:
    """``(True, call(*args))``, retried after each of RETRY_DELAYS_S; after the last failure
    a warning on stderr and ``(False, None)``: a tracking hiccup (sqlite "database is locked"
    with concurrent trials, a server restarting) must not fail a trial or a training."""
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            return True, call(*args)
        except Exception as err:  # sqlite, HTTP and filesystem errors of many kinds
            if attempt == len(RETRY_DELAYS_S):
                reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
                print(
                    f"warning: {what} not recorded after {attempt + 1} attempts ({reason}); "
                    "going on",
                    file=sys.stderr,
                    flush=True,
                )
                return False, None
            time.sleep(RETRY_DELAYS_S[attempt])
    return False, None


class RunLogger:
    """Metrics and artifacts of one run, by id (usable from any process).

    Writes are retried briefly and then dropped with a warning on stderr: a tracking hiccup
    must not kill a training worker (which would spend one of Ray Train's restarts) or lose
    the training itself; the checkpoints do not depend on MLflow."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        from cabb_ray.tracking_relay import RELAY_SCHEME, RelayedClient

        # relay://: a Ray actor on the head logs for a worker that cannot reach the server
        self.client = RelayedClient(uri) if uri.startswith(RELAY_SCHEME) else MlflowClient(uri)
        self.run_id = run_id

    def _tolerant(self, what: str, write, *args) -> bool:
        """Call ``write(*args)``, retrying after each of RETRY_DELAYS_S; False if it never
        succeeded."""
        ok, _ = with_retries(f"MLflow run {self.run_id}: {what}", write, *args)
        return ok

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in values.items()
            if isinstance(value, int | float) and value == value  # MLflow rejects NaN
        ]
        if batch:  # MLflow's client splits it into batches the server accepts
            self._tolerant(
                f"metrics at step {step}",
                lambda: self.client.log_batch(self.run_id, metrics=batch),
            )

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._tolerant(
            f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path), folder
        )

    def text(self, text: str, name: str) -> None:
        self._tolerant(f"artifact {name}", self.client.log_text, self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self._tolerant(f"status {status}", self.client.set_terminated, self.run_id, status)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._tolerant(f"tag {key}", self.client.set_tag, self.run_id, key, str(value))

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """Mark a run that continues (a resumed search trial) as running again, without the
        outcome an interruption gave it."""
        self.client.update_run(self.run_id, status="RUNNING")
        if "cabb_ray.outcome" in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, "cabb_ray.outcome")

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]


def per_class_table(per_class: list[dict[str, Any]]) -> str:
    """Markdown table of per-class PQ/SQ/RQ/PC/IoU in percent."""

    def pct(value: Any) -> str:
        return "" if value is None or value != value else f"{100 * value:.1f}"

    lines = ["| class | kind | PQ | SQ | RQ | PC | IoU |", "|---|---|---|---|---|---|---|"]
    for row in per_class:
        lines.append(
            f"| {row['name']} | {'thing' if row['isthing'] else 'stuff'} | {pct(row['pq'])} | "
            f"{pct(row['sq'])} | {pct(row['rq'])} | {pct(row['pc'])} | {pct(row['iou'])} |"
        )
    return "\n".join(lines) + "\n"
