from __future__ import annotations

import dataclasses
import math

import pytest

from cabb_ray.config import (
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    flatten_config,
    load_config,
    preset_names,
    validate,
)
from cabb_ray.errors import CabbRayError


def test_presets_ship_with_the_package():
    assert {"cpu_quickstart", "cityscapes_r50"} <= set(preset_names())
    quick = load_config("cpu_quickstart")
    assert quick.model.preset == "cpu_small"
    assert quick.data.crop_size == (128, 128)
    assert quick.optim.amp is False
    r50 = load_config("cityscapes_r50")
    assert r50.model.preset == "resnet50" and r50.run.gpu is True


def test_overrides_are_parsed_to_the_field_type():
    cfg = load_config(
        "cpu_quickstart",
        [
            "optim.lr=1",
            "data.crop_size=[64, 96]",
            "run.experiment=123",
            "eval.max_images=null",
            "loss.weights.roi_box=2.5",
            "optim.grad_clip_norm=null",
            "data.sampler=cus",
            "loss.cabb_rpn=false",
        ],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_size == (64, 96)
    assert cfg.run.experiment == "123"
    assert cfg.eval.max_images is None
    assert cfg.loss.weights.roi_box == 2.5
    assert cfg.optim.grad_clip_norm is None
    assert cfg.data.sampler == "cus"
    assert cfg.loss.cabb_rpn is False


def test_yaml_base_chain_and_local_values(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("base: cpu_quickstart\noptim:\n  lr: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\noptim:\n  momentum: 0.8\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.5 and cfg.optim.momentum == 0.8
    assert cfg.model.preset == "cpu_small"


def test_dump_round_trips(tmp_path):
    cfg = load_config("cpu_quickstart", ["loss.roi_beta=0.3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    flat = flatten_config(cfg)
    assert flat["loss.roi_beta"] == 0.3 and flat["data.crop_size"] == [128, 128]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optim.lrr=1"],
            "--set optim.lrr: unknown config key 'optim.lrr'; closest valid keys: optim.lr",
        ),
        (["optim.lr=abc"], "--set optim.lr: got 'abc', expected float"),
        (["data.crop_size=[1,"], "--set data.crop_size: cannot parse value '[1,'"),
        (["novalue"], "--set 'novalue': expected KEY=VALUE"),
        (["data.sampler=foo"], "expected one of 'random', 'cus', 'isus', 'full'"),
        (["data.crop_size=[1, 2, 3]"], "expected a list of 2 int values"),
        (["data.r_th=[4, 1]"], "data.r_th: expected 0 < low <= high"),
        (["optim.lr.x=1"], "'optim.lr' is a value"),
        (["loss.cabb_rpn=1"], "expected bool"),
        (["run.cpus_per_worker=0"], "run.cpus_per_worker: expected a positive value, got 0"),
        (["run.max_failures=-1"], "run.max_failures: expected >= 0, got -1"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(CabbRayError) as err:
        load_config("cpu_quickstart", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  crop_sise: [64, 64]\n")
    with pytest.raises(CabbRayError) as err:
        load_config(path)
    assert str(err.value).startswith(
        f"{path}: unknown config key 'data.crop_sise'; closest valid keys: data.crop_size"
    )


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(CabbRayError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(CabbRayError, match=r"broken\.yaml: invalid YAML at line"):
        load_config(bad)
    with pytest.raises(CabbRayError, match="not a YAML file or a preset; presets: "):
        load_config("no_such_preset")


def test_defaults_are_valid():
    assert load_config() == ExperimentConfig()


def test_checkpoint_configs_with_removed_keys_still_load():
    """Checkpoints written before the paper's LR schedule carry optim.warmup_factor."""
    data = config_to_dict(load_config("cpu_quickstart"))
    data["optim"]["warmup_factor"] = 0.1
    assert config_from_dict(data) == load_config("cpu_quickstart")


@pytest.mark.parametrize("layers", [-1, 6])
def test_trainable_backbone_layers_are_bounded(layers):
    with pytest.raises(CabbRayError, match=r"model\.trainable_backbone_layers: expected 0\.\.5"):
        load_config("cpu_quickstart", [f"model.trainable_backbone_layers={layers}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.nan", "--set optim.lr: got nan, expected a finite number"),
        ("optim.lr=.inf", "--set optim.lr: got inf, expected a finite number"),
        ("optim.weight_decay=.nan", "--set optim.weight_decay: got nan, expected a finite"),
        ("optim.momentum=-5", "optim.momentum: expected 0 <= m < 1, got -5.0"),
        ("optim.momentum=1", "optim.momentum: expected 0 <= m < 1, got 1.0"),
        ("optim.grad_clip_norm=-1", "optim.grad_clip_norm: expected a positive norm, or null"),
        ("optim.grad_clip_norm=0", "optim.grad_clip_norm: expected a positive norm, or null"),
        ("optim.grad_clip_norm=.nan", "--set optim.grad_clip_norm: got nan, expected a finite"),
        ("model.canonical_scale=.nan", "--set model.canonical_scale: got nan, expected a finite"),
        ("loss.rpn_beta=.inf", "--set loss.rpn_beta: got inf, expected a finite number"),
        ("loss.weights.roi_box=.inf", "--set loss.weights.roi_box: got inf, expected a finite"),
        ("run.cpus_per_worker=.nan", "--set run.cpus_per_worker: got nan, expected a finite"),
        ("data.r_th=[0.25, .inf]", "--set data.r_th[1]: got inf, expected a finite number"),
        ("data.loader_workers=-1", "data.loader_workers: expected >= 0, got -1"),
        ("eval.max_images=-3", "eval.max_images: expected >= 0, got -3"),
        ("data.min_visible_pixels=0", "data.min_visible_pixels: expected a positive value"),
        ("data.synthetic.num_val=0", "data.synthetic.num_val: expected a positive value"),
        ("data.synthetic.seed=-1", "data.synthetic.seed: expected >= 0, got -1"),
        ("run.seed=-1", "run.seed: expected >= 0, got -1"),
        ("run.overlays=-1", "run.overlays: expected >= 0, got -1"),
        ("model.fpn_channels=0", "model.fpn_channels: expected a positive value, got 0"),
    ],
)
def test_nonsense_values_are_refused_naming_the_key(override, message):
    """NaN fails no ``x < 0`` check, so every float must be finite first; negative workers,
    image counts and clip norms mean nothing (a negative clip norm ascends the gradient)."""
    with pytest.raises(CabbRayError) as err:
        load_config("cpu_quickstart", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_documented_meanings_stay_valid():
    """null clip norm: no clipping; null or 0 max_images: every image; 0 loader workers:
    load in the training process; lr 0 is allowed (a frozen network is a choice)."""
    cfg = load_config(
        "cpu_quickstart",
        ["optim.grad_clip_norm=null", "eval.max_images=0", "data.loader_workers=0", "optim.lr=0"],
    )
    assert cfg.optim.grad_clip_norm is None and cfg.eval.max_images == 0
    assert load_config("cpu_quickstart", ["eval.max_images=null"]).eval.max_images is None


def test_non_finite_yaml_values_and_direct_configs_are_refused(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("base: cpu_quickstart\noptim:\n  lr: .nan\n")
    with pytest.raises(CabbRayError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: optim.lr: got nan, expected a finite number"
    # validate() on a config built in code, not through the coercion
    cfg = load_config("cpu_quickstart")
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, r_st=(math.nan, 1.0)))
    with pytest.raises(CabbRayError, match=r"^data\.r_st\[0\]: expected a finite number, got nan"):
        validate(bad)
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=math.inf))
    with pytest.raises(CabbRayError, match=r"^optim\.lr: expected a finite number, got inf"):
        validate(bad)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("optim:\n  lr: 0.01  # café\n".encode("latin-1"))
    with pytest.raises(CabbRayError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: not UTF-8 text (byte 0xe9 at offset 24); expected a YAML file"
    )


def test_floats_in_exponent_form_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads ``1e-3`` as text; a float field takes it as the number."""
    cfg = load_config("cpu_quickstart", ["optim.lr=1e-3", "loss.weights.roi_box=2E1"])
    assert cfg.optim.lr == 0.001 and cfg.loss.weights.roi_box == 20.0
    with pytest.raises(CabbRayError, match=r"optim\.lr"):
        load_config("cpu_quickstart", ["optim.lr=1e400"])  # inf
    with pytest.raises(CabbRayError, match=r"data\.sampler"):
        load_config("cpu_quickstart", ["data.sampler=1e3"])  # a text field stays text
