"""Backbone pre-training: the file it writes loads into the network, body and FPN alike."""

from __future__ import annotations

import shutil

import pytest
import torch

from cabb_ray import pretrain
from cabb_ray.config import load_config
from cabb_ray.errors import CabbRayError
from cabb_ray.model.backbones import builtin_weights_path
from cabb_ray.model.network import build_model

SMALL = [
    "data.synthetic.height=128",
    "data.synthetic.width=256",
    "data.crop_size=[64, 96]",
    "data.shortest_side=128",
    "data.loader_workers=0",
    "model.canonical_scale=28",
]
CATEGORIES = [{"id": 0, "name": "road", "isthing": 0}, {"id": 13, "name": "car", "isthing": 1}]


def _run(argv: list[str], capsys) -> str:
    assert pretrain.main(argv) == 0
    return capsys.readouterr().out


def _losses(out: str) -> dict[int, str]:
    """Logged loss line of each step, by step: 'step 3/4 loss 2.345 (...)'."""
    found = {}
    for line in out.splitlines():
        if line.startswith("step "):
            step = int(line.split()[1].split("/")[0])
            found[step] = line.split(" lr ")[0]
    return found


@pytest.mark.integration
def test_pretrain_writes_a_whole_network_file_and_resumes_the_same_run(
    tmp_path, capsys, monkeypatch
):
    out, state = tmp_path / "full.pt", tmp_path / "state"
    common = [
        "--steps", "4", "--eval-every", "2", "--images", "4", "--eval-images", "2",
        "--log-every", "1", "--state-dir", str(state), "--out", str(out),
        *(f"--set={o}" for o in [f"data.cache_dir={tmp_path / 'cache'}", *SMALL]),
    ]  # fmt: skip
    whole = _losses(_run(common, capsys))
    assert sorted(whole) == [1, 2, 3, 4]
    payload = torch.load(out, weights_only=True)
    meta = payload["meta"]
    assert meta["total_steps"] == 4 and meta["complete"] and meta["seed"] == 1000
    assert [p["step"] for p in meta["curve"]] == [2, 4]
    assert meta["sittings"][0]["command"].startswith("python -m cabb_ray.pretrain --steps 4")
    floats = [v for v in payload["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert any(k.startswith("roi_heads.mask_head") for k in payload["model"])
    assert any(k.startswith("semantic_head") for k in payload["model"])

    # interrupted at the second evaluation (after epoch 1 was saved), then resumed
    calls = {"n": 0}
    real = pretrain.evaluate

    def dies_at_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    shutil.rmtree(state)
    monkeypatch.setattr(pretrain, "evaluate", dies_at_second)
    assert pretrain.main(common) == 130
    assert "--resume" in capsys.readouterr().err  # says how to continue
    monkeypatch.setattr(pretrain, "evaluate", real)
    resumed = _losses(_run([*common, "--resume"], capsys))
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == whole[3] and resumed[4] == whole[4]  # the same run, continued

    # another sitting from the file: steps and curve carry on
    extended = tmp_path / "extended.pt"
    argv = [*common, "--init-from", str(out), "--out", str(extended)]
    _run([*argv, "--state-dir", str(tmp_path / "state2")], capsys)
    meta = torch.load(extended, weights_only=True)["meta"]
    assert meta["total_steps"] == 8 and [p["step"] for p in meta["curve"]] == [2, 4, 6, 8]
    assert len(meta["sittings"]) == 2 and "--init-from" in meta["sittings"][1]["command"]


def test_pretrain_refuses_arguments_that_would_favour_an_ablation_row(capsys):
    assert pretrain.main(["--set", "loss.cabb_roi=true"]) == 2
    assert "whole images with plain smooth-L1" in capsys.readouterr().err
    assert pretrain.main(["--steps", "10", "--eval-every", "3"]) == 2
    assert "--eval-every 3: expected a positive divisor of --steps 10" in capsys.readouterr().err
    assert pretrain.main(["--resume", "--state-dir", "/nonexistent/state"]) == 2
    assert "--resume: no pre-training state at /nonexistent/state/last.pt" in (
        capsys.readouterr().err
    )


def test_pretrain_refuses_evaluation_seeds(capsys):
    assert pretrain.main(["--seed", "0"]) == 2
    assert "data.synthetic.seed 0: seeds 0..99 are kept for evaluation" in capsys.readouterr().err
    assert pretrain.main(["--set", "data.synthetic.seed=5"]) == 2
    assert "data.synthetic.seed 5: seeds 0..99" in capsys.readouterr().err


def test_the_shipped_synthetic_weights_are_small_and_load():
    path = builtin_weights_path("cpu_small")
    assert path.is_file(), f"{path} is missing: run python -m cabb_ray.pretrain"
    assert path.stat().st_size <= 10 * 2**20
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["seed"] not in pretrain.EVALUATION_SEEDS
    model = build_model(load_config("cpu_quickstart", ["model.pretrained=synthetic"]), CATEGORIES)
    key = "body.block4.block4-0.f.b.0.weight"
    assert torch.equal(model.backbone.state_dict()[key], payload["backbone"][key].float())
    trainable = {
        n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad
    }
    assert trainable == {"block2", "block3", "block4"}  # trainable_backbone_layers: 3


def _full_file(tmp_path, cfg_overrides=(), categories=CATEGORIES):
    from cabb_ray.model.pretrained import full_network_payload

    model = build_model(
        load_config("cpu_quickstart", ["model.pretrained=none", *cfg_overrides]), categories
    )
    meta = {"body": "regnet_y_400mf", "fpn_channels": 64, "categories": categories}
    path = tmp_path / "full.pt"
    torch.save(full_network_payload(model, meta), path)
    return path, model


def test_a_whole_network_file_loads_every_weight_and_freezes_nothing_else(tmp_path):
    path, source = _full_file(tmp_path)
    model = build_model(load_config("cpu_quickstart", [f"model.pretrained={path}"]), CATEGORIES)
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value.half().float()), key
    heads = [n for n, p in model.named_parameters() if p.requires_grad and "backbone" not in n]
    assert any(n.startswith("roi_heads.mask_head") for n in heads)  # heads fine-tune


@pytest.mark.parametrize(
    ("overrides", "categories", "message"),
    [
        (["model.fpn_channels=32"], CATEGORIES, r"tensors differ in shape \(first: .*fpn"),
        (
            [],
            [*CATEGORIES, {"id": 11, "name": "person", "isthing": 1}],
            r"another class set \(2 classes vs 3; only in the file: none; only in the dataset: "
            r"\['person'\]",
        ),
    ],
)
def test_a_mismatched_whole_network_file_fails_in_one_line(
    tmp_path, overrides, categories, message
):
    path, _ = _full_file(tmp_path)
    cfg = load_config("cpu_quickstart", [f"model.pretrained={path}", *overrides])
    with pytest.raises(CabbRayError, match=message) as err:
        build_model(cfg, categories)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_another_body_in_a_whole_network_file_is_named(tmp_path):
    from cabb_ray.model.pretrained import full_network_payload

    path, model = _full_file(tmp_path)
    torch.save(full_network_payload(model, {"body": "resnet50", "categories": CATEGORIES}), path)
    with pytest.raises(
        CabbRayError, match=r"holds a resnet50 network; this one has regnet_y_400mf"
    ):
        build_model(load_config("cpu_quickstart", [f"model.pretrained={path}"]), CATEGORIES)


def test_the_shipped_whole_network_file_is_fp16_small_and_fits_every_part():
    from cabb_ray.data.synthetic import synthetic_categories
    from cabb_ray.model.pretrained import builtin_full_weights_path

    path = builtin_full_weights_path("cpu_small")
    assert path.is_file(), f"{path} is missing: run python -m cabb_ray.pretrain"
    assert path.stat().st_size <= 20 * 2**20
    payload = torch.load(path, weights_only=True)
    meta = payload["meta"]
    assert meta["seed"] not in pretrain.EVALUATION_SEEDS and meta["total_steps"] > 0
    assert all(v.dtype == torch.float16 for v in payload["model"].values() if v.is_floating_point())
    categories = synthetic_categories()
    model = build_model(
        load_config("cpu_quickstart", ["model.pretrained=synthetic_full"]), categories
    )
    wanted = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(payload["model"]) == wanted  # no missing or unexpected key
    for part in (
        "backbone.body",
        "backbone.fpn",
        "rpn",
        "roi_heads.box_head",
        "roi_heads.mask_head",
        "semantic_head",
    ):
        assert any(k.startswith(part) for k in payload["model"]), part
