"""Faults that lose searches or run code from untrusted files (issue 22), one test per
defect: atomic writes across filesystems, checkpoints that carry pickled code, the MLflow
relay's allow-list, run and search names, concurrent drivers, resumes that would mix
configurations, the best-trial pick, AMP warm-up skips, divergence without retries, and
the driver's MLflow retries."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cabb_ray.errors import CabbRayError
from cabb_ray.files import copy_atomic, write_text_atomic

SHM = Path("/dev/shm")


def _other_filesystem(tmp_path: Path) -> Path:
    if not SHM.is_dir() or SHM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    return SHM


# ------------------------------------------------------------------ atomic writes
def test_leaderboard_files_reach_a_search_folder_on_another_filesystem(tmp_path, monkeypatch):
    """TMPDIR on tmpfs and the search folder elsewhere: the rename of the leaderboard files
    out of the temporary folder was EXDEV, and the search could never finish."""
    import tempfile

    from cabb_ray.tracking import RunLogger
    from cabb_ray.tune.driver import Search

    shm = _other_filesystem(tmp_path)
    scratch = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "runs" / "s1"
    folder.mkdir(parents=True)
    spec = SimpleNamespace(metric="pq", metrics=["pq"], modes=["max"], multi_objective=False)
    search = Search(
        spec=spec, cfg=None, uri=uri, root=tmp_path, name="s1", folder=folder,
        storage=str(tmp_path / "runs"), experiment="exdev", resources=None,
    )  # fmt: skip
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(uri).create_run(search.experiment_id).info.run_id
    table = pd.DataFrame(
        {
            "trial": ["t1"],
            "run_id": ["r"],
            "status": ["FINISHED"],
            "outcome": ["finished"],
            "pq": [0.5],
            "device_h": [0.1],
            "saved_device_h": [0],
        }
    )
    try:
        search._log_table(RunLogger(uri, parent), table)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    assert pd.read_csv(folder / "leaderboard.csv")["pq"].tolist() == [0.5]
    assert pd.read_parquet(folder / "leaderboard.parquet")["trial"].tolist() == ["t1"]


def test_atomic_writes_keep_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    state = tmp_path / "search.json"
    state.write_text('{"old": true}')

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_text_atomic(state, '{"new": true')
    with pytest.raises(OSError):
        copy_atomic(state, tmp_path / "copy.json")
    assert json.loads(state.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.json"]  # no temporary left


def test_copy_atomic_crosses_filesystems(tmp_path):
    source = _other_filesystem(tmp_path) / f"cabb_ray_test_{os.getpid()}.csv"
    source.write_text("a,b\n1,2\n")
    try:
        copy_atomic(source, tmp_path / "leaderboard.csv")
    finally:
        source.unlink()
    assert (tmp_path / "leaderboard.csv").read_text() == "a,b\n1,2\n"


def test_search_state_is_written_atomically(tmp_path, monkeypatch):
    """``search.json`` goes through the atomic writer (a crash mid-write left it empty and the
    search unresumable)."""
    import cabb_ray.tune.driver as driver

    written = []
    monkeypatch.setattr(driver, "write_text_atomic", lambda path, text: written.append(path))
    monkeypatch.setattr(driver, "in_process_trials", lambda *a: True)

    class FakeLogger:
        def __init__(self, *args):
            pass

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr("cabb_ray.tracking.RunLogger", FakeLogger)
    monkeypatch.setattr("cabb_ray.tracking.start_run", lambda *a, **k: "run1")
    monkeypatch.setattr("cabb_ray.tracking.experiment_id", lambda *a: "1")
    spec = SimpleNamespace(
        text="", path=tmp_path / "space.yaml", metrics=["pq"], modes=["max"], searcher="tpe",
        num_samples=2, scheduler=None, variants={},
    )  # fmt: skip
    search = driver.Search(
        spec=spec, cfg=None, uri="sqlite:///x.db", root=tmp_path, name="s", folder=tmp_path,
        storage=str(tmp_path), experiment="e", resources=None, fingerprint={"space_sha256": "h"},
    )  # fmt: skip
    monkeypatch.setattr(driver, "searched_keys", lambda spec: [])
    search.start({})
    assert written == [tmp_path / "search.json"]


# ------------------------------------------------------------------ untrusted checkpoints
class _RunsCode:
    """A pickle payload: unpickling it creates a marker file (it could do anything)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    from cabb_ray.model.checkpoint import FORMAT

    marker = tmp_path / "code_ran"
    path = tmp_path / "evil" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"format": FORMAT, "config": {}, "payload": _RunsCode(str(marker))}, path)
    return path, marker


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    from cabb_ray.model.checkpoint import load_checkpoint

    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(CabbRayError) as err:
        load_checkpoint(path)
    assert "refused" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_predict_refuses_a_checkpoint_carrying_code_in_one_line(tmp_path):
    """The reproduction: ``cabb_ray.predict`` on such a checkpoint ran its code."""
    path, marker = _evil_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 16)).save(images / "a.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cabb_ray.predict",
            "--checkpoint",
            str(path),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0], done.stderr
    assert not marker.exists()


