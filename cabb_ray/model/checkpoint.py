"""Checkpoint files: the weights together with the config and categories that built them, so
that a checkpoint alone is enough to rebuild its network (predict, resume, evaluate)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
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


# What checkpoints written before the numpy RNG state was stored as a tensor hold besides
# tensors and plain values: numpy arrays (reconstructing one runs no other code).
NUMPY_ARRAY_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def safe_torch_load(path: Path, what: str) -> Any:
    """``torch.load`` that runs no code from the file: tensors, plain values and numpy arrays
    only (``weights_only=True``). Checkpoints come from shared storage (S3, NFS, MLflow) that
    others can write; a file carrying any other pickled object is refused in one line."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle at all (a truncated or foreign file)
            raise CabbRayError(f"{path}: not a readable {what} (UnpicklingError)") from None
        culprit = found.group(1)
        raise CabbRayError(
            f"{path}: refused to load: it holds {culprit}, which no cabb_ray {what} holds "
            "(loading it could run code from the file)"
        ) from None
    except OSError:  # a storage hiccup (NFS, S3 mount): not the file's fault, may be retried
        raise
    except Exception as err:  # zip and format errors of many kinds
        raise CabbRayError(f"{path}: not a readable {what} ({type(err).__name__})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or the folder holding its ``checkpoint.pt`` (a Ray Train checkpoint,
    MLflow's ``best/``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CabbRayError(f"{path}: checkpoint not found")
    payload = safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CabbRayError(f"{path}: not a cabb_ray checkpoint (expected format {FORMAT})")
    return payload


def check_same_classes(
    path: str | Path, saved: list[dict[str, Any]], categories: list[dict[str, Any]]
) -> None:
    """One line naming the classes that differ when a checkpoint's class set is not ours."""
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


def load_weights_strictly(model: PanopticNet, state: dict[str, Any], path, preset: str) -> None:
    """``load_state_dict`` whose mismatch is one line naming the file and the first key."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(err)
        raise CabbRayError(
            f"{path}: weights do not fit the {preset} network of the config ({first[:200]})"
        ) from None


def model_from_checkpoint(
    path: str | Path, categories: list[dict[str, Any]] | None = None
) -> tuple[PanopticNet, ExperimentConfig, list[dict[str, Any]]]:
    """Rebuild the network of a checkpoint; with ``categories``, insist that they match."""
    payload = load_checkpoint(path)
    cfg = config_from_dict(payload["config"], where=str(path))
    saved = payload["categories"]
    if categories is not None:
        check_same_classes(path, saved, categories)
    model = build_model(cfg, saved, starting_weights=False)
    load_weights_strictly(model, payload["model"], path, cfg.model.preset)
    return model, cfg, saved
