"""The Ray Train wiring (driver side) and the Ray session the worker loop sees.

``run_training(cfg)``: check everything a user can get wrong before any worker starts (config vs an
existing run folder, model path, data set vs model), connect to Ray (an existing cluster, or a
local one started in-process with bounded CPUs, dashboard on 127.0.0.1), start a ``TorchTrainer``
whose workers run :func:`ftdist.loop.train_worker`, then write ``summary.json``.

Rerunning the same command with the same run name resumes: Ray Train restores the latest
checkpoint of ``<storage.path>/<run.name>`` and the loop continues from its reader position.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import RunConfig, config_record, dump_config, join_uri, redact_uri
from ftdist.storage import classify
from ftdist.data.manifest import (MANIFEST, check_compatible, check_shards_present, load_manifest,
                                  tokenizer_fingerprint)
from ftdist.errors import RunFailed, StorageUnavailable, UserError
from ftdist.metrics import majority_baseline

log = logging.getLogger("ftdist")


# ---------------------------------------------------------------------------------------------
# Worker side


class RaySession:
    """``Session`` backed by Ray Train v2's worker context."""

    def __init__(self, cfg: RunConfig, restore_from: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.restore_from = restore_from
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.restore_from:
            # A fresh run that starts from another run's checkpoint (a PBT exploit); once this run
            # has checkpoints of its own, a restart resumes from those instead.
            with self._fetch_restore_from() as d:
                yield d
            return
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    @contextlib.contextmanager
    def _fetch_restore_from(self) -> Iterator[str]:
        uri = self.restore_from or ""
        if not storage.is_remote(uri):
            yield storage.local_path(uri)
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ftdist-restore-") as tmp:
            yield storage.download_dir(uri, tmp, self.cfg.storage)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def fetch_checkpoint(self, name: str, dest: str) -> str:
        return storage.download_dir(join_uri(self.cfg.run_uri(), name), dest, self.cfg.storage)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO lines in this process.

    Each worker otherwise logs "Reporting training result N: TrainingReport(... the whole metrics
    dict ...)" and "Checkpoint successfully created at ..." every epoch, which drowns ftdist's own
    one-line epoch summaries (they say the same thing). Warnings and errors still pass. Ray names
    one of these loggers after the module's file path, so it is looked up the same way.
    """
    names = ["ray.train.v2._internal.execution.storage", "ray.train._internal.storage"]
    try:
        from ray.train.v2._internal.execution import context as train_context

        names.append(train_context.__file__)
    except ImportError:  # another Ray layout: keep its logs rather than fail the run
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_library_noise() -> None:
    """Hide library output a user cannot act on, in this process: the demo printed it between
    ftdist's own lines on every worker.

    - torch's FutureWarning that ``all_gather_into_tensor``/``reduce_scatter_tensor`` are deprecated
      (DeepSpeed calls them; nothing in a config changes that);
    - transformers' "Writing model shards" / "Loading weights" progress bars (the export and the
      model load take a second or two; ftdist reports both itself).
    Warnings that say something a user can fix are left alone.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
                                              r" is deprecated", category=FutureWarning)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def worker_entry(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer."""
    from ftdist.loop import train_worker

    logging.basicConfig(level=logging.WARNING)
    quiet_ray_train_logs()
    quiet_library_noise()
    # The config arrives with its ${env:...} references (never their values): resolve them here.
    cfg = RunConfig.model_validate(config["config"]).resolved()
    train_worker(cfg, RaySession(cfg, config.get("restore_from")))


# ---------------------------------------------------------------------------------------------
# Driver side: checks before anything starts


def prepare_data_if_needed(cfg: RunConfig) -> None:
    """Build ``data.path`` from ``data.prepare`` on first use; refuse to reuse one built from another spec."""
    if cfg.data.prepare is None:
        return
    train_uri = join_uri(cfg.data.path, "train")
    if storage.exists(join_uri(train_uri, MANIFEST), cfg.storage):
        built = load_manifest(train_uri, cfg.storage).prepare or {}
        from ftdist.data.prepare import spec_record

        if not built:
            raise UserError(f"data set '{cfg.data.path}' does not record how it was prepared (built by hand or by "
                            f"an older ftdist), so it cannot be checked against data.prepare; delete it to rebuild, "
                            f"or remove data.prepare to use it as it is")
        wanted = spec_record(cfg.data.prepare, cfg.model.task, cfg.run.seed, cfg.data.max_length)
        if built != wanted:
            diff = ", ".join(k for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k))
            raise UserError(f"data set '{cfg.data.path}' was prepared with different settings ({diff}); "
                            f"delete it to rebuild, or point data.path elsewhere")
        return
    from ftdist.data.prepare import prepare

    print(f"[ftdist] preparing data set {cfg.data.path} from {cfg.data.prepare.input}", flush=True)
    t0 = time.time()
    ms = prepare(cfg.data.prepare, cfg.data.path, cfg.model.tokenizer or cfg.model.path, cfg.data.max_length,
                 cfg.model.task, cfg.storage, seed=cfg.run.seed, label_names=cfg.model.label_names)
    print(f"[ftdist] prepared {', '.join(f'{k}: {m.num_rows} rows' for k, m in ms.items())} "
          f"in {time.time() - t0:.1f}s", flush=True)


def preflight(cfg: RunConfig) -> dict[str, Any]:
    """Every check that needs no worker. Returns facts the summary uses (label counts)."""
    from ftdist.modeling import load_tokenizer, resolve_model_path

    resolve_model_path(cfg.model.path, cfg.storage)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision,
                         cfg.storage)
    fp = tokenizer_fingerprint(tok)
    manifests = {}
    for split in ("train", "validation", "test"):
        uri = join_uri(cfg.data.path, split)
        m = manifests[split] = load_manifest(uri, cfg.storage)
        num_labels = cfg.model.num_labels or manifests["train"].num_labels
        check_compatible(m, uri, cfg.model.task, num_labels, fp)
        check_shards_present(m, uri, cfg.storage)
        if m.num_rows < cfg.scaling.num_workers:
            raise UserError(f"split '{uri}' has {m.num_rows} rows, fewer than scaling.num_workers="
                            f"{cfg.scaling.num_workers}; use fewer workers or more data")
    return {"label_counts": {s: m.label_counts for s, m in manifests.items()},
            "rows": {s: m.num_rows for s, m in manifests.items()}}


def check_run_folder(cfg: RunConfig) -> str:
    """'new', 'resume' or 'completed'; refuse a folder that another config made."""
    run_uri = cfg.run_uri()
    marker = join_uri(run_uri, layout.RUN_MARKER)
    if not storage.exists(marker, cfg.storage):
        if storage.listdir(run_uri, cfg.storage):
            raise UserError(f"run folder '{run_uri}' exists but was not made by ftdist; choose another run.name "
                            f"or storage.path")
        return "new"
    info = read_json(marker, cfg)
    if info.get("fingerprint") != cfg.fingerprint():
        saved = info.get("config", {})
        now = config_record(cfg, exclude={"scaling": True, "storage": True})
        diff = _diff_keys(saved, now)
        raise UserError(f"run folder '{run_uri}' was made by a different config (differs in: "
                        f"{', '.join(diff[:5]) or 'unknown'}); use a new run.name (--set run.name=...) or "
                        f"restore the original config to resume")
    if storage.exists(join_uri(run_uri, layout.SUMMARY), cfg.storage):
        read_json(join_uri(run_uri, layout.SUMMARY), cfg)  # a corrupt summary is one line, not a traceback
        return "completed"
    check_same_world_size(info, cfg, run_uri)
    return "resume"


def check_same_world_size(info: dict[str, Any], cfg: RunConfig, run_uri: str) -> None:
    """Refuse to resume on another number of workers.

    Why: the saved reader position (epoch, batch) indexes the old partition of the data across
    ranks, and ZeRO >= 1 optimizer shards belong to the old data-parallel size; resuming on another
    size would silently repeat and skip samples (or load mismatched shards)."""
    saved = info.get("num_workers")
    if saved is not None and saved != cfg.scaling.num_workers:
        raise UserError(f"run folder '{run_uri}' was started with {saved} worker(s) and this config asks for "
                        f"{cfg.scaling.num_workers} worker(s); resuming on another world size is not supported yet: "
                        f"set scaling.num_workers={saved} to resume, or use a new run.name to start over")


def read_json(uri: str, cfg: RunConfig) -> dict[str, Any]:
    """A run folder's JSON file, or one line saying it is corrupt (e.g. cut off by a crash mid-write)."""
    try:
        data = json.loads(storage.read_text(uri, cfg.storage))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{uri}' is corrupt ({type(e).__name__}: {str(e)[:80]}); delete it and rerun the same "
                        f"command (the run resumes from its latest checkpoint), or use a new run.name") from None
    if not isinstance(data, dict):
        raise UserError(f"'{uri}' is corrupt (not a JSON object); delete it and rerun the same command, "
                        f"or use a new run.name")
    return data