def test_checkpoints_written_before_the_rng_change_still_load(tmp_path):
    """Older checkpoints hold numpy's RNG state as an array: allowed, as arrays run no code."""
    from cabb_ray.model.checkpoint import FORMAT, load_checkpoint
    from cabb_ray.training.engine import set_rng_state

    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": None}
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "rng": old}, path)
    loaded = load_checkpoint(path)
    import random

    loaded["rng"]["python"] = random.getstate()
    expected = np.random.random(3)
    set_rng_state(loaded["rng"])
    assert np.allclose(np.random.random(3), expected)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    from cabb_ray.training.engine import rng_state, set_rng_state

    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (np.random.random(2), torch.rand(2))
    set_rng_state(torch.load(path, weights_only=True))
    assert np.allclose(np.random.random(2), expected[0])
    assert torch.equal(torch.rand(2), expected[1])


# ------------------------------------------------------------------ the MLflow relay
def test_the_relay_serves_only_logging_calls_inside_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from cabb_ray.tracking_relay import MlflowRelay

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("relay")).info.run_id
    relay = MlflowRelay(uri)
    relay.call("set_tag", run, "k", "v")  # what RunLogger does works
    relay.log_artifact_bytes(run, "overlay.jpg", b"x", "eval")
    for method in ("delete_run", "delete_experiment", "download_artifacts", "_tracking_client"):
        with pytest.raises(CabbRayError, match="not relayed"):
            relay.call(method, run)
    for name, folder in (("../../etc/x", None), ("..", None), ("a.txt", "../up"), ("a", "/abs")):
        with pytest.raises(CabbRayError):
            relay.log_artifact_bytes(run, name, b"x", folder)
    with pytest.raises(CabbRayError):
        relay.call("log_text", run, "t", "../../outside.txt")
    assert client.get_run(run).info.lifecycle_stage == "active"
    assert {a.path for a in client.list_artifacts(run, "eval")} == {"eval/overlay.jpg"}


# ------------------------------------------------------------------ names and drivers
@pytest.mark.parametrize("name", ["../x", "a/b", "a'b", ".hidden", "", "x" * 201])
def test_unsafe_run_and_search_names_are_refused(tmp_path, name):
    from cabb_ray.train import _run_name
    from cabb_ray.tune.cli import _search_folder

    with pytest.raises(CabbRayError, match="--name"):
        _run_name(str(tmp_path), name)
    with pytest.raises(CabbRayError, match="--name"):
        _search_folder(tmp_path, tmp_path / "space.yaml", name, resume=False)
    assert list(tmp_path.iterdir()) == []


def test_a_new_search_folder_is_taken_atomically_and_default_names_differ(tmp_path):
    from cabb_ray.tune.cli import _search_folder

    space = tmp_path / "quick.yaml"
    names = {_search_folder(tmp_path / "runs", space, None, False)[0] for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("quick-") for n in names)  # same second
    _, folder, state = _search_folder(tmp_path / "runs", space, "mine", False)
    assert folder.is_dir() and state == {}
    with pytest.raises(CabbRayError, match="already holds a search"):
        _search_folder(tmp_path / "runs", space, "mine", False)


def test_a_second_driver_of_one_search_is_refused(tmp_path):
    from cabb_ray.tune.cli import _driver_lock

    with _driver_lock(tmp_path, "s1"):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from cabb_ray.tune.cli import _driver_lock"
                "\nfrom cabb_ray.errors import CabbRayError\ntry:\n"
                f"    with _driver_lock(Path({str(tmp_path)!r}), 's1'): sys.exit(0)\n"
                "except CabbRayError as e:\n    print(e); sys.exit(3)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert child.returncode == 3, child.stderr
    assert f"pid {os.getpid()}" in child.stdout
    with _driver_lock(tmp_path, "s1"):  # released: the next driver gets it
        pass


