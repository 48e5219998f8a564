"""Search spaces: a space file read (``space_file``) and checked against the experiment
config before Ray starts, into the ``SearchSpec`` the search runs.

A space file names a base config, fixed overrides, the objective(s), the scheduler, the
searcher, per-trial resources and the searched parameters (dotted config keys). Every problem
is reported as one line naming the file and key (``search_spaces/README.md`` documents the
format); sampling is ``cabb_ray.tune.sampling``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cabb_ray.config import (
    ExperimentConfig,
    apply_override,
    apply_values,
    flatten_config,
    load_config,
    load_config_dict,
    preset_names,
    set_values,
    validate,
)
from cabb_ray.errors import CabbRayError
from cabb_ray.metrics.names import METRIC_NAMES

# Tune pickles the searcher with its define-by-run space: searches started before sampling
# had its own module find these names here when they resume.
from cabb_ray.tune.sampling import (  # noqa: F401
    VARIANT_KEY,
    DefineByRun,
    Distribution,
    Parameter,
    encode,
    grid_space,
    sampled_values,
    trial_config,
)
from cabb_ray.tune.space_file import (
    POSITIVE_INTEGER,
    ResourcesSection,
    SchedulerSection,
    SpaceFile,
    read_space_file,
)
from cabb_ray.typed_yaml import closest

METRICS = list(METRIC_NAMES)
SEARCHABLE_RUN_KEYS = ("run.seed",)  # repeats of a grid (ablations over seeds)
DEFAULT_SAMPLES = 16


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    max_t: int = 1
    grace_period: int = 1
    reduction_factor: float = 2.0

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares trials, and max_t where it stops every trial:
        those must be evaluated (the last report is the trial's result). Ray's ASHA puts its
        milestones at grace * factor**k below max_t and compares a trial at the first report
        at or past one (tests check this against a real ``ASHAScheduler``)."""
        if self.type != "asha":
            return []
        count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        rungs = {math.ceil(self.grace_period * self.reduction_factor**k) for k in range(count)}
        return sorted(rungs | {self.max_t})


@dataclass(frozen=True)
class ResourceSpec:
    """Per-trial resources: the config values the file sets (run.workers, run.cpus_per_worker,
    run.gpu, run.gpus_per_worker; what it leaves out keeps the base config's value) and the
    trial driver's CPUs."""

    config_values: tuple[tuple[str, Any], ...] = ()
    driver_cpus: float = 0.0


@dataclass
class SearchSpec:
    """A validated space file."""

    path: Path
    base: str
    fixed: dict[str, Any]
    metrics: list[str]
    modes: list[str]
    num_samples: int
    max_concurrent_trials: int
    scheduler: SchedulerSpec | None
    searcher: str
    seed: int | None
    resources: ResourceSpec
    max_failures: int
    params: list[Parameter] = field(default_factory=list)
    text: str = ""
    config: ExperimentConfig | None = None  # base + fixed + resources + --set, validated
    # named bundles of config values (an ablation's rows), picked by the 'variant' parameter
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The one metric a scheduler and the best-trial pick use: the first objective."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def base_config(self, overrides: list[str] = ()) -> ExperimentConfig:
        """Base config with the fixed values, the resources and ``--set`` overrides applied."""
        try:
            cfg = set_values(load_config(self.base), self.fixed)
        except CabbRayError as err:
            raise CabbRayError(f"{self.path}: fixed {err}") from None
        cfg = set_values(cfg, dict(self.resources.config_values))
        for text in overrides:  # --set wins over the file
            cfg = apply_override(cfg, text)
        try:
            validate(cfg)
        except CabbRayError as err:
            raise CabbRayError(f"{self.path}: base, fixed and --set give {err}") from None
        return cfg

    def define_by_run(self, fixed: Mapping[str, Any]) -> DefineByRun:
        return DefineByRun(tuple(self.params), dict(fixed), self.variants)

    def grid_space(self) -> dict[str, list[Any]]:
        return grid_space(self.params)

    def grid_size(self) -> int:
        return math.prod(len(p.dists[0].values) for p in self.params)

    def set_num_samples(self, value: Any, where: str) -> None:
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not integer or not POSITIVE_INTEGER.ok(value):  # the file's own bound (--num-samples)
            raise CabbRayError(f"{where}: expected {POSITIVE_INTEGER.expected}, got {value!r}")
        if self.searcher == "grid" and value > self.grid_size():
            raise CabbRayError(
                f"{where}: {value} is more than the grid's {self.grid_size()} points"
            )
        self.num_samples = value


