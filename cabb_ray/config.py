"""Typed experiment configuration: nested dataclasses loaded from YAML and ``--set`` overrides.

Why typed: a search trial that silently trains with ``lr="1e-3"`` (a string) or a misspelt key
wastes GPU hours. Every value is coerced to its field's declared type on load, and unknown keys
fail with the closest valid spellings.

Sources, later ones winning: a preset shipped in ``cabb_ray/presets`` (or a YAML file named by
``base:``), the YAML file itself, then ``--set a.b=c`` overrides parsed as YAML scalars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cabb_ray.errors import CabbRayError

SamplerName = Literal["random", "cus", "isus", "full"]
IsusOrder = Literal["level_first", "instance_first"]
BalancingName = Literal["fixed", "uncertainty", "normalized"]
LOSS_TERMS = ("rpn_objectness", "rpn_box", "roi_cls", "roi_box", "roi_mask", "semantic")


@dataclass
class SyntheticConfig:
    """The embedded street-scene dataset, generated on first use when ``data.root`` is unset."""

    num_train: int = 64
    num_val: int = 16
    height: int = 256
    width: int = 512
    seed: int = 0


@dataclass
class DataConfig:
    """Where images come from and how training crops are drawn (paper Sec. 2.1)."""

    root: str | None = None
    cache_dir: str = "~/.cache/cabb_ray"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    sampler: SamplerName = "isus"
    # level_first: a level, then an instance that can reach it (our default, see samplers.py);
    # instance_first: the paper's literal order (instance, level, sigma clamped to r_th).
    isus_order: IsusOrder = "level_first"
    crop_size: tuple[int, int] = (128, 128)
    shortest_side: int = 256
    r_st: tuple[float, float] = (0.75, 1.5)
    r_th: tuple[float, float] = (0.25, 4.0)
    min_visible_pixels: int = 16
    flip: bool = True
    batch_size: int = 8
    loader_workers: int = 2


@dataclass
class ModelConfig:
    """Network assembly; ``preset`` picks backbone and head widths."""

    preset: Literal["cpu_small", "resnet50"] = "cpu_small"
    pretrained: str = "none"
    fpn_channels: int = 64
    trainable_backbone_layers: int = 3
    # RoI pooler level heuristic (FPN Eq. 1), shared with ISUS: cabb_ray.structures.levels.
    roi_levels: tuple[int, int] = (2, 5)
    canonical_scale: float = 224.0
    canonical_level: int = 4


@dataclass
class LossWeights:
    """Fixed weight per loss term (the ``fixed`` and ``normalized`` balancing modes use them)."""

    rpn_objectness: float = 1.0
    rpn_box: float = 1.0
    roi_cls: float = 1.0
    roi_box: float = 1.0
    roi_mask: float = 1.0
    semantic: float = 1.0


@dataclass
class LossConfig:
    """CABB switches and smooth-L1 betas per stage, and how the six terms are balanced."""

    cabb_rpn: bool = True
    cabb_roi: bool = True
    rpn_beta: float = 1.0 / 9.0
    roi_beta: float = 1.0 / 9.0
    balancing: BalancingName = "fixed"
    weights: LossWeights = field(default_factory=LossWeights)
    normalized_momentum: float = 0.99
    # normalized: a term's running mean is floored here, so a term that is exactly 0 on the
    # first batches (no things in the crops) cannot get a weight of fixed / 1e-8
    normalized_floor: float = 0.01
    # uncertainty: log-variances are clamped to [-limit, limit] (weights e^-5..e^5 at 5), so a
    # term that is 0 on a batch cannot drive its log-variance down without bound
    log_var_limit: float = 5.0


@dataclass
class OptimConfig:
    """SGD with linear warm-up then linear decay (paper Appendix D)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 4
    steps_per_epoch: int = 50
    warmup_steps: int = 20
    grad_clip_norm: float | None = 10.0
    amp: bool = True
    max_nonfinite_steps: int = 10


@dataclass
class EvalConfig:
    """Evaluation cadence and the inference thresholds: the detector keeps boxes scoring at
    least ``detection_score_threshold`` (mask AP ranks all of them), panoptic fusion places
    instances scoring at least ``score_threshold``."""

    every: int = 1
    max_images: int | None = None
    score_threshold: float = 0.5
    overlap_threshold: float = 0.5
    detection_score_threshold: float = 0.05
    detection_nms_threshold: float = 0.5
    # pixels at the evaluation scale (data.shortest_side): Panoptic FPN and seamseg use 4096
    # at full Cityscapes resolution (the cityscapes_r50 preset); 64 suits the small scenes
    stuff_min_area: int = 64


