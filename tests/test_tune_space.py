"""Search-space files: every validation error, define-by-run sampling, trial configs."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from cabb_ray.config import load_config
from cabb_ray.errors import CabbRayError, run_cli
from cabb_ray.tune.cli import main as tune_main
from cabb_ray.tune.leaderboard import pareto_front
from cabb_ray.tune.sampling import sampled_values, trial_config
from cabb_ray.tune.space import SchedulerSpec, load_space

REPO = Path(__file__).resolve().parents[1]

VALID = {
    "base": "cpu_quickstart",
    "fixed": {"optim.epochs": 4},
    "metric": ["pq", "pc"],
    "mode": ["max", "max"],
    "num_samples": 4,
    "scheduler": {"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
    "searcher": {"type": "tpe", "seed": 0},
    "space": {
        "loss.weights.roi_box": {"loguniform": [0.1, 10.0]},
        "data.sampler": {"choice": ["isus", "cus"]},
        "data.r_th": {
            "pair": [{"loguniform": [0.1, 1.0]}, {"loguniform": [0.5, 8.0]}],
            "when": {"data.sampler": "isus"},
        },
        "data.crop_size": {"choice": [[96, 96], [128, 128]]},
        "optim.warmup_steps": {"int": [0, 40], "step": 10},
    },
}


def write_space(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_changes(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(VALID, sort_keys=False))
    for dotted, value in changes.items():
        *parents, last = dotted.split("/")
        node = data
        for key in parents:
            node = node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return data


def test_valid_space_loads_with_defaults(tmp_path):
    spec = load_space(write_space(tmp_path, VALID))
    assert spec.metrics == ["pq", "pc"] and spec.multi_objective and spec.metric == "pq"
    assert [p.key for p in spec.params][:2] == ["loss.weights.roi_box", "data.sampler"]
    assert spec.scheduler == SchedulerSpec("asha", 4, 1, 2.0)
    assert spec.max_concurrent_trials == 1 and spec.max_failures == 1


@pytest.mark.parametrize("name", ["quickstart.yaml", "loss_balance.yaml", "ablation.yaml"])
def test_shipped_spaces_are_valid(name, monkeypatch):
    monkeypatch.setenv("CABB_RAY_DATA_ROOT", "/data/cityscapes")
    spec = load_space(REPO / "search_spaces" / name)
    assert spec.num_samples > 0 and spec.params


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedular": {}}, "unknown key 'schedular' (closest valid: scheduler)"),
        (
            {"space/loss.weights.roi_bx": {"uniform": [0, 1]}},
            "space.loss.weights.roi_bx: unknown config key (closest valid: loss.weights.roi_box)",
        ),
        (
            {"space/loss.weights.roi_box": {"loguniform": [10.0, 1.0]}},
            "space.loss.weights.roi_box.loguniform: expected low < high, got [10.0, 1.0]",
        ),
        (
            {"space/loss.cabb_rpn": {"uniform": [0.0, 1.0]}},
            "space.loss.cabb_rpn: loss.cabb_rpn: got 0.0, expected bool",
        ),
        (
            {"space/data.sampler": {"choice": ["isus", "nearest"]}},
            "space.data.sampler: data.sampler: got 'nearest', expected one of",
        ),
        (
            {"space/data.r_th/when": {"data.samplr": "isus"}},
            "condition on unknown parameter 'data.samplr' (closest valid: data.sampler)",
        ),
        (
            {"space/optim.lr": {"grid": [0.01, 0.02]}},
            "space.optim.lr: 'grid' values need searcher.type grid, not tpe",
        ),
        (
            {"searcher": {"type": "grid"}},
            "searcher.type grid needs every parameter as 'grid' values without conditions",
        ),
        ({"searcher": {"type": "cmaes"}}, "searcher.type: unknown 'cmaes'"),
        ({"metric": ["pq", "pqq"]}, "metric: unknown metric 'pqq'"),
        ({"mode": ["max"]}, "expected one or two distinct metrics with a mode each"),
        ({"scheduler/max_t": 8}, "scheduler.max_t: 8 is more than the trials' optim.epochs 4"),
        ({"scheduler/grace_period": 5}, "scheduler.grace_period: 5 is more than max_t 4"),
        ({"scheduler/reduction_factor": 1}, "scheduler.reduction_factor: expected > 1, got 1"),
        ({"num_samples": 0}, "num_samples: expected a positive integer, got 0"),
        ({"num_samples": "many"}, "num_samples: expected a positive integer, got 'many'"),
        ({"space": {}}, "space: expected at least one searched parameter"),
        ({"space": ...}, "missing key 'space'"),
        ({"base": "no_such_preset"}, "base: config"),
        ({"fixed/optim.epocs": 3}, "fixed optim.epocs: unknown config key 'optim.epocs'"),
        ({"resources": {"workers": 0}}, "resources.workers: expected a positive integer, got 0"),
        ({"resources": {"cpus": 2}}, "resources: unknown key 'cpus'"),
        (
            {"space/data.r_th/pair": [{"loguniform": [0.1, 4.0]}, {"loguniform": [1.0, 2.0]}]},
            "pair: the first value's high 4.0 must not exceed the second's high 2.0",
        ),
        (
            {"space/data.r_th/pair": [{"loguniform": [0.1, 1.0], "setp": 1}, {"uniform": [1, 2]}]},
            "space.data.r_th.pair[0]: unknown key 'setp' (closest valid: step)",
        ),
        (
            {"space/optim.steps_per_epoch": {"uniform": [5, 50]}},
            "optim.steps_per_epoch: got 21.965, expected int",
        ),
        (
            {"space/data.r_th/when": {"data.sampler": "isuss"}},
            "space.data.r_th.when: data.sampler is never 'isuss'; its options: 'isus', 'cus'",
        ),
        ({"space/run.workers": {"int": [1, 4]}}, "space.run.workers: run.* keys are not searched"),
        ({"metric": ["pq", 3], "mode": ["max", "max"]}, "metric: unknown metric '3'"),
        ({"space/optim.lr": {"uniform": [0, 1], "step": -1}}, "step: expected a positive"),
        ({"space/optim.lr": {"normal": [0, 1]}}, "unknown key 'normal'"),
        (
            {"space/optim.lr": {"uniform": [0, 1], "choice": [1]}},
            "expected exactly one of uniform, loguniform, int, choice, grid, pair",
        ),
        # YAML's .nan and .inf: NaN passes every 'low >= high' check
        (
            {"space/optim.lr": {"uniform": [1e-3, math.nan]}},
            "space.optim.lr.uniform: expected a finite number, got nan",
        ),
        (
            {"space/optim.lr": {"loguniform": [1e-3, math.inf]}},
            "space.optim.lr.loguniform: expected a finite number, got inf",
        ),
        (
            {"space/optim.lr": {"choice": [0.01, math.nan]}},
            "space.optim.lr: optim.lr: got nan, expected a finite number",
        ),
        (
            {"space/optim.lr": {"uniform": [0, 1], "step": math.inf}},
            "space.optim.lr.step: expected a finite number, got inf",
        ),
        (
            {"scheduler/reduction_factor": math.inf},
            "scheduler.reduction_factor: expected a finite number, got inf",
        ),
        ({"fixed/optim.momentum": math.nan}, "fixed optim.momentum: got nan, expected a finite"),
        ({"fixed/optim.momentum": -5}, "optim.momentum: expected 0 <= m < 1, got -5.0"),
        (
            {"resources": {"driver_cpus": math.nan}},
            "resources.driver_cpus: expected a finite number, got nan",
        ),
        (
            {"resources": {"gpus_per_worker": math.nan}},
            "resources.gpus_per_worker: expected a finite number, got nan",
        ),
    ],
)
def test_invalid_space_is_one_line_naming_the_key(tmp_path, changes, message):
    path = write_space(tmp_path, with_changes(**changes))
    with pytest.raises(CabbRayError) as info:
        load_space(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_space_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"base: cpu_quickstart\ndescription: caf\xe9\n")
    with pytest.raises(CabbRayError) as info:
        load_space(path)
    assert str(info.value) == (
        f"{path}: not UTF-8 text (byte 0xe9 at offset 37); expected a YAML file"
    )


def test_condition_must_follow_its_parameter(tmp_path):
    data = with_changes()
    data["space"] = {
        "data.r_th": VALID["space"]["data.r_th"],
        "data.sampler": {"choice": ["isus", "cus"]},
    }
    with pytest.raises(CabbRayError, match=r"'data.sampler' is searched after 'data.r_th'"):
        load_space(write_space(tmp_path, data))


def test_set_overrides_are_part_of_validation(tmp_path):
    path = write_space(tmp_path, with_changes(scheduler={"type": "asha"}))
    assert load_space(path, ["optim.epochs=8"]).scheduler.max_t == 8  # default max_t follows
    with pytest.raises(CabbRayError, match=r"max_t: 4 is more than the trials' optim.epochs 2"):
        load_space(write_space(tmp_path, VALID, "v.yaml"), ["optim.epochs=2"])


def test_resources_set_only_what_they_name(tmp_path):
    data = with_changes(fixed={"optim.epochs": 4, "run.workers": 2})
    cfg = load_space(write_space(tmp_path, data)).base_config()
    assert cfg.run.workers == 2 and cfg.run.cpus_per_worker is None and not cfg.run.gpu
    data["resources"] = {"workers": 3, "cpus_per_worker": 0.5, "gpus_per_worker": 0.25}
    cfg = load_space(write_space(tmp_path, data)).base_config()
    assert (cfg.run.workers, cfg.run.cpus_per_worker, cfg.run.gpu) == (3, 0.5, True)
    assert cfg.run.gpus_per_worker == 0.25


def test_grid_with_more_samples_than_points(tmp_path):
    data = with_changes(
        searcher={"type": "grid"}, num_samples=5, space={"optim.lr": {"grid": [0.01, 0.02]}}
    )
    with pytest.raises(CabbRayError, match="num_samples: 5 is more than the grid's 2 points"):
        load_space(write_space(tmp_path, data))


def test_cli_rejects_bad_space_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path, with_changes(**{"metric": ["pqq"], "mode": ["max"]}))
    with pytest.raises(SystemExit) as info:
        run_cli(tune_main, ["--space", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unknown metric 'pqq'" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_rejects_resources_that_never_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = with_changes(resources={"workers": 3, "cpus_per_worker": 64})
    path = write_space(tmp_path, data)
    with pytest.raises(SystemExit) as info:
        run_cli(tune_main, ["--space", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "need 192 CPUs but this machine has" in err
    assert not (tmp_path / "runs").exists()


def test_resume_without_a_search(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path, VALID)
    with pytest.raises(SystemExit) as info:
        run_cli(tune_main, ["--space", str(path), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--resume: no search of {path.resolve()}" in err


def test_resume_of_another_space_and_bad_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path, VALID)
    folder = tmp_path / "runs" / "s1"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text('{"space": "/elsewhere/other.yaml", "num_samples": 4}')
    for argv, message in [
        (["--name", "s1", "--resume"], "that search ran /elsewhere/other.yaml, not"),
        (["--name", "s1"], "already holds a search; --resume continues it"),
        (["--name", "it's"], '--name "it\'s": expected letters, digits'),
        (["--num-samples", "0"], "--num-samples: expected a positive integer, got 0"),
    ]:
        with pytest.raises(SystemExit) as info:
            run_cli(tune_main, ["--space", str(path), *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, err


def test_resume_keeps_the_searchs_early_stopping(tmp_path, capsys, monkeypatch):
    """A search started with ASHA cannot lose it on resume (Tune restores its scheduler)."""
    import json

    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path, VALID)
    folder = tmp_path / "runs" / "s1"
    folder.mkdir(parents=True)
    state = {"space": str(path.resolve()), "num_samples": 4, "scheduler": "asha"}
    (folder / "search.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit) as info:
        run_cli(
            tune_main, ["--space", str(path), "--name", "s1", "--resume", "--no-early-stopping"]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "was started with early stopping, which a resume keeps" in err


def _sample(spec, seed: int) -> dict:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    spec.define_by_run({"data.sampler": "isus"})(trial)
    return trial.params


def test_define_by_run_conditions_pairs_and_types(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_space(write_space(tmp_path, VALID))
    base = load_config("cpu_quickstart", ["optim.epochs=4"])
    seen_samplers = set()
    for seed in range(40):
        params = _sample(spec, seed)
        seen_samplers.add(params["data.sampler"])
        has_pair = "data.r_th[0]" in params
        assert has_pair == (params["data.sampler"] == "isus")  # condition
        cfg = trial_config(base, params)
        if has_pair:
            low, high = cfg.data.r_th
            assert 0.1 <= low <= 1.0 and max(low, 0.5) <= high <= 8.0 and low <= high
        else:
            assert cfg.data.r_th == base.data.r_th
        assert cfg.data.crop_size in ((96, 96), (128, 128))  # typed: a tuple of ints
        assert cfg.optim.warmup_steps % 10 == 0 and isinstance(cfg.optim.warmup_steps, int)
        assert 0.1 <= cfg.loss.weights.roi_box <= 10.0
    assert seen_samplers == {"isus", "cus"}


def test_sampled_values_decodes_pairs_and_lists():
    config = {"data.r_th[0]": 0.5, "data.r_th[1]": 2.0, "data.crop_size": "[96, 96]"}
    values = sampled_values(config)
    assert values == {"data.r_th": [0.5, 2.0], "data.crop_size": [96, 96]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss.weights.semantic": -1.0}, "loss.weights.semantic: expected >= 0, got -1.0"),
        ({"optim.warmup_steps": 500}, "optim.warmup_steps: expected 0 <= warm-up < the run's"),
        ({"data.crop_size": "[512, 512]"}, "data.crop_size [512, 512]: larger than the image"),
        ({"loss.rpn_beta": 0.0}, "loss.rpn_beta: expected > 0, got 0.0"),
    ],
)
def test_invalid_trial_config_names_the_reason(values, message):
    base = load_config("cpu_quickstart")
    with pytest.raises(CabbRayError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trial_config(base, values)


def test_asha_rungs_are_evaluated_epochs():
    assert SchedulerSpec("asha", 4, 1, 2.0).rungs() == [1, 2, 4]
    assert SchedulerSpec("asha", 100, 5, 3.0).rungs() == [5, 15, 45, 100]  # + where it stops
    assert SchedulerSpec("asha", 9, 2, 1.5).rungs() == [2, 3, 5, 7, 9]


@pytest.mark.parametrize(
    ("max_t", "grace", "factor"), [(4, 1, 2.0), (100, 5, 3.0), (9, 2, 1.5), (16, 3, 4.0), (7, 7, 2)]
)
def test_asha_rungs_are_where_a_real_ashascheduler_compares_trials(max_t, grace, factor):
    """Ray's ASHA compares a trial at its first report at or past each milestone of its
    bracket (``_Bracket.on_result``), and stops every trial at max_t: with one report per
    epoch, those epochs are ceil(milestone) and max_t."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        metric="pq",
        mode="max",
        max_t=max_t,
        grace_period=grace,
        reduction_factor=factor,
    )
    (bracket,) = scheduler._brackets  # one bracket: brackets=1, Ray's default
    milestones = {math.ceil(milestone) for milestone, _ in bracket._rungs}
    assert SchedulerSpec("asha", max_t, grace, float(factor)).rungs() == sorted(
        milestones | {max_t}
    )