def test_a_search_that_fails_before_its_state_leaves_no_folder(tmp_path):
    from cabb_ray.tune.cli import LOCK_FILE, _drop_if_unstarted

    unstarted = tmp_path / "a"
    unstarted.mkdir()
    (unstarted / LOCK_FILE).write_text("")
    _drop_if_unstarted(unstarted)
    assert not unstarted.exists()
    started = tmp_path / "b"
    started.mkdir()
    (started / "search.json").write_text("{}")
    _drop_if_unstarted(started)
    assert (started / "search.json").exists()


def test_a_resume_refuses_an_edited_space_file_or_other_overrides(tmp_path):
    from cabb_ray.tune.cli import _check_same_search, search_fingerprint

    spec = SimpleNamespace(text="space: {}\n", config=_small_config())
    saved = search_fingerprint(spec)
    state = {"space": "s.yaml", **json.loads(json.dumps(saved))}
    _check_same_search("s1", state, search_fingerprint(spec))  # the same search: fine
    _check_same_search("s1", {"space": "s.yaml"}, saved)  # saved before fingerprints
    edited = SimpleNamespace(text="space: {a: 1}\n", config=spec.config)
    with pytest.raises(CabbRayError, match=r"space file s\.yaml changed"):
        _check_same_search("s1", state, search_fingerprint(edited))
    other = SimpleNamespace(text=spec.text, config=_small_config(["optim.lr=0.5"]))
    with pytest.raises(CabbRayError, match=r"optim\.lr \(0\.01 -> 0\.5\)"):
        _check_same_search("s1", state, search_fingerprint(other))


def _small_config(overrides=()):
    from cabb_ray.config import load_config

    return load_config("cpu_quickstart", ["optim.lr=0.01", *overrides])


# ------------------------------------------------------------------ the best trial
def _run(trial, status, outcome, **metrics):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"run-{trial}", status=status),
        data=SimpleNamespace(
            metrics=metrics,
            tags={"cabb_ray.trial_id": trial, "cabb_ray.outcome": outcome},
        ),
    )


def test_the_best_trial_is_a_finished_one_on_the_searchs_objective():
    from cabb_ray.tune.driver import best_trial
    from cabb_ray.tune.leaderboard import leaderboard

    runs = [
        _run("failed", "FAILED", "failed", pq=0.9, pc=0.1),
        _run("interrupted", "KILLED", "interrupted", pq=0.8, pc=0.05),
        _run("stopped", "FINISHED", "early_stopped", pq=0.7, pc=0.01),
        _run("good_pq", "FINISHED", "finished", pq=0.6, pc=0.4),
        _run("good_pc", "FINISHED", "finished", pq=0.5, pc=0.2),
    ]
    assert best_trial(leaderboard(runs, ["pq"], ["max"]), ["pq"])["trial"] == "good_pq"
    # the search minimises PC (say): the finished trial lowest in PC, not the best PQ
    assert best_trial(leaderboard(runs, ["pc"], ["min"]), ["pc"])["trial"] == "good_pc"
    two = leaderboard(runs, ["pc", "pq"], ["min", "max"])
    assert best_trial(two, ["pc", "pq"])["trial"] == "good_pc"
    assert best_trial(leaderboard(runs[:3], ["pq"], ["max"]), ["pq"]) is None


def test_a_trial_keeps_its_best_epoch_by_the_searchs_objective():
    from cabb_ray.training.engine import TrainState
    from cabb_ray.training.loop import LoopArgs, _improves

    args = LoopArgs(config={}, root="", run_id="", mlflow_uri="", objective="pc")
    args.objective_mode = "min"
    state = TrainState(last_metrics={"pc": 0.3, "pq": 0.9})
    assert _improves(state, args)  # the first evaluation
    state.best_score = 0.3
    state.last_metrics = {"pc": 0.4, "pq": 0.95}  # better PQ, worse objective
    assert not _improves(state, args)
    state.last_metrics = {"pc": 0.2, "pq": 0.1}
    assert _improves(state, args)
    state.last_metrics = {"pc": math.nan}
    assert not _improves(state, args)


