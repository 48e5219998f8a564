"""The per-split segment index ``ROOT/<split>.segments.parquet``.

Samplers (class-uniform, instance-scale-uniform) need "which images contain class c, and
where are its instances" thousands of times per epoch; answering from one columnar table
avoids opening PNGs or re-parsing a large JSON in every data-loader worker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cabb_ray.data.panoptic_format import load_split
from cabb_ray.errors import CabbRayError

SEGMENT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_file", pa.string()),
        ("panoptic_file", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("segment_id", pa.int64()),
        ("category_id", pa.int32()),
        ("isthing", pa.bool_()),
        ("iscrowd", pa.bool_()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float64(), 4)),
    ]
)


def index_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.segments.parquet"


def build_segment_index(
    root: str | Path,
    split: str,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the parquet index of ``split``; with ``verify``, check every PNG against the JSON."""
    data = load_split(root, split)
    columns: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    for n, image in enumerate(data.images, start=1):
        annotation = data.annotations[image["id"]]
        if verify:
            data.read_panoptic(image, verify=True)
            if not data.image_path(image).is_file():
                raise CabbRayError(f"{data.image_path(image)}: image file not found")
        for seg in annotation["segments_info"]:
            category = data.categories_by_id[int(seg["category_id"])]
            columns["image_id"].append(str(image["id"]))
            columns["image_file"].append(image["file_name"])
            columns["panoptic_file"].append(annotation["file_name"])
            columns["height"].append(int(image["height"]))
            columns["width"].append(int(image["width"]))
            columns["segment_id"].append(int(seg["id"]))
            columns["category_id"].append(int(seg["category_id"]))
            columns["isthing"].append(bool(category["isthing"]))
            columns["iscrowd"].append(bool(seg["iscrowd"]))
            columns["area"].append(int(seg["area"]))
            columns["bbox"].append([float(v) for v in seg["bbox"]])
        if progress is not None:
            progress(n, len(data.images))
    table = pa.table(columns, schema=SEGMENT_SCHEMA)
    path = index_path(root, split)
    _write_atomically(table, path)
    return path


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` in one step:
    a reader (or a failed or interrupted build) never leaves a half-written index behind."""
    # a fresh name (not mkstemp, whose files are private to their owner: a shared dataset
    # folder's index must keep the permissions that the umask gives)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_segment_index(root: str | Path, split: str) -> pa.Table:
    """Read the index, with a one-line hint when it has not been built yet."""
    path = index_path(root, split)
    if not path.is_file():
        raise CabbRayError(
            f"{path}: segment index not found; build it with "
            f"`python -m cabb_ray.data index --root {root} --split {split}`"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = reason.replace(f"Could not open Parquet input source '{path}': ", "")
        raise CabbRayError(
            f"{path}: cannot read the segment index ({reason}); rebuild it with "
            f"`python -m cabb_ray.data index --root {root} --split {split}`"
        ) from None
    if not table.schema.equals(SEGMENT_SCHEMA):
        raise CabbRayError(f"{path}: unexpected columns; rebuild it with `cabb_ray.data index`")
    return table
