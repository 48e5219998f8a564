"""Cityscapes categories and segment-id conventions, taken from ``cityscapesscripts``.

Both the synthetic generator and the Cityscapes import follow cityscapesscripts'
``createPanopticImgs`` exactly, so that models and evaluations move between them:
category ids are train ids; a stuff segment (or a crowd of things) has the Cityscapes
label id as segment id; a thing instance k has segment id ``label_id * 1000 + k``.
"""

from __future__ import annotations

from typing import Any

from cityscapesscripts.helpers.labels import labels, name2label

from cabb_ray.errors import CabbRayError

THING_ID_FACTOR = 1000


def category_entry(name: str) -> dict[str, Any]:
    """The COCO-panoptic category dict for a Cityscapes label, as createPanopticImgs writes it."""
    label = name2label.get(name)
    if label is None or label.ignoreInEval:
        valid = ", ".join(lab.name for lab in labels if not lab.ignoreInEval)
        raise CabbRayError(f"unknown Cityscapes evaluation class '{name}'; valid: {valid}")
    return {
        "id": int(label.trainId),
        "name": label.name,
        "color": list(label.color),
        "supercategory": label.category,
        "isthing": 1 if label.hasInstances else 0,
    }


def stuff_segment_id(name: str) -> int:
    """Segment id of a stuff region, or of a crowd of things: the Cityscapes label id."""
    return int(name2label[name].id)


def thing_segment_id(name: str, instance: int) -> int:
    """Segment id of thing instance ``instance`` (0-based) of class ``name``."""
    return int(name2label[name].id) * THING_ID_FACTOR + instance
