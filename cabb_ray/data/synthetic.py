"""Synthetic street scenes in COCO-panoptic format: the embedded, download-free default dataset.

Why it looks the way it does: CABB only matters when training crops truncate objects, and ISUS
only matters when instance sizes are heavy-tailed. Objects therefore stand on a ground plane
seen in perspective; their pixel height grows linearly with how far below the horizon they
stand, and that distance is drawn log-uniformly, so most instances are small and a few are
large enough to be cut by any crop. Appearance is textured, shaded and noisy, with overlapping
colour palettes between classes, and things have parts (wheels, windows, heads), so a model
has to use shape and context rather than a colour lookup.

Rendering is a painter's algorithm on one integer "material" canvas drawn with PIL (C speed):
each material belongs to exactly one segment and carries its own colour and texture, so the
panoptic id map and the RGB image are two vectorised lookups of the same canvas. Per-image
random generators are seeded by (seed, split, index): the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cabb_ray.data.categories import category_entry, stuff_segment_id, thing_segment_id
from cabb_ray.data.panoptic_format import (
    id2rgb,
    images_dir,
    panoptic_dir,
    segments_from_ids,
    write_split_json,
)

STUFF_CLASSES = ("road", "sidewalk", "building", "pole", "vegetation", "terrain", "sky")
THING_CLASSES = ("person", "car", "truck", "bus", "bicycle")
CLASSES = STUFF_CLASSES + THING_CLASSES

# Object height over camera height (a 1.75 m person seen from a 1.2 m camera is 1.45), and the
# range of width/height aspect ratios (rear views to side views).
THING_SHAPE = {
    "person": (1.45, (0.3, 0.45)),
    "car": (1.25, (1.1, 2.4)),
    "truck": (2.6, (0.9, 2.2)),
    "bus": (2.7, (0.9, 2.6)),
    "bicycle": (0.9, (0.9, 1.7)),
}
THING_FREQUENCY = {"person": 0.34, "car": 0.4, "truck": 0.09, "bus": 0.07, "bicycle": 0.1}
# Ground-plane depth parameter s (1 = bottom image row; pixel size is proportional to s) is
# drawn on a log scale in this range, skewed towards far away (small): this is what makes the
# size distribution heavy-tailed, as in real street scenes.
DEPTH_RANGE = (0.02, 1.5)
DEPTH_SKEW = 2.6
# Size floor, in image heights (16 px and 8 px at the benchmark's 256 px rows): a thing's
# unoccluded box has sqrt(area) >= MIN_THING_SIDE, and a thing that occlusion leaves with
# fewer than MIN_VISIBLE_SIDE**2 pixels becomes void. Smaller things sit below the CPU
# network's smallest anchor (12 px) and were essentially never proposed: with the depth range
# alone as the floor, 44% of validation things had sqrt(area) < 14 px and a quarter < 8 px.
MIN_THING_SIDE = 16 / 256
MIN_VISIBLE_SIDE = 8 / 256
MAX_THING_HEIGHT = 1.5  # in image heights: nearer large vehicles are moved back
JPEG_QUALITY = 92
# Raised whenever the same seed would give other scenes (2: the size floor), so that caches
# of an earlier generator are regenerated (data/resolve.py)
GENERATOR_VERSION = 2


@dataclass
class Material:
    """A coloured, textured part of one segment (a car's wheel, a building's window...)."""

    segment: int
    color: tuple[float, float, float]
    texture: float
    top: float = 0.0
    height: float = 1.0
    shade: float = 0.0


@dataclass
class Canvas:
    """Integer material canvas plus the material table; index 0 is void."""

    height: int
    width: int
    materials: list[Material] = field(default_factory=list)
    segment_meta: dict[int, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = Image.new("I", (self.width, self.height), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.materials.append(Material(0, (0.0, 0.0, 0.0), 0.0))

    def material(self, segment: int, color, texture: float, box=None, shade: float = 0.0) -> int:
        top, height = (box[1], max(box[3] - box[1], 1.0)) if box is not None else (0.0, 1.0)
        self.materials.append(Material(segment, tuple(color), texture, top, height, shade))
        return len(self.materials) - 1

    def register(self, segment: int, category_id: int, iscrowd: int) -> None:
        self.segment_meta[segment] = {"category_id": category_id, "iscrowd": iscrowd}


def _color(rng: np.random.Generator, base, spread: float) -> np.ndarray:
    return np.clip(np.asarray(base, float) + rng.normal(0, spread, 3), 0, 255)


def _any_color(rng: np.random.Generator) -> np.ndarray:
    """Vehicle paint and clothing: any hue, often desaturated, so colour never gives class away."""
    if rng.random() < 0.45:
        grey = rng.uniform(25, 235)
        return _color(rng, (grey, grey, grey), 8)
    return rng.uniform(20, 235, 3)


def _noise_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth value noise: a coarse random grid upsampled bilinearly (PIL, float mode)."""
    gh, gw = max(2, cells * height // max(height, width)), max(2, cells)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


@dataclass
class Scene:
    """Geometry of one street: horizon, vanishing point and road/sidewalk edge slopes."""

    height: int
    width: int
    horizon: float
    vanish_x: float
    road_slopes: tuple[float, float]
    walk_slopes: tuple[float, float]

    def ground_row(self, s: float) -> float:
        return self.horizon + s * (self.height - self.horizon)

    def edge_x(self, slope: float, y: float) -> float:
        return self.vanish_x + slope * (y - self.horizon)


def _make_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    horizon = height * rng.uniform(0.36, 0.5)
    vanish_x = width * rng.uniform(0.35, 0.65)
    depth = height - horizon
    left = -width * rng.uniform(0.25, 0.5) / depth
    right = width * rng.uniform(0.25, 0.5) / depth
    walk_left = left - width * rng.uniform(0.15, 0.4) / depth
    walk_right = right + width * rng.uniform(0.15, 0.4) / depth
    return Scene(height, width, horizon, vanish_x, (left, right), (walk_left, walk_right))


def _ground_polygon(scene: Scene, slope_a: float, slope_b: float) -> list[tuple[float, float]]:
    y0, y1 = scene.horizon, float(scene.height) + 1
    return [
        (scene.edge_x(slope_a, y0), y0),
        (scene.edge_x(slope_b, y0), y0),
        (scene.edge_x(slope_b, y1), y1),
        (scene.edge_x(slope_a, y1), y1),
    ]


def _draw_background(rng: np.random.Generator, canvas: Canvas, scene: Scene) -> None:
    """Sky, skyline of buildings with windows, terrain, sidewalks and the road with markings."""
    w, h, hz = scene.width, scene.height, scene.horizon
    draw = canvas.draw

    sky = stuff_segment_id("sky")
    canvas.register(sky, category_entry("sky")["id"], 0)
    overcast = rng.random() < 0.4
    sky_base = (205, 210, 215) if overcast else (110, 160, 215)
    mat = canvas.material(sky, _color(rng, sky_base, 15), 0.05, (0, 0, w, hz), shade=-0.25)
    draw.rectangle((0, 0, w, h), fill=mat)

    terrain = stuff_segment_id("terrain")
    canvas.register(terrain, category_entry("terrain")["id"], 0)
    mat = canvas.material(terrain, _color(rng, (130, 165, 100), 25), 0.3)
    draw.rectangle((0, hz - 2, w, h), fill=mat)

    building = stuff_segment_id("building")
    canvas.register(building, category_entry("building")["id"], 0)
    palette = [(120, 120, 120), (190, 175, 150), (150, 80, 60), (215, 210, 200), (90, 100, 120)]
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = rng.uniform(0.08, 0.3) * w
        top = hz - rng.uniform(0.15, 0.95) * hz
        bottom = hz + rng.uniform(0.0, 0.05) * (h - hz)
        box = (x, top, x + bw, bottom)
        base = palette[rng.integers(len(palette))]
        draw.rectangle(box, fill=canvas.material(building, _color(rng, base, 20), 0.15, box, 0.2))
        _draw_windows(rng, canvas, building, box)
        x += bw + rng.uniform(-0.01, 0.02) * w

    sidewalk = stuff_segment_id("sidewalk")
    canvas.register(sidewalk, category_entry("sidewalk")["id"], 0)
    walk_color = _color(rng, (165, 150, 155), 20)
    for a, b in (
        (scene.walk_slopes[0], scene.road_slopes[0]),
        (scene.road_slopes[1], scene.walk_slopes[1]),
    ):
        draw.polygon(_ground_polygon(scene, a, b), fill=canvas.material(sidewalk, walk_color, 0.12))

    road = stuff_segment_id("road")
    canvas.register(road, category_entry("road")["id"], 0)
    mat = canvas.material(road, _color(rng, (95, 90, 100), 15), 0.1)
    draw.polygon(_ground_polygon(scene, *scene.road_slopes), fill=mat)
    marking = canvas.material(road, _color(rng, (225, 225, 215), 10), 0.05)
    mid = 0.5 * (scene.road_slopes[0] + scene.road_slopes[1])
    for k in range(12):
        s0, s1 = 0.04 * 1.35**k, 0.04 * 1.35**k * 1.15
        if s0 > 1.2:
            break
        y0, y1 = scene.ground_row(s0), scene.ground_row(s1)
        half = 0.004 * w * (s0 + s1)
        draw.polygon(
            [
                (scene.edge_x(mid, y0) - half, y0),
                (scene.edge_x(mid, y0) + half, y0),
                (scene.edge_x(mid, y1) + half, y1),
                (scene.edge_x(mid, y1) - half, y1),
            ],
            fill=marking,
        )


def _draw_windows(rng: np.random.Generator, canvas: Canvas, segment: int, box) -> None:
    x0, y0, x1, y1 = box
    if rng.random() < 0.2:
        return
    glass = canvas.material(segment, _color(rng, (60, 70, 85), 20), 0.08)
    cols = int(rng.integers(2, 7))
    rows = int(max(1, (y1 - y0) / max((x1 - x0) / cols, 4)))
    cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
    for r in range(rows - 1):
        for c in range(cols):
            wx, wy = x0 + c * cw, y0 + r * rh
            canvas.draw.rectangle(
                (wx + 0.25 * cw, wy + 0.25 * rh, wx + 0.75 * cw, wy + 0.7 * rh), fill=glass
            )


@dataclass
class Placed:
    """An object standing on the ground plane at depth ``s`` (drawn far to near)."""

    s: float
    draw: Callable[[], None]


def _stuff_objects(rng: np.random.Generator, canvas: Canvas, scene: Scene) -> list[Placed]:
    """Trees and poles on sidewalks, plus void clutter (bins, signs: Cityscapes 'static')."""
    placed: list[Placed] = []
    veg = stuff_segment_id("vegetation")
    canvas.register(veg, category_entry("vegetation")["id"], 0)
    pole = stuff_segment_id("pole")
    canvas.register(pole, category_entry("pole")["id"], 0)
    for _ in range(int(rng.integers(2, 9))):
        s = float(np.exp(rng.uniform(math.log(0.05), math.log(1.3))))
        side = rng.integers(2)
        x_frac = rng.uniform(0.2, 0.8)
        kind = rng.random()
        if kind < 0.55:
            placed.append(Placed(s, _tree(rng, canvas, scene, veg, s, side, x_frac)))
        elif kind < 0.9:
            placed.append(Placed(s, _pole(rng, canvas, scene, pole, s, side, x_frac)))
        else:
            placed.append(Placed(s, _clutter(rng, canvas, scene, s, side, x_frac)))
    return placed


def _sidewalk_x(scene: Scene, y: float, side: int, frac: float) -> float:
    a, b = (
        (scene.walk_slopes[0], scene.road_slopes[0])
        if side == 0
        else (scene.road_slopes[1], scene.walk_slopes[1])
    )
    return scene.edge_x(a + frac * (b - a), y)


def _tree(rng, canvas: Canvas, scene: Scene, segment: int, s: float, side: int, frac: float):
    y = scene.ground_row(s)
    x = _sidewalk_x(scene, y, side, frac)
    size = (y - scene.horizon) * rng.uniform(2.0, 3.5)
    leaf_base = (70, 120, 45) if rng.random() < 0.8 else (160, 125, 50)
    trunk = canvas.material(segment, _color(rng, (90, 70, 50), 15), 0.2)
    leaves = [canvas.material(segment, _color(rng, leaf_base, 20), 0.4) for _ in range(3)]
    blobs = [
        (rng.normal(0, 0.25), rng.uniform(0.55, 0.9), rng.uniform(0.2, 0.35)) for _ in range(5)
    ]

    def draw() -> None:
        tw = 0.05 * size
        canvas.draw.rectangle((x - tw, y - 0.6 * size, x + tw, y), fill=trunk)
        for k, (dx, dy, r) in enumerate(blobs):
            cx, cy, rr = x + dx * size, y - dy * size, r * size
            canvas.draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=leaves[k % 3])

    return draw