def load_space(path: str | Path, overrides: list[str] = ()) -> SearchSpec:
    """Read and validate a space file (with the ``--set`` overrides that will apply to every
    trial); one-line ``CabbRayError`` naming file and key."""
    path = Path(path)
    label = str(path)
    data = read_space_file(path)
    base = _resolve_base(label, path, data.base)
    metrics, modes = _objectives(label, data)
    searcher_type = data.searcher.type if data.searcher else "tpe"
    seed = data.searcher.seed if data.searcher else None
    variants = _overridden_variants(data.variants or {}, overrides)
    if not data.space:
        raise CabbRayError(f"{label}: space: expected at least one searched parameter")
    spec = SearchSpec(
        path=path,
        base=base,
        fixed=dict(data.fixed or {}),
        metrics=metrics,
        modes=modes,
        num_samples=0,
        max_concurrent_trials=data.max_concurrent_trials,
        scheduler=None,
        searcher=searcher_type,
        seed=seed,
        resources=_resources(data.resources or ResourcesSection()),
        max_failures=data.failure.max_failures if data.failure else 1,
        text=path.read_text(),
        variants=variants,
    )
    base_cfg = spec.config = spec.base_config(list(overrides))
    valid_keys = sorted(flatten_config(base_cfg))
    _check_variants(label, variants, base_cfg, valid_keys)
    if variants and VARIANT_KEY not in data.space:
        raise CabbRayError(
            f"{label}: variants: defined, but space has no '{VARIANT_KEY}' parameter to pick them"
        )
    for key, raw in data.space.items():
        spec.params.append(_parameter(label, key, raw, spec, data, valid_keys))
    default_samples = spec.grid_size() if searcher_type == "grid" else DEFAULT_SAMPLES
    spec.set_num_samples(data.num_samples or default_samples, f"{label}: num_samples")
    spec.scheduler = _scheduler(label, data.scheduler, base_cfg)
    return spec


def _resolve_base(label: str, path: Path, base: str) -> str:
    """A preset name, or a config path relative to the space file; readable."""
    if base not in preset_names():
        candidate = Path(base).expanduser()
        base = str(candidate if candidate.is_absolute() else (path.parent / candidate))
    try:
        load_config_dict(base)
    except CabbRayError as err:
        raise CabbRayError(f"{label}: base: {err}") from None
    return base


def _objectives(label: str, data: SpaceFile) -> tuple[list[str], list[str]]:
    metrics = [data.metric] if isinstance(data.metric, str) else list(data.metric)
    modes = data.mode if data.mode is not None else ["max"] * len(metrics)
    modes = [modes] if isinstance(modes, str) else list(modes)
    for name in metrics:
        if name not in METRICS:
            raise CabbRayError(f"{label}: metric: unknown metric '{name}'{closest(name, METRICS)}")
    if len(metrics) > 2 or len(metrics) != len(modes) or len(set(metrics)) != len(metrics):
        raise CabbRayError(
            f"{label}: metric/mode: expected one or two distinct metrics with a mode each, got "
            f"{metrics} and {modes}"
        )
    for mode in modes:
        if mode not in ("max", "min"):
            raise CabbRayError(f"{label}: mode: expected max or min, got {mode!r}")
    return metrics, modes


def _overridden_variants(
    variants: Mapping[str, Mapping[str, Any]], overrides: list[str]
) -> dict[str, dict[str, Any]]:
    """--set wins over the file, variants included."""
    overridden = {text.split("=", 1)[0].strip() for text in overrides}
    return {
        name: {k: v for k, v in values.items() if k not in overridden}
        for name, values in variants.items()
    }


def _parameter(
    label: str, key: str, raw, spec: SearchSpec, data: SpaceFile, valid_keys: list[str]
) -> Parameter:
    """One searched parameter, checked against the config, the variants and earlier ones."""
    where = f"{label}: space.{key}"
    if key == VARIANT_KEY and not spec.variants:
        raise CabbRayError(f"{where}: needs a top-level 'variants:' mapping of named configs")
    if key not in valid_keys and key != VARIANT_KEY:
        raise CabbRayError(f"{where}: unknown config key{closest(key, valid_keys)}")
    if key.startswith("run.") and key not in SEARCHABLE_RUN_KEYS:
        raise CabbRayError(f"{where}: run.* keys are not searched (resources: sets them)")
    try:
        dists = raw.distributions(f"space.{key}")
    except CabbRayError as err:
        raise CabbRayError(f"{label}: {err}") from None
    seen = [p.key for p in spec.params]
    when = []
    for cond_key, allowed in (raw.when or {}).items():
        if cond_key not in seen and cond_key not in valid_keys:
            raise CabbRayError(
                f"{where}.when: condition on unknown parameter '{cond_key}'"
                f"{closest(cond_key, seen + valid_keys)}"
            )
        if cond_key in data.space and cond_key not in seen:
            raise CabbRayError(
                f"{where}.when: '{cond_key}' is searched after '{key}'; list it first"
            )
        options = _condition_values(where, cond_key, allowed, spec.params)
        when.append((cond_key, tuple(encode(v) for v in options)))
    param = Parameter(key, dists, tuple(when))
    if any(d.kind == "grid" for d in dists) and spec.searcher != "grid":
        raise CabbRayError(f"{where}: 'grid' values need searcher.type grid, not {spec.searcher}")
    if spec.searcher == "grid" and (dists[0].kind != "grid" or param.when):
        raise CabbRayError(
            f"{where}: searcher.type grid needs every parameter as 'grid' values without conditions"
        )
    if key == VARIANT_KEY:
        _check_variant_names(where, param, spec.variants)
    else:
        _check_against_config(where, param, spec.config)
    return param


