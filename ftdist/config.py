"""The run configuration's schema and its loading: one YAML file, validated, addressable by dotted path.

Sections (all documented in README's config reference): ``run``, ``model``, ``data``, ``train``,
``deepspeed``, ``scaling``, ``storage``, ``tracking``. Every key can be overridden with ``--set dotted.key=value``
and swept by Ray Tune under the same dotted path. Unknown keys are errors with a "did you mean"
hint. Values may reference the environment as ``${env:NAME}``; such references are resolved only
where a value is used (e.g. when a filesystem is opened on a worker), so secrets never travel in
the config object, Ray's metadata or the saved ``config.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ftdist.errors import UserError
from ftdist.overrides import apply_overrides, known_paths, read_yaml, validation_message
from ftdist.redaction import has_env_ref, redact, redact_uri, resolve_env_refs
from ftdist.uri import absolute_local_path, is_uri, join_uri

TASKS = ("sequence-classification", "causal-lm", "masked-lm")
#: what a prepared data set can be for: a model task, or ``regression`` (float labels; a multi-task run's task type)
DATA_TASKS = (*TASKS, "regression")
#: metrics each task reports on the validation split (``val_`` prefix in reports)
TASK_METRICS: dict[str, dict[str, str]] = {
    "sequence-classification": {"loss": "min", "accuracy": "max", "macro_f1": "max"},
    "causal-lm": {"loss": "min", "perplexity": "min"},
    "masked-lm": {"loss": "min", "perplexity": "min"},
}
DEFAULT_EVAL_METRIC = {"sequence-classification": "accuracy", "causal-lm": "loss", "masked-lm": "loss"}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: a run name, or text holding ``${env:NAME}`` references (checked again once they are resolved)
RUN_NAME_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*|.*\$\{env:[A-Za-z_][A-Za-z0-9_]*\}.*)$"


class RunSection(Section):
    name: str = Field("ftdist-run", pattern=RUN_NAME_PATTERN,
                      description="run name: the folder under storage.path; rerunning the same name resumes")
    seed: int = Field(42, ge=0)


class LoraSection(Section):
    """LoRA adapters (the ``peft`` library): the base weights are frozen, low-rank updates of the
    ``target_modules`` and the task head (in full) are trained. See ftdist/lora.py."""

    r: int = Field(8, ge=1, description="rank of the low-rank update")
    alpha: float = Field(16, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffixes) to adapt; unset = the architecture's default (query/value "
                          "projections)")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: a plain HF model (AutoModelFor... loads it); adapter: a peft adapter folder")

    @model_validator(mode="after")
    def _targets(self) -> "LoraSection":
        if isinstance(self.target_modules, list) and not [t for t in self.target_modules if t.strip()]:
            raise ValueError("model.lora.target_modules is empty; name modules (e.g. [query, value]), "
                             "use all-linear, or remove the key for the architecture's default")
        return self


class ModelSection(Section):
    path: str = Field(..., description="hub id, local folder, s3://... or pkg://python_package/subdir")
    task: Literal["sequence-classification", "causal-lm", "masked-lm"] = "sequence-classification"
    num_labels: int | None = Field(None, ge=2)
    label_names: list[str] | None = None
    tokenizer: str | None = Field(None, description="defaults to model.path")
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoraSection | None = Field(None, description="train LoRA adapters instead of every weight")

    @model_validator(mode="after")
    def _labels(self) -> "ModelSection":
        if self.task == "sequence-classification":
            if self.label_names and self.num_labels and len(self.label_names) != self.num_labels:
                raise ValueError(f"model.label_names has {len(self.label_names)} names but "
                                 f"model.num_labels is {self.num_labels}; make them agree")
        elif self.num_labels or self.label_names:
            raise ValueError("model.num_labels/label_names only apply to task sequence-classification; "
                             f"remove them for {self.task}")
        return self


class PrepareSection(Section):
    """Build ``data.path`` from a raw file the first time a run needs it (same as ``ftdist data prepare``)."""

    input: str
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    text_field: str = "text"
    label_field: str | None = "label"
    split: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    rows_per_shard: int = Field(20000, ge=1)
    encoding: str = "utf-8"
    limit: int | None = Field(None, ge=1, description="keep a seeded random sample of this many rows")
    tokenize: bool = Field(True, description="false: shards hold raw text; workers tokenize on the fly "
                                             "with the model's tokenizer and data.max_length")
    keep_text: bool = Field(False, description="also store the raw text next to the token ids")
    pack: bool = Field(False, description="causal-lm/masked-lm: concatenate the tokenized documents (each ending "
                                          "with its separator/EOS) and cut them into max_length blocks, no padding")


class ReplaySection(Section):
    """Earlier data sets whose training batches are mixed into this run's epochs (ftdist/data/replay.py)."""

    paths: list[str] = Field(..., min_length=1, description="prepared data sets (their train/ splits are replayed)")
    fraction: float = Field(0.2, gt=0, lt=1, description="share of each epoch's batches that are replayed")


