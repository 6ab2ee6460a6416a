"""The pipeline file: its schema, each stage's run config, ``${stage:NAME}`` references. Pure: loading
and validating a pipeline starts nothing, so every mistake is one line before any stage trains.

A pipeline names its folder (``name`` under ``storage.path``) and lists stages in order. A stage is a
run config (``path:`` a YAML file, relative to the current directory as every ftdist path is, or
``config:`` inline) with ``set:`` overrides in ``--set`` syntax, and the evaluation sets forgetting is
measured on (``eval:``; default: the stage's own validation split). Any string of a stage's config may
hold ``${stage:NAME}``, replaced by that earlier stage's export (``<pipeline>/stages/NAME/model``),
typically ``model.path``. The pipeline sets each stage's ``run.name`` (the stage name) and ``storage``
(the pipeline's, with run folders under ``stages/``).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftdist.config import PrepareSection, RunConfig, StorageSection, absolutize_local_paths, load_raw, validate
from ftdist.errors import UserError
from ftdist.overrides import did_you_mean, known_paths, parse_override, read_yaml, set_dotted, validation_message
from ftdist.pipeline import layout
from ftdist.redaction import redact
from ftdist.uri import absolute_local_path, join_uri

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
STAGE_REF = re.compile(r"\$\{stage:([^}]*)\}")
#: the tasks a stage may train (causal-lm stages: their sets would need a causal head per stage; not built)
STAGE_TASKS = ("masked-lm", "sequence-classification")
#: each evaluation set's metric: its name and whether lower is better
SET_METRIC = {"masked-lm": ("perplexity", "min"), "sequence-classification": ("accuracy", "max")}


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSetSpec(Spec):
    name: str = Field(..., pattern=NAME_PATTERN, description="the set's name (a column of the matrix)")
    data: str | None = Field(None, description="prepared data set prefix; default: the stage's data.path")
    split: Literal["train", "validation", "test"] = "validation"
    prepare: PrepareSection | None = Field(None, description="build data on first use (as data.prepare does)")


class StageSpec(Spec):
    name: str = Field(..., pattern=NAME_PATTERN, description="the stage's run folder under stages/")
    path: str | None = Field(None, description="run config YAML (relative to the current directory)")
    config: dict[str, Any] | None = Field(None, description="the run config inline")
    set: list[str] = Field(default_factory=list, description="--set style overrides of the stage's config")
    eval: list[EvalSetSpec] | None = Field(None, description="default: [{name: <stage>, split: validation}]")

    @model_validator(mode="after")
    def _one(self) -> "StageSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError(f"stage '{self.name}' needs exactly one of path: (a run config file) or config: "
                             f"(the run config inline)")
        return self


class PipelineSpec(Spec):
    name: str = Field(..., pattern=NAME_PATTERN, description="the pipeline folder under storage.path")
    storage: StorageSection = Field(default_factory=StorageSection)
    stages: list[StageSpec] = Field(..., min_length=1)


PIPELINE_KEYS = known_paths(PipelineSpec)


@dataclass(frozen=True)
class EvalSet:
    """One column of the matrix: a split of a prepared data set, scored with the declaring stage's task."""

    name: str
    stage: int  # index of the stage that declared it (its "own" stage: the diagonal)
    task: str
    data: str
    split: str
    metric: str
    mode: str  # "max" or "min"
    batch_size: int
    seed: int  # masked-LM sets: the Masker's seed (the declaring stage's, so its diagonal entry is its val metric)
    mlm_probability: float
    max_length: int
    prepare: PrepareSection | None = None

    def data_config(self, stage: RunConfig) -> RunConfig:
        """``stage``'s config reading this set's data (what preparing the set on first use needs)."""
        return stage.model_copy(update={"data": stage.data.model_copy(update={"path": self.data,
                                                                               "prepare": self.prepare})})