def _pole(rng, canvas: Canvas, scene: Scene, segment: int, s: float, side: int, frac: float):
    y = scene.ground_row(s)
    x = _sidewalk_x(scene, y, side, frac)
    length = (y - scene.horizon) * rng.uniform(2.5, 4.0)
    metal = canvas.material(segment, _color(rng, (130, 130, 135), 25), 0.1)

    def draw() -> None:
        half = max(0.6, 0.012 * length)
        canvas.draw.rectangle((x - half, y - length, x + half, y), fill=metal)

    return draw


def _clutter(rng, canvas: Canvas, scene: Scene, s: float, side: int, frac: float):
    y = scene.ground_row(s)
    x = _sidewalk_x(scene, y, side, frac)
    size = (y - scene.horizon) * rng.uniform(0.4, 0.8)
    mat = canvas.material(0, _any_color(rng), 0.2)

    def draw() -> None:
        canvas.draw.rectangle((x - 0.3 * size, y - size, x + 0.3 * size, y), fill=mat)

    return draw


def _thing_box(scene: Scene, name: str, s: float, x: float, aspect: float):
    y = scene.ground_row(s)
    height = (y - scene.horizon) * THING_SHAPE[name][0]
    width = height * aspect
    return (x - width / 2, y - height, x + width / 2, y)