def write_run_marker(cfg: RunConfig) -> None:
    """``config.yaml`` and ``ftdist_run.json``: what made this run folder (resume vs another config)."""
    run_uri = cfg.run_uri()
    storage.write_text(join_uri(run_uri, layout.CONFIG), dump_config(cfg), cfg.storage)
    storage.write_text(join_uri(run_uri, layout.RUN_MARKER), json.dumps({
        "fingerprint": cfg.fingerprint(), "created": time.time(), "num_workers": cfg.scaling.num_workers,
        "config": config_record(cfg, exclude={"scaling": True, "storage": True})}, indent=1),
        cfg.storage)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------
# Ray


def connect_ray(cfg: RunConfig) -> None:
    """Connect to ``scaling.address`` / RAY_ADDRESS, or start a bounded local cluster in-process."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    # No runtime_env here: inside a Ray job it would replace the job's own (env vars such as the S3
    # endpoint); in local mode workers inherit this process's environment anyway.
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    # Ray warns that the local cluster it starts uses token authentication: ftdist's private cluster
    # on 127.0.0.1 needs no action from the user, so the warning only interrupts the run's output.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # A rank that stops responding fails the run after collective_timeout_s (Ray Train's worker
    # health check; DeepSpeed's CPU shared-memory allreduce has no timeout of its own). On a
    # cluster, set RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S in the cluster's environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", str(cfg.scaling.collective_timeout_s))
    # Ray's own helpers find "the" cluster by scanning the machine; with several Ray clusters on one
    # machine that fails, and Train's PlacementGroupCleaner then never frees the resources of a run
    # whose controller was killed (every trial a Tune scheduler stops). Pin the dashboard port and
    # name it in the environment the cluster's processes inherit.
    dashboard = {}
    if "RAY_API_SERVER_ADDRESS" not in os.environ:
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = {"dashboard_port": port}
    ray.init(num_cpus=cfg.scaling.local_num_cpus or max(need, 1), dashboard_host="127.0.0.1",
             include_dashboard=True, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING,
             **dashboard)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_gpu(cfg: RunConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def worker_resources(cfg: RunConfig, gpu: bool) -> dict[str, float]:
    s = cfg.scaling
    res: dict[str, float] = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if gpu:
        res["GPU"] = s.gpus_per_worker
    if s.memory_per_worker_gb:
        res["memory"] = s.memory_per_worker_gb * 1024**3
    if s.accelerator_type:
        res[f"accelerator_type:{s.accelerator_type}"] = 0.001
    return res


def wait_for_resources(cfg: RunConfig, per_worker: dict[str, float]) -> None:
    """Fail with a clear message instead of pending forever when the cluster cannot host the workers."""
    import ray

    need = {k: v * cfg.scaling.num_workers for k, v in per_worker.items()}
    deadline = time.monotonic() + cfg.scaling.placement_timeout_s
    with contextlib.suppress(Exception):  # ask an autoscaler (if any) for the nodes: GPU groups may sit at 0
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in per_worker.items() if k != "memory"}] * cfg.scaling.num_workers)
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() > deadline:
            asked = ", ".join(f"{k}={v:g}" for k, v in need.items() if not k.startswith("accelerator_type"))
            has = ", ".join(f"{k}={v:g}" for k, v in sorted(have.items())
                            if k in ("CPU", "GPU", "memory") or k in need)
            raise UserError(f"the Ray cluster cannot host {cfg.scaling.num_workers} worker(s): asked for {asked} "
                            f"in total, the cluster has {has}; lower scaling.num_workers/cpus_per_worker/"
                            f"gpus_per_worker or add nodes (waited scaling.placement_timeout_s="
                            f"{cfg.scaling.placement_timeout_s:g}s)")
        time.sleep(1.0)


def build_trainer(cfg: RunConfig, callbacks: list[Any] | None = None, restore_from: str | None = None) -> Any:
    """The TorchTrainer for ``cfg`` (also used by each Tune trial). ``restore_from``: a checkpoint URI
    a run without checkpoints of its own starts from (PBT: another trial's state)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.resolved()  # storage and run name as used; train_loop_config below keeps the references
    gpu = use_gpu(cfg)
    per_worker = worker_resources(cfg, gpu)
    wait_for_resources(cfg, per_worker)
    fs, path = storage.pyarrow_filesystem(cfg.storage.path, cfg.storage)
    metric = f"val_{cfg.eval_metric}"
    return TorchTrainer(
        worker_entry,
        train_loop_config={"config": cfg.unresolved().model_dump(mode="json"),
                           **({"restore_from": restore_from} if restore_from else {})},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=int(cfg.scaling.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=gpu,
                                     resources_per_worker={k: v for k, v in per_worker.items()
                                                           if not k.startswith("accelerator_type")},
                                     accelerator_type=cfg.scaling.accelerator_type),
        run_config=RayRunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.num_checkpoints_to_keep,
                                               checkpoint_score_attribute=metric,
                                               checkpoint_score_order=cfg.eval_mode),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks or None),
    )