# ------------------------------------------------------------------ numerics
class _Overflowing(torch.nn.Module):
    """A finite loss whose gradient is huge (it overflows once the GradScaler's 2**16 is
    applied, as fp16 gradients do early in a healthy AMP run), or NaN (divergence)."""

    def __init__(self, nan: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.nan = nan

    def forward(self, images, targets):
        scale = math.nan if self.nan else 1e35
        loss = (self.weight * 0.0).sum() + _GradTimes.apply(self.weight, scale).sum()
        return loss, {"raw/loss": loss.detach()}


class _GradTimes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x * 0.0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _amp_steps(nan: bool, steps: int, model=None, state=None, scaler=None):
    from cabb_ray.training.engine import TrainState, train_step

    model = model or _Overflowing(nan)
    model.nan = nan
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-40)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = scaler or torch.amp.GradScaler("cpu", init_scale=2.0**16)
    cfg = SimpleNamespace(optim=SimpleNamespace(grad_clip_norm=None, max_nonfinite_steps=3))
    state = state or TrainState()
    images, targets = [torch.zeros(1)], [{}]
    for _ in range(steps):
        train_step(model, optimizer, scheduler, scaler, images, targets, state, cfg)
    return state, scaler, model


def test_amp_warm_up_skips_do_not_count_toward_the_divergence_limit():
    """2**16 x 1e35 overflows fp32; the scaler halves its scale on each skipped step until
    the gradients fit (~scale 2**11): about six skips, against a limit of three."""
    state, scaler, _ = _amp_steps(nan=False, steps=12)
    assert state.nonfinite_total >= 4  # skipped more steps than the limit allows in a row
    assert state.nonfinite_streak == 0 and state.step > 0  # ... and trains on
    assert scaler.get_scale() < 2.0**16


def test_amp_divergence_after_the_warm_up_stops_at_the_limit():
    """Once the run has taken a step, NaN gradients count at once, whatever the scale."""
    from cabb_ray.training.engine import DivergedError

    state, scaler, model = _amp_steps(nan=False, steps=12)
    steps_before = state.step
    with pytest.raises(DivergedError, match="3 non-finite gradient norms in a row"):
        _amp_steps(nan=True, steps=3, model=model, state=state, scaler=scaler)
    assert state.step == steps_before and scaler.get_scale() > 1.0


def test_amp_divergence_from_the_first_step_still_stops():
    from cabb_ray.training.engine import DivergedError

    with pytest.raises(DivergedError):
        _amp_steps(nan=True, steps=40)  # 16 halvings to scale 1, then 3 counted skips


def test_a_failed_or_diverged_trial_is_failed_in_the_study_not_retried():
    """The trial's last report carries the error: Optuna records FAIL, and the trial ends
    normally (Tune's FailureConfig would otherwise retry a divergence that repeats)."""
    import optuna

    from cabb_ray.training.loop import failure_report
    from cabb_ray.tune.callbacks import CabbOptunaSearch
    from cabb_ray.tune.tags import ERROR_KEY

    search = CabbOptunaSearch(
        space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="pq", mode="max"
    )
    search.set_search_properties("pq", "max", {})
    search.suggest("t1")
    report = failure_report(("pq",), ERROR_KEY, "diverged")
    search.on_trial_result("t1", report)
    search.on_trial_complete("t1", report)
    assert search._ot_study.trials[0].state == optuna.trial.TrialState.FAIL


def test_the_driver_retries_mlflow_when_a_trial_ends(tmp_path, monkeypatch):
    """With sqlite and concurrent trials, 'database is locked' at a trial's end made Tune
    count a finished trial as failed: the callback retries and never raises."""
    import cabb_ray.tracking as tracking
    import cabb_ray.tune.callbacks as callbacks
    from cabb_ray.tune.trial import TrialSetup

    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.0, 0.0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e")).info.run_id
    attempts = []

    def locked_twice(*args):
        attempts.append(1)
        if len(attempts) <= 2:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return run

    monkeypatch.setattr(callbacks, "open_child_run", locked_twice)
    setup = TrialSetup(
        search="s", base_config={}, metric_names=("pq",), uri=uri, experiment="e",
        parent_run_id="p", root="", train_storage="", eval_epochs=(), last_epoch=2,
        resources=SimpleNamespace(gpus=0, cpus=1),
    )  # fmt: skip
    trial = SimpleNamespace(
        trial_id="t1", config={}, error_file=None, last_result={"epoch": 2, "pq": 0.5}
    )
    callback = callbacks.ChildRunCallback(setup)
    callback.on_trial_complete(0, [], trial)
    assert len(attempts) == 3
    finished = client.get_run(run)
    assert finished.info.status == "FINISHED" and finished.data.tags["cabb_ray.outcome"] == (
        "finished"
    )
    monkeypatch.setattr(callbacks, "open_child_run", lambda *a: 1 / 0)
    callback.on_trial_complete(0, [], trial)  # never raises into Tune


