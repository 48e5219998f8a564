"""Search-space files: parsed, validated whole before Ray starts, and sampled define-by-run.

A space file names a base config, fixed overrides, the objective(s), the scheduler, the
searcher, per-trial resources and the searched parameters (dotted config keys). Every problem
is reported as one line naming the file and key (``search_spaces/README.md`` documents the
format). Sampling is define-by-run through Optuna so that parameters can depend on others
(``when:``) and ordered pairs stay ordered (``pair:``).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cabb_ray.config import (
    ExperimentConfig,
    _read_yaml,
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

METRICS = list(METRIC_NAMES)
SEARCHERS = ("tpe", "nsga2", "random", "grid")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid", "pair")
TOP_KEYS = [
    "base",
    "fixed",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "scheduler",
    "searcher",
    "resources",
    "failure",
    "space",
    "variants",
    "description",
]
VARIANT_KEY = "variant"  # the searched parameter that picks one of the file's named variants
SEARCHABLE_RUN_KEYS = ("run.seed",)  # repeats of a grid (ablations over seeds)
SCHEDULER_KEYS = ("type", "max_t", "grace_period", "reduction_factor")
SEARCHER_KEYS = ("type", "seed")
RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "driver_cpus")
FAILURE_KEYS = ("max_failures",)
PARAM_KEYS = (*DISTRIBUTIONS, "step", "when")


@dataclass(frozen=True)
class Distribution:
    """One sampled dimension: ``kind`` in uniform / loguniform / int / choice / grid."""

    kind: str
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice and grid
    step: float | None = None

    def suggest(self, trial: Any, name: str, low: float | None = None) -> Any:
        """Draw from an Optuna trial; ``low`` raises the lower bound (ordered pairs)."""
        if self.kind in ("choice", "grid"):
            return _decode(trial.suggest_categorical(name, [_encode(v) for v in self.values]))
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
class SchedulerSpec:
    type: str = "asha"
    max_t: int = 1
    grace_period: int = 1
    reduction_factor: float = 2.0

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares trials, and max_t where it stops every trial:
        those must be evaluated (the last report is the trial's result)."""
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
        """Optuna GridSampler's search space (names as the trials suggest them)."""
        return {p.key: [_encode(v) for v in p.dists[0].values] for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.dists[0].values) for p in self.params)

    def set_num_samples(self, value: Any, where: str) -> None:
        _number(where, value, integer=True, positive=True)
        if self.searcher == "grid" and value > self.grid_size():
            raise CabbRayError(
                f"{where}: {value} is more than the grid's {self.grid_size()} points"
            )
        self.num_samples = value


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
            if all(_value_of(k, chosen, self.fixed, self.variants) in ok for k, ok in param.when):
                chosen[param.key] = param.sample(trial)
        # the suggestions OptunaSearch captures are the trial's config


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
            values[name] = _decode(value) if isinstance(value, str) else value
    return values


def _value_of(
    key: str,
    chosen: Mapping[str, Any],
    fixed: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
) -> Any:
    variant = variants.get(chosen.get(VARIANT_KEY), {}) if VARIANT_KEY in chosen else {}
    if key in chosen:
        value = chosen[key]
    elif key in variant:
        value = variant[key]
    else:
        value = fixed.get(key)
    return _encode(value)


