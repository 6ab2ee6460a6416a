"""The sweep spec: one YAML file naming a base run config, a search space over dotted config keys,
a scheduler, a search algorithm and the trial budget. Pure: validating a spec starts nothing.

Everything a user can get wrong is checked here, before Ray starts, and reported as one line
(:class:`ftdist.errors.UserError`): unknown spec keys (with "did you mean"), unknown or section
config keys in the space, bad bounds, values the run config schema refuses, a metric the task does
not report, an unknown scheduler or search algorithm, and combinations that cannot work (grid
search over a continuous range, PBT perturbing a key a checkpoint cannot carry over).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftdist.config import KNOWN_PATHS, TASK_METRICS, RunConfig, absolutize_local_paths, accepts_key, validate
from ftdist.errors import UserError
from ftdist.overrides import apply_overrides, did_you_mean, parse_override, read_yaml, set_dotted, validation_message
from ftdist.uri import absolute_local_path, join_uri

SPACE_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "hyperband", "pbt", "median", "fifo")
SEARCHERS = ("random", "grid", "optuna")
SPACE_EXAMPLE = "train.learning_rate: {loguniform: [1.0e-5, 1.0e-4]}"
#: keys the sweep sets for every trial itself (or that would change what the metric means)
SWEEP_MANAGED = ("run.name", "storage.path", "scaling.address", "scaling.local_num_cpus", "model.task",
                 "train.eval_metric", "train.eval_mode")
#: keys PBT may perturb: a checkpoint trained with other values of these can continue training
#: (the loop re-applies the optimizer hyperparameters after restoring; model shapes, ZeRO layout
#: and world size stay the same, so DeepSpeed's state loads at every ZeRO stage)
PBT_MUTABLE = ("train.learning_rate", "train.weight_decay", "train.warmup_ratio", "train.lr_schedule",
               "train.max_grad_norm", "train.adam_eps", "train.batch_size", "train.gradient_accumulation_steps")
_SECTIONS = {p for p in KNOWN_PATHS if any(q.startswith(p + ".") for q in KNOWN_PATHS)}


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dimension:
    """One swept key: a range (loguniform/uniform/randint, bounds inclusive) or a list of values."""

    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def is_range(self) -> bool:
        return self.kind in ("loguniform", "uniform", "randint")

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can receive (each is validated against the config schema)."""
        return [self.low, self.high] if self.is_range else list(self.values)

    def to_yaml(self) -> dict[str, list[Any]]:
        return {self.kind: [self.low, self.high] if self.is_range else list(self.values)}


def parse_dimension(key: str, raw: Any) -> Dimension:
    where = f"space '{key}'"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"{where} must be one mapping like {{loguniform: [low, high]}} or {{choice: [a, b]}} "
                         f"(kinds: {', '.join(SPACE_KINDS)}); got {raw!r}")
    kind, args = next(iter(raw.items()))
    if kind not in SPACE_KINDS:
        raise ValueError(f"{where}: unknown kind '{kind}'{did_you_mean(str(kind), list(SPACE_KINDS))} "
                         f"(kinds: {', '.join(SPACE_KINDS)})")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {kind} needs a non-empty list of values, e.g. {{{kind}: [16, 32]}}")
        if len({json.dumps(v, sort_keys=True) for v in args}) != len(args):
            raise ValueError(f"{where}: {kind} lists a value twice")
        return Dimension(kind, values=tuple(args))
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)):
        raise ValueError(f"{where}: {kind} needs two numbers [low, high]; got {args!r}")
    low, high = args
    if not all(math.isfinite(v) for v in (low, high)):
        raise ValueError(f"{where}: bounds must be finite numbers; got [{low}, {high}]")
    if kind == "randint" and not all(float(v).is_integer() for v in (low, high)):
        raise ValueError(f"{where}: randint bounds must be integers; got [{low}, {high}]")
    if not low < high:
        raise ValueError(f"{where}: low must be below high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0 (it samples log(value)); got [{low}, {high}]")
    if kind == "randint":
        return Dimension(kind, int(low), int(high))
    return Dimension(kind, float(low), float(high))


def check_space_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"space keys must be dotted config paths like train.learning_rate; got {key!r}")
    if key in _SECTIONS:
        raise ValueError(f"space key '{key}' is a config section; name a key inside it, e.g. "
                         f"{next(p for p in KNOWN_PATHS if p.startswith(key + '.'))}")
    if not accepts_key(key):
        raise ValueError(f"space: unknown config key '{key}'{did_you_mean(key, KNOWN_PATHS) or ' (see README config reference)'}")
    if key in SWEEP_MANAGED or key.startswith("storage."):
        raise ValueError(f"space key '{key}' cannot be swept: the sweep sets it for every trial")


