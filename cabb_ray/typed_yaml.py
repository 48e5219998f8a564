"""A typed YAML loader: plain mappings to nested dataclasses, with one-line errors.

Why: the experiment config and the search-space file are both hand-written YAML that decides
hours of training. Both are declared as dataclasses and read by this one loader, which coerces
every value to its field's declared type, refuses unknown keys (naming the closest valid ones),
refuses missing required keys, and checks the bounds declared beside each field
(``bounded(...)``) and each section's own ``check(where)`` for what involves several fields.

The two files word their errors differently (the messages are part of their contracts):
``TypedLoader`` is the experiment config's wording, ``SpaceLoader`` the space file's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cabb_ray.errors import CabbRayError


@dataclass(frozen=True)
class Bound:
    """A field's admissible values: ``ok(value)`` must hold (None is always admissible where
    the field's type allows it); ``expected`` words it for the error."""

    ok: Callable[[Any], bool]
    expected: str


def bounded(default: Any = dataclasses.MISSING, bound: Bound | None = None, **kwargs) -> Any:
    """A dataclass field with its bound beside it (``x: int = bounded(1, POSITIVE)``)."""
    return dataclasses.field(default=default, metadata={"bound": bound}, **kwargs)


def at_least(low: float, expected: str | None = None) -> Bound:
    return Bound(lambda v: v >= low, expected or f">= {low:g}")


def above(low: float, expected: str | None = None) -> Bound:
    return Bound(lambda v: v > low, expected or f"> {low:g}")


def between(low: float, high: float, expected: str | None = None) -> Bound:
    return Bound(lambda v: low <= v <= high, expected or f"{low:g}..{high:g}")


def ordered_pair(expected: str = "0 < low <= high") -> Bound:
    return Bound(lambda v: 0 < v[0] <= v[1], expected)


# Every comparison is written so that NaN fails it (``v > 0``, never ``not v <= 0``).
POSITIVE = above(0, "a positive value")
NON_NEGATIVE = at_least(0)