def user_error_from_ray(exc: BaseException) -> UserError | None:
    """A UserError raised inside a worker arrives wrapped by Ray; recover its one line."""
    text = "\n".join(str(e) for e in _exc_chain(exc))
    m = re.search(r"UserError: (.+)", text)
    return UserError(m.group(1)) if m else None


def storage_outage_from_ray(exc: BaseException) -> str | None:
    """A worker's StorageUnavailable (storage down beyond the retry budget), wrapped by Ray: its line."""
    text = "\n".join(str(e) for e in _exc_chain(exc))
    m = re.search(r"StorageUnavailable: (.+)", text)
    return m.group(1).strip() if m else None


@contextlib.contextmanager
def unreachable_storage_is_a_user_error() -> Iterator[None]:
    """Before a run starts, storage that never answers is most likely a wrong endpoint (exit 2);
    once it has started, the same failure is an outage (exit 1, rerun to resume)."""
    try:
        yield
    except StorageUnavailable as e:
        raise UserError(str(e).replace("storage unavailable:", "storage unreachable:", 1)) from None


def describe_failure(exc: BaseException) -> str | None:
    """One line from Ray Train's WorkerGroupError (per failed rank) or ControllerError (None if neither)."""
    for e in _exc_chain(exc):
        controller = getattr(e, "controller_failure", None)
        if controller is not None:
            lines = [l for l in str(controller).strip().splitlines() if l.strip()]
            last = redact_uri(lines[-1].strip()[:240]) if lines else type(controller).__name__
            if classify(controller) == "transient" or "connect" in last.lower():
                return (f"storage unavailable: the Ray Train controller could not reach the run folder ({last}); "
                        f"check the S3 service and storage.endpoint_url / AWS_ENDPOINT_URL")
            return f"the Ray Train controller failed: {last}"
        failures = getattr(e, "worker_failures", None)
        if not isinstance(failures, dict) or not failures:
            continue
        parts = []
        for rank, err in sorted(failures.items()):
            text = str(err)
            if "health check" in text:
                kind = "stopped responding (health check failed: the rank is stalled, hung or was killed)"
            elif "timed out" in text.lower() or "timeout" in text.lower():
                kind = "timed out in a collective (another rank is stalled or gone)"
            else:
                lines = [l for l in text.strip().splitlines() if l.strip()]
                kind = f"raised {lines[-1].strip()[:200] if lines else type(err).__name__}"
            parts.append(f"rank {rank} {kind}")
        return "; ".join(parts)
    return None