@dataclass(frozen=True)
class Stage:
    name: str
    config: RunConfig  # validated, references resolved, run.name/storage set by the pipeline
    sets: tuple[EvalSet, ...]


@dataclass(frozen=True)
class Pipeline:
    name: str
    storage: StorageSection
    stages: tuple[Stage, ...]
    source: str  # the file, for messages

    @property
    def uri(self) -> str:
        return join_uri(self.storage.path, self.name)

    @property
    def sets(self) -> list[EvalSet]:
        return [s for st in self.stages for s in st.sets]

    @property
    def start_model(self) -> str:
        return self.stages[0].config.model.path

    def stage(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        raise UserError(f"{self.source}: no stage '{name}'{did_you_mean(name, [s.name for s in self.stages])} "
                        f"(stages: {', '.join(s.name for s in self.stages)})")


def load_pipeline(path: str, overrides: list[str] | None = None, data: dict[str, Any] | None = None,
                  address: str | None = None) -> Pipeline:
    """Read, validate and resolve a pipeline file. ``overrides`` (``--set``) address the pipeline file
    (``storage.path=...``) or, prefixed by a stage name, that stage's config (``task:train.epochs=2``).
    ``address``: every stage's ``scaling.address``."""
    raw = copy.deepcopy(data) if data is not None else read_yaml(path, what="pipeline")
    source = f"pipeline {path}"
    raw = _apply_overrides(raw, overrides or [], source)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(validation_message(e, source, PIPELINE_KEYS)) from None
    storage = spec.storage.model_copy(update={"path": absolute_local_path(spec.storage.path)})
    uri = join_uri(storage.path, spec.name)
    names = [s.name for s in spec.stages]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{source}: stage name '{dup}' is used twice; stage names name run folders and must differ")
    stages: list[Stage] = []
    for i, st in enumerate(spec.stages):
        where = f"{source} stage '{st.name}'"
        stage_raw = st.config if st.config is not None else read_yaml(st.path, what=f"stage '{st.name}' config")  # type: ignore[arg-type]
        stage_raw = load_raw(data=stage_raw, overrides=st.set + ([f"scaling.address={address}"] if address else []))
        stage_raw = resolve_stage_refs(stage_raw, names, i, uri, where)
        stage_raw.setdefault("run", {})["name"] = st.name
        stage_raw["storage"] = {**storage.model_dump(mode="json"), "path": layout.stages_uri(uri)}
        cfg = absolutize_local_paths(validate(stage_raw, where))
        _check_stage(cfg, where)
        stages.append(Stage(st.name, cfg, tuple(_eval_sets(st, i, cfg))))
    sets = [s.name for stage in stages for s in stage.sets]
    if len(set(sets)) != len(sets):
        dup = next(n for n in sets if sets.count(n) > 1)
        raise UserError(f"{source}: evaluation set name '{dup}' is used twice; each set is a column of the matrix")
    return Pipeline(spec.name, storage, tuple(stages), source)


def self_contained(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline file with ``--set`` applied and every stage's ``path:`` replaced by its config inline
    (``${stage:...}`` and ``${env:...}`` references kept as written): one file that runs anywhere, e.g.
    as a Ray job whose working directory holds nothing else."""
    raw = _apply_overrides(read_yaml(path, what="pipeline"), overrides or [], f"pipeline {path}")
    for st in raw.get("stages") or []:
        if isinstance(st, dict) and isinstance(st.get("path"), str):
            st["config"] = read_yaml(st.pop("path"), what=f"stage '{st.get('name')}' config")
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    for item in overrides:
        stage, sep, rest = item.partition(":")
        if sep and "=" in rest and "=" not in stage and "." not in stage:  # stage:key=value
            entries = [s for s in raw.get("stages") or [] if isinstance(s, dict) and s.get("name") == stage]
            if not entries:
                known = [str(s.get("name")) for s in raw.get("stages") or [] if isinstance(s, dict)]
                raise UserError(f"--set {item}: {source} has no stage '{stage}'{did_you_mean(stage, known)} "
                                f"(stages: {', '.join(known)})")
            parse_override(rest)  # one line now for a malformed key
            entries[0]["set"] = list(entries[0].get("set") or []) + [rest]
            continue
        key, value = parse_override(item)
        set_dotted(raw, key, value, PIPELINE_KEYS)
    return raw


def resolve_stage_refs(raw: Any, names: list[str], index: int, pipeline_uri: str, where: str) -> Any:
    """``raw`` with every ``${stage:NAME}`` replaced by stage NAME's export; NAME must be an earlier stage."""
    if isinstance(raw, dict):
        return {k: resolve_stage_refs(v, names, index, pipeline_uri, where) for k, v in raw.items()}
    if isinstance(raw, list):
        return [resolve_stage_refs(v, names, index, pipeline_uri, where) for v in raw]
    if not isinstance(raw, str) or "${stage:" not in raw:
        return raw

    def one(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref not in names:
            raise UserError(f"{where}: {m.group(0)} names no stage{did_you_mean(ref, names)} "
                            f"(stages: {', '.join(names)})")
        if names.index(ref) >= index:
            what = "itself" if ref == names[index] else f"stage '{ref}', which runs after it"
            raise UserError(f"{where}: {m.group(0)} names {what}; a stage can start only from an earlier "
                            f"stage's export")
        return layout.stage_export_uri(pipeline_uri, ref)

    out = STAGE_REF.sub(one, raw)
    if "${stage:" in out:
        raise UserError(f"{where}: malformed stage reference in {raw!r}; write ${{stage:NAME}}")
    return out


def _check_stage(cfg: RunConfig, where: str) -> None:
    if cfg.tasks:
        raise UserError(f"{where}: multi-task configs (tasks:) are not supported as pipeline stages yet; "
                        f"use one stage per task")
    if cfg.model.task not in STAGE_TASKS:
        raise UserError(f"{where}: model.task {cfg.model.task} is not supported in a pipeline yet "
                        f"(stages: {', '.join(STAGE_TASKS)})")
    if cfg.model.lora is not None and cfg.model.lora.export == "adapter":
        raise UserError(f"{where}: model.lora.export adapter cannot feed a later stage or the evaluation; "
                        f"use model.lora.export: merged in a pipeline")


def _eval_sets(st: StageSpec, index: int, cfg: RunConfig) -> list[EvalSet]:
    given = st.eval if st.eval is not None else [EvalSetSpec(name=st.name)]
    metric, mode = SET_METRIC[cfg.model.task]
    out = []
    for e in given:
        if e.prepare is not None and e.data is None:
            raise UserError(f"stage '{st.name}' eval set '{e.name}': prepare: needs data: (where to build the set)")
        data = e.data if e.data is not None else cfg.data.path
        prepare = e.prepare if e.data is not None else cfg.data.prepare
        if "://" not in data and not os.path.isabs(data):
            data = os.path.abspath(data)
        if prepare is not None and "://" not in prepare.input and not os.path.isabs(prepare.input):
            prepare = prepare.model_copy(update={"input": os.path.abspath(prepare.input)})
        out.append(EvalSet(e.name, index, cfg.model.task, data, e.split, metric, mode, cfg.train.batch_size,
                           cfg.run.seed, cfg.train.mlm_probability, cfg.data.max_length, prepare))
    return out


def dump_pipeline(p: Pipeline) -> str:
    """The resolved pipeline saved in its folder: every stage's config (secrets redacted)."""
    from ftdist.config import config_record

    return yaml.safe_dump({"name": p.name, "storage": redact(p.storage.model_dump(mode="json")),
                           "stages": [{"name": s.name, "config": config_record(s.config),
                                       "eval": [{"name": e.name, "data": e.data, "split": e.split,
                                                 "metric": e.metric} for e in s.sets]}
                                      for s in p.stages]}, sort_keys=False)
