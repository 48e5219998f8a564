"""Typed experiment configuration: the schema of a run, loaded from YAML and ``--set`` overrides.

Why typed: a search trial that silently trains with ``lr="1e-3"`` (a string) or a misspelt key
wastes GPU hours. Every value is coerced to its field's declared type on load, unknown keys
fail with the closest valid spellings, and each field's bounds are declared beside it
(``bounded``), each section's checks that involve several fields in its ``check``. The loading
itself is ``cabb_ray.typed_yaml``, shared with the search-space file.

Sources, later ones winning: a preset shipped in ``cabb_ray/presets`` (or a YAML file named by
``base:``), the YAML file itself, then ``--set a.b=c`` overrides parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cabb_ray.errors import CabbRayError
from cabb_ray.typed_yaml import (
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    TypedLoader,
    above,
    between,
    bounded,
    deep_merge,
    join,
    ordered_pair,
    read_yaml,
)

SamplerName = Literal["random", "cus", "isus", "full"]
IsusOrder = Literal["level_first", "instance_first"]
BalancingName = Literal["fixed", "uncertainty", "normalized"]
# torchvision's smooth-L1 beta for box regression (its RPN and RoI heads use 1/9)
DEFAULT_BETA = 1.0 / 9.0
MOMENTUM = Bound(lambda v: 0 <= v < 1, "0 <= m < 1")
POSITIVE_SIZES = Bound(lambda v: min(v) > 0, "positive sizes")
UNIT = between(0, 1)


@dataclass
class SyntheticConfig:
    """The embedded street-scene dataset, generated on first use when ``data.root`` is unset."""

    num_train: int = bounded(64, POSITIVE)
    num_val: int = bounded(16, POSITIVE)
    height: int = bounded(256, POSITIVE)
    width: int = bounded(512, POSITIVE)
    seed: int = bounded(0, NON_NEGATIVE)


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
    crop_size: tuple[int, int] = bounded((128, 128), POSITIVE_SIZES)
    shortest_side: int = bounded(256, POSITIVE)
    r_st: tuple[float, float] = bounded((0.75, 1.5), ordered_pair())
    r_th: tuple[float, float] = bounded((0.25, 4.0), ordered_pair())
    # an instance with fewer visible pixels is dropped from a crop; 0 would keep empty masks
    min_visible_pixels: int = bounded(16, POSITIVE)
    flip: bool = True
    batch_size: int = bounded(8, POSITIVE)
    loader_workers: int = bounded(2, NON_NEGATIVE)  # 0: load in the training process

    def check(self, where: str) -> None:
        if self.sampler != "full" and min(self.crop_size) > self.shortest_side:
            raise CabbRayError(
                f"{where}.crop_size {list(self.crop_size)}: larger than the image rescaled to "
                f"{where}.shortest_side {self.shortest_side} in both directions"
            )


@dataclass
class ModelConfig:
    """Network assembly; ``preset`` picks backbone and head widths."""

    preset: Literal["cpu_small", "resnet50"] = "cpu_small"
    pretrained: str = "none"
    fpn_channels: int = bounded(64, POSITIVE)
    trainable_backbone_layers: int = bounded(3, between(0, 5, "0..5 (stages from the deepest)"))
    # RoI pooler level heuristic (FPN Eq. 1), shared with ISUS: cabb_ray.structures.levels.
    roi_levels: tuple[int, int] = bounded((2, 5), ordered_pair())
    canonical_scale: float = bounded(224.0, POSITIVE)
    canonical_level: int = bounded(4, POSITIVE)


@dataclass
class LossWeights:
    """Fixed weight per loss term (the ``fixed`` and ``normalized`` balancing modes use them).
    Its fields are the loss terms' names (``LOSS_TERMS``)."""

    rpn_objectness: float = bounded(1.0, NON_NEGATIVE)
    rpn_box: float = bounded(1.0, NON_NEGATIVE)
    roi_cls: float = bounded(1.0, NON_NEGATIVE)
    roi_box: float = bounded(1.0, NON_NEGATIVE)
    roi_mask: float = bounded(1.0, NON_NEGATIVE)
    semantic: float = bounded(1.0, NON_NEGATIVE)


LOSS_TERMS = tuple(f.name for f in dataclasses.fields(LossWeights))


@dataclass
class LossConfig:
    """CABB switches and smooth-L1 betas per stage, and how the six terms are balanced."""

    cabb_rpn: bool = True
    cabb_roi: bool = True
    rpn_beta: float = bounded(DEFAULT_BETA, above(0))
    roi_beta: float = bounded(DEFAULT_BETA, above(0))
    balancing: BalancingName = "fixed"
    weights: LossWeights = field(default_factory=LossWeights)
    normalized_momentum: float = bounded(0.99, MOMENTUM)
    # normalized: a term's running mean is floored here, so a term that is exactly 0 on the
    # first batches (no things in the crops) cannot get a weight of fixed / 1e-8
    normalized_floor: float = bounded(0.01, above(0))
    # uncertainty: log-variances are clamped to [-limit, limit] (weights e^-5..e^5 at 5), so a
    # term that is 0 on a batch cannot drive its log-variance down without bound
    log_var_limit: float = bounded(5.0, above(0))


