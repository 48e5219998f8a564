"""Backbone pre-training: the file it writes loads into the network, body and FPN alike."""

from __future__ import annotations

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


@pytest.mark.integration
def test_pretrain_writes_backbone_weights_that_the_network_loads(tmp_path, capsys):
    out = tmp_path / "weights.pt"
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", *SMALL]
    argv = ["--steps", "3", "--images", "2", "--out", str(out)]
    assert pretrain.main([*argv, *(f"--set={o}" for o in overrides)]) == 0
    assert "wrote" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["meta"]["body"] == "regnet_y_400mf" and payload["meta"]["seed"] == 1000
    floats = [v for v in payload["backbone"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    model = build_model(load_config("cpu_quickstart", [f"model.pretrained={out}"]), CATEGORIES)
    for key, value in payload["backbone"].items():
        assert torch.equal(model.backbone.state_dict()[key], value.float()), key
    assert any(k.startswith("fpn.") for k in payload["backbone"])
    with pytest.raises(CabbRayError, match=r"model\.fpn_channels=32"):
        cfg = load_config("cpu_quickstart", [f"model.pretrained={out}", "model.fpn_channels=32"])
        build_model(cfg, CATEGORIES)


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
