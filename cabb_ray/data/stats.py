"""Instance-size statistics of a split, read from its parquet index.

The figures that say whether a dataset exercises CABB and ISUS at all: how heavy-tailed the
thing sizes are, and how many instances a crop of a given size must truncate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cabb_ray.data.index import read_segment_index
from cabb_ray.errors import CabbRayError

SIZE_BIN_EDGES = (0, 8, 16, 32, 64, 128, 256, 400, 10**9)


@dataclass
class SizeStats:
    """Thing-instance (non-crowd) size figures of one split."""

    images: int
    instances: int
    sqrt_area_min: float
    sqrt_area_max: float
    sqrt_area_median: float
    frac_larger_than_crop: float
    crop: int
    histogram: list[tuple[str, int]]
    crowd_segments: int

    def lines(self) -> list[str]:
        out = [
            f"images: {self.images}, thing instances: {self.instances}, "
            f"crowd segments: {self.crowd_segments}",
            f"sqrt(area) px: min {self.sqrt_area_min:.1f}, median {self.sqrt_area_median:.1f}, "
            f"max {self.sqrt_area_max:.1f}",
            f"wider or taller than {self.crop} px: {100 * self.frac_larger_than_crop:.1f}%",
            "sqrt(area) histogram:",
        ]
        peak = max((n for _, n in self.histogram), default=1) or 1
        for label, n in self.histogram:
            bar = "#" * round(40 * n / peak)
            out.append(f"  {label:>12} {n:6d} {100 * n / max(self.instances, 1):5.1f}% {bar}")
        return out


def _things(table: pa.Table) -> pa.Table:
    """The non-crowd thing segments: the instances a crop cuts and CABB sees."""
    return table.filter(pc.and_(table["isthing"], pc.invert(table["iscrowd"])))


def _thing_sides(things: pa.Table) -> np.ndarray:
    return np.sqrt(things["area"].to_numpy().astype(float))


def thing_size_stats(root: str | Path, split: str, crop: int = 256) -> SizeStats:
    """Size distribution of non-crowd thing instances, from the index alone."""
    table = read_segment_index(root, split)
    things = _things(table)
    crowd = table.filter(pc.and_(table["isthing"], table["iscrowd"])).num_rows
    if things.num_rows == 0:
        raise CabbRayError(f"{root}: split '{split}' has no thing instances")
    side = _thing_sides(things)
    boxes = np.asarray(things["bbox"].to_pylist(), dtype=float)
    larger = (boxes[:, 2] > crop) | (boxes[:, 3] > crop)
    counts, _ = np.histogram(side, bins=SIZE_BIN_EDGES)
    edges = SIZE_BIN_EDGES
    labels = [
        f"[{edges[i]}, {edges[i + 1]})" if i + 2 < len(edges) else f">= {edges[i]}"
        for i in range(len(edges) - 1)
    ]
    return SizeStats(
        images=len(set(table["image_id"].to_pylist())),
        instances=len(side),
        sqrt_area_min=float(side.min()),
        sqrt_area_max=float(side.max()),
        sqrt_area_median=float(np.median(side)),
        frac_larger_than_crop=float(larger.mean()),
        crop=crop,
        histogram=list(zip(labels, counts.tolist(), strict=True)),
        crowd_segments=int(crowd),
    )


def plot_size_histogram(root: str | Path, split: str, out: str | Path) -> Path:
    """PNG histogram of thing sqrt(area) on log bins, for people who would rather look."""
    from cabb_ray.viz import size_histogram

    side = _thing_sides(_things(read_segment_index(root, split)))
    return size_histogram(side, f"{Path(root).name}/{split}: {len(side)} instances", out)