class DataSection(Section):
    path: str = Field(..., description="prepared data set prefix holding train/ validation/ test/")
    prepare: PrepareSection | None = None
    replay: ReplaySection | None = Field(None, description="mix earlier data sets' training batches into each epoch")
    max_length: int = Field(128, ge=8)
    shuffle_buffer: int = Field(4096, ge=1)
    prefetch_shards: int = Field(2, ge=0)
    length_bucketing: bool = Field(True, description="group similar lengths inside the shuffle buffer")
    record_sample_ids: bool = Field(False, description="keep trained sample ids in checkpoints (tests/audits)")


class TrainSection(Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1, description="micro batch per worker")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_metric: str | None = Field(None, description="validation metric for best/early stopping")
    eval_mode: Literal["min", "max"] | None = None
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smaller changes do not count as improvement")
    checkpoint_every_steps: int | None = Field(None, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    log_every_steps: int = Field(50, ge=1)
    compile: bool = False
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU; auto for known GPUs")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="weighted cross-entropy: 'balanced' (from the train split's label counts) or one "
                          "weight per class")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked-lm: share of tokens masked per batch")
    freeze: list[str] = Field(default_factory=list, description="parts not trained: embeddings, layers:N, layers:A-B "
                                                                "(blocks from 0, both ends included)")
    l2sp: float | None = Field(None, gt=0, description="L2-SP: before each optimizer step the trained non-head weights "
                                                       "move lr*l2sp of the way back to w0, the weights of model.path")

    @model_validator(mode="after")
    def _weights(self) -> "TrainSection":
        if isinstance(self.class_weights, list) and not all(w > 0 for w in self.class_weights):
            raise ValueError("train.class_weights must be positive numbers, one per class (or 'balanced')")
        return self

    @model_validator(mode="after")
    def _freeze(self) -> "TrainSection":
        from ftdist.freezing import parse_freeze

        for name in self.freeze:
            parse_freeze(name)
        return self


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: Literal["torch_autocast", "deepspeed"] = Field(
        "torch_autocast", description="how bf16/fp16 is applied; torch_autocast measured faster (bench/)")
    overlap_comm: bool = True
    reduce_bucket_size: int | None = Field(None, ge=1, description="unset: 5e7; at ZeRO-3 the model's hidden size "
                                                                   "squared (engine.zero3_sizes)")
    allgather_bucket_size: int = Field(50_000_000, ge=1)
    config: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed keys merged last")

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSection":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        return self


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1, description="elastic: Ray Train may run the worker group with "
                                                            "between min_workers and num_workers workers")
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    memory_per_worker_gb: float | None = Field(None, gt=0)
    enforce_memory_limit: bool = Field(False, description="each worker fails in one line when its memory (data "
                                                          "segment) would pass memory_per_worker_gb")
    accelerator_type: str | None = None
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = unlimited")
    placement_timeout_s: float = Field(300, gt=0, description="fail if the cluster cannot place the workers by then")
    collective_timeout_s: float = Field(1800, gt=0, description="a rank stuck in a collective fails the run after this")
    address: str | None = Field(None, description="Ray cluster address; unset = RAY_ADDRESS or a local cluster")
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of the in-process local cluster")

    @model_validator(mode="after")
    def _worker_range(self) -> "ScalingSection":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers ({self.min_workers}) is more than scaling.num_workers "
                             f"({self.num_workers}, the most workers); lower min_workers or raise num_workers")
        if self.enforce_memory_limit and self.memory_per_worker_gb is None:
            raise ValueError("scaling.enforce_memory_limit needs scaling.memory_per_worker_gb (the limit); set it, "
                             "e.g. scaling.memory_per_worker_gb: 16")
        return self