# ---------------------------------------------------------------------------------------------
# Schedulers, search, resources


class AshaSpec(Spec):
    """Asynchronous successive halving: stop the worse 1 - 1/reduction_factor at each rung."""

    type: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the most epochs any trial runs")
    brackets: int = Field(1, ge=1)


class HyperbandSpec(Spec):
    """Synchronous HyperBand (pauses and resumes trials from their checkpoints)."""

    type: Literal["hyperband"]
    reduction_factor: float = Field(3, gt=1)
    max_t: int | None = Field(None, ge=1)


class PbtSpec(Spec):
    """Population based training: every interval, the worst quantile copies a best trial's checkpoint
    and continues with perturbed hyperparameters."""

    type: Literal["pbt"]
    perturbation_interval: int = Field(1, ge=1, description="epochs between exploit/explore decisions")
    burn_in_period: int = Field(0, ge=0)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    perturbation_factors: tuple[float, float] = (1.2, 0.8)
    synch: bool = False


class MedianSpec(Spec):
    """Median stopping: stop a trial whose best result is below the median of others' running averages."""

    type: Literal["median", "median_stopping"]
    grace_period: int = Field(1, ge=1)
    min_samples_required: int = Field(3, ge=1)
    hard_stop: bool = True


class FifoSpec(Spec):
    """No early stopping: every trial runs its full budget."""

    type: Literal["fifo"]


SchedulerSpec = Annotated[Union[AshaSpec, HyperbandSpec, PbtSpec, MedianSpec, FifoSpec], Field(discriminator="type")]


class SearchSpec(Spec):
    type: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = Field(0, description="sampling seed; the same seed and space give the same trials")


class ResourcesPerTrial(Spec):
    """Scaling of each trial (replaces the base config's ``scaling`` keys of the same names)."""

    num_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)
    use_gpu: bool | Literal["auto"] | None = None
    memory_per_worker_gb: float | None = Field(None, gt=0)
    resources_per_worker: dict[str, float] | None = None


class CheckpointsSpec(Spec):
    num_to_keep: int = Field(1, ge=1, description="best-by-metric checkpoints per trial while it runs (+ the latest)")
    keep_losing_trials: bool = Field(False, description="keep the checkpoints of every trial after the sweep, "
                                                        "not only the best trial's")


class BaseSpec(Spec):
    path: str | None = Field(None, description="run config YAML (relative to the current directory)")
    config: dict[str, Any] | None = Field(None, description="the run config inline")
    set: list[str] = Field(default_factory=list, description="--set style overrides of the base config")

    @model_validator(mode="after")
    def _one(self) -> "BaseSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("base needs exactly one of path: (a run config file) or config: (the run config inline)")
        return self