def _exc_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__] + list(getattr(e, "exceptions", []) or [])
        stack += [v for v in getattr(e, "worker_failures", {}).values()] if isinstance(
            getattr(e, "worker_failures", None), dict) else []


# ---------------------------------------------------------------------------------------------
# The run


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("ftdist", "torch", "transformers", "deepspeed", "ray", "pyarrow", "s3fs"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def run_training(cfg: RunConfig, started_at: float | None = None) -> dict[str, Any]:
    """Train (or resume, or report a finished) run; returns the summary."""
    started_at = started_at or time.time()
    cfg = cfg.resolved()  # the values this driver uses; saved files and workers get the references
    run_uri = cfg.run_uri()
    with unreachable_storage_is_a_user_error():
        state = check_run_folder(cfg)
        if state == "completed":
            summary = read_json(join_uri(run_uri, layout.SUMMARY), cfg)
            print(f"[ftdist] run '{cfg.run.name}' already completed; nothing to do (summary: "
                  f"{join_uri(run_uri, layout.SUMMARY)})")
            return summary
        prepare_data_if_needed(cfg)
        facts = preflight(cfg)
    if state == "new":
        write_run_marker(cfg)
    else:
        print(f"[ftdist] resuming run '{cfg.run.name}' from {run_uri}", flush=True)
    connect_ray(cfg)
    trainer = build_trainer(cfg)
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - turned into a UserError or a one-line RunFailed
        ue = user_error_from_ray(e)
        if ue is not None:
            raise ue from None
        outage = storage_outage_from_ray(e)
        if outage is not None:
            raise RunFailed(f"run '{cfg.run.name}' failed: {outage}; completed checkpoints are kept in "
                            f"{run_uri}") from None
        why = describe_failure(e)
        if why is None:
            raise
        raise RunFailed(f"run '{cfg.run.name}' failed: {why}; completed checkpoints are kept in {run_uri}: "
                        f"rerun the same command to resume from the latest") from e
    result = json.loads(storage.read_text(join_uri(run_uri, layout.RESULT), cfg.storage))
    wall = time.time() - started_at
    summary = {
        "run": cfg.run.name, "status": "completed", "resumed": state == "resume", "run_dir": run_uri,
        "config": config_record(cfg), **{k: v for k, v in result.items() if k != "first_step_time"},
        "baseline": {"majority_class_accuracy": majority_baseline((facts["label_counts"].get("test") or None))},
        "rows": facts["rows"], "wall_time_s": wall,
        "time_to_first_step_s": (result["first_step_time"] - started_at) if result.get("first_step_time") else None,
        "checkpoints": sorted(n for n in storage.listdir(run_uri, cfg.storage) if layout.is_checkpoint(n)),
        "versions": library_versions(),
    }
    storage.write_text(join_uri(run_uri, layout.SUMMARY), json.dumps(summary, indent=1), cfg.storage)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end of a run: metrics per epoch, test vs baseline, where the model is."""
    lines = [f"run '{summary['run']}' ({summary['world_size']} worker(s), {summary['device']}, {summary['precision']}):"]
    metric = summary["eval_metric"]
    for e in summary["epochs"]:
        vals = "  ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in e.items() if k.startswith("val_"))
        star = " *" if e["epoch"] == summary["best_epoch"] else ""
        lines.append(f"  epoch {e['epoch']}: train_loss {e['train_loss']:.4f}  val: {vals}  "
                     f"{e['samples_per_s']:.1f} samples/s{star}")
    lines.append(f"  best epoch {summary['best_epoch']} by val_{metric}"
                 + (" (stopped early)" if summary.get("stopped_early") else ""))
    test = "  ".join(f"{k} {v:.4f}" for k, v in summary["test"].items())
    lines.append(f"  test: {test}")
    base = (summary.get("baseline") or {}).get("majority_class_accuracy")
    if base is not None and "accuracy" in summary["test"]:
        lines.append(f"  majority-class baseline accuracy: {base:.4f} "
                     f"({summary['test']['accuracy'] - base:+.4f} for the fine-tuned model)")
    tp = summary.get("throughput") or {}
    if tp:
        mfu = f", MFU {tp['mfu']:.1%}" if tp.get("mfu") else ""
        lines.append(f"  throughput: {tp['samples_per_s']:.1f} samples/s, {tp['tokens_per_s']:.0f} tokens/s{mfu}")
    lines.append(f"  wall time {summary['wall_time_s']:.0f}s"
                 + (f", first step after {summary['time_to_first_step_s']:.0f}s" if summary.get("time_to_first_step_s") else ""))
    lines.append(f"  exported model: {summary['model_uri']}")
    lines.append(f"  summary: {join_uri(summary['run_dir'], layout.SUMMARY)}")
    return "\n".join(lines)