class StorageSection(Section):
    path: str = Field("./runs", description="run folders go here; local path or s3://...")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="fsspec/s3fs options; use ${env:NAME} for secrets")
    retries: int = Field(5, ge=0)
    retry_budget_s: float = Field(60, gt=0)
    num_checkpoints_to_keep: int = Field(2, ge=1)


class MlflowSection(Section):
    """Where MLflow runs go. Credentials never here: MLflow reads MLFLOW_TRACKING_USERNAME/_PASSWORD or
    MLFLOW_TRACKING_TOKEN from the environment of the driver and the workers."""

    tracking_uri: str = Field(..., description="MLflow server, e.g. http://mlflow.internal:5000")
    experiment: str = Field("ftdist", min_length=1, description="created if it does not exist")
    log_model: bool = Field(False, description="also upload the exported model as the run's artifacts")
    parent_run_id: str | None = Field(None, description="set by `ftdist tune` for its trials; leave unset")

    @model_validator(mode="after")
    def _no_credentials(self) -> "MlflowSection":
        from urllib.parse import urlsplit

        parts = urlsplit(self.tracking_uri)
        if parts.username or parts.password:
            raise ValueError("tracking.mlflow.tracking_uri must not hold credentials: set MLFLOW_TRACKING_USERNAME "
                             "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
        return self


class TrackingSection(Section):
    tensorboard: bool = Field(True, description="TensorBoard event files in <run>/tensorboard/ (rank 0)")
    plots: bool = Field(True, description="learning-curve and confusion-matrix PNGs in <run>/plots/")
    baseline: bool = Field(True, description="classification: TF-IDF + logistic regression on the same splits")
    baseline_max_rows: int | None = Field(50_000, ge=1, description="train rows the baseline is fitted on "
                                          "(the first in shard order, a random sample); null = all")
    mlflow: MlflowSection | None = Field(None, description="log the run to an MLflow server (rank 0 and driver)")


class TaskDataSection(Section):
    """A multi-task run's data set for one task: a prepared folder/URI, optionally built from ``prepare``."""

    path: str = Field(..., description="prepared data set prefix holding train/ validation/ test/")
    prepare: PrepareSection | None = None


class TaskSpec(Section):
    """One task of a multi-task run: its own data set and classification head on the shared encoder."""

    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="names the head and its export folder")
    data: TaskDataSection
    type: Literal["sequence-classification", "regression"] = Field(
        "sequence-classification", description="regression: one float per text, MSE loss (README: Multi-task)")
    label_names: list[str] | None = Field(None, description="default: the data set's label names")
    loss_weight: float = Field(1.0, gt=0, description="this task's loss is multiplied by it in training")

    @model_validator(mode="after")
    def _regression_labels(self) -> "TaskSpec":
        if self.type == "regression" and self.label_names is not None:
            raise ValueError(f"tasks: '{self.name}' is a regression task; label_names apply to "
                             f"sequence-classification tasks only, remove them")
        return self