class SweepSpec(Spec):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="sweep folder under storage_path")
    base: BaseSpec
    space: dict[str, Dimension]
    scheduler: SchedulerSpec = Field(default_factory=lambda: AshaSpec(type="asha"))
    search: SearchSpec = Field(default_factory=SearchSpec)
    num_samples: int = Field(1, ge=1, description="trials to sample (grid: repeats of the whole grid)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="upper bound; the cluster may allow fewer")
    resources_per_trial: ResourcesPerTrial = Field(default_factory=ResourcesPerTrial)
    metric: str | None = Field(None, description="default: the base config's validation metric")
    mode: Literal["min", "max"] | None = None
    storage_path: str | None = Field(None, description="default: the base config's storage.path")
    checkpoints: CheckpointsSpec = Field(default_factory=CheckpointsSpec)

    @field_validator("base", mode="before")
    @classmethod
    def _base_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("space", mode="before")
    @classmethod
    def _space(cls, v: Any) -> dict[str, Dimension]:
        if v is None or v == {}:
            raise ValueError(f"space is empty; add at least one key, e.g. {SPACE_EXAMPLE}")
        if not isinstance(v, dict):
            raise ValueError(f"space must map dotted config keys to ranges, e.g. {SPACE_EXAMPLE}")
        out = {}
        for key, raw in v.items():
            check_space_key(key)
            out[key] = raw if isinstance(raw, Dimension) else parse_dimension(key, raw)
        return out

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = {"type": v}
        if isinstance(v, dict):
            t = v.get("type")
            if t is None:
                raise ValueError(f"scheduler needs a type: one of {', '.join(SCHEDULERS)}")
            if t not in SCHEDULERS + ("median_stopping",):
                raise ValueError(f"unknown scheduler '{t}'{did_you_mean(str(t), list(SCHEDULERS))}; "
                                 f"choose one of {', '.join(SCHEDULERS)}")
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = {"type": v}
        if isinstance(v, dict) and v.get("type", "random") not in SEARCHERS:
            t = v["type"]
            raise ValueError(f"unknown search '{t}'{did_you_mean(str(t), list(SEARCHERS))}; "
                             f"choose one of {', '.join(SEARCHERS)}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "SweepSpec":
        if self.search.type in ("grid", "optuna"):
            ranges = [k for k, d in self.space.items() if d.is_range] if self.search.type == "grid" else []
            grids = [k for k, d in self.space.items() if d.kind == "grid"] if self.search.type == "optuna" else []
            if ranges:
                raise ValueError(f"search 'grid' enumerates values, but space '{ranges[0]}' is a "
                                 f"{self.space[ranges[0]].kind} range; use choice/grid values or search 'random'")
            if grids:
                raise ValueError(f"search 'optuna' samples, it cannot enumerate space '{grids[0]}' (grid); "
                                 f"use choice instead")
        if isinstance(self.scheduler, PbtSpec):
            bad = [k for k in self.space if k not in PBT_MUTABLE]
            if bad:
                raise ValueError(f"scheduler 'pbt' cannot perturb '{bad[0]}': a checkpoint only carries over "
                                 f"to changed {', '.join(PBT_MUTABLE)}; set '{bad[0]}' in the base config")
            if self.search.type != "random":
                raise ValueError("scheduler 'pbt' samples its population itself; use search 'random'")
        return self

    @property
    def scheduler_type(self) -> str:
        return "median" if self.scheduler.type == "median_stopping" else self.scheduler.type

    def to_yaml_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"space"})
        d["space"] = {k: v.to_yaml() for k, v in self.space.items()}
        return d


SPEC_KEYS = list(SweepSpec.model_fields)
_SCHEDULER_MODELS: dict[str, type[BaseModel]] = {"asha": AshaSpec, "hyperband": HyperbandSpec, "pbt": PbtSpec,
                                                 "median": MedianSpec, "median_stopping": MedianSpec,
                                                 "fifo": FifoSpec}


# ---------------------------------------------------------------------------------------------
# Loading


def spec_error_message(err: ValidationError, source: str) -> str:
    """One line for the first problem, with the spec key path and a "did you mean" where it helps."""
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    # pydantic names the union member in discriminated unions: scheduler.asha.grace -> scheduler.grace
    sched_type = None
    if len(loc) > 1 and loc[0] == "scheduler" and loc[1] in _SCHEDULER_MODELS:
        sched_type = loc.pop(1)
    path = ".".join(loc)
    if e["type"] == "extra_forbidden":
        section = loc[0] if len(loc) > 1 else ""
        models: dict[str, type[BaseModel]] = {"search": SearchSpec, "resources_per_trial": ResourcesPerTrial,
                                              "checkpoints": CheckpointsSpec, "base": BaseSpec}
        model = _SCHEDULER_MODELS[sched_type] if sched_type else models.get(section)
        if model is None:
            return f"{source}: unknown key '{path}'{did_you_mean(path, SPEC_KEYS)}"
        fields = [k for k in model.model_fields if k != "type"]
        close = _closest(loc[-1], fields)
        what = f"scheduler {sched_type}" if sched_type else section
        hint = (f"; did you mean '{section}.{close}'?" if close
                else f"; {what} takes: {', '.join(fields) or 'no parameters'}")
        return f"{source}: unknown key '{path}'{hint}"
    if e["type"] == "missing":
        return f"{source}: required key '{path}' is missing (see README, Sweeps)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error" or not path:  # our own messages name the key already
        return f"{source}: {msg}"
    got = e.get("input")
    got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: '{path}': {msg}{got_s}"


