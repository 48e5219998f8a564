"""Reading and writing COCO-panoptic datasets (the one on-disk format of cabb_ray).

Layout (see docs/contracts.md): ``ROOT/<split>.json``, ``ROOT/<split>/<name>.png`` with
id = R + 256 G + 256^2 B, ``ROOT/images/<split>/<file>``. Every structural problem is
reported as a ``CabbRayError`` naming the file and key, so that a broken dataset fails at
load time rather than halfway through a training run.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cabb_ray.errors import CabbRayError
from cabb_ray.structures.boxes import label_boxes

REQUIRED_TOP_KEYS = ("images", "annotations", "categories")
REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
REQUIRED_ANNOTATION_KEYS = ("image_id", "file_name", "segments_info")
REQUIRED_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area", "bbox")
REQUIRED_CATEGORY_KEYS = ("id", "name", "isthing")


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb2id``: [H,W] integer ids to a [H,W,3] uint8 panoptic PNG array."""
    ids = ids.astype(np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic ids must lie in [0, 256^3)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def split_json_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.json"


def panoptic_dir(root: Path, split: str) -> Path:
    return Path(root) / split


def images_dir(root: Path, split: str) -> Path:
    return Path(root) / "images" / split


@dataclass
class PanopticSplit:
    """One split of a COCO-panoptic dataset, with annotations keyed by image id."""

    root: Path
    split: str
    images: list[dict[str, Any]]
    annotations: dict[Any, dict[str, Any]]
    categories: list[dict[str, Any]]
    categories_by_id: dict[int, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.categories_by_id = {int(c["id"]): c for c in self.categories}

    @property
    def json_path(self) -> Path:
        return split_json_path(self.root, self.split)

    def image_path(self, image: dict[str, Any]) -> Path:
        return images_dir(self.root, self.split) / image["file_name"]

    def panoptic_path(self, image: dict[str, Any]) -> Path:
        return panoptic_dir(self.root, self.split) / self.annotations[image["id"]]["file_name"]

    def read_image(self, image: dict[str, Any]) -> np.ndarray:
        """RGB uint8 [H,W,3]."""
        return read_rgb(self.image_path(image))

    def read_panoptic(self, image: dict[str, Any], verify: bool = True) -> np.ndarray:
        """Panoptic ids [H,W] int64; with ``verify``, ids and sizes are checked against JSON."""
        path = self.panoptic_path(image)
        ids = read_ids(path).astype(np.int64)
        if verify:
            verify_panoptic(path, ids, image, self.annotations[image["id"]])
        return ids


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8, with a one-line error for missing or broken files."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise CabbRayError(f"{path}: file not found") from None
    except OSError as err:
        raise CabbRayError(f"{path}: cannot decode image ({err})") from None


def verify_panoptic(
    path: Path, ids: np.ndarray, image: dict[str, Any], annotation: dict[str, Any]
) -> None:
    """Check a decoded panoptic PNG against its image entry and segments_info."""
    expected = (int(image["height"]), int(image["width"]))
    if ids.shape != expected:
        raise CabbRayError(
            f"{path}: size {ids.shape[1]}x{ids.shape[0]} differs from the JSON's "
            f"{expected[1]}x{expected[0]} for image {image['id']!r}"
        )
    in_png = set(np.unique(ids).tolist()) - {0}
    in_json = {int(s["id"]) for s in annotation["segments_info"]}
    missing = sorted(in_png - in_json)
    if missing:
        raise CabbRayError(
            f"{path}: segment id {missing[0]} in the PNG is missing from segments_info "
            f"of image {image['id']!r}"
        )
    absent = sorted(in_json - in_png)
    if absent:
        raise CabbRayError(
            f"{path}: segments_info of image {image['id']!r} lists id {absent[0]} "
            "that does not occur in the PNG"
        )


def _require(obj: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise CabbRayError(f"{path}: {where} must be an object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise CabbRayError(f"{path}: {where} lacks required key '{key}'")


def _list(obj: dict[str, Any], key: str, where: str, path: Path) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        label = f"{where}.{key}" if where != "top level" else f"'{key}'"
        raise CabbRayError(f"{path}: {label} must be a list, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool)) else None
    return text if text is not None and len(text) <= 40 else type(value).__name__


def _whole(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, float) and math.isfinite(v) and v.is_integer()
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# kind -> (check, what it expects); ints may be written as 3.0, never as true/false
KINDS = {
    "int": (_whole, "an integer"),
    "count": (lambda v: _whole(v) and v >= 0, "an integer >= 0"),
    "size": (lambda v: _whole(v) and v > 0, "a positive integer"),
    "flag": (lambda v: isinstance(v, bool) or (_whole(v) and v in (0, 1)), "0 or 1"),
    "id": (
        lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
        "a string or an integer",
    ),
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "bbox": (
        lambda v: isinstance(v, list) and len(v) == 4 and all(map(_number, v)),
        "[x, y, width, height]",
    ),
}


def _check_values(obj: dict[str, Any], kinds: dict[str, str], where: str, path: Path) -> None:
    """Each key's value is of its kind (``KINDS``)."""
    for key, kind in kinds.items():
        check, expected = KINDS[kind]
        if not check(obj[key]):
            shown = _shown(obj[key])
            raise CabbRayError(f"{path}: {where}.{key}: expected {expected}, got {shown}")


CATEGORY_KINDS = {"id": "int", "name": "name", "isthing": "flag"}
IMAGE_KINDS = {"id": "id", "file_name": "name", "height": "size", "width": "size"}
ANNOTATION_KINDS = {"image_id": "id", "file_name": "name"}
SEGMENT_KINDS = {
    "id": "size",
    "category_id": "int",
    "iscrowd": "flag",
    "area": "count",
    "bbox": "bbox",
}


def _plain_segment(seg: dict[str, Any]) -> bool:
    """True for a segment written with plain ints (as every writer does): a Cityscapes split
    holds ~10^5 segments, whose key-by-key check would double the load time."""
    seg_id, area, crowd, bbox = seg["id"], seg["area"], seg["iscrowd"], seg["bbox"]
    return (
        type(seg_id) is int
        and seg_id > 0
        and type(seg["category_id"]) is int
        and type(area) is int
        and area >= 0
        and (crowd is False or crowd is True or (type(crowd) is int and 0 <= crowd <= 1))
        and type(bbox) is list
        and len(bbox) == 4
        and all(type(v) is int for v in bbox)
    )


def _checked_list(data: Any, key: str, required, kinds, path: Path) -> list[dict[str, Any]]:
    """The top-level list ``key``, each item with the ``required`` keys of the ``kinds``."""
    _require(data, (key,), "top level", path)
    items = _list(data, key, "top level", path)
    for i, item in enumerate(items):
        _require(item, required, f"{key}[{i}]", path)
        _check_values(item, kinds, f"{key}[{i}]", path)
    return items


def check_categories(data: Any, path: Path) -> list[dict[str, Any]]:
    """The ``categories`` list of a COCO-panoptic JSON object, each with its id, name and
    isthing of the right kind; a one-line error naming ``path`` and the key otherwise."""
    return _checked_list(data, "categories", REQUIRED_CATEGORY_KEYS, CATEGORY_KINDS, path)


def check_images(data: Any, path: Path) -> list[dict[str, Any]]:
    """The ``images`` list, each with its id, file_name, height and width."""
    return _checked_list(data, "images", REQUIRED_IMAGE_KEYS, IMAGE_KINDS, path)


def load_split(root: str | Path, split: str) -> PanopticSplit:
    """Load and structurally validate ``ROOT/<split>.json``: every key that readers use is
    there with a value of its kind, so that a broken file fails here, in one line, rather
    than as a traceback in a data-loader worker."""
    root = Path(root)
    if not root.is_dir():
        raise CabbRayError(f"{root}: dataset folder not found")
    path = split_json_path(root, split)
    if not path.is_file():
        raise CabbRayError(f"{path}: split file not found (expected ROOT/<split>.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CabbRayError(f"{path}: invalid JSON at line {err.lineno}") from None
    except UnicodeDecodeError as err:
        raise CabbRayError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "expected a COCO-panoptic JSON file"
        ) from None
    except OSError as err:
        raise CabbRayError(f"{path}: cannot read ({err.strerror})") from None
    _require(data, REQUIRED_TOP_KEYS, "top level", path)
    categories = check_categories(data, path)
    category_ids = {int(c["id"]) for c in categories}
    images = check_images(data, path)
    annotations: dict[Any, dict[str, Any]] = {}
    for i, ann in enumerate(_list(data, "annotations", "top level", path)):
        _require(ann, REQUIRED_ANNOTATION_KEYS, f"annotations[{i}]", path)
        _check_values(ann, ANNOTATION_KINDS, f"annotations[{i}]", path)
        for j, seg in enumerate(_list(ann, "segments_info", f"annotations[{i}]", path)):
            where = f"annotations[{i}].segments_info[{j}]"
            _require(seg, REQUIRED_SEGMENT_KEYS, where, path)
            if not _plain_segment(seg):  # the common case, checked fast; else key by key
                _check_values(seg, SEGMENT_KINDS, where, path)
            if int(seg["category_id"]) not in category_ids:
                raise CabbRayError(
                    f"{path}: {where} has category_id {seg['category_id']} not listed in categories"
                )
        annotations[ann["image_id"]] = ann
    for img in images:
        if img["id"] not in annotations:
            raise CabbRayError(f"{path}: image {img['id']!r} has no entry in annotations")
    return PanopticSplit(root, split, images, annotations, categories)


def write_split_json(
    root: Path,
    split: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
) -> Path:
    """Write ``ROOT/<split>.json`` deterministically (sorted keys, fixed separators)."""
    path = split_json_path(root, split)
    payload = {"images": images, "annotations": annotations, "categories": categories}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:  # a reader never sees half a file: written beside it, then renamed over it
        tmp.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def segments_from_ids(ids: np.ndarray, segment_meta: dict[int, dict[str, int]]) -> list[dict]:
    """segments_info (area and bbox computed from the id map) for the ids present in ``ids``.

    ``segment_meta`` maps segment id to ``{"category_id", "iscrowd"}``.
    """
    present, inverse, counts = _unique_with_inverse(ids.ravel())
    # ranks 1..n as labels: find_objects lists one entry per label up to the largest
    boxes = label_boxes(inverse.reshape(ids.shape) + 1, len(present))
    segments = []
    for seg_id, area, bbox in zip(present.tolist(), counts.tolist(), boxes, strict=True):
        if seg_id == 0:
            continue
        meta = segment_meta[seg_id]
        segments.append(
            {
                "id": int(seg_id),
                "category_id": int(meta["category_id"]),
                "iscrowd": int(meta["iscrowd"]),
                "area": int(area),
                "bbox": bbox,
            }
        )
    return segments


def _unique_with_inverse(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(..., return_inverse, return_counts)`` through bincount when ids are small.

    Panoptic ids rarely exceed ~34,000 (Cityscapes: label id x 1000 + k), where a bincount is
    an order of magnitude faster than the sort inside ``np.unique``.
    """
    top = int(flat.max(initial=0))
    if flat.min(initial=0) < 0 or top >= 1 << 20:
        return np.unique(flat, return_inverse=True, return_counts=True)
    all_counts = np.bincount(flat, minlength=top + 1)
    present = np.flatnonzero(all_counts)
    rank = np.zeros(top + 1, dtype=np.int64)
    rank[present] = np.arange(len(present))
    return present, rank[flat], all_counts[present]


def _decode_planes(path: Path) -> np.ndarray:
    """[3, H, W] uint8 planes of a PNG.

    torchvision's libpng decoder is 1.5-3x faster here than Pillow's RGB path, which matters
    because decoding dominates evaluation from files. torchvision 0.29 deprecates its image
    I/O in favour of TorchCodec, so Pillow takes over where it is gone.
    """
    try:
        from torchvision.io import ImageReadMode, decode_png, read_file
    except ImportError:
        with Image.open(path) as img:
            return np.moveaxis(np.asarray(img.convert("RGB")), -1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_png(read_file(str(path)), ImageReadMode.RGB).numpy()


def read_ids(path: Path) -> np.ndarray:
    """Panoptic PNG to a uint32 id map (R + 256 G + 256^2 B), combined in place."""
    path = Path(path)
    if not path.is_file():
        raise CabbRayError(f"{path}: file not found")
    try:
        planes = _decode_planes(path)
    except (RuntimeError, OSError) as err:
        raise CabbRayError(f"{path}: cannot decode PNG ({str(err).splitlines()[0]})") from None
    ids = planes[2].astype(np.uint32)
    ids <<= 8
    ids |= planes[1]
    ids <<= 8
    ids |= planes[0]
    return ids