class MultitaskSection(Section):
    sampling: Literal["proportional", "temperature", "equal"] = Field(
        "proportional", description="which task each batch comes from (README: Multi-task fine-tuning)")
    temperature: float = Field(2.0, ge=1, description="sampling temperature: p(task) ~ batches^(1/T)")


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    tasks: list[TaskSpec] | None = Field(None, description="multi-task: one head per task on model.path's encoder")
    multitask: MultitaskSection = Field(default_factory=MultitaskSection)
    #: the config with its ``${env:...}`` references, on a copy made by :meth:`resolved`
    _unresolved: RunConfig | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _multitask_data_path(cls, raw: Any) -> Any:
        # Multi-task (ftdist.multitask): data.path defaults to the first task's data set, so data:
        # keeps only the settings every task shares (max_length, shuffle_buffer, ...).
        if isinstance(raw, dict) and raw.get("tasks") == []:
            raise ValueError("tasks: is empty; list at least one task (or remove tasks: for a single-task run)")
        if isinstance(raw, dict) and isinstance(raw.get("tasks"), list) and raw["tasks"]:
            first = raw["tasks"][0]
            path = first.get("data", {}).get("path") if isinstance(first, dict) and isinstance(first.get("data"), dict) else None
            data = raw.get("data")
            if path and (data is None or (isinstance(data, dict) and "path" not in data)):
                raw = {**raw, "data": {**(data or {}), "path": path}}
        return raw

    @model_validator(mode="after")
    def _tasks(self) -> "RunConfig":
        if self.tasks is None:
            return self
        if self.model.task != "sequence-classification":
            raise ValueError("tasks: needs model.task sequence-classification (the shared encoder's heads classify)")
        if self.data.prepare is not None:
            raise ValueError("data.prepare does not apply to a multi-task run; put prepare: under each tasks[].data")
        if self.model.label_names or self.model.num_labels:
            raise ValueError("model.label_names/num_labels do not apply to a multi-task run; "
                             "set tasks[].label_names per task")
        if self.model.lora is not None and self.model.lora.export == "adapter":
            raise ValueError("model.lora.export: adapter is not built for a multi-task run (its tasks export "
                             "merged models); use export: merged, or remove it")
        # The multi-task loop reads neither (no per-task class weights, no compiled model): refused, not ignored.
        if self.train.class_weights is not None:
            raise ValueError("train.class_weights is not built for a multi-task run (its heads train on unweighted "
                             "losses); remove it, or weight a task with tasks[].loss_weight")
        if self.train.compile:
            raise ValueError("train.compile is not built for a multi-task run; remove it (or set it to false)")
        seen: set[str] = set()
        for t in self.tasks:
            if t.name == "multitask":
                raise ValueError("tasks: 'multitask' is reserved (the multi-head export's folder); rename the task")
            if t.name in seen:
                raise ValueError(f"tasks: two tasks are named '{t.name}'; give each task its own name")
            seen.add(t.name)
        return self

    @model_validator(mode="after")
    def _mitigations(self) -> "RunConfig":
        # train.freeze / train.l2sp act on the weights a full fine-tuning run trains (README: Continual learning).
        if self.model.lora is not None and (self.train.freeze or self.train.l2sp):
            raise ValueError("train.freeze / train.l2sp with model.lora: LoRA already keeps every base weight frozen; "
                             "remove train.freeze/train.l2sp (or model.lora)")
        if self.tasks is not None and (self.train.freeze or self.train.l2sp or self.data.replay):
            raise ValueError("train.freeze / train.l2sp / data.replay with tasks: is not built yet; remove them for a "
                             "multi-task run")
        if self.train.l2sp and self.train.l2sp * self.train.learning_rate >= 1:
            raise ValueError(f"train.l2sp {self.train.l2sp} x train.learning_rate {self.train.learning_rate} must be "
                             f"below 1 (each step moves that share of the way back to the starting weights); "
                             f"lower train.l2sp")
        if self.train.l2sp and self.train.precision == "fp16":
            raise ValueError("train.l2sp with train.precision fp16: a step fp16's loss scale skips would still be "
                             "pulled; use bf16 or fp32")
        return self

    @model_validator(mode="after")
    def _elastic_single_task(self) -> "RunConfig":
        # Ray Train restarts an elastic group at another size from the latest checkpoint, and only the plain
        # reader's positions are re-planned for it (loop.resume_on_another_size): refused here, in one line,
        # rather than by an assertion in the workers after a resize.
        elastic = self.scaling.min_workers is not None and self.scaling.min_workers < self.scaling.num_workers
        if elastic and self.tasks:
            raise ValueError("scaling.min_workers: a multi-task run resumes only on the number of workers it started "
                             "with (its per-task stream positions are not re-planned); remove min_workers")
        if elastic and self.data.replay is not None:
            raise ValueError("scaling.min_workers with data.replay: a replay run resumes only on the number of "
                             "workers it started with (the replayed batches' positions are not re-planned); remove "
                             "scaling.min_workers or data.replay")
        return self

    @model_validator(mode="after")
    def _metric(self) -> "RunConfig":
        metrics = TASK_METRICS[self.model.task]
        metric = self.train.eval_metric
        if metric is not None and metric not in metrics:
            raise ValueError(f"train.eval_metric '{metric}' is not reported for task {self.model.task}; "
                             f"choose one of {', '.join(metrics)}")
        return self

    @model_validator(mode="after")
    def _class_weights(self) -> "RunConfig":
        w = self.train.class_weights
        if w is not None and self.model.task != "sequence-classification":
            raise ValueError("train.class_weights applies to task sequence-classification only; remove it")
        labels = self.model.num_labels or (len(self.model.label_names) if self.model.label_names else None)
        if isinstance(w, list) and labels is not None and len(w) != labels:
            raise ValueError(class_weights_mismatch(len(w), labels))
        return self

    @model_validator(mode="after")
    def _fp16_loss_scaling(self) -> "RunConfig":
        # Checked here too (the workers' resolve_precision has the why): refused before Ray starts.
        if (self.train.precision == "fp16" and self.deepspeed.mixed_precision == "torch_autocast"
                and self.deepspeed.zero_stage >= 1):
            raise ValueError("train.precision fp16 with deepspeed.mixed_precision torch_autocast has loss scaling "
                             "only at deepspeed.zero_stage 0; use bf16, zero_stage 0, or deepspeed.mixed_precision: "
                             "deepspeed")
        return self

    # The metric that picks the best checkpoint, drives early stopping and is Tune's default.
    @property
    def eval_metric(self) -> str:
        return self.train.eval_metric or DEFAULT_EVAL_METRIC[self.model.task]

    @property
    def eval_mode(self) -> str:
        return self.train.eval_mode or TASK_METRICS[self.model.task][self.eval_metric]

    def run_uri(self) -> str:
        return join_uri(self.storage.path, self.run.name)

    def fingerprint(self) -> str:
        """Hash of what makes two runs the same run (resume) or different (refuse to overwrite).

        Scaling and storage details may change between a crash and a rerun (fewer nodes, a new
        endpoint) without making it another run, so they are left out; so is tracking (what is
        recorded about the run, not what it trains).
        """
        d = self.unresolved().model_dump(mode="json", exclude={"scaling": True, "storage": True, "tracking": True})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


    def resolved(self) -> RunConfig:
        """A copy with every ``${env:NAME}`` replaced by this process's environment, for the code that
        uses the values (opening storage, loading the model, naming the run folder).

        Why a copy: the saved ``config.yaml``, the fingerprint and the config Ray ships to workers
        keep the references, so a secret (or a machine-specific path) never travels or lands on
        disk; each process resolves them itself. Resolved values are validated and local paths made
        absolute again. Idempotent; a config without references is returned as is.
        """
        if self._unresolved is not None:
            return self
        raw = self.model_dump(mode="json")
        if not has_env_ref(raw):
            return self
        out = absolutize_local_paths(validate(resolve_env_refs(raw), "config (with ${env:...} resolved)"))
        out._unresolved = self
        return out

    def unresolved(self) -> RunConfig:
        """The config as written, ``${env:...}`` references kept (``self`` unless made by :meth:`resolved`)."""
        return self._unresolved or self