# ------------------------------------------------------------------ checks before Ray starts
def test_resume_with_a_checkpoint_of_another_network_fails_before_anything_is_recorded(
    synthetic_root, tmp_path, monkeypatch
):
    """It used to fail in every worker's load_state_dict, after Ray started and a run was
    recorded, and was retried."""
    from cabb_ray.config import load_config
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.model.checkpoint import save_checkpoint
    from cabb_ray.model.network import build_model
    from cabb_ray.train import main

    monkeypatch.chdir(tmp_path)
    categories = load_split(synthetic_root, "val").categories
    narrow = load_config("cpu_quickstart", ["model.fpn_channels=32"])
    checkpoint = save_checkpoint(
        tmp_path / "narrow" / "checkpoint.pt",
        build_model(narrow, categories, starting_weights=False),
        narrow,
        categories,
        optimizer={},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--set", f"data.root={synthetic_root}", "--mlflow-uri", uri]
    with pytest.raises(CabbRayError, match="do not fit the cpu_small network"):
        main([*argv, "--resume", str(checkpoint), "--set", "run.output_dir=out"])
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).search_runs(["0"]) == []  # nothing recorded
    assert not (tmp_path / "out").exists()


def test_ctrl_c_outside_the_trials_prints_the_resume_line_and_keeps_the_search(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while Ray starts or the results are written (outside tuner.fit) was a
    traceback; it is the same one line as an interruption inside the trials."""
    import yaml

    from cabb_ray.tune import driver
    from cabb_ray.tune.cli import main

    monkeypatch.chdir(tmp_path)

    def interrupted(self, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver.Search, "run", interrupted)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "base": "cpu_quickstart",
                "fixed": {"data.root": str(synthetic_root)},
                "num_samples": 2,
                "space": {"optim.lr": {"loguniform": [0.001, 0.01]}},
            }
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--space", str(space), "--name", "c1", "--mlflow-uri", uri])
    assert code == 130
    err = capsys.readouterr().err
    assert "search c1 interrupted; continue it with:" in err and "--resume" in err
    assert json.loads((tmp_path / "runs" / "c1" / "search.json").read_text())["num_samples"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("space").experiment_id])
    assert parent.info.status == "KILLED"


def test_a_file_that_is_no_checkpoint_is_called_unreadable_not_dangerous(tmp_path):
    from cabb_ray.model.checkpoint import load_checkpoint

    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(CabbRayError, match="not a readable checkpoint"):
        load_checkpoint(garbage)


def test_atomic_writes_keep_the_files_mode(tmp_path):
    """Shared search folders: a file written atomically is as readable as one written plainly
    (mkstemp would make it 0600)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert write_text_atomic(tmp_path / "atomic.txt", "x").stat().st_mode == plain.stat().st_mode


def test_the_printed_leaderboard_fits_120_columns_and_names_what_it_leaves_out():
    from cabb_ray.tune.leaderboard import format_table, leaderboard

    searched = [f"loss.weights.term_{i}" for i in range(12)] + ["data.sampler", "optim.lr"]
    runs = []
    for i in range(4):
        run = _run(f"trial{i:03d}", "FINISHED", "finished", pq=0.3 + i / 100, pc=0.2)
        values = {key: 0.123456 * (i + 1) for key in searched[:-2]}
        values |= {"data.sampler": "isus" if i % 2 else "cus", "optim.lr": 0.01}  # lr: fixed
        run.data.tags["cabb_ray.sampled"] = json.dumps(values)
        runs.append(run)
    table = leaderboard(runs, ["pq"], ["max"])
    text = format_table(table, searched, ["pq"])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, text
    assert "term_0" in lines[0] and "lr" not in lines[0].split()  # values that do not vary
    note = " ".join(lines[5:])
    assert note.startswith("(not shown: ") and "leaderboard.csv" in note
    assert "data.sampler" in note  # the last searched keys give way first
    assert len(lines[0].split()) == 2 + 9 + 4 + 2  # trial, outcome, 9 values, metrics, epochs


def test_orphaned_study_trials_fail_and_their_grid_points_run_again(tmp_path):
    """A grid (an ablation's rows): the orphan's point must not count as visited."""
    import optuna

    from cabb_ray.tune.callbacks import fail_orphan_trials

    grid = {"variant": ["crop", "crop_cabb", "full"]}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(
        study_name="g", storage=storage, sampler=optuna.samplers.GridSampler(grid, seed=0)
    )
    owned = study.ask()
    owned.suggest_categorical("variant", grid["variant"])
    orphan = study.ask()
    lost = orphan.suggest_categorical("variant", grid["variant"])
    fail_orphan_trials(study, {owned.number})
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[orphan.number] == "FAIL" and states[owned.number] == "RUNNING"
    again = study.ask()
    assert again.suggest_categorical("variant", grid["variant"]) == lost


def test_a_resume_is_not_refused_for_keys_another_version_lacks_or_result_locations(tmp_path):
    from cabb_ray.tune.cli import _check_same_search, _same_uri, search_fingerprint

    spec = SimpleNamespace(text="space: {}\n", config=_small_config())
    saved = json.loads(json.dumps(search_fingerprint(spec)))
    saved["config"]["a.key_an_older_version_had"] = 1
    del saved["config"]["optim.momentum"]  # a key a newer version added
    moved = SimpleNamespace(text=spec.text, config=_small_config(["run.output_dir=/elsewhere"]))
    _check_same_search("s1", {"space": "s.yaml", **saved}, search_fingerprint(moved))
    assert _same_uri("http://host:5000/", "http://host:5000")


def test_a_checkpoint_from_before_best_score_starts_from_its_best_pq():
    """Else the first evaluation after such a resume would replace best/ with any epoch."""
    from cabb_ray.training.engine import TrainState
    from cabb_ray.training.loop import LoopArgs, _improves, carry_best_score

    state = TrainState(best_pq=0.4)  # restored: best_score absent, so NaN
    args = LoopArgs(config={}, root="", run_id="", mlflow_uri="")
    carry_best_score(state, args)
    assert state.best_score == 0.4
    state.last_metrics = {"pq": 0.3}
    assert not _improves(state, args)


def test_storage_errors_while_reading_a_checkpoint_stay_retryable(tmp_path, monkeypatch):
    """An NFS or S3-mount hiccup is not the file's fault: Tune may retry the trial."""
    from cabb_ray.model.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")

    def flaky(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "load", flaky)
    with pytest.raises(OSError):
        load_checkpoint(path)


def test_names_with_a_trailing_newline_are_refused():
    from cabb_ray.errors import check_name

    with pytest.raises(CabbRayError):
        check_name("--name", "abc\n")
    assert check_name("--name", "abc-1.2_x") == "abc-1.2_x"


def test_the_best_weights_come_from_the_trials_checkpoint_when_mlflow_lacks_them(tmp_path):
    """An MLflow outage at the improving epoch lost best/checkpoint.pt: the copy kept in the
    trial's newest Tune checkpoint goes to the search's best/ instead."""
    from mlflow.tracking import MlflowClient

    from cabb_ray.tracking import RunLogger
    from cabb_ray.tune.driver import Search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    folder = storage / "s1"
    for epoch, text in ((1, b"older"), (2, b"best weights")):
        kept = folder / "trial_a" / f"checkpoint_00000{epoch}" / "best.pt"
        kept.parent.mkdir(parents=True)
        kept.write_bytes(text)
    search = Search(
        spec=None, cfg=None, uri=uri, root=tmp_path, name="s1", folder=folder,
        storage=str(storage), experiment="fallback", resources=None,
    )  # fmt: skip
    client = MlflowClient(uri)
    parent = client.create_run(search.experiment_id).info.run_id
    child = client.create_run(search.experiment_id).info.run_id  # no artifacts at all
    search._mark_best(RunLogger(uri, parent), {"run_id": child, "trial": "trial_a"})
    assert (folder / "best" / "checkpoint.pt").read_bytes() == b"best weights"


def test_a_resume_with_another_mlflow_uri_is_refused_in_one_line(tmp_path, monkeypatch):
    from cabb_ray.tune import cli

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("num_samples: 2\nspace:\n  optim.lr: {loguniform: [0.001, 0.01]}\n")
    from cabb_ray.tune.space import load_space

    folder = tmp_path / "runs" / "m1"
    folder.mkdir(parents=True)
    saved = {
        "parent_run_id": "p",
        "mlflow_uri": f"sqlite:///{tmp_path / 'first.db'}",
        "experiment": "space",
        "space": str(space.resolve()),
        "num_samples": 2,
        "scheduler": "asha",
        **json.loads(json.dumps(cli.search_fingerprint(load_space(space)))),
    }
    (folder / "search.json").write_text(json.dumps(saved))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(CabbRayError, match="records its runs at"):
        cli.main(["--space", str(space), "--name", "m1", "--resume", "--mlflow-uri", other])
    assert not (tmp_path / "other.db").exists()
