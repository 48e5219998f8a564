"""The search end to end with real Ray Tune, Ray Train, Optuna (sqlite) and MLflow (sqlite):
complete search with an invalid trial and a killed worker, ASHA early stopping, and
interrupt + resume of the command-line search."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import torch

from cabb_ray.config import load_config
from cabb_ray.tune.cli import main as tune_main
from tests.search_helpers import TINY_FIXED, children, common_args, tiny_space


@pytest.mark.integration
def test_search_end_to_end_with_invalid_trial_and_killed_worker(
    local_ray, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "killed"
    # Rank 0 of whichever trial first reaches step 4 dies once; Tune restarts it from its
    # epoch-1 checkpoint (run.max_failures=1) and the search goes on.
    monkeypatch.setenv(
        "CABB_RAY_TEST_FAULT", json.dumps({"rank": 0, "step": 4, "marker": str(marker)})
    )
    space = tiny_space(
        tmp_path,
        "e2e",
        searcher={"type": "grid", "seed": 0},
        scheduler="none",
        space={"optim.warmup_steps": {"grid": [1, 2, 100]}},  # 100 > the 6 steps: invalid
    )
    assert tune_main(["--space", str(space), "--name", "s1", *common_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert marker.exists(), "no worker was killed"

    client, parents, kids = children(tmp_path, "e2e")
    assert len(parents) == 1 and len(kids) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    by_outcome = {}
    for kid in kids:
        by_outcome.setdefault(kid.data.tags["cabb_ray.outcome"], []).append(kid)
    assert sorted(by_outcome) == ["finished", "invalid"] and len(by_outcome["finished"]) == 2
    invalid = by_outcome["invalid"][0]
    assert invalid.info.status == "FAILED"
    assert "optim.warmup_steps" in invalid.data.tags["cabb_ray.invalid_reason"]
    assert "pq" not in invalid.data.metrics  # no worker ever started
    for kid in by_outcome["finished"]:
        assert kid.info.status == "FINISHED"
        # one worker: trained by the loop in the trial's own process, threads = its CPUs
        assert kid.data.tags["cabb_ray.launcher"] == "tune_trial"
        assert kid.data.tags["cabb_ray.torch_threads"] == kid.data.tags["cabb_ray.cpus"] == "1"
        assert {"pq", "pc", "pq_th", "miou", "map", "cost/device_hours"} <= set(kid.data.metrics)
        assert kid.data.metrics["epoch"] == 2
        assert kid.data.metrics["cost/device_hours"] > 0
    # the killed trial replayed step 4 from its checkpoint: its loss history has step 4 twice
    histories = [[m.step for m in client.get_metric_history(k.info.run_id, "loss")] for k in kids]
    assert [1, 2, 3, 4, 4, 5, 6] in histories

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.parquet", "space"} <= artifacts
    best = [k for k in kids if k.data.tags.get("cabb_ray.best") == "true"]
    assert len(best) == 1 and parent.data.tags["cabb_ray.best_run_id"] == best[0].info.run_id
    assert parent.data.metrics["search/trials"] == 3

    assert "leaderboard of search s1" in out and "warmup_steps" in out
    folder = tmp_path / "runs" / "s1"
    cfg = load_config(folder / "best" / "config.yaml")  # cabb_ray.train's loader
    assert cfg.optim.warmup_steps in (1, 2) and cfg.optim.epochs == 2
    assert (folder / "best" / "checkpoint.pt").is_file()
    assert f"best checkpoint: {folder / 'best' / 'checkpoint.pt'}" in out
    # the best weights also live beside each trial's Tune checkpoints (an MLflow outage at
    # the improving epoch does not lose them), chosen by the search's metric
    kept = sorted(folder.glob("*/checkpoint_*/best.pt"))
    assert kept, sorted(str(p) for p in folder.rglob("*.pt"))
    assert torch.load(kept[-1], weights_only=True)["best"]["metric"] == "pq"

    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.integration
def test_a_two_worker_trial_trains_under_ray_train_ddp(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = {**TINY_FIXED, "data.cache_dir": str(tmp_path / "cache"), "optim.epochs": 1}
    space = tiny_space(
        tmp_path,
        "ddp",
        num_samples=1,
        searcher={"type": "random", "seed": 0},
        scheduler="none",
        fixed={**fixed, "optim.steps_per_epoch": 2},
        resources={"workers": 2, "cpus_per_worker": 1},
        space={"loss.weights.roi_box": {"loguniform": [0.5, 2.0]}},
    )
    assert tune_main(["--space", str(space), "--name", "d1", *common_args(tmp_path)]) == 0
    _, _, kids = children(tmp_path, "ddp")
    (kid,) = kids
    assert kid.data.tags["cabb_ray.outcome"] == "finished" and kid.info.status == "FINISHED"
    # the same loop (it sets these tags), run by two Ray Train workers of one CPU each
    assert kid.data.tags["cabb_ray.launcher"] == "ray_train"
    assert kid.data.tags["cabb_ray.world_size"] == "2"
    assert kid.data.tags["cabb_ray.torch_threads"] == "1"
    assert "pq" in kid.data.metrics and kid.data.metrics["epoch"] == 1


@pytest.mark.integration
def test_asha_stops_a_trial_and_the_next_one_runs(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A huge stuff_min_area drops every predicted stuff segment, and no instance reaches a
    # score threshold of 1.0: PC is exactly 0, below the first trial's, so ASHA stops that
    # trial at its first rung (epoch 1). Grid seed 1 runs the normal trial first. The stop
    # reaches the trial's training thread asynchronously, so the stopped trial may finish
    # another epoch or so first; it must still end before max_t.
    space = tiny_space(
        tmp_path,
        "asha",
        metric="pc",
        searcher={"type": "grid", "seed": 1},
        scheduler={"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
        fixed={
            **TINY_FIXED,
            "data.cache_dir": str(tmp_path / "cache"),
            "optim.epochs": 4,
            "model.pretrained": "synthetic",  # untrained heads
            "eval.score_threshold": 1.0,  # and no instance placed: an untrained head's score is < 1
        },
        space={"eval.stuff_min_area": {"grid": [64, 100000000]}},
    )
    assert tune_main(["--space", str(space), "--name", "a1", *common_args(tmp_path)]) == 0
    _, parents, kids = children(tmp_path, "asha")
    outcomes = {json.loads(k.data.tags["cabb_ray.sampled"])["eval.stuff_min_area"]: k for k in kids}
    stopped, normal = outcomes[100000000], outcomes[64]
    assert normal.data.tags["cabb_ray.outcome"] == "finished" and normal.info.status == "FINISHED"
    assert stopped.data.tags["cabb_ray.outcome"] == "early_stopped"
    assert stopped.info.status == "FINISHED"  # not left RUNNING, not drawn as a failure
    assert stopped.data.metrics["epoch"] < 4 and stopped.data.metrics["pc"] == 0.0
    assert stopped.data.metrics["cost/saved_device_hours"] > 0
    assert parents[0].data.metrics["search/saved_device_hours"] > 0


@pytest.mark.integration
def test_a_diverging_trial_fails_at_once_without_retries(local_ray, tmp_path, monkeypatch):
    """Divergence repeats on every restart: the trial is failed after its first attempt
    (Tune's FailureConfig would retry it (1 + run.max_failures) x (1 + failure.max_failures)
    times), with the reason on its MLflow run and FAIL in the study."""
    monkeypatch.chdir(tmp_path)
    space = tiny_space(
        tmp_path,
        "diverge",
        num_samples=1,
        searcher={"type": "random", "seed": 0},
        scheduler="none",
        failure={"max_failures": 2},
        space={"optim.lr": {"loguniform": [1e12, 1e13]}},
    )
    args = ["--space", str(space), "--name", "d1", "--set", "optim.max_nonfinite_steps=1"]
    assert tune_main([*args, "--set", "optim.grad_clip_norm=null", *common_args(tmp_path)]) == 0
    _, _, kids = children(tmp_path, "diverge")
    assert len(kids) == 1
    kid = kids[0]
    assert kid.info.status == "FAILED" and kid.data.tags["cabb_ray.outcome"] == "failed"
    assert "non-finite" in kid.data.tags["cabb_ray.error"]
    folder = tmp_path / "runs" / "d1"
    study = optuna.load_study(study_name="d1", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    from ray.tune import ExperimentAnalysis

    (trial,) = ExperimentAnalysis(str(folder)).trials
    assert trial.run_metadata.num_failures == 0  # never restarted


def _wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"search exited early with {process.returncode}")
        time.sleep(1.0)
    raise AssertionError("timed out waiting for the search")


@pytest.mark.integration
def test_interrupted_search_resumes_to_exactly_num_samples(tmp_path):
    space = tiny_space(
        tmp_path,
        "resume",
        num_samples=3,
        searcher={"type": "random", "seed": 0},
        scheduler="none",
        space={"loss.weights.roi_box": {"loguniform": [0.5, 2.0]}},
    )
    command = [
        sys.executable,
        "-m",
        "cabb_ray.tune",
        "--space",
        str(space),
        "--name",
        "r1",
        *common_args(tmp_path),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def one_finished() -> bool:
        # Open the database only once the search has created it (its start line follows
        # start_run): two processes creating MLflow's tables at once collide in alembic.
        if "MLflow experiment" not in (tmp_path / "first.log").read_text():
            return False
        try:
            _, _, kids = children(tmp_path, "resume")
        except Exception:
            return False
        return any(k.data.tags.get("cabb_ray.outcome") == "finished" for k in kids)

    try:
        _wait_for(one_finished, 300, first)
        first.send_signal(signal.SIGINT)  # Ctrl-C while the second trial runs
        code = first.wait(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    log.close()
    text = (tmp_path / "first.log").read_text()
    assert code == 130, text[-3000:]
    assert "--resume" in text
    _, parents, kids = children(tmp_path, "resume")
    assert parents[0].info.status == "KILLED"
    assert all(k.info.status != "RUNNING" for k in kids)
    assert len(kids) < 3

    second = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _, parents, kids = children(tmp_path, "resume")
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    assert parents[0].info.status == "FINISHED"
    folder = tmp_path / "runs" / "r1"
    study = optuna.load_study(study_name="r1", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    from ray.tune import ExperimentAnalysis

    assert len(ExperimentAnalysis(str(folder)).trials) == 3

    again = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "already finished" in again.stdout


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the search's whole session at once (driver, Ray's processes, trial workers),
    as an OOM kill or a lost head would."""
    session = os.getsid(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, sid = (int(v) for v in line.split())
        if sid == session and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
def test_a_search_killed_right_after_a_trial_finishes_resumes_to_consistent_records(tmp_path):
    """Tune saves its experiment state periodically, Optuna and MLflow at once: a kill in
    between leaves a trial that started after Tune's last save. Widened here to a whole
    trial (TUNE_GLOBAL_CHECKPOINT_S=1000: Tune saves once, at the start), the whole process
    group is SIGKILLed while the second trial runs; after --resume, Tune, the study and
    MLflow count each trial once and nothing stays RUNNING."""
    space = tiny_space(
        tmp_path,
        "killed",
        num_samples=3,
        searcher={"type": "random", "seed": 0},
        scheduler="none",
        space={"loss.weights.roi_box": {"loguniform": [0.5, 2.0]}},
    )
    command = [
        sys.executable, "-m", "cabb_ray.tune", "--space", str(space), "--name", "k1",
        *common_args(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1000"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    def second_running() -> bool:
        if "MLflow experiment" not in (tmp_path / "first.log").read_text():
            return False
        try:
            _, _, kids = children(tmp_path, "killed")
        except Exception:
            return False
        done = [k for k in kids if k.data.tags.get("cabb_ray.outcome") == "finished"]
        return len(done) == 1 and len(kids) == 2

    try:
        _wait_for(second_running, 300, first)
    finally:
        _kill_session(first)
    log.close()

    env.pop("TUNE_GLOBAL_CHECKPOINT_S")
    second = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _, parents, kids = children(tmp_path, "killed")
    assert parents[0].info.status == "FINISHED"
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["cabb_ray.outcome"] for k in kids} == {"finished"}
    folder = tmp_path / "runs" / "k1"
    study = optuna.load_study(study_name="k1", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states, states
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(folder)).trials
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in trials)
    board = pd.read_csv(folder / "leaderboard.csv")
    assert sorted(board["trial"]) == sorted(t.trial_id for t in trials)
    assert set(board["outcome"]) == {"finished"}
    assert "started after the search's last saved state" in second.stdout