def test_pareto_front_keeps_non_dominated_rows():
    import pandas as pd

    table = pd.DataFrame(
        {
            "trial": list("abcde"),
            "pq": [0.5, 0.4, 0.3, 0.5, math.nan],
            "pc": [0.2, 0.6, 0.5, 0.1, 0.9],
        }
    )
    front = pareto_front(table, ["pq", "pc"], ["max", "max"])
    assert list(front["trial"]) == ["a", "b"]
    front_min = pareto_front(table, ["pq", "pc"], ["min", "max"])
    assert set(front_min["trial"]) == {"b", "c"}


def test_cluster_environment_supplies_storage_and_tracking_uri(tmp_path, monkeypatch, capsys):
    """On a cluster head (cluster/*.yaml) CABB_RAY_STORAGE and MLFLOW_TRACKING_URI stand in
    for --storage and --mlflow-uri."""
    from cabb_ray.errors import run_cli
    from cabb_ray.tune.cli import main as tune_main

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CABB_RAY_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://tracking-from-env")
    with pytest.raises(SystemExit):
        run_cli(tune_main, ["--space", str(space), "--resume"])
    assert f"no search of {space} in {tmp_path / 'store'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(tune_main, ["--space", str(space)])
    assert "--mlflow-uri ftp://tracking-from-env: expected sqlite" in capsys.readouterr().err


