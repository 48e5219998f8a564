"""Whole-network pre-trained files: every weight of the panoptic network (body, FPN, RPN, RoI box
and mask heads, semantic head) in fp16, with how it was made.

``model.pretrained: synthetic_full`` (or a path to such a file) fine-tunes all of it, as
practitioners fine-tune a COCO-pretrained Mask R-CNN. The file is written by
``python -m cabb_ray.pretrain`` and loaded strictly: another architecture, another FPN width
or another class set fails with one line naming the file and what differs.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cabb_ray.errors import CabbRayError

FULL_FORMAT = "cabb_ray.pretrained_network/1"
WEIGHTS_PACKAGE = "cabb_ray.model.weights"
FULL_BUILTIN = "synthetic_full"


def builtin_full_weights_path(preset: str) -> Path:
    """Where the package keeps a network preset's whole-network ``synthetic_full`` file."""
    return Path(str(resources.files(WEIGHTS_PACKAGE))) / f"{preset}_synthetic_full.pt"


def full_network_file(pretrained: str, preset: str) -> Path | None:
    """The whole-network file that ``model.pretrained`` names, or None when it names body
    weights (or none)."""
    if pretrained == FULL_BUILTIN:
        path = builtin_full_weights_path(preset)
        if not path.is_file():
            raise CabbRayError(
                f"model.pretrained={FULL_BUILTIN}: no shipped file for model.preset={preset} "
                f"({path.name}); make it with python -m cabb_ray.pretrain"
            )
        return path
    if pretrained in ("none", "imagenet", "synthetic"):
        return None
    path = Path(pretrained).expanduser()
    if path.is_file() and read_weights_file(path).get("format") == FULL_FORMAT:
        return path
    return None


def read_weights_file(path: Path) -> dict[str, Any]:
    """A weights file's dict, read without running any pickled code (``weights_only``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors have no common base
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CabbRayError(
            f"model.pretrained: {path} is not a readable weights file "
            f"({type(err).__name__}: {first})"
        ) from None
    if not isinstance(payload, dict):
        raise CabbRayError(f"model.pretrained: {path} holds no state dict")
    return payload


def full_network_payload(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What ``cabb_ray.pretrain`` writes: floats in fp16, batch-norm counters dropped (the
    fine-tuned network freezes batch norm, which keeps no counter)."""
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    return {"format": FULL_FORMAT, "model": state, "meta": meta}


def _class_set(categories: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
    return sorted((int(c["id"]), str(c["name"]), bool(c["isthing"])) for c in categories)


def read_full_network_file(
    path: str | Path, model: nn.Module, categories: list[dict[str, Any]]
) -> dict[str, Any]:
    """Load a whole-network file into ``model`` (every key, every shape) and return the file's
    payload; anything that differs is one ``CabbRayError`` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CabbRayError(f"model.pretrained: {path} not found")
    payload = read_weights_file(path)
    if payload.get("format") != FULL_FORMAT:
        raise CabbRayError(
            f"model.pretrained: {path} is not a whole-network file (expected format "
            f"{FULL_FORMAT}; body-only files load with model.pretrained=synthetic or their path)"
        )
    meta = payload.get("meta", {})
    if meta.get("complete") is False:
        print(
            f"warning: {path} is a snapshot at step {meta.get('total_steps')} of an unfinished "
            "pre-training",
            file=sys.stderr,
        )
    body = getattr(getattr(model, "arch", None), "backbone", None)
    if meta.get("body") != body:
        raise CabbRayError(
            f"model.pretrained: {path} holds a {meta.get('body')} network; this one has {body}"
        )
    if "categories" in meta and _class_set(meta["categories"]) != _class_set(categories):
        theirs = {name for _, name, _ in _class_set(meta["categories"])}
        ours = {name for _, name, _ in _class_set(categories)}
        raise CabbRayError(
            f"model.pretrained: {path} was trained on another class set "
            f"({len(theirs)} classes vs {len(ours)}; only in the file: "
            f"{sorted(theirs - ours) or 'none'}; only in the dataset: "
            f"{sorted(ours - theirs) or 'none'}; ids or kinds may differ too)"
        )
    wanted = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    saved = payload["model"]
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    if missing or unexpected:
        raise CabbRayError(
            f"model.pretrained: {path} does not fit this network: {len(missing)} missing keys "
            f"(first: {missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]})"
        )
    shapes = [k for k in wanted if tuple(wanted[k].shape) != tuple(saved[k].shape)]
    if shapes:
        k = shapes[0]
        raise CabbRayError(
            f"model.pretrained: {path} does not fit this network: {len(shapes)} tensors differ "
            f"in shape (first: {k} {tuple(saved[k].shape)} in the file, "
            f"{tuple(wanted[k].shape)} here; model.fpn_channels={meta.get('fpn_channels')} there)"
        )
    converted = {k: v.to(wanted[k].dtype) for k, v in saved.items()}
    model.load_state_dict(converted, strict=False)  # batch-norm counters, if any, stay
    return payload
