"""Training: schedule, non-finite guard, bad input, and real Ray Train runs with MLflow."""

from __future__ import annotations

import functools
import math
import operator

import pytest
import torch
from torch import nn

from cabb_ray.config import LOSS_TERMS, load_config
from cabb_ray.errors import CabbRayError, run_cli
from cabb_ray.train import main as train_main
from cabb_ray.training.engine import TrainModule, TrainState, lr_lambda, make_optimizer, train_step

TINY = [
    "data.synthetic.num_train=6",
    "data.synthetic.num_val=2",
    "data.synthetic.height=128",
    "data.synthetic.width=256",
    "data.crop_size=[64, 96]",
    "data.shortest_side=128",
    "model.canonical_scale=28",
    "data.batch_size=2",
    "optim.steps_per_epoch=3",
    "optim.warmup_steps=2",
    "data.loader_workers=0",
    "run.log_every=1",
    "eval.max_images=2",
]


def test_lr_schedule_is_the_papers_warmup_from_zero_then_linear_decay():
    cfg = load_config(
        "cpu_quickstart", ["optim.epochs=1", "optim.steps_per_epoch=10", "optim.warmup_steps=4"]
    )
    scale = lr_lambda(cfg)
    expected = [0.0, 0.25, 0.5, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    assert [round(scale(s), 3) for s in range(0, 11)] == expected


class _Exploding(nn.Module):
    """Returns a NaN total on the steps listed, a finite one otherwise."""

    def __init__(self, bad_steps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.bad_steps, self.calls = set(bad_steps), 0

    def forward(self, images, targets):
        self.calls += 1
        value = self.weight.sum() * (math.nan if self.calls in self.bad_steps else 1.0)
        return value, {"raw/rpn_box": float(value.detach())}


def test_non_finite_losses_are_skipped_then_fail_after_k_in_a_row():
    cfg = load_config("cpu_quickstart", ["optim.max_nonfinite_steps=3"])
    module = _Exploding(bad_steps={2, 4, 5, 6})
    optimizer, scheduler = make_optimizer(module, cfg)
    state, images = TrainState(), [torch.zeros(3, 4, 4)]
    assert train_step(module, optimizer, scheduler, None, images, [{}], state, cfg) is not None
    assert train_step(module, optimizer, scheduler, None, images, [{}], state, cfg) is None
    assert train_step(module, optimizer, scheduler, None, images, [{}], state, cfg) is not None
    assert (state.step, state.nonfinite_total, state.nonfinite_streak) == (2, 1, 0)
    assert train_step(module, optimizer, scheduler, None, images, [{}], state, cfg) is None
    assert train_step(module, optimizer, scheduler, None, images, [{}], state, cfg) is None
    with pytest.raises(CabbRayError, match="3 non-finite losses in a row at step 2"):
        train_step(module, optimizer, scheduler, None, images, [{}], state, cfg)


class _InfiniteGradient(nn.Module):
    """A finite loss (0) whose gradient is infinite: d sqrt(w - 1) / dw at w = 1."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        value = torch.sqrt(self.weight - 1.0).sum()
        return value, {"raw/rpn_box": float(value.detach())}


@pytest.mark.parametrize("clip", ["10.0", "null"])
def test_a_non_finite_gradient_norm_from_a_finite_loss_skips_the_step(clip):
    cfg = load_config("cpu_quickstart", [f"optim.grad_clip_norm={clip}"])
    module = _InfiniteGradient()
    optimizer, scheduler = make_optimizer(module, cfg)
    state = TrainState()
    assert (
        train_step(module, optimizer, scheduler, None, [torch.zeros(3)], [{}], state, cfg) is None
    )
    assert torch.equal(module.weight.detach(), torch.ones(1))
    assert (state.step, state.nonfinite_total) == (0, 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "no_such_preset"], "config 'no_such_preset': not a YAML file or a preset"),
        (["--workers", "0"], "run.workers: expected a positive value, got 0"),
        (
            ["--mlflow-uri", "http://127.0.0.1:9"],
            "--mlflow-uri http://127.0.0.1:9: tracking server unreachable",
        ),
        (
            ["--mlflow-uri", "ftp://x"],
            "expected sqlite:///path.db, http(s)://host:port or databricks",
        ),
    ],
)
def test_bad_input_fails_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_flag_without_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, ["--gpu"])
    assert exit_info.value.code == 2
    assert "--gpu: no CUDA device on this machine" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU head node")
def test_gpu_flag_passes_on_the_cpu_head_node_of_a_cluster(tmp_path, capsys, monkeypatch):
    """On the head of `ray up` (no GPU, no RAY_ADDRESS, Ray started by `ray start`) the GPUs
    are the cluster's: the check must not refuse --gpu."""
    import ray._private.utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *a: "10.0.0.1:6379")
    with pytest.raises(SystemExit):  # stopped by the next check, the tracking URI
        run_cli(train_main, ["--gpu", "--mlflow-uri", "ftp://x"])
    err = capsys.readouterr().err
    assert "no CUDA device" not in err and "expected sqlite:///path.db" in err


def test_a_reused_run_name_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / ".validate_storage_marker").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, ["--name", "taken", "--mlflow-uri", "ftp://x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--name taken: runs/taken already holds a run" in err


def test_default_run_names_never_repeat_within_one_second(tmp_path, monkeypatch):
    import cabb_ray.train

    monkeypatch.setattr(cabb_ray.train.time, "strftime", lambda fmt: "train-same-second")
    first = cabb_ray.train._run_name(str(tmp_path), None)
    (tmp_path / first).mkdir()
    (tmp_path / first / "checkpoint_0").mkdir()
    second = cabb_ray.train._run_name(str(tmp_path), None)
    assert (first, second) == ("train-same-second", "train-same-second-2")
    # an empty folder (a run that failed before Ray started) does not count as a run
    (tmp_path / "empty").mkdir()
    assert cabb_ray.train._run_name(str(tmp_path), "empty") == "empty"


# ---------------------------------------------------------------- real Ray Train runs


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def _history(uri, run_id, key):
    from cabb_ray.tracking import RunLogger

    return RunLogger(uri, run_id).history(key)


def _run_of(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    return client, runs


@pytest.mark.integration
def test_two_worker_run_tracks_everything_and_resumes(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "--workers",
        "2",
        "--mlflow-uri",
        uri,
        "--experiment",
        "it",
        *functools.reduce(operator.iadd, (["--set", s] for s in TINY), []),
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    assert train_main([*common, "--set", "optim.epochs=1", "--name", "first"]) == 0
    client, runs = _run_of(uri, "it")
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.cabb_roi"] == "True" and len(run.data.params) > 40
    assert {
        "pq",
        "sq",
        "rq",
        "pc",
        "pq_dagger",
        "miou",
        "map",
        "raw/rpn_box",
        "weight/roi_box",
    } <= set(run.data.metrics)
    artifacts = {
        a.path
        for folder in (None, "eval/epoch_001", "best")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "config.yaml",
        "eval/epoch_001/per_class.md",
        "eval/epoch_001/ap_by_size.png",
        "best/checkpoint.pt",
    } <= artifacts
    assert any(a.startswith("eval/epoch_001/overlay_") for a in artifacts)
    best = torch.load(
        client.download_artifacts(run.info.run_id, "best/checkpoint.pt", str(tmp_path)),
        weights_only=False,
    )
    assert "optimizer" not in best and best["best"]["pq"] == run.data.metrics["pq"]
    assert best["model"].keys() and best["config"]["run"]["workers"] == 2
    assert [s for s, _ in _history(uri, run.info.run_id, "loss")] == [1, 2, 3]

    checkpoints = sorted(
        p for p in (tmp_path / "runs" / "first").glob("checkpoint_*") if p.is_dir()
    )
    saved = torch.load(checkpoints[-1] / "checkpoint.pt", weights_only=False)
    assert saved["state"]["best_pq"] == run.data.metrics["pq"]  # the checkpoint knows its best
    assert (
        train_main(
            [
                *common,
                "--set",
                "optim.epochs=2",
                "--name",
                "second",
                "--resume",
                str(checkpoints[-1]),
            ]
        )
        == 0
    )
    _, runs = _run_of(uri, "it")
    resumed = runs[1]
    assert [s for s, _ in _history(uri, resumed.info.run_id, "loss")] == [4, 5, 6]
    assert [s for s, _ in _history(uri, resumed.info.run_id, "pq")] == [6]


@pytest.mark.integration
def test_worker_failure_restarts_from_last_checkpoint(ray_cluster, tmp_path):
    from cabb_ray.tracking import start_run
    from cabb_ray.train import prepare, run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "cpu_quickstart",
        [
            *TINY,
            "optim.epochs=2",
            "run.workers=2",
            "run.max_failures=1",
            "run.keep_checkpoints=1",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
    )
    cfg, uri, root = prepare(cfg, uri, "faults")
    run_id = start_run(cfg, uri, "faults")
    marker = tmp_path / "killed"
    result = run_training(
        cfg, uri, root, run_id, "faulty", fault={"rank": 1, "step": 4, "marker": str(marker)}
    )
    assert marker.exists(), "the worker was not killed"
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 6
    # Metrics logged before the failure are kept. Rank 1 died after step 4; the restart
    # resumed from the epoch-1 checkpoint (step 3), so step 4 ran twice, with the very same
    # loss: the checkpoint restores weights, optimizer, schedule and random states exactly.
    assert [s for s, _ in _history(uri, run_id, "pq")] == [3, 6]
    loss = _history(uri, run_id, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 4, 5, 6]
    assert loss[3][1] == loss[4][1]
    kept = [p for p in (tmp_path / "runs" / "faulty").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 1  # run.keep_checkpoints


@pytest.mark.integration
def test_a_diverging_multi_worker_run_fails_in_one_line_without_restarts(ray_cluster, tmp_path):
    """Every rank diverges at the same step; the run ends (no run.max_failures restarts that
    would diverge again) and run_training raises the reason: Train V2 keeps only reports
    with a checkpoint, so the last report carries a marker checkpoint."""
    from cabb_ray.tracking import start_run
    from cabb_ray.train import prepare, run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "cpu_quickstart",
        [
            *TINY,
            "optim.epochs=2",
            "run.workers=2",
            "run.max_failures=2",
            "optim.lr=1e12",
            "optim.grad_clip_norm=null",
            "optim.max_nonfinite_steps=1",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
    )
    cfg, uri, root = prepare(cfg, uri, "diverge")
    run_id = start_run(cfg, uri, "diverge")
    # (with restarts, Train would end in a TrainingFailedError after run.max_failures tries)
    with pytest.raises(CabbRayError, match="non-finite"):
        run_training(cfg, uri, root, run_id, "diverging")


def test_steps_the_amp_grad_scaler_skips_count_as_skipped():
    """With AMP the GradScaler skips an overflowing step itself and halves its scale. Those
    skips are its warm-up and do not count until the scale is down to 1; then they do, or a
    scale that never recovers would train nothing without stopping (CPU scaler, same
    logic): from 2**8, eight uncounted halvings, then two counted skips stop the run."""
    cfg = load_config("cpu_quickstart", ["optim.max_nonfinite_steps=2"])
    module = _InfiniteGradient()
    optimizer, scheduler = make_optimizer(module, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    state = TrainState()
    assert (
        train_step(module, optimizer, scheduler, scaler, [torch.zeros(3)], [{}], state, cfg) is None
    )
    assert scaler.get_scale() == 2.0**7  # the scaler saw the overflow and backed off
    assert torch.equal(module.weight.detach(), torch.ones(1))
    assert (state.step, state.nonfinite_total, scheduler.last_epoch) == (0, 1, 0)
    assert state.nonfinite_streak == 0  # warm-up: not counted
    for _ in range(7):
        train_step(module, optimizer, scheduler, scaler, [torch.zeros(3)], [{}], state, cfg)
    assert (scaler.get_scale(), state.nonfinite_total, state.nonfinite_streak) == (1.0, 8, 0)
    train_step(module, optimizer, scheduler, scaler, [torch.zeros(3)], [{}], state, cfg)
    assert state.nonfinite_streak == 1
    with pytest.raises(CabbRayError, match="2 non-finite gradient norms in a row"):
        train_step(module, optimizer, scheduler, scaler, [torch.zeros(3)], [{}], state, cfg)


def test_logged_values_stay_on_the_device_until_logged():
    from cabb_ray.losses.balancing import LossBalancer, host_values

    cfg = load_config("cpu_quickstart")

    class _Terms(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {t: self.weight.sum() * (k + 1) for k, t in enumerate(LOSS_TERMS)}

    module = TrainModule(_Terms(), LossBalancer(cfg.loss))
    optimizer, scheduler = make_optimizer(module, cfg)
    values = train_step(
        module, optimizer, scheduler, None, [torch.zeros(3)], [{}], TrainState(), cfg
    )
    assert isinstance(values["loss"], torch.Tensor) and isinstance(
        values["raw/roi_box"], torch.Tensor
    )
    numbers = host_values(values)
    assert list(numbers) == list(values)
    assert numbers["raw/roi_box"] == pytest.approx(LOSS_TERMS.index("roi_box") + 1)
    assert numbers["loss"] == pytest.approx(sum(range(1, 7)))
    assert numbers["lr"] == values["lr"]


def test_restored_optimizer_state_follows_the_module_to_its_device(synthetic_root):
    """Momentum buffers restored from a checkpoint must land on the module's device ("meta"
    stands in for CUDA here: a restore before the move would leave them on the CPU)."""
    import warnings

    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.training.state import build_training, checkpoint_payload

    cfg = load_config("cpu_quickstart", ["model.pretrained=none"])
    categories = load_split(synthetic_root, "val").categories
    parts = build_training(cfg, categories, torch.device("cpu"))
    for param in parts.module.parameters():
        param.grad = torch.ones_like(param)
    parts.optimizer.step()  # creates the momentum buffers
    payload = {"model": parts.module.model.state_dict(), **checkpoint_payload(parts)}
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, and says so
        warnings.simplefilter("ignore")
        moved = build_training(cfg, categories, torch.device("meta"), payload)
    buffers = [
        value
        for state in moved.optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    ]
    assert len(buffers) == len(list(moved.module.parameters()))
    assert {b.device.type for b in buffers} == {"meta"}
    assert {p.device.type for p in moved.module.parameters()} == {"meta"}


def test_evaluation_sums_are_reduced_on_the_process_groups_device(monkeypatch):
    """Under NCCL the evaluator must all-reduce a CUDA tensor (NCCL rejects CPU tensors)."""
    import torch.distributed as dist

    from cabb_ray.metrics import evaluator as module

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert module.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert module.collective_device() == torch.device("cpu")

    class _Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(module, "collective_device", lambda: torch.device("meta"))
    categories = [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "road", "isthing": 0}]
    with pytest.raises(_Reduced):
        module.PanopticEvaluator(categories).all_reduce()
    assert seen == [torch.device("meta")]


@pytest.mark.integration
def test_one_worker_trains_in_this_process_without_ray_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "--mlflow-uri",
        uri,
        "--experiment",
        "local",
        *functools.reduce(operator.iadd, (["--set", s] for s in TINY), []),
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
        "--set",
        "run.keep_checkpoints=1",
        "--set",
        "run.cpus_per_worker=1",
    ]
    threads = torch.get_num_threads()
    try:
        assert train_main([*common, "--set", "optim.epochs=2", "--name", "first"]) == 0
        trained_with = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)  # the run set this process's threads to its CPUs
    _, runs = _run_of(uri, "local")
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["cabb_ray.launcher"] == "local"  # the loop in this process, no Ray
    assert run.data.tags["cabb_ray.torch_threads"] == "1" == str(trained_with)
    assert [s for s, _ in _history(uri, run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    kept = sorted(p.name for p in (tmp_path / "runs" / "first").iterdir())
    assert kept == ["checkpoint_000002"]  # run.keep_checkpoints=1, no partial folder left
    out = capsys.readouterr().out
    assert f"last checkpoint: {tmp_path / 'runs' / 'first' / 'checkpoint_000002'}" in out

    checkpoint = tmp_path / "runs" / "first" / "checkpoint_000002"
    resume = ["--set", "optim.epochs=3", "--name", "second", "--resume", str(checkpoint)]
    try:
        assert train_main([*common, *resume]) == 0
    finally:
        torch.set_num_threads(threads)
    _, runs = _run_of(uri, "local")
    assert [s for s, _ in _history(uri, runs[1].info.run_id, "loss")] == [7, 8, 9]
