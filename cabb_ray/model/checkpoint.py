"""Checkpoint files: the weights together with the config and categories that built them, so
that a checkpoint alone is enough to rebuild its network (predict, resume, evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cabb_ray.config import ExperimentConfig, config_from_dict, config_to_dict
from cabb_ray.errors import CabbRayError
from cabb_ray.model.network import PanopticNet, build_model

FORMAT = "cabb_ray.checkpoint/1"


def save_checkpoint(
    path: str | Path,
    model: PanopticNet,
    cfg: ExperimentConfig,
    categories: list[dict[str, Any]],
    **extra: Any,
) -> Path:
    """Write weights, config and categories (plus ``extra``: optimizer state, step, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": config_to_dict(cfg),
        "categories": categories,
        "model": model.state_dict(),
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or the folder holding its ``checkpoint.pt`` (a Ray Train checkpoint,
    MLflow's ``best/``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CabbRayError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors of many kinds
        raise CabbRayError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CabbRayError(f"{path}: not a cabb_ray checkpoint (expected format {FORMAT})")
    return payload


def model_from_checkpoint(
    path: str | Path, categories: list[dict[str, Any]] | None = None
) -> tuple[PanopticNet, ExperimentConfig, list[dict[str, Any]]]:
    """Rebuild the network of a checkpoint; with ``categories``, insist that they match."""
    payload = load_checkpoint(path)
    cfg = config_from_dict(payload["config"], where=str(path))
    saved = payload["categories"]
    if categories is not None:
        ours = [(int(c["id"]), c["name"], bool(c["isthing"])) for c in categories]
        theirs = [(int(c["id"]), c["name"], bool(c["isthing"])) for c in saved]
        if sorted(ours) != sorted(theirs):
            only_saved = sorted({n for _, n, _ in theirs} - {n for _, n, _ in ours})
            only_given = sorted({n for _, n, _ in ours} - {n for _, n, _ in theirs})
            raise CabbRayError(
                f"{path}: trained on another class set ({len(theirs)} classes vs {len(ours)} "
                f"given; only in checkpoint: {only_saved or 'none'}; only given: "
                f"{only_given or 'none'}; ids or kinds may differ too)"
            )
    model = build_model(cfg, saved, starting_weights=False)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CabbRayError(
            f"{path}: weights do not fit the {cfg.model.preset} network its config "
            f"describes ({first})"
        ) from None
    return model, cfg, saved
