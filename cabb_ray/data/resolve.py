"""Find the dataset a config points at, generating the synthetic one on first use.

Several Ray workers may ask at once, so generation goes to a private temporary folder that
is renamed into place in one step: readers only ever see a complete dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cabb_ray.config import DataConfig
from cabb_ray.data.index import index_path, read_segment_index
from cabb_ray.data.panoptic_format import load_split, split_json_path
from cabb_ray.errors import CabbRayError

COMPLETE_MARKER = ".complete"


def synthetic_cache_path(data: DataConfig) -> Path:
    """The cache folder of one synthetic dataset; the generator's version is in the name, so
    that scenes cached by an earlier generator are never read as this one's."""
    from cabb_ray.data.synthetic import GENERATOR_VERSION

    s = data.synthetic
    name = (
        f"synthetic-v{GENERATOR_VERSION}-{s.height}x{s.width}-n{s.num_train}-{s.num_val}"
        f"-seed{s.seed}"
    )
    return Path(data.cache_dir).expanduser() / name


def resolve_dataset_root(data: DataConfig, verbose: bool = True) -> Path:
    """Return the root of the configured dataset, generating the synthetic one if needed."""
    if data.root is not None:
        text = os.path.expandvars(data.root)  # e.g. $CABB_RAY_DATA_ROOT on a cluster
        if "$" in text:
            raise CabbRayError(f"data.root {data.root}: environment variable not set")
        # absolute: Ray workers and Tune trials run in other working directories
        root = Path(text).expanduser().resolve()
        for split in (data.train_split, data.val_split):
            if not split_json_path(root, split).is_file():
                raise CabbRayError(
                    f"data.root: {split_json_path(root, split)} not found "
                    "(convert Cityscapes with `python -m cabb_ray.data cityscapes`)"
                )
            if not index_path(root, split).is_file():
                raise CabbRayError(
                    f"data.root: {index_path(root, split)} not found; build it with "
                    f"`python -m cabb_ray.data index --root {root} --split {split}`"
                )
        for split in (data.train_split, data.val_split):
            # read both now, in the driver: a broken file fails before a run is recorded or
            # Ray starts, not in every worker
            load_split(root, split)
            read_segment_index(root, split)
        return root
    target = synthetic_cache_path(data)
    if (target / COMPLETE_MARKER).is_file():
        return target
    from cabb_ray.data.synthetic import write_synthetic_dataset

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    s = data.synthetic
    if verbose:
        print(f"generating synthetic dataset into {target} ...", flush=True)
    try:
        write_synthetic_dataset(tmp, s.num_train, s.num_val, s.seed, s.height, s.width)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
