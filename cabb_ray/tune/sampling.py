"""Optuna sampling of a search space, define-by-run, and a trial's typed config.

Define-by-run so that parameters can depend on others (``when:``) and ordered pairs stay
ordered (``pair:``); what a trial drew becomes its config through the same typed coercion as
``--set`` (``trial_config``), never through strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cabb_ray.config import ExperimentConfig, apply_values
from cabb_ray.errors import CabbRayError

VARIANT_KEY = "variant"  # the searched parameter that picks one of the file's named variants


@dataclass(frozen=True)
class Distribution:
    """One sampled dimension: ``kind`` in uniform / loguniform / int / choice / grid."""

    kind: str
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice and grid
    step: float | None = None

    def suggest(self, trial: Any, name: str, low: float | None = None) -> Any:
        """Draw from an Optuna trial; ``low`` raises the lower bound (ordered pairs)."""
        if self.kind in ("choice", "grid"):
            return decode(trial.suggest_categorical(name, [encode(v) for v in self.values]))
        lo, hi = self.values
        if low is not None:
            lo = max(lo, low)
        if self.kind == "int":
            return trial.suggest_int(name, math.ceil(lo), int(hi), step=int(self.step or 1))
        step = self.step if lo == self.values[0] else None  # a raised low is off the grid
        return trial.suggest_float(name, lo, hi, log=self.kind == "loguniform", step=step)

    def endpoints(self) -> list[Any]:
        return list(self.values)


@dataclass(frozen=True)
class Parameter:
    """A searched config key: one distribution, or an ordered pair of two (``pair``), sampled
    only when every ``when`` condition holds."""

    key: str
    dists: tuple[Distribution, ...]
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def is_pair(self) -> bool:
        return len(self.dists) == 2

    def sample(self, trial: Any) -> Any:
        if not self.is_pair:
            return self.dists[0].suggest(trial, self.key)
        low = self.dists[0].suggest(trial, f"{self.key}[0]")
        return [low, self.dists[1].suggest(trial, f"{self.key}[1]", low=low)]


@dataclass(frozen=True)
class DefineByRun:
    """Optuna's define-by-run space (a plain object, as Tune pickles its searcher): samples
    the parameters whose conditions hold; conditions see earlier samples first, then the
    chosen variant's values, then the fixed config values."""

    params: tuple[Parameter, ...]
    fixed: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if all(self._value_of(k, chosen) in ok for k, ok in param.when):
                chosen[param.key] = param.sample(trial)
        # the suggestions OptunaSearch captures are the trial's config

    def _value_of(self, key: str, chosen: Mapping[str, Any]) -> Any:
        variant = self.variants.get(chosen.get(VARIANT_KEY), {}) if VARIANT_KEY in chosen else {}
        if key in chosen:
            value = chosen[key]
        elif key in variant:
            value = variant[key]
        else:
            value = self.fixed.get(key)
        return encode(value)


def grid_space(params: list[Parameter]) -> dict[str, list[Any]]:
    """Optuna GridSampler's search space (names as the trials suggest them)."""
    return {p.key: [encode(v) for v in p.dists[0].values] for p in params}


def expand_variant(
    values: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Sampled values with a ``variant`` name replaced by that variant's config values (the
    other sampled values win over the variant's)."""
    values = dict(values)
    if VARIANT_KEY not in values:
        return values
    name = values.pop(VARIANT_KEY)
    if name not in variants:
        raise CabbRayError(f"variant {name!r}: not among {', '.join(variants) or 'no variants'}")
    return {**variants[name], **values}


def sampled_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's Tune config (Optuna's suggestions, pairs as ``key[0]``/``key[1]``) as dotted
    config keys to values."""
    values: dict[str, Any] = {}
    for name, value in config.items():
        if name.endswith("[0]") or name.endswith("[1]"):
            values.setdefault(name[:-3], [None, None])[int(name[-2])] = value
        else:
            values[name] = decode(value) if isinstance(value, str) else value
    return values


def trial_config(
    base: ExperimentConfig,
    config: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExperimentConfig:
    """The typed config of one trial: the base with its sampled values (a variant expanded to
    its values) applied, coerced and validated like ``--set``, never through strings."""
    return apply_values(base, expand_variant(sampled_values(config), variants or {}))


def encode(value: Any) -> Any:
    """Optuna's categorical values are scalars: lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value