def _thing_x(rng, scene: Scene, name: str, y: float) -> float:
    """Persons and bicycles mostly on sidewalks, vehicles mostly on the road; the rest anywhere
    on the ground plane (squares, parking), which keeps far objects from all piling up at the
    vanishing point."""
    where = rng.random()
    if where < 0.35:
        return float(rng.uniform(-0.05, 1.05) * scene.width)
    if name in ("person", "bicycle") and where < 0.85:
        return _sidewalk_x(scene, y, int(rng.integers(2)), rng.uniform(0.1, 0.9))
    left, right = (scene.edge_x(k, y) for k in scene.road_slopes)
    return float(rng.uniform(left, right))


def _draw_car(canvas: Canvas, mats: dict[str, int], box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = canvas.draw
    d.polygon(
        [
            (x0 + 0.18 * w, y0),
            (x1 - 0.18 * w, y0),
            (x1 - 0.05 * w, y0 + 0.45 * h),
            (x0 + 0.05 * w, y0 + 0.45 * h),
        ],
        fill=mats["body"],
    )
    d.polygon(
        [
            (x0 + 0.24 * w, y0 + 0.08 * h),
            (x1 - 0.24 * w, y0 + 0.08 * h),
            (x1 - 0.12 * w, y0 + 0.4 * h),
            (x0 + 0.12 * w, y0 + 0.4 * h),
        ],
        fill=mats["glass"],
    )
    d.rounded_rectangle(
        (x0, y0 + 0.4 * h, x1, y1 - 0.12 * h), radius=0.08 * min(w, h), fill=mats["body"]
    )
    d.rectangle((x0, y0 + 0.7 * h, x1, y1 - 0.12 * h), fill=mats["lower"])
    for cx in (x0 + 0.2 * w, x1 - 0.2 * w):
        r = 0.14 * min(w, 1.6 * h)
        d.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=mats["wheel"])
    for lx in (x0 + 0.04 * w, x1 - 0.14 * w):
        d.rectangle((lx, y0 + 0.5 * h, lx + 0.1 * w, y0 + 0.58 * h), fill=mats["light"])


