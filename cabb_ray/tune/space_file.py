"""The search-space file's schema: what a user may write in it, typed and bounded.

Read by the same typed loader as the experiment config (``cabb_ray.typed_yaml``), worded as
the space file's errors have always been worded: unknown keys with the closest valid one,
wrong types, bounds. What involves the experiment config (keys, variants, conditions, the
schedule) is checked by ``cabb_ray.tune.space.load_space``; the file format is documented in
``search_spaces/README.md``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cabb_ray.errors import CabbRayError
from cabb_ray.tune.sampling import Distribution
from cabb_ray.typed_yaml import Bound, SpaceLoader, above, at_least, bounded, read_yaml

SearcherName = Literal["tpe", "nsga2", "random", "grid"]
SEARCHERS = typing.get_args(SearcherName)
KINDS = ("uniform", "loguniform", "int", "choice", "grid", "pair")
RANGE_KINDS = ("uniform", "loguniform", "int")
POSITIVE_INTEGER = above(0, "a positive integer")
POSITIVE_NUMBER = above(0, "a positive number")
NON_NEGATIVE = at_least(0)


def worded(default: Any, expected: str) -> Any:
    """A field whose wrong-type error says ``expected <expected>`` (no bound beyond its type)."""
    return bounded(default, Bound(lambda _: True, expected))


@dataclass
class ParamSpec:
    """One searched parameter: exactly one distribution, an optional step, conditions."""

    __expected__ = "a mapping with one of " + ", ".join(KINDS)

    uniform: list[Any] | None = None
    loguniform: list[Any] | None = None
    int: list[Any] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    pair: list[ParamSpec] | None = None
    step: float | None = bounded(None, POSITIVE_NUMBER)
    when: dict[str, Any] | None = None

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None]

    def check(self, where: str) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            raise CabbRayError(
                f"{where}: expected exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(kinds) or 'none'}"
            )

    def distributions(self, where: str) -> tuple[Distribution, ...]:
        """The one distribution (two for a pair), every range and option checked."""
        kind = self.kinds()[0]
        value = getattr(self, kind)
        if kind == "pair":
            return self._pair(where, value)
        if kind in ("choice", "grid"):
            if not value:
                raise CabbRayError(f"{where}.{kind}: expected a non-empty list of values")
            if any(isinstance(option, dict) for option in value):
                raise CabbRayError(
                    f"{where}.{kind}: options must be values or lists, got a mapping"
                )
            return (Distribution(kind, tuple(value)),)
        if len(value) != 2:
            raise CabbRayError(f"{where}.{kind}: expected [low, high], got {value!r}")
        low, high = (_number(f"{where}.{kind}", v, integer=kind == "int") for v in value)
        if not low < high:
            raise CabbRayError(f"{where}.{kind}: expected low < high, got [{low}, {high}]")
        if kind == "loguniform" and not low > 0:
            raise CabbRayError(f"{where}.loguniform: expected low > 0, got {low}")
        step = self.step
        if step is not None:
            if kind == "loguniform":
                raise CabbRayError(f"{where}.step: not allowed with loguniform")
            if kind == "int":
                step = _number(f"{where}.step", step, integer=True)
        return (Distribution(kind, (low, high), step),)

    def _pair(self, where: str, items: list[ParamSpec]) -> tuple[Distribution, ...]:
        if len(items) != 2:
            raise CabbRayError(f"{where}.pair: expected a list of two distributions")
        dists = []
        for i, item in enumerate(items):
            if item.pair is not None:
                raise CabbRayError(f"{where}.pair: pairs cannot nest")
            if item.kinds()[0] not in RANGE_KINDS or item.when is not None:
                raise CabbRayError(f"{where}.pair[{i}]: expected uniform, loguniform or int")
            dists.extend(item.distributions(f"{where}.pair[{i}]"))
        first, second = dists
        if first.values[1] > second.values[1]:
            raise CabbRayError(
                f"{where}.pair: the first value's high {first.values[1]} must not exceed the "
                f"second's high {second.values[1]}"
            )
        return tuple(dists)


@dataclass
class SchedulerSection:
    """ASHA early stopping (``scheduler: none`` or no section: every trial runs to the end)."""

    type: Literal["asha", "none"] = "asha"
    max_t: int | None = bounded(None, POSITIVE_INTEGER)  # default: the trials' optim.epochs
    grace_period: int = bounded(1, POSITIVE_INTEGER)
    reduction_factor: float = bounded(2.0, above(1))


@dataclass
class SearcherSection:
    type: SearcherName = "tpe"
    seed: int | None = worded(None, "an integer")


@dataclass
class ResourcesSection:
    """Per trial: the config values it sets (``run.*``; unset keeps the base config's) and
    the trial driver's own CPUs."""

    workers: int | None = bounded(None, POSITIVE_INTEGER)
    cpus_per_worker: float | Literal["auto"] | None = bounded(
        None, Bound(lambda v: v == "auto" or v > 0, "a positive number or auto")
    )
    gpus_per_worker: float | None = bounded(None, NON_NEGATIVE)
    driver_cpus: float = bounded(0.0, NON_NEGATIVE)


@dataclass
class FailureSection:
    max_failures: int = bounded(1, NON_NEGATIVE)  # Tune retries of a failed trial


@dataclass
class SpaceFile:
    """A search-space file as written (``search_spaces/README.md``)."""

    space: dict[str, ParamSpec] | None = field(metadata={"help": "the searched parameters"})
    base: str = worded("cpu_quickstart", "a preset name or a config path")
    fixed: dict[str, Any] | None = None
    metric: str | list[str] = "pq"
    mode: str | list[str] | None = None
    num_samples: int | None = bounded(None, POSITIVE_INTEGER)
    max_concurrent_trials: int = bounded(1, POSITIVE_INTEGER)
    scheduler: SchedulerSection | Literal["none"] | None = None
    searcher: SearcherSection | None = None
    resources: ResourcesSection | None = None
    failure: FailureSection | None = None
    variants: dict[str, dict[str, Any]] | None = None
    description: str = ""


LOADER = SpaceLoader()


def read_space_file(path: Path) -> SpaceFile:
    """The file, typed and within its fields' bounds, or one line naming the file and key."""
    label = str(path)
    try:
        spec = LOADER.build(SpaceFile, read_yaml(path, label))
        LOADER.check(spec)
    except CabbRayError as err:
        text = str(err)
        raise CabbRayError(text if text.startswith(label) else f"{label}: {text}") from None
    return spec


def _number(where: str, value: Any, integer: bool = False) -> Any:
    """A range end or an int step: a finite number (an integer for ``int``)."""
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise CabbRayError(
            f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}"
        )
    if not math.isfinite(value):  # YAML's .nan and .inf: NaN would pass every bound check
        raise CabbRayError(f"{where}: expected a finite number, got {value!r}")
    return value