ABLATION = {
    "base": "cpu_quickstart",
    "metric": "pq",
    "scheduler": "none",
    "searcher": {"type": "grid"},
    "variants": {
        "CROP": {"data.sampler": "cus", "loss.cabb_rpn": False},
        "FULL": {"data.sampler": "full", "data.batch_size": 2},
    },
    "space": {"variant": {"grid": ["CROP", "FULL"]}, "run.seed": {"grid": [0, 1]}},
}


def test_variants_expand_into_each_trial_config(tmp_path):
    spec = load_space(write_space(tmp_path, ABLATION))
    assert spec.num_samples == 4 and list(spec.variants) == ["CROP", "FULL"]
    cfg = trial_config(spec.config, {"variant": "FULL", "run.seed": 1}, spec.variants)
    assert (cfg.data.sampler, cfg.data.batch_size, cfg.run.seed) == ("full", 2, 1)
    assert cfg.loss.cabb_rpn is True  # the base's value where the variant says nothing
    cfg = trial_config(spec.config, {"variant": "CROP", "run.seed": 0}, spec.variants)
    assert (cfg.data.sampler, cfg.loss.cabb_rpn, cfg.data.batch_size) == ("cus", False, 8)
    with pytest.raises(CabbRayError, match="variant 'NONE': not among CROP, FULL"):
        trial_config(spec.config, {"variant": "NONE"}, spec.variants)