@dataclass
class RunConfig:
    """Process-level settings: seeds, workers, tracking."""

    seed: int = 0
    workers: int = 1
    gpu: bool = False
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cabb_ray"
    output_dir: str = "runs"
    max_failures: int = 1  # Ray Train restarts from the last checkpoint this many times
    cpus_per_worker: float | None = None  # default: local Ray splits this machine's cores
    gpus_per_worker: float = 1.0  # with run.gpu; fractions share a GPU between workers
    log_every: int = 10  # steps between loss logs
    # full training states (weights, optimizer, schedule, RNG) Ray Train keeps per run; MLflow
    # gets the best weights only
    keep_checkpoints: int = 2
    overlays: int = 2  # validation overlays logged per evaluation


@dataclass
class ExperimentConfig:
    """Everything one training run needs; a search trial is one of these."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Coercion of plain YAML values to declared field types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])} values"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def _mismatch(where: str, value: Any, tp: Any) -> CabbRayError:
    prefix = f"{where}: " if where else ""
    return CabbRayError(f"{prefix}got {value!r}, expected {_type_name(tp)}")


def _not_finite(where: str, value: float) -> CabbRayError:
    """YAML's .nan and .inf are floats, but no setting means either (and NaN passes every
    range check written as ``x < 0``)."""
    prefix = f"{where}: " if where else ""
    return CabbRayError(f"{prefix}got {value!r}, expected a finite number")


def _join(key: str, err: CabbRayError) -> str:
    """``key: message``, or ``key[i]: message`` where the message starts at a list item."""
    text = str(err)
    return f"{key}{text}" if text.startswith("[") else f"{key}: {text}"


def _coerce(value: Any, tp: Any, where: str, current: Any = None) -> Any:
    """Return ``value`` converted to type ``tp`` or raise a message naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _mismatch(where, value, tp)
        return _build_dataclass(tp, value, where, current)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, float) and not math.isfinite(value) and float in args:
            raise _not_finite(where, value)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, current)
            except CabbRayError:
                continue
        raise _mismatch(where, value, tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _mismatch(where, value, tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(where, value, tp)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _mismatch(where, value, tp)
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(where, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _mismatch(where, value, tp)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e12 (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value.strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _not_finite(where, value)
            return float(value)
        raise _mismatch(where, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _mismatch(where, value, tp)
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_error(where: str, key: str, valid: Iterable[str]) -> CabbRayError:
    """Name the bad dotted key and the closest valid ones at the same level."""
    prefix = f"{where}." if where else ""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    shown = close or valid
    kind = "closest valid keys" if close else "valid keys"
    listing = ", ".join(f"{prefix}{k}" for k in shown)
    return CabbRayError(f"unknown config key '{prefix}{key}'; {kind}: {listing}")


def _build_dataclass(cls: type, values: Mapping[str, Any], where: str, current: Any = None):
    """Build ``cls`` from ``values`` on top of ``current`` (or the defaults)."""
    hints = _field_types(cls)
    base = current if current is not None else cls()
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key_error(where, str(key), hints)
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path, getattr(base, key))
    return dataclasses.replace(base, **kwargs)


# ---------------------------------------------------------------------------------------------
# Loading


PRESETS_PACKAGE = "cabb_ray.presets"


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package (``cpu_quickstart``, ...)."""
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any, label: str) -> dict[str, Any]:
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


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _resolve_source(source: str | Path, relative_to: Path | None = None) -> tuple[Any, str]:
    """Map a preset name or a YAML path to (readable path, label for messages)."""
    text = str(source)
    if text in preset_names():
        return resources.files(PRESETS_PACKAGE) / f"{text}.yaml", f"preset '{text}'"
    path = Path(text).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path, str(path)
    names = ", ".join(preset_names())
    raise CabbRayError(f"config '{text}': not a YAML file or a preset; presets: {names}")


def load_config_dict(source: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset or YAML file, following ``base:`` chains, into one merged mapping."""
    path, label = _resolve_source(source)
    if label in _seen:
        raise CabbRayError(f"{label}: 'base' chain loops back to itself")
    data = _read_yaml(path, label)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise CabbRayError(f"{label}: key 'base' must be a preset name or a YAML path")
    if base not in preset_names() and isinstance(path, Path):
        base = str(_resolve_source(base, path.parent)[0])
    return _deep_merge(load_config_dict(base, (*_seen, label)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (['a', 'b'], parsed YAML value of c)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CabbRayError(
            f"--set '{text}': expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise CabbRayError(f"--set {key}: cannot parse value '{raw}' (expected YAML)") from None
    return key.split("."), value


def apply_override(cfg: ExperimentConfig, text: str) -> ExperimentConfig:
    """Return a copy of ``cfg`` with one ``--set KEY=VALUE`` applied, type-checked."""
    path, value = parse_override(text)
    raw = text.partition("=")[2]
    try:
        return _set_path(cfg, path, value, raw, "")
    except CabbRayError as err:
        raise CabbRayError(_join(f"--set {'.'.join(path)}", err)) from None


def _set_path(obj: Any, path: list[str], value: Any, raw: str, where: str) -> Any:
    hints = _field_types(type(obj))
    key = path[0]
    if key not in hints:
        raise _unknown_key_error(where, key, hints)
    here = f"{where}.{key}" if where else key
    current = getattr(obj, key)
    if len(path) == 1:
        tp = hints[key]
        if _accepts_str(tp) and isinstance(raw, str) and not isinstance(value, (str, type(None))):
            value = raw.strip()
        new = _coerce(value, tp, "", current)
    else:
        if not dataclasses.is_dataclass(current):
            raise CabbRayError(f"'{here}' is a value, it has no key '{path[1]}'")
        new = _set_path(current, path[1:], value, raw, here)
    return dataclasses.replace(obj, **{key: new})


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def load_config(
    source: str | Path | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load a preset name or YAML path (default: the built-in defaults), then apply overrides."""
    data = load_config_dict(source) if source is not None else {}
    try:
        cfg = _build_dataclass(ExperimentConfig, data, "", None)
    except CabbRayError as err:
        raise CabbRayError(f"{_resolve_source(source)[1]}: {err}") from None
    for text in overrides:
        cfg = apply_override(cfg, text)
    validate(cfg)
    return cfg


# Keys that older versions wrote into checkpoints and configs; dropped when read back.
REMOVED_KEYS = {("optim", "warmup_factor")}  # the paper's schedule warms up from 0


def _without_removed_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for section, key in REMOVED_KEYS:
        if isinstance(out.get(section), Mapping) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def config_from_dict(data: Mapping[str, Any], where: str = "") -> ExperimentConfig:
    """Build a config from an already merged mapping (search spaces, checkpoints)."""
    try:
        cfg = _build_dataclass(ExperimentConfig, _without_removed_keys(data), "", None)
    except CabbRayError as err:
        raise CabbRayError(f"{where}: {err}" if where else str(err)) from None
    validate(cfg)
    return cfg


def set_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """Return a copy of ``cfg`` with dotted keys set to already parsed values, each coerced to
    its field's type exactly like ``--set`` (not yet cross-validated)."""
    for key, value in values.items():
        try:
            cfg = _set_path(cfg, key.split("."), value, None, "")
        except CabbRayError as err:
            raise CabbRayError(_join(key, err)) from None
    return cfg


def apply_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """``set_values`` then ``validate``: a search trial's sampled values on its base config."""
    cfg = set_values(cfg, values)
    validate(cfg)
    return cfg


def _float_fields(obj: Any, where: str = "") -> Iterable[tuple[str, float]]:
    """(dotted key, value) of every float leaf, tuple items included, as ``key[i]``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, key)
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, tuple):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that a type alone cannot express. Every comparison is written so
    that NaN fails it (``not x > 0``, never ``x <= 0``), and no float may be NaN or inf."""
    for key, value in _float_fields(cfg):
        if not math.isfinite(value):
            raise CabbRayError(f"{key}: expected a finite number, got {value}")
    for name in ("r_st", "r_th"):
        low, high = getattr(cfg.data, name)
        if not 0 < low <= high:
            raise CabbRayError(f"data.{name}: expected 0 < low <= high, got [{low}, {high}]")
    for name, value in (("crop_size", cfg.data.crop_size),):
        if min(value) <= 0:
            raise CabbRayError(f"data.{name}: expected positive sizes, got {list(value)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.shortest_side": cfg.data.shortest_side,
        # an instance with fewer visible pixels is dropped from a crop; 0 would keep empty masks
        "data.min_visible_pixels": cfg.data.min_visible_pixels,
        "data.synthetic.num_train": cfg.data.synthetic.num_train,
        "data.synthetic.num_val": cfg.data.synthetic.num_val,
        "model.fpn_channels": cfg.model.fpn_channels,
        "model.canonical_scale": cfg.model.canonical_scale,
        "model.canonical_level": cfg.model.canonical_level,
        "optim.epochs": cfg.optim.epochs,
        "optim.steps_per_epoch": cfg.optim.steps_per_epoch,
        "eval.every": cfg.eval.every,
        "run.workers": cfg.run.workers,
        "data.synthetic.height": cfg.data.synthetic.height,
        "data.synthetic.width": cfg.data.synthetic.width,
        "run.log_every": cfg.run.log_every,
        "run.keep_checkpoints": cfg.run.keep_checkpoints,
        "optim.max_nonfinite_steps": cfg.optim.max_nonfinite_steps,
    }
    if cfg.run.cpus_per_worker is not None:
        positive["run.cpus_per_worker"] = cfg.run.cpus_per_worker
    clip = cfg.optim.grad_clip_norm
    if clip is not None and not clip > 0:  # 0 would freeze the network, < 0 ascend
        raise CabbRayError(
            f"optim.grad_clip_norm: expected a positive norm, or null for no clipping, got {clip}"
        )
    if cfg.run.gpu and not cfg.run.gpus_per_worker > 0:
        raise CabbRayError(
            f"run.gpus_per_worker: expected > 0 with run.gpu, got {cfg.run.gpus_per_worker}"
        )
    total_steps = cfg.optim.epochs * cfg.optim.steps_per_epoch
    if not 0 <= cfg.optim.warmup_steps < total_steps:
        raise CabbRayError(
            f"optim.warmup_steps: expected 0 <= warm-up < the run's {total_steps} steps "
            f"(optim.epochs x optim.steps_per_epoch), got {cfg.optim.warmup_steps}"
        )
    if cfg.data.sampler != "full" and min(cfg.data.crop_size) > cfg.data.shortest_side:
        raise CabbRayError(
            f"data.crop_size {list(cfg.data.crop_size)}: larger than the image rescaled to "
            f"data.shortest_side {cfg.data.shortest_side} in both directions"
        )
    for key, value in positive.items():
        if not value > 0:
            raise CabbRayError(f"{key}: expected a positive value, got {value}")
    non_negative = {
        "run.max_failures": cfg.run.max_failures,
        "run.seed": cfg.run.seed,  # numpy's generators take no negative seeds
        "run.overlays": cfg.run.overlays,
        "run.gpus_per_worker": cfg.run.gpus_per_worker,
        "data.synthetic.seed": cfg.data.synthetic.seed,
        "data.loader_workers": cfg.data.loader_workers,  # 0: load in the training process
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "eval.stuff_min_area": cfg.eval.stuff_min_area,
    }
    if cfg.eval.max_images is not None:  # null (or 0): every validation image
        non_negative["eval.max_images"] = cfg.eval.max_images
    for key, value in non_negative.items():
        if not value >= 0:
            raise CabbRayError(f"{key}: expected >= 0, got {value}")
    k_min, k_max = cfg.model.roi_levels
    if not 0 < k_min <= k_max:
        raise CabbRayError(f"model.roi_levels: expected 0 < low <= high, got [{k_min}, {k_max}]")
    if not 0 <= cfg.optim.momentum < 1:
        raise CabbRayError(f"optim.momentum: expected 0 <= m < 1, got {cfg.optim.momentum}")
    for key in ("rpn_beta", "roi_beta"):
        if not getattr(cfg.loss, key) > 0:
            raise CabbRayError(f"loss.{key}: expected > 0, got {getattr(cfg.loss, key)}")
    for key, weight in dataclasses.asdict(cfg.loss.weights).items():
        if not weight >= 0:
            raise CabbRayError(f"loss.weights.{key}: expected >= 0, got {weight}")
    if not 0 <= cfg.loss.normalized_momentum < 1:
        raise CabbRayError(
            f"loss.normalized_momentum: expected 0 <= m < 1, got {cfg.loss.normalized_momentum}"
        )
    for key in ("normalized_floor", "log_var_limit"):
        if not getattr(cfg.loss, key) > 0:
            raise CabbRayError(f"loss.{key}: expected > 0, got {getattr(cfg.loss, key)}")
    if not 0 <= cfg.model.trainable_backbone_layers <= 5:
        raise CabbRayError(
            "model.trainable_backbone_layers: expected 0..5 (stages from the deepest), got "
            f"{cfg.model.trainable_backbone_layers}"
        )
    thresholds = ("score_threshold", "overlap_threshold", "detection_score_threshold")
    for key in (*thresholds, "detection_nms_threshold"):
        if not 0 <= getattr(cfg.eval, key) <= 1:
            raise CabbRayError(f"eval.{key}: expected 0..1, got {getattr(cfg.eval, key)}")


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML dumps and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def flatten_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys to leaf values, as MLflow params and search-space keys use them."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", config_to_dict(cfg))
    return flat


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