def _draw_truck(canvas: Canvas, mats: dict[str, int], box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = canvas.draw
    cab_right = x0 + 0.3 * w
    d.rectangle((x0, y0 + 0.3 * h, cab_right, y1 - 0.1 * h), fill=mats["body"])
    d.rectangle(
        (x0 + 0.04 * w, y0 + 0.36 * h, cab_right - 0.04 * w, y0 + 0.55 * h), fill=mats["glass"]
    )
    d.rectangle((cab_right + 0.01 * w, y0, x1, y1 - 0.12 * h), fill=mats["cargo"])
    d.rectangle((x0, y1 - 0.22 * h, x1, y1 - 0.1 * h), fill=mats["lower"])
    for cx in (x0 + 0.15 * w, x1 - 0.3 * w, x1 - 0.13 * w):
        r = 0.09 * min(w, 1.5 * h)
        d.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=mats["wheel"])


def _draw_bus(canvas: Canvas, mats: dict[str, int], box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = canvas.draw
    d.rounded_rectangle((x0, y0, x1, y1 - 0.08 * h), radius=0.06 * min(w, h), fill=mats["body"])
    n = max(2, round(w / (0.45 * h)))
    for k in range(n):
        wx0 = x0 + (k + 0.1) * w / n
        d.rectangle((wx0, y0 + 0.12 * h, wx0 + 0.8 * w / n, y0 + 0.45 * h), fill=mats["glass"])
    d.rectangle((x0, y0 + 0.75 * h, x1, y1 - 0.08 * h), fill=mats["lower"])
    for cx in (x0 + 0.18 * w, x1 - 0.18 * w):
        r = 0.1 * min(w, 1.5 * h)
        d.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=mats["wheel"])


