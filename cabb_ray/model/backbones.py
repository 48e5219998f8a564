"""Backbone bodies + FPN, and the weights they start from.

Two families of torchvision bodies: ResNets (the GPU network's ResNet-50) and RegNets (the CPU
network's RegNetY-400MF, chosen because its pre-trained body plus FPN fits in the package at
under 10 MB in fp16, where a ResNet-18 needs 22 MB). Both are cut into five stages (stem and
four blocks at strides 4..32) so that ``trainable_backbone_layers`` means the same thing for
both.

Starting weights (``model.pretrained``):
- ``none``: trained from scratch, ordinary batch norm, every stage trains;
- ``imagenet``: torchvision's ImageNet weights (downloaded; frozen batch norm);
- ``synthetic``: body + FPN pre-trained on synthetic scenes of a seed no evaluation set uses,
  shipped in ``cabb_ray/model/weights`` (made by the body-only ``cabb_ray.pretrain`` of commit
  941cd2c, on ISUS crops with CABB on; kept for comparison); the analogue of
  ImageNet initialisation for the CPU network (heads still start from scratch);
- ``synthetic_full``: the whole network (heads too) pre-trained on whole synthetic images; the
  network loads it (``cabb_ray.model.pretrained``), the backbone only builds its structure;
- a path: a torchvision state dict of the body, a body file of the earlier pre-training, or a
  whole-network file written by ``cabb_ray.pretrain``.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cabb_ray.errors import CabbRayError
from cabb_ray.model.pretrained import FULL_BUILTIN, full_network_file, read_weights_file

WEIGHTS_PACKAGE = "cabb_ray.model.weights"
BUILTIN_WEIGHTS = {"synthetic": "{preset}_synthetic.pt"}
# Stage names from the deepest to the stem: the first ``trainable_backbone_layers`` train.
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
REGNET_STAGES = ("block4", "block3", "block2", "block1", "stem")


def _body(name: str, weights: Any, norm: type[nn.Module]) -> tuple[nn.Module, tuple[str, ...]]:
    """The torchvision classifier without its head, and its stage names (deepest first)."""
    model = getattr(torchvision.models, name)(weights=weights, norm_layer=norm)
    if name.startswith("resnet"):
        return model, RESNET_STAGES
    stages = [("stem", model.stem)]
    stages += [(f"block{k}", model.trunk_output[k - 1]) for k in (1, 2, 3, 4)]
    return nn.Sequential(OrderedDict(stages)), REGNET_STAGES


def _stage_channels(body: nn.Module, stages: tuple[str, ...]) -> list[int]:
    """Output channels of the four blocks, read by running a tiny input through them."""
    x = torch.zeros(1, 3, 64, 64)
    channels = {}
    body.eval()
    with torch.no_grad():
        for name, child in body.named_children():
            if name in ("avgpool", "fc"):
                break
            x = child(x)
            channels[name] = x.shape[1]
    body.train()
    return [channels[name] for name in reversed(stages[:4])]


def _imagenet_weights(name: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    return enum.IMAGENET1K_V1


def builtin_weights_path(preset: str) -> Path:
    """Where the package keeps the ``synthetic`` body + FPN weights of a network preset."""
    folder = Path(str(resources.files(WEIGHTS_PACKAGE)))
    return folder / BUILTIN_WEIGHTS["synthetic"].format(preset=preset)


def build_backbone(
    body_name: str,
    preset: str,
    pretrained: str,
    fpn_channels: int,
    trainable: int,
    starting_weights: bool = True,
) -> BackboneWithFPN:
    """Body + FPN (P2..P6) with the requested starting weights and trainable stages; without
    ``starting_weights`` the same structure (frozen batch norm, frozen stages) is built but
    nothing is read or downloaded."""
    load = starting_weights and pretrained == "imagenet"
    weights = _imagenet_weights(body_name) if load else None
    from_scratch = pretrained == "none"
    norm = nn.BatchNorm2d if from_scratch else FrozenBatchNorm2d
    try:
        body, stages = _body(body_name, weights, norm)
    except (OSError, RuntimeError) as err:  # no network: URLError is an OSError
        raise CabbRayError(
            f"model.pretrained=imagenet: could not download {weights} ({type(err).__name__}); "
            "fetch the .pth elsewhere and pass it: --set model.pretrained=/path/to/weights.pth"
        ) from None
    trainable = len(stages) if from_scratch else trainable
    train = stages[:trainable]
    for name, parameter in body.named_parameters():
        stage = "conv1" if name.startswith("bn1") else name.split(".")[0]
        if stage not in train:
            parameter.requires_grad_(False)
    backbone = BackboneWithFPN(
        body,
        {stage: str(k) for k, stage in enumerate(reversed(stages[:4]))},
        _stage_channels(body, stages),
        fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    body_file = pretrained not in ("none", "imagenet", FULL_BUILTIN)
    if starting_weights and body_file and full_network_file(pretrained, preset) is None:
        _load_weights(backbone, body_name, preset, pretrained, fpn_channels)
    return backbone


def _load_weights(
    backbone: BackboneWithFPN, body_name: str, preset: str, pretrained: str, fpn_channels: int
) -> None:
    path = (
        builtin_weights_path(preset)
        if pretrained in BUILTIN_WEIGHTS
        else Path(pretrained).expanduser()
    )
    if pretrained in BUILTIN_WEIGHTS and not path.is_file():
        raise CabbRayError(
            f"model.pretrained={pretrained}: no shipped weights for model.preset={preset} "
            f"({path.name}); make them with python -m cabb_ray.pretrain, or use none/imagenet"
        )
    if not path.is_file():
        expected = "none, imagenet, synthetic, synthetic_full or a .pth path"
        raise CabbRayError(f"model.pretrained: {path} not found (expected {expected})")
    state = read_weights_file(path)
    if "backbone" in state and "meta" in state:
        meta = state["meta"]
        if (meta.get("body"), meta.get("fpn_channels")) != (body_name, fpn_channels):
            raise CabbRayError(
                f"model.pretrained: {path} holds a {meta.get('body')} body with an FPN of "
                f"{meta.get('fpn_channels')} channels; this network has {body_name} with "
                f"model.fpn_channels={fpn_channels}"
            )
        backbone.load_state_dict({k: v.float() for k, v in state["backbone"].items()})
        return
    # torchvision's RegNets keep their blocks under trunk_output; our body lifts them up.
    state = {k.removeprefix("trunk_output."): v for k, v in state.items()}
    result = backbone.body.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(backbone.body.state_dict()):
        raise CabbRayError(f"model.pretrained: {path} holds no {body_name} weights")