def class_weights_mismatch(given: int, labels: int) -> str:
    """The one line for a weight list whose length is not the number of classes (config or data set)."""
    return (f"train.class_weights has {given} weight(s) but there are {labels} classes; give one weight per "
            f"class in label order, or use train.class_weights: balanced")


# ---------------------------------------------------------------------------------------------
# Loading: YAML + ``--set`` overrides (ftdist/overrides.py) + this schema


KNOWN_PATHS = known_paths(RunConfig)


def is_free_dict_key(key: str) -> bool:
    """A dotted key inside a free-form mapping (raw DeepSpeed keys, fsspec options, custom resources),
    which the schema cannot list: ``--set`` and sweep spaces accept any name there. Also a field of a
    multi-task list item (``tasks.<i>.loss_weight``): the schema checks the name once it is set."""
    return (any(key.startswith(p + ".") for p in ("deepspeed.config", "storage.options", "scaling.resources_per_worker"))
            or re.fullmatch(r"tasks\.\d+\.[A-Za-z_][A-Za-z0-9_.]*", key) is not None)


def accepts_key(key: str) -> bool:
    """Whether ``--set`` (or a sweep space) may name ``key``: a schema path or a free-form mapping's key."""
    return key in KNOWN_PATHS or is_free_dict_key(key)