def _check_against_config(where: str, param: Parameter, base: ExperimentConfig) -> None:
    """The parameter's values have its config key's type."""
    if param.is_pair:
        samples = [[param.dists[0].values[0], param.dists[1].values[1]]]
    else:
        dist = param.dists[0]
        samples = dist.endpoints()
        if dist.kind in ("uniform", "loguniform") and not dist.step:
            low, high = dist.values
            samples.append(low + 0.377 * (high - low))  # a float field's values are not whole
    for value in samples:
        try:
            set_values(base, {param.key: value})
        except CabbRayError as err:
            raise CabbRayError(f"{where}: {err}") from None


def _check_variants(
    label: str, variants: Mapping[str, Mapping[str, Any]], base: ExperimentConfig, valid: list[str]
) -> None:
    """Every variant names known config keys and gives a valid config on the base."""
    for name, values in variants.items():
        where = f"{label}: variants.{name}"
        for key in values:
            if key not in valid:
                raise CabbRayError(f"{where}: unknown config key '{key}'{closest(key, valid)}")
            if key.startswith("run."):
                raise CabbRayError(f"{where}: {key}: run.* keys are not set per variant")
            if key in ("optim.epochs", "optim.steps_per_epoch"):
                raise CabbRayError(
                    f"{where}: {key}: every variant trains the search's schedule (set it in fixed:)"
                )
        try:
            apply_values(base, values)
        except CabbRayError as err:
            raise CabbRayError(f"{where}: {err}") from None


def _check_variant_names(
    where: str, param: Parameter, variants: Mapping[str, Mapping[str, Any]]
) -> None:
    dist = param.dists[0]
    if param.is_pair or dist.kind not in ("choice", "grid"):
        raise CabbRayError(f"{where}: expected choice or grid over variant names")
    for name in dist.values:
        if not isinstance(name, str):
            raise CabbRayError(f"{where}: expected variant names, got {name!r}")
        if name not in variants:
            raise CabbRayError(
                f"{where}: unknown variant {name!r}{closest(str(name), list(variants))}"
            )


def _condition_values(where: str, key: str, allowed: Any, params: list[Parameter]) -> list[Any]:
    """The values a condition accepts; checked against the options of a searched choice."""
    searched = next((p for p in params if p.key == key), None)
    choices = (
        list(searched.dists[0].values)
        if searched and searched.dists[0].kind in ("choice", "grid")
        else None
    )
    if choices is not None and allowed in choices:
        return [allowed]
    values = allowed if isinstance(allowed, list) else [allowed]
    for value in values:
        if choices is not None and value not in choices:
            raise CabbRayError(
                f"{where}.when: {key} is never {value!r}; its options: "
                + ", ".join(map(repr, choices))
            )
    return values


def _resources(section: ResourcesSection) -> ResourceSpec:
    values: dict[str, Any] = {}
    if section.workers is not None:
        values["run.workers"] = section.workers
    if section.cpus_per_worker is not None:
        cpus = section.cpus_per_worker
        values["run.cpus_per_worker"] = None if cpus == "auto" else cpus
    if section.gpus_per_worker is not None:
        values["run.gpu"] = section.gpus_per_worker > 0
        if section.gpus_per_worker > 0:
            values["run.gpus_per_worker"] = section.gpus_per_worker
    return ResourceSpec(tuple(values.items()), section.driver_cpus)


def _scheduler(
    label: str, section: SchedulerSection | str | None, cfg: ExperimentConfig
) -> SchedulerSpec | None:
    if section is None or section == "none" or section.type == "none":
        return None
    where = f"{label}: scheduler"
    epochs = cfg.optim.epochs
    max_t = section.max_t if section.max_t is not None else epochs
    if max_t > epochs:
        raise CabbRayError(f"{where}.max_t: {max_t} is more than the trials' optim.epochs {epochs}")
    if section.grace_period > max_t:
        raise CabbRayError(
            f"{where}.grace_period: {section.grace_period} is more than max_t {max_t}"
        )
    return SchedulerSpec("asha", max_t, section.grace_period, float(section.reduction_factor))


def searched_keys(spec: SearchSpec) -> list[str]:
    return [p.key for p in spec.params]