@dataclass
class OptimConfig:
    """SGD with linear warm-up then linear decay (paper Appendix D)."""

    lr: float = bounded(0.01, NON_NEGATIVE)
    momentum: float = bounded(0.9, MOMENTUM)
    weight_decay: float = bounded(1e-4, NON_NEGATIVE)
    epochs: int = bounded(4, POSITIVE)
    steps_per_epoch: int = bounded(50, POSITIVE)
    warmup_steps: int = 20
    # 0 would freeze the network, < 0 ascend
    grad_clip_norm: float | None = bounded(
        10.0, above(0, "a positive norm, or null for no clipping")
    )
    amp: bool = True
    max_nonfinite_steps: int = bounded(10, POSITIVE)

    def check(self, where: str) -> None:
        total = self.epochs * self.steps_per_epoch
        if not 0 <= self.warmup_steps < total:
            raise CabbRayError(
                f"{where}.warmup_steps: expected 0 <= warm-up < the run's {total} steps "
                f"({where}.epochs x {where}.steps_per_epoch), got {self.warmup_steps}"
            )


@dataclass
class EvalConfig:
    """Evaluation cadence and the inference thresholds: the detector keeps boxes scoring at
    least ``detection_score_threshold`` (mask AP ranks all of them), panoptic fusion places
    instances scoring at least ``score_threshold``."""

    every: int = bounded(1, POSITIVE)
    max_images: int | None = bounded(None, NON_NEGATIVE)  # null (or 0): every validation image
    score_threshold: float = bounded(0.5, UNIT)
    overlap_threshold: float = bounded(0.5, UNIT)
    detection_score_threshold: float = bounded(0.05, UNIT)
    detection_nms_threshold: float = bounded(0.5, UNIT)
    # pixels at the evaluation scale (data.shortest_side): Panoptic FPN and seamseg use 4096
    # at full Cityscapes resolution (the cityscapes_r50 preset); 64 suits the small scenes
    stuff_min_area: int = bounded(64, NON_NEGATIVE)
    # mask and box AP are also reported on the things wider or taller than this crop (pixels
    # at data.shortest_side; null: data.crop_size): the things training crops always cut.
    # A whole-image run sets the crop of the runs it is compared with, at its own scale.
    over_crop_bin: tuple[int, int] | None = bounded(None, POSITIVE_SIZES)


@dataclass
class RunConfig:
    """Process-level settings: seeds, workers, tracking."""

    seed: int = bounded(0, NON_NEGATIVE)  # numpy's generators take no negative seeds
    workers: int = bounded(1, POSITIVE)
    gpu: bool = False
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cabb_ray"
    output_dir: str = "runs"
    # Ray Train restarts from the last checkpoint this many times
    max_failures: int = bounded(1, NON_NEGATIVE)
    # default: local Ray splits this machine's cores
    cpus_per_worker: float | None = bounded(None, POSITIVE)
    # with run.gpu; fractions share a GPU between workers
    gpus_per_worker: float = bounded(1.0, NON_NEGATIVE)
    log_every: int = bounded(10, POSITIVE)  # steps between loss logs
    # full training states (weights, optimizer, schedule, RNG) Ray Train keeps per run; MLflow
    # gets the best weights only
    keep_checkpoints: int = bounded(2, POSITIVE)
    overlays: int = bounded(2, NON_NEGATIVE)  # validation overlays logged per evaluation

    def check(self, where: str) -> None:
        if self.gpu and not self.gpus_per_worker > 0:
            raise CabbRayError(
                f"{where}.gpus_per_worker: expected > 0 with {where}.gpu, got "
                f"{self.gpus_per_worker}"
            )


@dataclass
class ExperimentConfig:
    """Everything one training run needs; a search trial is one of these."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


LOADER = TypedLoader()


# ---------------------------------------------------------------------------------------------
# Loading


PRESETS_PACKAGE = "cabb_ray.presets"


def preset_names() -> list[str]:
    """Names of the presets shipped inside the package (``cpu_quickstart``, ...)."""
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


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
    data = read_yaml(path, label)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise CabbRayError(f"{label}: key 'base' must be a preset name or a YAML path")
    if base not in preset_names() and isinstance(path, Path):
        base = str(_resolve_source(base, path.parent)[0])
    return deep_merge(load_config_dict(base, (*_seen, label)), data)


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
        return LOADER.set_path(cfg, path, value, raw)
    except CabbRayError as err:
        raise CabbRayError(join(f"--set {'.'.join(path)}", err)) from None


def load_config(
    source: str | Path | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load a preset name or YAML path (default: the built-in defaults), then apply overrides."""
    data = load_config_dict(source) if source is not None else {}
    try:
        cfg = LOADER.build(ExperimentConfig, data)
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
        cfg = LOADER.build(ExperimentConfig, _without_removed_keys(data))
    except CabbRayError as err:
        raise CabbRayError(f"{where}: {err}" if where else str(err)) from None
    validate(cfg)
    return cfg


def set_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """Return a copy of ``cfg`` with dotted keys set to already parsed values, each coerced to
    its field's type exactly like ``--set`` (not yet cross-validated)."""
    for key, value in values.items():
        try:
            cfg = LOADER.set_path(cfg, key.split("."), value, None)
        except CabbRayError as err:
            raise CabbRayError(join(key, err)) from None
    return cfg


def apply_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """``set_values`` then ``validate``: a search trial's sampled values on its base config."""
    cfg = set_values(cfg, values)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Every float finite, every field within its declared bounds, then each section's checks
    across its fields (a config built in code skips the coercion, not these)."""
    LOADER.check(cfg)


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
    """Dotted keys to leaf values, as MLflow params and search-space keys use them. Its
    callers run inside Ray's processes, so Ray's ``flatten_dict`` costs no import there."""
    from ray.tune.utils import flatten_dict

    return flatten_dict(config_to_dict(cfg), delimiter=".")


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
