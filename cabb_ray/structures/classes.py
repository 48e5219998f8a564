"""Category ids and the network's class indices, shared by data/ (crop targets) and model/
(fusion) from this leaf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClassMapping:
    """Category ids to the model's indices: semantic 0..C-1 (all classes, sorted by id) and
    instance labels 1..T (thing classes, torchvision's convention: 0 is background)."""

    category_ids: tuple[int, ...]
    thing_ids: tuple[int, ...]

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]]) -> ClassMapping:
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        return cls(
            tuple(int(c["id"]) for c in ordered),
            tuple(int(c["id"]) for c in ordered if c["isthing"]),
        )

    def semantic_index(self, category_id: int) -> int:
        return self.category_ids.index(category_id)

    def thing_label(self, category_id: int) -> int:
        return self.thing_ids.index(category_id) + 1
