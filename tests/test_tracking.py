"""MLflow logging from training workers: hiccups are retried, then dropped with a warning."""

from __future__ import annotations

import pytest

import cabb_ray.tracking
from cabb_ray.config import load_config
from cabb_ray.tracking import RunLogger, start_run


@pytest.fixture
def logger(tmp_path, monkeypatch) -> RunLogger:
    monkeypatch.setattr(cabb_ray.tracking, "RETRY_DELAYS_S", (0.0, 0.0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return RunLogger(uri, start_run(load_config("cpu_quickstart"), uri, "hiccups"))


def _failing(times: int, real):
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return real(*args, **kwargs)

    return write, calls


def test_a_locked_database_is_retried_until_the_write_lands(logger, capsys, monkeypatch):
    write, calls = _failing(2, logger.client.log_batch)
    monkeypatch.setattr(logger.client, "log_batch", write)
    logger.metrics({"loss": 1.5}, step=3)
    assert calls["n"] == 3
    assert logger.history("loss") == [(3, 1.5)]
    assert capsys.readouterr().err == ""


def test_a_write_that_keeps_failing_warns_and_training_goes_on(logger, capsys, monkeypatch):
    write, calls = _failing(99, logger.client.log_artifact)
    monkeypatch.setattr(logger.client, "log_artifact", write)
    logger.artifact(__file__, "eval")  # no exception
    err = capsys.readouterr().err
    assert calls["n"] == 3 and err.count("\n") == 1
    assert f"MLflow run {logger.run_id}: artifact test_tracking.py not recorded" in err
    assert "database is locked" in err
    logger.metrics({"loss": 2.0}, step=4)  # the next write goes through
    assert logger.history("loss") == [(4, 2.0)]


def test_loopback_servers_need_a_relay_only_on_a_cluster(monkeypatch):
    from cabb_ray.tracking_relay import needs_relay, worker_tracking_uri

    assert needs_relay("http://127.0.0.1:5000") and needs_relay("http://localhost:5000")
    assert needs_relay("sqlite:////home/ray/mlflow.db")  # a file on the head only
    assert not needs_relay("http://10.0.0.10:5000") and not needs_relay("databricks")
    assert worker_tracking_uri("http://127.0.0.1:5000", cluster=False) == "http://127.0.0.1:5000"
    internal = "http://mlflow.internal:5000"
    assert worker_tracking_uri(internal, cluster=True) == internal


@pytest.mark.integration
def test_a_worker_logs_through_the_relay_actor(tmp_path):
    """A Ray task standing in for a Train worker on a GPU node: every RunLogger call it makes
    with the relay:// URI lands in the run, files included."""
    import ray

    from cabb_ray.tracking_relay import start_relay

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(load_config("cpu_quickstart"), uri, "relayed")
    ray.shutdown()  # whatever an earlier test left running
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        relay_uri = start_relay(uri)
        assert relay_uri.startswith("relay://") and start_relay(uri) == relay_uri  # shared

        @ray.remote(num_cpus=1)
        def worker(relay_uri: str, run_id: str) -> list:
            import tempfile
            from pathlib import Path

            logger = RunLogger(relay_uri, run_id)
            logger.metrics({"loss": 0.5}, step=7)
            logger.text("table\n", "eval/per_class.md")
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "overlay.jpg"
                path.write_bytes(b"\xff\xd8jpeg")
                logger.artifact(path, "eval")
            logger.tags({"cabb_ray.outcome": "finished"})
            return logger.history("loss")

        assert ray.get(worker.remote(relay_uri, run_id)) == [(7, 0.5)]
        # the relay's process dies: Ray restarts it (max_restarts) and logging goes on
        from cabb_ray.tracking_relay import NAMESPACE

        name = relay_uri[len("relay://") :]
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)

        @ray.remote(num_cpus=1)
        def after_restart(relay_uri: str, run_id: str) -> list:
            logger = RunLogger(relay_uri, run_id)
            logger.metrics({"loss": 0.25}, step=8)
            return logger.history("loss")

        assert ray.get(after_restart.remote(relay_uri, run_id)) == [(7, 0.5), (8, 0.25)]
    finally:
        ray.shutdown()
    direct = RunLogger(uri, run_id)
    run = direct.client.get_run(run_id)
    assert run.data.tags["cabb_ray.outcome"] == "finished"
    paths = {a.path for a in direct.client.list_artifacts(run_id, "eval")}
    assert paths == {"eval/per_class.md", "eval/overlay.jpg"}


def test_experiments_open_on_the_runs_table_in_the_ui(logger):
    """MLflow 3's UI shows an experiment without mlflow.experimentKind as a GenAI one."""
    from cabb_ray.tracking import experiment_id

    run = logger.client.get_run(logger.run_id)
    tags = logger.client.get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    other = logger.client.create_experiment("made elsewhere")
    assert experiment_id(logger.client.tracking_uri, "made elsewhere") == other
    assert logger.client.get_experiment(other).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
