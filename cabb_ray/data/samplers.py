"""Where training crops come from: random, class-uniform (CUS), instance-scale-uniform (ISUS)
and full-image sampling.

Every sampler draws from the split's parquet index (no PNG is opened to choose), then loads the
one image it chose. Scales are relative to the image rescaled so that its shortest side is
``data.shortest_side`` (s0):

* ``random``: uniform image, sigma ~ U(r_st), uniformly placed window.
* ``cus`` (Rota Bulo et al. 2018): uniform class among those present, uniform image containing
  it, sigma ~ U(r_st), window around a random pixel of that class.
* ``isus`` (CABB paper Sec. 2.1): as CUS, but for a thing class also a random pyramid level and
  a random instance of the class in the image; sigma makes the instance's box size fall in that
  level's range under the model's own level heuristic (``cabb_ray.structures.levels``), within
  r_th. Stuff classes keep sigma ~ U(r_st). One deviation from a literal reading: the level is
  drawn first and the instance among those that some sigma in r_th can put on it (any instance
  if none can). Drawing the instance first and clamping sigma piles every unreachable draw onto
  the lowest levels, because most instances are small: on the synthetic scenes that made the
  per-level histogram of the sampled instances less even than plain CUS. The literal order
  stays available as ``data.isus_order: instance_first`` so that the two can be compared.
* ``full``: the whole image at scale sigma ~ U(r_st), no window (FULL baselines).

A window larger than the rescaled image (possible when sigma < 1) overhangs it; the overhang is
padding. A crop larger than the image rescaled to s0 (sigma = 1) is a configuration error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cabb_ray.config import ExperimentConfig, ModelConfig
from cabb_ray.data.crops import CropWindow
from cabb_ray.data.panoptic_format import PanopticSplit, read_rgb
from cabb_ray.errors import CabbRayError
from cabb_ray.structures.classes import ClassMapping
from cabb_ray.structures.levels import size_range_for_level

SAMPLERS = ("random", "cus", "isus", "full")


@dataclass
class Catalog:
    """The segment index as arrays, grouped for class-uniform draws."""

    image_pos: np.ndarray  # per segment row: position of its image in split.images
    segment_id: np.ndarray
    category_id: np.ndarray
    isthing: np.ndarray
    iscrowd: np.ndarray
    bbox: np.ndarray  # [S, 4] x, y, w, h
    images_of_class: dict[int, np.ndarray]
    instances: dict[tuple[int, int], np.ndarray]  # (image pos, category) -> thing rows

    @classmethod
    def build(cls, split: PanopticSplit, table: pa.Table) -> Catalog:
        position = {str(img["id"]): k for k, img in enumerate(split.images)}
        image_ids = table["image_id"].to_pylist()
        missing = next((i for i in image_ids if i not in position), None)
        if missing is not None:
            raise CabbRayError(
                f"{split.json_path}: the segment index names image {missing!r} that the JSON "
                "lacks; rebuild it with `python -m cabb_ray.data index`"
            )
        image_pos = np.array([position[i] for i in image_ids], dtype=np.int64)
        category = table["category_id"].to_numpy().astype(np.int64)
        isthing = table["isthing"].to_numpy(zero_copy_only=False)
        iscrowd = table["iscrowd"].to_numpy(zero_copy_only=False)
        bbox = np.asarray(table["bbox"].to_pylist(), dtype=np.float64).reshape(-1, 4)
        usable = ~isthing | ~iscrowd  # stuff, or a thing instance that is not a crowd
        images_of_class = {
            int(c): np.unique(image_pos[usable & (category == c)])
            for c in np.unique(category[usable])
        }
        instances: dict[tuple[int, int], list[int]] = {}
        for row in np.flatnonzero(isthing & ~iscrowd):
            instances.setdefault((int(image_pos[row]), int(category[row])), []).append(int(row))
        return cls(
            image_pos,
            table["segment_id"].to_numpy(),
            category,
            isthing,
            iscrowd,
            bbox,
            images_of_class,
            {k: np.array(v) for k, v in instances.items()},
        )


@dataclass
class Drawn:
    """A sampled crop before extraction: the loaded source and the window."""

    image_pos: int
    image: np.ndarray
    ids: np.ndarray
    segments: list[dict[str, Any]]
    window: CropWindow
    focus_segment: int | None = None  # the segment under the pixel the window was placed on


class CropSampler:
    """Draws crop windows from one split according to ``data.sampler``."""

    def __init__(self, split: PanopticSplit, table: pa.Table, cfg: ExperimentConfig):
        self.split, self.cfg, self.data = split, cfg, cfg.data
        if self.data.sampler not in SAMPLERS:
            raise CabbRayError(
                f"data.sampler: got {self.data.sampler!r}, expected one of {', '.join(SAMPLERS)}"
            )
        self.catalog = Catalog.build(split, table)
        self.classes = ClassMapping.from_categories(split.categories)
        self.class_ids = np.array(sorted(self.catalog.images_of_class))
        if len(split.images) == 0:
            raise CabbRayError(f"{split.json_path}: the split has no images")
        if self.data.sampler == "isus" and not self.catalog.instances:
            raise CabbRayError(
                f"{split.json_path}: data.sampler=isus needs thing instances, but the split has "
                "none (use cus or random)"
            )
        if self.data.sampler != "full":
            self._check_crop_fits()

    def _check_crop_fits(self) -> None:
        crop_h, crop_w = self.data.crop_size
        for img in self.split.images:
            f0 = self.base_scale(img)
            h, w = round(img["height"] * f0), round(img["width"] * f0)
            if crop_h > h or crop_w > w:
                raise CabbRayError(
                    f"data.crop_size {list(self.data.crop_size)} is larger than image "
                    f"{img['id']!r} rescaled to shortest side {self.data.shortest_side} "
                    f"({h}x{w}); lower data.crop_size or raise data.shortest_side"
                )

    def base_scale(self, image: dict[str, Any]) -> float:
        """Factor that rescales the source so that its shortest side is s0."""
        return self.data.shortest_side / min(image["height"], image["width"])

    def load(self, pos: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        img = self.split.images[pos]
        image = read_rgb(self.split.image_path(img))
        ids = self.split.read_panoptic(img, verify=False)
        if image.shape[:2] != ids.shape:
            raise CabbRayError(
                f"{self.split.image_path(img)}: image size {image.shape[1]}x{image.shape[0]} "
                f"differs from its panoptic PNG's {ids.shape[1]}x{ids.shape[0]}"
            )
        return image, ids, self.split.annotations[img["id"]]["segments_info"]

    # -- drawing ------------------------------------------------------------------------------

    def draw(self, rng: np.random.Generator) -> Drawn:
        sampler = self.data.sampler
        if sampler in ("random", "full"):
            pos = int(rng.integers(len(self.split.images)))
            sigma = float(rng.uniform(*self.data.r_st))
            image, ids, segments = self.load(pos)
            if sampler == "full":
                window = self._full_window(pos, sigma, rng)
            else:
                window, _ = self._window(pos, sigma, None, ids, rng)
            return Drawn(pos, image, ids, segments, window)
        category = int(rng.choice(self.class_ids))
        pos = int(rng.choice(self.catalog.images_of_class[category]))
        image, ids, segments = self.load(pos)
        rows = self.catalog.instances.get((pos, category))
        if sampler == "isus" and rows is not None:
            if self.data.isus_order == "instance_first":
                row, sigma = self._isus_draw_literal(pos, rows, rng)
            else:
                row, sigma = self._isus_draw(pos, rows, rng)
            focus = ids == int(self.catalog.segment_id[row])
        else:
            sigma = float(rng.uniform(*self.data.r_st))
            focus = self._class_mask(ids, segments, category)
        window, focus_segment = self._window(pos, sigma, focus, ids, rng)
        return Drawn(pos, image, ids, segments, window, focus_segment)

    def _isus_draw(self, pos: int, rows: np.ndarray, rng: np.random.Generator):
        """(instance row, sigma): a uniform pyramid level, then a uniform instance of the class
        in this image that some sigma in r_th can put on it (any instance if none can)."""
        k_min, k_max = self.cfg.model.roi_levels
        level = int(rng.integers(k_min, k_max + 1))
        f0 = self.base_scale(self.split.images[pos])
        sizes = (
            np.sqrt(np.maximum(self.catalog.bbox[rows, 2] * self.catalog.bbox[rows, 3], 1.0)) * f0
        )
        able = [
            k
            for k, size in enumerate(sizes)
            if level in reachable_levels(size, self.cfg.model, self.data.r_th)
        ]
        k = int(rng.choice(able)) if able else int(rng.integers(len(rows)))
        if able:
            return int(rows[k]), level_scale(sizes[k], level, self.cfg.model, self.data.r_th, rng)
        return int(rows[k]), isus_scale(float(sizes[k]), self.cfg.model, self.data.r_th, rng)[1]

    def _isus_draw_literal(self, pos: int, rows: np.ndarray, rng: np.random.Generator):
        """(instance row, sigma) in the paper's order: a uniform instance of the class in this
        image, a uniform pyramid level, and the sigma that puts the instance on that level,
        clamped to r_th (so unreachable levels fall back to the nearest reachable size)."""
        k_min, k_max = self.cfg.model.roi_levels
        k = int(rng.integers(len(rows)))
        level = int(rng.integers(k_min, k_max + 1))
        f0 = self.base_scale(self.split.images[pos])
        size = math.sqrt(
            max(float(self.catalog.bbox[rows[k], 2] * self.catalog.bbox[rows[k], 3]), 1.0)
        )
        low, high = size_range_for_level(level, self.cfg.model)
        target = math.exp(rng.uniform(math.log(low), math.log(high)))
        return int(rows[k]), float(np.clip(target / (size * f0), *self.data.r_th))

    @staticmethod
    def _class_mask(ids: np.ndarray, segments: list[dict[str, Any]], category: int) -> np.ndarray:
        wanted = [int(s["id"]) for s in segments if int(s["category_id"]) == category]
        return np.isin(ids, wanted)

    def _full_window(self, pos: int, sigma: float, rng: np.random.Generator) -> CropWindow:
        img = self.split.images[pos]
        scale = self.base_scale(img) * sigma
        height, width = round(img["height"] * scale), round(img["width"] * scale)
        return CropWindow(0.0, 0.0, scale, height, width, self._flip(rng), sigma)

    def _flip(self, rng: np.random.Generator) -> bool:
        return bool(self.data.flip and rng.random() < 0.5)

    def _window(
        self,
        pos: int,
        sigma: float,
        focus: np.ndarray | None,
        ids: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[CropWindow, int | None]:
        """A window of the crop size at scale sigma containing a random pixel of ``focus``,
        and the segment id under that pixel."""
        scale = self.base_scale(self.split.images[pos]) * sigma
        crop_h, crop_w = self.data.crop_size
        src_h, src_w = ids.shape
        points = np.flatnonzero(focus) if focus is not None else np.zeros(0, dtype=np.int64)
        centre, segment = None, None
        if points.size:
            py, px = divmod(int(rng.choice(points)), src_w)
            centre, segment = (px + 0.5, py + 0.5), int(ids[py, px])
        x0 = _place(src_w, crop_w / scale, None if centre is None else centre[0], rng)
        y0 = _place(src_h, crop_h / scale, None if centre is None else centre[1], rng)
        return CropWindow(x0, y0, scale, crop_h, crop_w, self._flip(rng), sigma), segment


def reachable_levels(size: float, model: ModelConfig, r_th: tuple[float, float]) -> list[int]:
    """Pyramid levels that some sigma in r_th puts an instance of box size ``size`` on."""
    r_lo, r_hi = r_th
    k_min, k_max = model.roi_levels
    levels = []
    for level in range(k_min, k_max + 1):
        low, high = size_range_for_level(level, model)
        span = (0.0 if level == k_min else low, math.inf if level == k_max else high)
        if _overlap(span, (size * r_lo, size * r_hi)):
            levels.append(level)
    return levels


def level_scale(
    size: float, level: int, model: ModelConfig, r_th: tuple[float, float], rng: np.random.Generator
) -> float:
    """A sigma in r_th putting box size ``size`` on reachable ``level``: log-uniform target
    size within the level (the clamped end levels: one octave next to their boundary)."""
    r_lo, r_hi = r_th
    k_min, k_max = model.roi_levels
    base_low, base_high = size_range_for_level(level, model)
    low, high = max(base_low, size * r_lo), min(base_high, size * r_hi)
    if level == k_max and low >= high:
        low = max(base_low, size * r_lo)
        high = min(2 * low, size * r_hi)
    if level == k_min and low >= high:
        high = min(base_high, size * r_hi)
        low = max(high / 2, size * r_lo)
    target = math.exp(rng.uniform(math.log(low), math.log(high)))
    return float(np.clip(target / size, r_lo, r_hi))


def isus_scale(
    size: float, model: ModelConfig, r_th: tuple[float, float], rng: np.random.Generator
) -> tuple[int, float]:
    """(level, sigma) for one given instance: a level drawn uniformly among those reachable
    within r_th, and a scale that puts the instance on it."""
    level = int(rng.choice(reachable_levels(size, model, r_th)))
    return level, level_scale(size, level, model, r_th, rng)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _place(extent: float, span: float, focus: float | None, rng: np.random.Generator) -> float:
    """Start of a window of length ``span`` over [0, extent), containing ``focus`` if given.

    Windows that fit stay inside the image; wider ones overhang on both sides at random.
    """
    if span >= extent:
        return float(rng.uniform(extent - span, 0.0))
    if focus is None:
        return float(rng.uniform(0.0, extent - span))
    start = focus - rng.uniform(0.0, span)
    return float(np.clip(start, 0.0, extent - span))


def load_sampler(root: str | Path, split_name: str, cfg: ExperimentConfig) -> CropSampler:
    """Sampler over ``ROOT/<split>`` with its parquet index."""
    from cabb_ray.data.index import read_segment_index
    from cabb_ray.data.panoptic_format import load_split

    split = load_split(root, split_name)
    return CropSampler(split, read_segment_index(root, split_name), cfg)