def _draw_person(canvas: Canvas, mats: dict[str, int], box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = 0.5 * (x0 + x1)
    d = canvas.draw
    head = 0.07 * h
    d.ellipse((cx - head, y0, cx + head, y0 + 2 * head), fill=mats["skin"])
    d.polygon(
        [
            (cx - 0.38 * w, y0 + 0.15 * h),
            (cx + 0.38 * w, y0 + 0.15 * h),
            (cx + 0.3 * w, y0 + 0.55 * h),
            (cx - 0.3 * w, y0 + 0.55 * h),
        ],
        fill=mats["body"],
    )
    d.polygon(
        [
            (x0, y0 + 0.17 * h),
            (x0 + 0.14 * w, y0 + 0.17 * h),
            (x0 + 0.1 * w, y0 + 0.5 * h),
            (x0 - 0.02 * w, y0 + 0.5 * h),
        ],
        fill=mats["body"],
    )
    d.polygon(
        [
            (x1 - 0.14 * w, y0 + 0.17 * h),
            (x1, y0 + 0.17 * h),
            (x1 + 0.02 * w, y0 + 0.5 * h),
            (x1 - 0.1 * w, y0 + 0.5 * h),
        ],
        fill=mats["body"],
    )
    for lx in (cx - 0.28 * w, cx + 0.04 * w):
        d.rectangle((lx, y0 + 0.55 * h, lx + 0.24 * w, y1), fill=mats["lower"])


def _draw_bicycle(canvas: Canvas, mats: dict[str, int], box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = canvas.draw
    r = min(0.28 * w, 0.32 * h)
    line = max(1, round(0.05 * r) + 1)
    centres = ((x0 + r, y1 - r), (x1 - r, y1 - r))
    for cx, cy in centres:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=mats["wheel"], width=line * 2)
    (ax, ay), (bx, by) = centres
    seat = (ax + 0.35 * (bx - ax), y0 + 0.35 * h)
    bar = (bx - 0.1 * (bx - ax), y0 + 0.25 * h)
    d.line(
        [(ax, ay), seat, ((ax + bx) / 2, ay), (bx, by), bar, seat],
        fill=mats["body"],
        width=line * 2,
    )
    d.line(
        [(bar[0] - 0.1 * w, y0 + 0.2 * h), (bar[0] + 0.05 * w, y0 + 0.2 * h)],
        fill=mats["body"],
        width=line * 2,
    )


THING_PAINTERS = {
    "car": _draw_car,
    "truck": _draw_truck,
    "bus": _draw_bus,
    "person": _draw_person,
    "bicycle": _draw_bicycle,
}


def _thing_materials(rng, canvas: Canvas, segment: int, box) -> dict[str, int]:
    paint = _any_color(rng)
    return {
        "body": canvas.material(segment, paint, 0.08, box, 0.25),
        "lower": canvas.material(segment, _any_color(rng) * 0.5 + paint * 0.3, 0.1, box, 0.25),
        "cargo": canvas.material(segment, _any_color(rng), 0.1, box, 0.2),
        "glass": canvas.material(segment, _color(rng, (50, 60, 75), 15), 0.05, box, 0.1),
        "wheel": canvas.material(segment, _color(rng, (25, 25, 28), 6), 0.05),
        "light": canvas.material(segment, _color(rng, (200, 40, 30), 20), 0.05),
        "skin": canvas.material(segment, _color(rng, (190, 140, 110), 35), 0.05),
    }


def _things(rng, canvas: Canvas, scene: Scene) -> list[Placed]:
    """Instances of thing classes at log-uniform depths, plus crowds of small persons."""
    names = list(THING_FREQUENCY)
    probs = np.array([THING_FREQUENCY[n] for n in names])
    count = {n: 0 for n in names}
    placed: list[Placed] = []
    log_low, log_high = np.log(DEPTH_RANGE)
    for _ in range(6 + int(rng.poisson(18))):
        name = names[int(rng.choice(len(names), p=probs))]
        aspect = rng.uniform(*THING_SHAPE[name][1])
        # pixels per unit of depth s for this thing's box height
        height_per_s = THING_SHAPE[name][0] * (scene.height - scene.horizon)
        s_floor = MIN_THING_SIDE * scene.height / (height_per_s * math.sqrt(aspect))
        log_floor = max(log_low, math.log(s_floor))
        s = float(np.exp(log_floor + rng.beta(1.0, DEPTH_SKEW) * (log_high - log_floor)))
        s = min(s, MAX_THING_HEIGHT * scene.height / height_per_s)
        y = scene.ground_row(s)
        x = _thing_x(rng, scene, name, y)
        box = _thing_box(scene, name, s, x, aspect)
        segment = thing_segment_id(name, count[name])
        count[name] += 1
        canvas.register(segment, category_entry(name)["id"], 0)
        mats = _thing_materials(rng, canvas, segment, box)
        painter = THING_PAINTERS[name]
        placed.append(Placed(s, lambda p=painter, m=mats, b=box: p(canvas, m, b)))
    if rng.random() < 0.5:
        placed.append(_crowd(rng, canvas, scene))
    return placed


def _crowd(rng, canvas: Canvas, scene: Scene) -> Placed:
    """A group of small, overlapping persons labelled as one iscrowd=1 segment."""
    segment = stuff_segment_id("person")
    canvas.register(segment, category_entry("person")["id"], 1)
    s = rng.uniform(0.05, 0.2)
    y = scene.ground_row(s)
    x = _sidewalk_x(scene, y, int(rng.integers(2)), rng.uniform(0.2, 0.8))
    members = []
    for _ in range(int(rng.integers(4, 11))):
        sm = s * rng.uniform(0.9, 1.1)
        xm = x + rng.normal(0, 0.6) * (scene.ground_row(sm) - scene.horizon)
        box = _thing_box(scene, "person", sm, xm, rng.uniform(*THING_SHAPE["person"][1]))
        members.append((box, _thing_materials(rng, canvas, segment, box)))

    def draw() -> None:
        for box, mats in sorted(members, key=lambda m: m[0][3]):
            _draw_person(canvas, mats, box)

    return Placed(s, draw)


def _ego_vehicle(rng, canvas: Canvas, scene: Scene) -> None:
    """A void bonnet at the bottom of some images, like Cityscapes' 'ego vehicle' label."""
    if rng.random() < 0.5:
        return
    w, h = scene.width, scene.height
    top = h - rng.uniform(0.04, 0.1) * h
    mat = canvas.material(0, _color(rng, (40, 40, 45), 10), 0.05)
    canvas.draw.pieslice((-0.2 * w, top, 1.2 * w, 2 * h - top), 180, 360, fill=mat)


def _render(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Turn the material canvas into (panoptic ids [H,W] int64, RGB uint8 [H,W,3])."""
    h, w = canvas.height, canvas.width
    mat = np.asarray(canvas.image, dtype=np.int32)
    table = canvas.materials
    seg_of = np.array([m.segment for m in table], dtype=np.int64)
    color_of = np.array([m.color for m in table], dtype=np.float32)
    texture_of = np.array([m.texture for m in table], dtype=np.float32)
    top_of = np.array([m.top for m in table], dtype=np.float32)
    inv_height_of = np.array([1.0 / m.height for m in table], dtype=np.float32)
    shade_of = np.array([m.shade for m in table], dtype=np.float32)

    ids = seg_of[mat]
    texture = 0.65 * _noise_field(rng, h, w, 96) + 0.35 * _noise_field(rng, h, w, 24)
    light = 1.0 + 0.12 * _noise_field(rng, h, w, 4)
    rows = np.arange(h, dtype=np.float32)[:, None]
    rel = np.clip((rows - top_of[mat]) * inv_height_of[mat], 0.0, 1.0)
    gain = light * (1.0 + texture_of[mat] * texture) * (1.0 - shade_of[mat] * rel)
    rgb = color_of[mat] * gain[..., None]
    rgb += rng.normal(0.0, 5.0, size=rgb.shape).astype(np.float32)
    return ids, np.clip(rgb, 0, 255).astype(np.uint8)


def _drop_tiny_things(ids: np.ndarray) -> np.ndarray:
    """Thing instances reduced by occlusion to a few pixels become void (unlabelable)."""
    counts = np.bincount(ids.ravel())
    min_pixels = (MIN_VISIBLE_SIDE * ids.shape[0]) ** 2
    tiny = [
        seg for seg in np.flatnonzero(counts).tolist() if seg >= 1000 and counts[seg] < min_pixels
    ]
    if tiny:
        ids = np.where(np.isin(ids, tiny), 0, ids)
    return ids


def generate_scene(seed: int, split: str, index: int, height: int, width: int):
    """One image: (panoptic ids [H,W], RGB [H,W,3], segments_info list)."""
    split_code = int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([seed, split_code, index])
    canvas = Canvas(height, width)
    scene = _make_scene(rng, height, width)
    _draw_background(rng, canvas, scene)
    placed = _stuff_objects(rng, canvas, scene) + _things(rng, canvas, scene)
    for item in sorted(placed, key=lambda p: p.s):
        item.draw()
    _ego_vehicle(rng, canvas, scene)
    ids, rgb = _render(rng, canvas)
    ids = _drop_tiny_things(ids)
    return ids, rgb, segments_from_ids(ids, canvas.segment_meta)


def synthetic_categories() -> list[dict]:
    """Categories of the synthetic dataset: Cityscapes evaluation classes it draws, by train id."""
    return sorted((category_entry(n) for n in CLASSES), key=lambda c: c["id"])


def write_synthetic_split(
    root: Path,
    split: str,
    num_images: int,
    seed: int,
    height: int,
    width: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write one split (images, panoptic PNGs, JSON); returns the JSON path."""
    img_dir, pan_dir = images_dir(root, split), panoptic_dir(root, split)
    img_dir.mkdir(parents=True, exist_ok=True)
    pan_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        ids, rgb, segments = generate_scene(seed, split, index, height, width)
        stem = f"synth_{split}_{index:05d}"
        Image.fromarray(rgb).save(img_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(id2rgb(ids)).save(pan_dir / f"{stem}.png", compress_level=1)
        images.append({"id": index, "file_name": f"{stem}.jpg", "height": height, "width": width})
        annotations.append(
            {"image_id": index, "file_name": f"{stem}.png", "segments_info": segments}
        )
        if progress is not None:
            progress(index + 1, num_images)
    return write_split_json(root, split, images, annotations, synthetic_categories())


def write_synthetic_dataset(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int,
    height: int = 512,
    width: int = 1024,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, float]:
    """Write train and val splits plus their parquet indexes; returns timing figures."""
    from cabb_ray.data.index import build_segment_index

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for split, count in (("train", num_train), ("val", num_val)):
        report = (lambda i, n, s=split: progress(s, i, n)) if progress else None
        write_synthetic_split(root, split, count, seed, height, width, report)
        build_segment_index(root, split, verify=False)
    seconds = time.perf_counter() - start
    total = num_train + num_val
    return {"images": total, "seconds": seconds, "images_per_second": total / max(seconds, 1e-9)}
