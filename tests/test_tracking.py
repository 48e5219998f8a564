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