def _closest(name: str, names: list[str]) -> str | None:
    """A name that starts like ``name`` (grace -> grace_period), else a close spelling."""
    prefixed = [n for n in names if n.startswith(name) or name.startswith(n)]
    if prefixed:
        return prefixed[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return close[0] if close else None


def apply_spec_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``--set`` items: spec keys (``num_samples=4``, ``scheduler.type=fifo``, ``space.train.epochs={choice: [2]}``)
    change the spec; run config keys (``train.epochs=2``) are appended to ``base.set``."""
    raw = copy.deepcopy(raw)
    base_sets: list[str] = []
    for item in overrides:
        key, value = parse_override(item)
        head = key.split(".", 1)[0]
        if head == "space" and "." in key:
            raw.setdefault("space", {})[key.split(".", 1)[1]] = value
        elif head in SPEC_KEYS:
            set_dotted(raw, key, value)
        elif accepts_key(key):
            base_sets.append(item)
        else:
            raise UserError(f"--set: unknown key '{key}' (neither a sweep spec key nor a run config key)"
                            f"{did_you_mean(key, SPEC_KEYS + KNOWN_PATHS)}")
    return raw, base_sets


def load_sweep_spec(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                    data: dict[str, Any] | None = None) -> SweepSpec:
    """Parse and validate a spec on its own (the base config is checked by :func:`resolve_sweep`)."""
    raw = copy.deepcopy(data) if data is not None else read_yaml(path, what="sweep spec")  # type: ignore[arg-type]
    raw, base_sets = apply_spec_overrides(raw, overrides or [])
    if base_sets:
        base = raw.get("base")
        base = {"path": base} if isinstance(base, str) else dict(base or {})
        base["set"] = list(base.get("set") or []) + base_sets
        raw["base"] = base
    source = f"sweep spec {path}" if path else "sweep spec"
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(spec_error_message(e, source)) from None


# ---------------------------------------------------------------------------------------------
# Checking the spec against the base config


@dataclass(frozen=True)
class ResolvedSweep:
    """A spec checked against its base config: everything the driver and the trials need."""

    spec: SweepSpec
    base: dict[str, Any]  # validated base config, local paths absolute (JSON-able)
    metric: str  # as reported: val_<name>
    mode: str
    storage_path: str
    max_epochs: int

    @property
    def sweep_uri(self) -> str:
        return join_uri(self.storage_path, self.spec.name)

    @property
    def trials_uri(self) -> str:
        return join_uri(self.sweep_uri, "trials")

    @property
    def base_config(self) -> RunConfig:
        return RunConfig.model_validate(self.base)

    def fingerprint(self) -> str:
        """What makes a resumed sweep the same sweep (storage, concurrency and tracking may change)."""
        d = self.spec.to_yaml_dict()
        for k in ("max_concurrent_trials", "storage_path"):
            d.pop(k, None)
        base = {k: v for k, v in self.base.items() if k not in ("scaling", "storage", "tracking")}
        return hashlib.sha256(json.dumps([d, base], sort_keys=True, default=str).encode()).hexdigest()[:16]


def normalize_metric(metric: str | None, task: str, default: str) -> str:
    """``accuracy`` or ``val_accuracy`` -> ``val_accuracy``; refuse what the task does not report."""
    name = (metric or default).removeprefix("val_")
    metrics = TASK_METRICS[task]
    if name not in metrics:
        raise UserError(f"sweep spec: metric '{metric}' is not reported for task {task}; choose one of "
                        f"{', '.join('val_' + m for m in metrics)}")
    return "val_" + name


def load_base(spec: SweepSpec, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base run config as a raw dict (``raw``: its content when the file is elsewhere, e.g. a
    ConfigMap checked offline), with ``base.set`` applied; not yet validated."""
    if raw is not None:
        raw = copy.deepcopy(raw)
    else:
        raw = read_yaml(spec.base.path) if spec.base.path else copy.deepcopy(spec.base.config or {})
    return apply_overrides(raw, spec.base.set, accepts_key, KNOWN_PATHS, what="sweep spec base.set")


def _validate(raw: dict[str, Any], source: str) -> RunConfig:
    return absolutize_local_paths(validate(raw, source))


def resolve_sweep(spec: SweepSpec, base_raw: dict[str, Any] | None = None) -> ResolvedSweep:
    """Check the spec against its base config; every value a trial can receive must pass the schema."""
    raw = load_base(spec, base_raw)
    for k, v in spec.resources_per_trial.model_dump(exclude_none=True).items():
        raw.setdefault("scaling", {})[k] = v
    source = f"base config {spec.base.path}" if spec.base.path else "base config"
    cfg = _validate(raw, source)
    metric = normalize_metric(spec.metric, cfg.model.task, cfg.eval_metric)
    mode = spec.mode or TASK_METRICS[cfg.model.task][metric.removeprefix("val_")]
    base = cfg.model_dump(mode="json")
    for key, dim in spec.space.items():
        for value in dim.extremes():
            sample = copy.deepcopy(base)
            set_dotted(sample, key, value)
            try:
                RunConfig.model_validate(sample)
            except ValidationError as e:
                msg = validation_message(e, "config", KNOWN_PATHS).removeprefix("config: ")
                raise UserError(f"sweep spec: space '{key}' value {value!r} is not a valid run config value: "
                                f"{msg}") from None
    first = copy.deepcopy(base)
    for key, dim in spec.space.items():
        set_dotted(first, key, dim.extremes()[0])
    _validate(first, "sweep spec: a sampled trial config")
    max_epochs = max_value(spec, "train.epochs", cfg.train.epochs)
    _check_scheduler(spec, max_epochs)
    storage_path = absolute_local_path(spec.storage_path or cfg.storage.path)
    return ResolvedSweep(spec, base, metric, mode, storage_path, int(max_epochs))


def max_value(spec: SweepSpec, key: str, default: float) -> float:
    """The largest value ``key`` can take in any trial (for budgets and per-trial resources)."""
    dim = spec.space.get(key)
    if dim is None:
        return default
    return max(float(v) for v in dim.extremes())


def _check_scheduler(spec: SweepSpec, max_epochs: float) -> None:
    s = spec.scheduler
    grace = getattr(s, "grace_period", None)
    if grace is not None and grace > max_epochs:
        raise UserError(f"sweep spec: scheduler.grace_period ({grace}) exceeds the most epochs a trial runs "
                        f"({max_epochs:g}); {s.type} could never stop a trial")
    if isinstance(s, AshaSpec) and s.max_t is not None and s.max_t < s.grace_period:
        raise UserError(f"sweep spec: scheduler.max_t ({s.max_t}) must be >= grace_period ({s.grace_period})")
    if isinstance(s, PbtSpec) and s.perturbation_interval >= max_epochs:
        raise UserError(f"sweep spec: scheduler.perturbation_interval ({s.perturbation_interval}) must be below "
                        f"the trials' epochs ({max_epochs:g}) or PBT never exploits")


def warmup_note(rs: ResolvedSweep) -> str | None:
    """A warning when an early-stopping scheduler's first decision can fall inside warmup.

    Why: with ``warmup_ratio`` w and E epochs, warmup lasts w * E epochs whatever the data size. A
    trial still warming up at the first rung is compared with trials already at full learning rate
    and is stopped for its schedule, not its promise (measured: bench/RESULTS.md, ASHA vs FIFO).
    """
    grace = getattr(rs.spec.scheduler, "grace_period", None)
    if grace is None:
        return None
    base = rs.base_config
    warmup = max_value(rs.spec, "train.warmup_ratio", base.train.warmup_ratio)
    epochs = max_value(rs.spec, "train.epochs", base.train.epochs)
    if warmup * epochs <= grace:
        return None
    return (f"{rs.spec.scheduler_type}'s first decision comes after {grace} epoch(s), but warmup lasts up to "
            f"{warmup * epochs:.2g} epochs (train.warmup_ratio up to {warmup:g} of {epochs:g} epochs): trials still "
            f"warming up will be judged against trials at full learning rate; raise scheduler.grace_period or keep "
            f"train.warmup_ratio <= {grace / epochs:.3g}")


def trial_config(rs: ResolvedSweep, values: dict[str, Any], run_name: str) -> RunConfig:
    """The run config of one trial: the base with the sampled values, the trial's own run folder
    under ``<sweep>/trials/``, and the sweep's metric as the run's eval metric (so each trial's best
    checkpoint is best by the metric the sweep ranks trials by)."""
    d = copy.deepcopy(rs.base)
    for key, value in values.items():
        set_dotted(d, key, value)
    set_dotted(d, "run.name", run_name)
    set_dotted(d, "storage.path", rs.trials_uri)
    set_dotted(d, "train.eval_metric", rs.metric.removeprefix("val_"))
    set_dotted(d, "train.eval_mode", rs.mode)
    set_dotted(d, "storage.num_checkpoints_to_keep", rs.spec.checkpoints.num_to_keep)
    return _validate(d, f"trial {run_name} config")


def dump_spec(rs: ResolvedSweep) -> str:
    """The resolved spec and base config saved in the sweep folder (secrets redacted)."""
    from ftdist.redaction import redact

    return yaml.safe_dump({"spec": rs.spec.to_yaml_dict(), "metric": rs.metric, "mode": rs.mode,
                           "base_config": redact(rs.base)}, sort_keys=False)