def load_raw(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
             data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as a plain dict with ``--set`` overrides applied (not yet validated)."""
    raw = copy.deepcopy(data) if data is not None else read_yaml(path)  # type: ignore[arg-type]
    return apply_overrides(raw, overrides or [], accepts_key, KNOWN_PATHS)


def validate(raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(validation_message(e, blamed_source(e, source, overrides or []), KNOWN_PATHS)) from None


def blamed_source(err: ValidationError, source: str, overrides: list[str]) -> str:
    """Where the bad value came from: the ``--set KEY=VALUE`` that set the failing key (or that a
    cross-key check names), else ``source`` (the YAML file). Naming the file for a value the user
    typed on the command line sends them to look for it in the wrong place."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    for override in reversed(overrides):  # the last --set of a key is the one that counts
        key = override.split("=", 1)[0].strip()
        if loc and (loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")):
            return f"--set {override}"
        if not loc and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", first["msg"]):
            return f"--set {override}"
    return source


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> RunConfig:
    """Read, override, validate, and make local paths absolute (Ray workers run elsewhere)."""
    raw = load_raw(path, overrides, data)
    return absolutize_local_paths(validate(raw, str(path) if path else "config", overrides))


def absolutize_local_paths(cfg: RunConfig) -> RunConfig:
    """Relative local paths are taken from the current directory (as any CLI does) and made
    absolute, because Ray workers run in another working directory."""
    def fix(p: str | None, must_exist: bool = False) -> str | None:
        if p is None:
            return p
        if must_exist and not os.path.exists(os.path.expanduser(p)) and not p.startswith((".", "~")) and not is_uri(p):
            return p  # a hub id such as "bert-base-uncased" or "org/model"
        return absolute_local_path(p)

    cfg.model.path = fix(cfg.model.path, must_exist=True)  # type: ignore[assignment]
    cfg.model.tokenizer = fix(cfg.model.tokenizer, must_exist=True)
    cfg.data.path = fix(cfg.data.path)  # type: ignore[assignment]
    if cfg.data.prepare is not None:
        cfg.data.prepare.input = fix(cfg.data.prepare.input)  # type: ignore[assignment]
    if cfg.data.replay is not None:
        cfg.data.replay.paths = [fix(p) or p for p in cfg.data.replay.paths]
    cfg.storage.path = fix(cfg.storage.path)  # type: ignore[assignment]
    for t in cfg.tasks or []:
        t.data.path = fix(t.data.path)  # type: ignore[assignment]
        if t.data.prepare is not None:
            t.data.prepare.input = fix(t.data.prepare.input)  # type: ignore[assignment]
    return cfg


def config_record(cfg: RunConfig, exclude: Any = None) -> dict[str, Any]:
    """The config as run folders keep it (``config.yaml``, ``summary.json``, ``ftdist_run.json``):
    ``${env:...}`` references kept, not their values, and literal secrets redacted."""
    return redact(cfg.unresolved().model_dump(mode="json", exclude=exclude))


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config (defaults and ``--set`` applied; ``${env:...}`` references kept,
    secrets redacted) as YAML: what goes into the run folder and loads back to the same run."""
    return yaml.safe_dump(config_record(cfg), sort_keys=False)


def show_config(cfg: RunConfig) -> str:
    """:func:`dump_config` for a person (``ftdist config``): a key left null whose value follows from
    other keys carries that value as a comment. Comments, not values: the printed YAML loads back
    to the same config, and so to the same run folder (its fingerprint)."""
    derived = {
        ("train", "eval_metric"): f"{cfg.eval_metric} (model.task {cfg.model.task}'s default)",
        ("train", "eval_mode"): f"{cfg.eval_mode} ({cfg.eval_metric} is better {'higher' if cfg.eval_mode == 'max' else 'lower'})",
        ("model", "tokenizer"): f"model.path's ({redact_uri(cfg.model.path)})",
    }
    out, section = [], ""
    for line in dump_config(cfg).splitlines():
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
        key = line.strip().split(":", 1)[0]
        note = derived.get((section, key)) if line.startswith("  ") and not line.startswith("   ") else None
        out.append(f"{line}  # {note}" if note is not None and line.endswith(": null") else line)
    return "\n".join(out) + "\n"