def shown(value: Any) -> str:
    """A value as the user wrote it: tuples as YAML lists."""
    if isinstance(value, tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return repr(value)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if tp is type(None):
        return "null"
    if origin is dict or tp is dict:
        return "a mapping"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {type_name(args[0])} values"
        return f"a list of {type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def read_yaml(path: Path | Any, label: str) -> dict[str, Any]:
    """A YAML file's top-level mapping (``{}`` for an empty file), or one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CabbRayError(f"{label}: file not found") from None
    except UnicodeDecodeError as err:
        raise CabbRayError(
            f"{label}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "expected a YAML file"
        ) from None
    except OSError as err:
        raise CabbRayError(f"{label}: cannot read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise CabbRayError(f"{label}: invalid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CabbRayError(f"{label}: expected a mapping at top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key (a ``base:`` chain).

    Ray's ``ray.tune.utils.merge_dicts`` does the same, but importing it costs about 1 s and
    loads Ray into every command that reads a config (``predict``, ``data``, ``report``)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def join(key: str, err: CabbRayError) -> str:
    """``key: message``, or ``key[i]: message`` where the message starts at a list item."""
    text = str(err)
    return f"{key}{text}" if text.startswith("[") else f"{key}: {text}"


class TypedLoader:
    """Builds and checks dataclass trees, worded as the experiment config words its errors
    (``unknown config key 'a.b'; closest valid keys: ...``, ``a.b: got X, expected T``)."""

    def unknown_key(self, where: str, key: str, valid: Iterable[str]) -> CabbRayError:
        prefix = f"{where}." if where else ""
        valid = sorted(valid)
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        kind = "closest valid keys" if close else "valid keys"
        listing = ", ".join(f"{prefix}{k}" for k in close or valid)
        return CabbRayError(f"unknown config key '{prefix}{key}'; {kind}: {listing}")

    def mismatch(self, where: str, value: Any, tp: Any, bound: Bound | None) -> CabbRayError:
        prefix = f"{where}: " if where else ""
        return CabbRayError(f"{prefix}got {value!r}, expected {type_name(tp)}")

    def not_finite(self, where: str, value: float) -> CabbRayError:
        """YAML's .nan and .inf are floats, but no setting means either (and NaN passes every
        range check written as ``x < 0``)."""
        prefix = f"{where}: " if where else ""
        return CabbRayError(f"{prefix}got {value!r}, expected a finite number")

    def missing(self, where: str, key: str, help_text: str) -> CabbRayError:
        prefix = f"{where}: " if where else ""
        extra = f" ({help_text})" if help_text else ""
        return CabbRayError(f"{prefix}missing key '{key}'{extra}")

    def out_of_bounds(self, where: str, value: Any, bound: Bound) -> CabbRayError:
        return CabbRayError(f"{where}: expected {bound.expected}, got {shown(value)}")

    # -- building -------------------------------------------------------------------------

    def build(self, cls: type, values: Mapping[str, Any], where: str = "", current: Any = None):
        """``cls`` from ``values`` on top of ``current`` (or the defaults); not yet checked."""
        hints = field_types(cls)
        bounds = {f.name: f.metadata.get("bound") for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise self.unknown_key(where, str(key), hints)
            path = f"{where}.{key}" if where else str(key)
            old = getattr(current, key) if current is not None else None
            kwargs[key] = self.coerce(value, hints[key], path, old, bounds[key])
        if current is not None:
            return dataclasses.replace(current, **kwargs)
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in kwargs:
                raise self.missing(where, f.name, f.metadata.get("help", ""))
        return cls(**kwargs)

    def coerce(
        self, value: Any, tp: Any, where: str, current: Any = None, bound: Bound | None = None
    ) -> Any:
        """``value`` converted to type ``tp``, or an error naming ``where``."""
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, Mapping):
                raise self.mismatch(where, value, tp, bound)
            return self.build(tp, value, where, current)
        if origin in (Union, types.UnionType):
            return self._coerce_union(value, tp, where, current, bound)
        if origin is Literal:
            if value in typing.get_args(tp):
                return value
            raise self.mismatch(where, value, tp, bound)
        if origin is dict or tp is dict:
            if not isinstance(value, Mapping):
                raise self.mismatch(where, value, tp, bound)
            args = typing.get_args(tp) or (Any, Any)
            return {
                str(k): self.coerce(v, args[1], f"{where}.{k}" if where else str(k))
                for k, v in value.items()
            }
        if origin in (tuple, list):
            return self._coerce_sequence(value, tp, where, bound)
        if tp is Any:
            return value
        return self._coerce_scalar(value, tp, where, bound)

    def _coerce_union(self, value, tp, where, current, bound):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, float) and not math.isfinite(value) and float in args:
            raise self.not_finite(where, value)
        members = [a for a in args if a is not type(None)]
        same_kind = [a for a in members if _kind(a) == _kind_of(value)]
        if len(same_kind) == 1 and _kind_of(value) != "scalar":
            # one member takes mappings (or lists): its own errors are the precise ones
            return self.coerce(value, same_kind[0], where, current, bound)
        for arg in members:
            try:
                return self.coerce(value, arg, where, current, bound)
            except CabbRayError:
                continue
        raise self.mismatch(where, value, tp, bound)

    def _coerce_sequence(self, value, tp, where, bound):
        origin = typing.get_origin(tp)
        if not isinstance(value, (list, tuple)):
            raise self.mismatch(where, value, tp, bound)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise self.mismatch(where, value, tp, bound)
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(self.coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [self.coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    def _coerce_scalar(self, value, tp, where, bound):
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif tp is float:
            if isinstance(value, str):  # YAML 1.1 reads 1e12 (no dot) as text
                with contextlib.suppress(ValueError):
                    value = float(value.strip())
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise self.not_finite(where, value)
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        else:
            raise TypeError(f"unsupported field type {tp!r} at {where}")
        raise self.mismatch(where, value, tp, bound)

    def set_path(self, obj: Any, path: list[str], value: Any, raw: str | None, where: str = ""):
        """A copy of ``obj`` with the dotted ``path`` set to ``value`` (coerced; ``raw`` is the
        text of a ``--set`` value, kept as text where the field takes strings)."""
        hints = field_types(type(obj))
        key = path[0]
        if key not in hints:
            raise self.unknown_key(where, key, hints)
        here = f"{where}.{key}" if where else key
        current = getattr(obj, key)
        if len(path) == 1:
            tp = hints[key]
            if (
                _accepts_str(tp)
                and isinstance(raw, str)
                and not isinstance(value, (str, type(None)))
            ):
                value = raw.strip()
            new = self.coerce(value, tp, "", current)
        else:
            if not dataclasses.is_dataclass(current):
                raise CabbRayError(f"'{here}' is a value, it has no key '{path[1]}'")
            new = self.set_path(current, path[1:], value, raw, here)
        return dataclasses.replace(obj, **{key: new})

    # -- checking -------------------------------------------------------------------------

    def check(self, obj: Any, where: str = "") -> None:
        """Every float finite, every declared bound, then each section's ``check(where)``
        (children first: a section's own check may rely on its fields being in bounds)."""
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{where}.{f.name}" if where else f.name
            if dataclasses.is_dataclass(value):
                self.check(value, key)
                continue
            for item_key, item in _items(key, value):
                if dataclasses.is_dataclass(item):
                    self.check(item, item_key)
            for item_key, item in _float_leaves(key, value):
                if not math.isfinite(item):
                    raise self.out_of_bounds(
                        item_key, item, Bound(math.isfinite, "a finite number")
                    )
            bound = f.metadata.get("bound")
            if bound is not None and value is not None and not bound.ok(value):
                raise self.out_of_bounds(key, value, bound)
        section_check = getattr(obj, "check", None)
        if callable(section_check):
            section_check(where)


class SpaceLoader(TypedLoader):
    """The search-space file's wording: ``key: unknown key 'x' (closest valid: y)`` and
    ``key: expected <what the field's bound says>, got X``."""

    def unknown_key(self, where: str, key: str, valid: Iterable[str]) -> CabbRayError:
        prefix = f"{where}: " if where else ""
        return CabbRayError(f"{prefix}unknown key '{key}'{closest(key, sorted(valid))}")

    def mismatch(self, where: str, value: Any, tp: Any, bound: Bound | None) -> CabbRayError:
        prefix = f"{where}: " if where else ""
        if typing.get_origin(tp) is Literal:
            names = [str(v) for v in typing.get_args(tp)]
            return CabbRayError(f"{prefix}unknown {value!r}{closest(str(value), names)}")
        expected = bound.expected if bound is not None else _space_type_name(tp)
        return CabbRayError(f"{prefix}expected {expected}, got {value!r}")

    def not_finite(self, where: str, value: float) -> CabbRayError:
        prefix = f"{where}: " if where else ""
        return CabbRayError(f"{prefix}expected a finite number, got {value!r}")


def closest(key: str, valid: list[str]) -> str:
    """`` (closest valid: x)``, or the whole list where nothing is close."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (closest valid: {close[0]})" if close else f" (valid: {', '.join(valid)})"


def _space_type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a name", bool: "true or false"}
    if hasattr(tp, "__expected__"):  # a section that words what it wants
        return tp.__expected__
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _space_type_name(members[0])
    return names.get(tp, type_name(tp))


def _kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is dict or tp is dict:
        return "mapping"
    return "list" if origin in (list, tuple) else "scalar"


def _kind_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    return "list" if isinstance(value, (list, tuple)) else "scalar"


def _items(key: str, value: Any) -> Iterable[tuple[str, Any]]:
    """The entries of a mapping or list field, with their keys (sections inside them)."""
    if isinstance(value, dict):
        return ((f"{key}.{k}", v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ((f"{key}[{i}]", v) for i, v in enumerate(value))
    return ()


def _float_leaves(key: str, value: Any) -> Iterable[tuple[str, float]]:
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, tuple):
        yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return False