def _encode(value: Any) -> Any:
    """Optuna's categorical values are scalars: lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (closest valid: {close[0]})" if close else f" (valid: {', '.join(valid)})"


def _check_keys(where: str, data: Mapping[str, Any], valid: tuple[str, ...] | list[str]) -> None:
    for key in data:
        if key not in valid:
            raise CabbRayError(f"{where}: unknown key '{key}'{_closest(str(key), list(valid))}")


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CabbRayError(f"{where}: expected a mapping, got {value!r}")
    return value


def _number(where: str, value: Any, integer: bool = False, positive: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (positive and not value > 0):
        kind = "integer" if integer else "number"
        expected = f"a positive {kind}" if positive else f"a{'n' if integer else ''} {kind}"
        raise CabbRayError(f"{where}: expected {expected}, got {value!r}")
    if not math.isfinite(value):  # YAML's .nan and .inf: NaN would pass every bound check
        raise CabbRayError(f"{where}: expected a finite number, got {value!r}")
    return value


def _as_list(where: str, value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [value]
    raise CabbRayError(f"{where}: expected a name or a list of names, got {value!r}")


def _parse_distribution(where: str, spec: Any) -> tuple[Distribution, ...]:
    if not isinstance(spec, Mapping):
        raise CabbRayError(
            f"{where}: expected a mapping with one of {', '.join(DISTRIBUTIONS)}, got {spec!r}"
        )
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    if len(kinds) != 1:
        raise CabbRayError(
            f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)}, got "
            f"{', '.join(map(str, spec)) or 'none'}"
        )
    kind = kinds[0]
    value = spec[kind]
    if kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise CabbRayError(f"{where}.pair: expected a list of two distributions")
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                _check_keys(f"{where}.pair[{i}]", item, ("uniform", "loguniform", "int", "step"))
        first = _parse_distribution(f"{where}.pair[0]", value[0])
        second = _parse_distribution(f"{where}.pair[1]", value[1])
        if len(first) != 1 or len(second) != 1:
            raise CabbRayError(f"{where}.pair: pairs cannot nest")
        for i, dist in enumerate((*first, *second)):
            if dist.kind not in ("uniform", "loguniform", "int"):
                raise CabbRayError(f"{where}.pair[{i}]: expected uniform, loguniform or int")
        if first[0].values[1] > second[0].values[1]:
            raise CabbRayError(
                f"{where}.pair: the first value's high {first[0].values[1]} must not exceed the "
                f"second's high {second[0].values[1]}"
            )
        return (*first, *second)
    step = spec.get("step")
    if kind in ("choice", "grid"):
        if not isinstance(value, (list, tuple)) or not value:
            raise CabbRayError(f"{where}.{kind}: expected a non-empty list of values")
        for option in value:
            if isinstance(option, Mapping):
                raise CabbRayError(
                    f"{where}.{kind}: options must be values or lists, got a mapping"
                )
        return (Distribution(kind, tuple(value)),)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise CabbRayError(f"{where}.{kind}: expected [low, high], got {value!r}")
    low, high = (_number(f"{where}.{kind}", v, integer=kind == "int") for v in value)
    if low >= high:
        raise CabbRayError(f"{where}.{kind}: expected low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise CabbRayError(f"{where}.loguniform: expected low > 0, got {low}")
    if step is not None:
        _number(f"{where}.step", step, integer=kind == "int", positive=True)
        if kind == "loguniform":
            raise CabbRayError(f"{where}.step: not allowed with loguniform")
    return (Distribution(kind, (low, high), step),)


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


def load_space(path: str | Path, overrides: list[str] = ()) -> SearchSpec:
    """Read and validate a space file (with the ``--set`` overrides that will apply to every
    trial); one-line ``CabbRayError`` naming file and key."""
    path = Path(path)
    label = str(path)
    data = dict(_read_yaml(path, label))
    _check_keys(label, data, TOP_KEYS)
    if "space" not in data:
        raise CabbRayError(f"{label}: missing key 'space' (the searched parameters)")
    base = data.get("base", "cpu_quickstart")
    if not isinstance(base, str):
        raise CabbRayError(f"{label}: base: expected a preset name or a config path")
    if base not in preset_names():
        candidate = Path(base).expanduser()
        base = str(candidate if candidate.is_absolute() else (path.parent / candidate))
    try:
        load_config_dict(base)
    except CabbRayError as err:
        raise CabbRayError(f"{label}: base: {err}") from None

    fixed = dict(_mapping(f"{label}: fixed", data.get("fixed")))
    metrics = _as_list(f"{label}: metric", data.get("metric", "pq"))
    modes = _as_list(f"{label}: mode", data.get("mode", ["max"] * len(metrics)))
    for name in metrics:
        if not isinstance(name, str) or name not in METRICS:
            raise CabbRayError(
                f"{label}: metric: unknown metric '{name}'{_closest(str(name), METRICS)}"
            )
    if len(metrics) > 2 or len(metrics) != len(modes) or len(set(metrics)) != len(metrics):
        raise CabbRayError(
            f"{label}: metric/mode: expected one or two distinct metrics with a mode each, got "
            f"{metrics} and {modes}"
        )
    for mode in modes:
        if mode not in ("max", "min"):
            raise CabbRayError(f"{label}: mode: expected max or min, got {mode!r}")

    searcher = _mapping(f"{label}: searcher", data.get("searcher"))
    _check_keys(f"{label}: searcher", searcher, SEARCHER_KEYS)
    kind = searcher.get("type", "tpe")
    if kind not in SEARCHERS:
        raise CabbRayError(
            f"{label}: searcher.type: unknown {kind!r}{_closest(str(kind), list(SEARCHERS))}"
        )
    seed = searcher.get("seed")
    if seed is not None:
        _number(f"{label}: searcher.seed", seed, integer=True)

    resources_map = _mapping(f"{label}: resources", data.get("resources"))
    _check_keys(f"{label}: resources", resources_map, RESOURCE_KEYS)
    resources = _parse_resources(label, resources_map)

    failure = _mapping(f"{label}: failure", data.get("failure"))
    _check_keys(f"{label}: failure", failure, FAILURE_KEYS)
    max_failures = _number(
        f"{label}: failure.max_failures", failure.get("max_failures", 1), integer=True
    )
    if max_failures < 0:
        raise CabbRayError(f"{label}: failure.max_failures: expected >= 0, got {max_failures}")

    variants = _parse_variants(label, data.get("variants"))
    overridden = {text.split("=", 1)[0].strip() for text in overrides}
    variants = {  # --set wins over the file, variants included
        name: {k: v for k, v in values.items() if k not in overridden}
        for name, values in variants.items()
    }
    space = _mapping(f"{label}: space", data.get("space"))
    if not space:
        raise CabbRayError(f"{label}: space: expected at least one searched parameter")
    spec = SearchSpec(
        path=path,
        base=base,
        fixed=fixed,
        metrics=metrics,
        modes=modes,
        num_samples=0,
        max_concurrent_trials=_number(
            f"{label}: max_concurrent_trials", data.get("max_concurrent_trials", 1), True, True
        ),
        scheduler=None,
        searcher=kind,
        seed=seed,
        resources=resources,
        max_failures=max_failures,
        text=path.read_text(),
        variants=variants,
    )
    base_cfg = spec.config = spec.base_config(list(overrides))
    valid_keys = sorted(flatten_config(base_cfg))
    _check_variants(label, variants, base_cfg, valid_keys)
    if variants and VARIANT_KEY not in space:
        raise CabbRayError(
            f"{label}: variants: defined, but space has no '{VARIANT_KEY}' parameter to pick them"
        )
    seen: list[str] = []
    for key, raw in space.items():
        where = f"{label}: space.{key}"
        if key == VARIANT_KEY and not variants:
            raise CabbRayError(f"{where}: needs a top-level 'variants:' mapping of named configs")
        if key not in valid_keys and key != VARIANT_KEY:
            raise CabbRayError(f"{where}: unknown config key{_closest(str(key), valid_keys)}")
        if key.startswith("run.") and key not in SEARCHABLE_RUN_KEYS:
            raise CabbRayError(f"{where}: run.* keys are not searched (resources: sets them)")
        if isinstance(raw, Mapping):
            _check_keys(where, raw, PARAM_KEYS)
        dists = _parse_distribution(where, raw)
        when = []
        for cond_key, allowed in _mapping(f"{where}.when", raw.get("when")).items():
            if cond_key not in seen and cond_key not in valid_keys:
                candidates = seen + valid_keys
                raise CabbRayError(
                    f"{where}.when: condition on unknown parameter '{cond_key}'"
                    f"{_closest(str(cond_key), candidates)}"
                )
            if cond_key in space and cond_key not in seen:
                raise CabbRayError(
                    f"{where}.when: '{cond_key}' is searched after '{key}'; list it first"
                )
            options = _condition_values(where, cond_key, allowed, spec.params)
            when.append((cond_key, tuple(_encode(v) for v in options)))
        param = Parameter(key, dists, tuple(when))
        if any(d.kind == "grid" for d in dists) and kind != "grid":
            raise CabbRayError(f"{where}: 'grid' values need searcher.type grid, not {kind}")
        if kind == "grid" and (dists[0].kind != "grid" or param.when):
            raise CabbRayError(
                f"{where}: searcher.type grid needs every parameter as 'grid' values without "
                "conditions"
            )
        if key == VARIANT_KEY:
            _check_variant_names(where, param, variants)
        else:
            _check_against_config(where, param, base_cfg)
        spec.params.append(param)
        seen.append(key)
    default_samples = spec.grid_size() if kind == "grid" else 16
    spec.set_num_samples(data.get("num_samples", default_samples), f"{label}: num_samples")
    spec.scheduler = _parse_scheduler(label, data.get("scheduler"), base_cfg)
    return spec


def _parse_variants(label: str, raw: Any) -> dict[str, dict[str, Any]]:
    """``variants:`` maps a name to dotted config keys and values."""
    variants: dict[str, dict[str, Any]] = {}
    for name, values in _mapping(f"{label}: variants", raw).items():
        if not isinstance(name, str) or not name:
            raise CabbRayError(f"{label}: variants: expected names as keys, got {name!r}")
        variants[name] = dict(_mapping(f"{label}: variants.{name}", values))
    return variants


def _check_variants(
    label: str, variants: Mapping[str, Mapping[str, Any]], base: ExperimentConfig, valid: list[str]
) -> None:
    """Every variant names known config keys and gives a valid config on the base."""
    for name, values in variants.items():
        where = f"{label}: variants.{name}"
        for key in values:
            if key not in valid:
                raise CabbRayError(f"{where}: unknown config key '{key}'{_closest(key, valid)}")
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
                f"{where}: unknown variant {name!r}{_closest(str(name), list(variants))}"
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


def _parse_resources(label: str, raw: Mapping[str, Any]) -> ResourceSpec:
    values: dict[str, Any] = {}
    if "workers" in raw:
        values["run.workers"] = _number(f"{label}: resources.workers", raw["workers"], True, True)
    if "cpus_per_worker" in raw:
        cpus = raw["cpus_per_worker"]
        values["run.cpus_per_worker"] = (
            None
            if cpus in (None, "auto")
            else _number(f"{label}: resources.cpus_per_worker", cpus, positive=True)
        )
    if "gpus_per_worker" in raw:
        gpus = _number(f"{label}: resources.gpus_per_worker", raw["gpus_per_worker"])
        if gpus < 0:
            raise CabbRayError(f"{label}: resources.gpus_per_worker: expected >= 0, got {gpus}")
        values["run.gpu"] = gpus > 0
        if gpus > 0:
            values["run.gpus_per_worker"] = gpus
    driver = _number(f"{label}: resources.driver_cpus", raw.get("driver_cpus", 0.0))
    if driver < 0:
        raise CabbRayError(f"{label}: resources.driver_cpus: expected >= 0, got {driver}")
    return ResourceSpec(tuple(values.items()), driver)


def _parse_scheduler(label: str, raw: Any, cfg: ExperimentConfig) -> SchedulerSpec | None:
    if raw in (None, "none") or (isinstance(raw, Mapping) and raw.get("type") == "none"):
        return None
    where = f"{label}: scheduler"
    raw = _mapping(where, raw)
    _check_keys(where, raw, SCHEDULER_KEYS)
    if raw.get("type", "asha") != "asha":
        raise CabbRayError(f"{where}.type: expected asha or none, got {raw.get('type')!r}")
    epochs = cfg.optim.epochs
    max_t = _number(f"{where}.max_t", raw.get("max_t", epochs), integer=True, positive=True)
    grace = _number(f"{where}.grace_period", raw.get("grace_period", 1), True, True)
    factor = _number(f"{where}.reduction_factor", raw.get("reduction_factor", 2))
    if max_t > epochs:
        raise CabbRayError(f"{where}.max_t: {max_t} is more than the trials' optim.epochs {epochs}")
    if grace > max_t:
        raise CabbRayError(f"{where}.grace_period: {grace} is more than max_t {max_t}")
    if not factor > 1:
        raise CabbRayError(f"{where}.reduction_factor: expected > 1, got {factor}")
    return SchedulerSpec("asha", max_t, grace, float(factor))


def trial_config(
    base: ExperimentConfig,
    config: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExperimentConfig:
    """The typed config of one trial: the base with its sampled values (a variant expanded to
    its values) applied, coerced and validated like ``--set``, never through strings."""
    return apply_values(base, expand_variant(sampled_values(config), variants or {}))


def searched_keys(spec: SearchSpec) -> list[str]:
    return [p.key for p in spec.params]