def test_conditions_see_the_variants_values_and_set_wins(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(ABLATION))
    data["searcher"] = {"type": "random", "seed": 0}
    data["space"] = {
        "variant": {"choice": ["CROP", "FULL"]},
        "data.r_st": {
            "pair": [{"uniform": [0.5, 1.0]}, {"uniform": [1.0, 2.0]}],
            "when": {"data.sampler": "cus"},
        },
    }
    spec = load_space(write_space(tmp_path, data), ["data.batch_size=4"])
    assert spec.variants["FULL"] == {"data.sampler": "full"}  # --set took batch_size
    seen = {}
    for seed in range(12):
        values = _sample(spec, seed)
        seen.setdefault(values["variant"], set()).add("data.r_st[0]" in values)
        cfg = trial_config(spec.config, values, spec.variants)
        assert cfg.data.batch_size == 4
    assert seen == {"CROP": {True}, "FULL": {False}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"variants": {"CROP": {"data.samplr": "cus"}}},
            "variants.CROP: unknown config key 'data.samplr' (closest valid: data.sampler)",
        ),
        (
            {"variants": {"CROP": {"data.sampler": "crop"}}},
            "variants.CROP: data.sampler: got 'crop', expected one of",
        ),
        ({"variants": {"CROP": {"run.workers": 2}}}, "variants.CROP: run.workers: run.* keys"),
        ({"variants": {"CROP": {"data.crop_size": [512, 512]}}}, "variants.CROP: data.crop_size"),
        ({"variants": ...}, "space.variant: needs a top-level 'variants:' mapping"),
        (
            {"space": {"run.seed": {"grid": [0, 1]}}},
            "variants: defined, but space has no 'variant' parameter",
        ),
        (
            {"space": {"variant": {"grid": ["CROP", "CORP"]}}},
            "space.variant: unknown variant 'CORP' (closest valid: CROP)",
        ),
        (
            {"searcher": {"type": "random"}, "space": {"variant": {"uniform": [0, 1]}}},
            "space.variant: expected choice or grid over variant names",
        ),
        ({"space": {"variant": {"grid": ["CROP"]}, "run.workers": {"grid": [1]}}}, "run.* keys"),
        (
            {"variants": {"CROP": {"optim.epochs": 2}}},
            "variants.CROP: optim.epochs: every variant trains the search's schedule",
        ),
        (
            {"space": {"variant": {"grid": [["CROP", "FULL"]]}}},
            "space.variant: expected variant names, got ['CROP', 'FULL']",
        ),
    ],
)
def test_invalid_variants_are_one_line_naming_the_key(tmp_path, changes, message):
    data = yaml.safe_load(yaml.safe_dump(ABLATION, sort_keys=False))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path = write_space(tmp_path, data)
    with pytest.raises(CabbRayError) as info:
        load_space(path)
    assert message in str(info.value) and str(path) in str(info.value)
