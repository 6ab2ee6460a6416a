"""Everything checked before a worker starts, and the run folder's ownership.

Why before: a mistake found after Ray started costs the user a minute and a page of logs; found
here it is one line (exit 2) and nothing is written. Owns the run folder's marker: a folder made
by another config is never resumed; one started on another number of workers is resumed on this
one (single-task runs; see ``check_resize``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import RunConfig, config_record, dump_config
from ftdist.uri import join_uri
from ftdist.data.manifest import (MANIFEST, check_compatible, check_shards_present, load_manifest,
                                  tokenizer_fingerprint)
from ftdist.errors import StorageUnavailable, UserError
from ftdist.metrics import class_weights


def prepare_data_if_needed(cfg: RunConfig, data_task: str | None = None) -> None:
    """Build ``data.path`` from ``data.prepare`` on first use; refuse to reuse one built from another spec.
    ``data_task``: what the data set is for when not ``model.task`` (a multi-task run's regression task)."""
    task = data_task or cfg.model.task
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
        wanted = spec_record(cfg.data.prepare, task, cfg.run.seed, cfg.data.max_length)
        if built != wanted:
            diff = ", ".join(k for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k))
            raise UserError(f"data set '{cfg.data.path}' was prepared with different settings ({diff}); "
                            f"delete it to rebuild, or point data.path elsewhere")
        return
    from ftdist.data.prepare import prepare

    print(f"[ftdist] preparing data set {cfg.data.path} from {cfg.data.prepare.input}", flush=True)
    t0 = time.time()
    ms = prepare(cfg.data.prepare, cfg.data.path, cfg.model.tokenizer or cfg.model.path, cfg.data.max_length,
                 task, cfg.storage, seed=cfg.run.seed, label_names=cfg.model.label_names)
    print(f"[ftdist] prepared {', '.join(f'{k}: {m.num_rows} rows' for k, m in ms.items())} "
          f"in {time.time() - t0:.1f}s", flush=True)


def preflight(cfg: RunConfig, data_task: str | None = None) -> dict[str, Any]:
    """Every check that needs no worker. Returns facts the summary uses (label counts; a regression
    data set's label statistics). ``data_task``: as in ``prepare_data_if_needed``."""
    task = data_task or cfg.model.task
    from ftdist.modeling import load_tokenizer, resolve_model_path

    from ftdist.lora import check_lora_config

    from ftdist.freezing import check_freeze

    check_lora_config(cfg.model, resolve_model_path(cfg.model.path, cfg.storage))
    check_freeze(cfg.model, cfg.train.freeze, resolve_model_path(cfg.model.path, cfg.storage))
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision,
                         cfg.storage)
    fp = tokenizer_fingerprint(tok)
    manifests = {}
    for split in ("train", "validation", "test"):
        uri = join_uri(cfg.data.path, split)
        m = manifests[split] = load_manifest(uri, cfg.storage)
        num_labels = cfg.model.num_labels or manifests["train"].num_labels
        check_compatible(m, uri, task, num_labels, fp)
        check_shards_present(m, uri, cfg.storage)
        if m.num_rows < cfg.scaling.num_workers:
            raise UserError(f"split '{uri}' has {m.num_rows} rows, fewer than scaling.num_workers="
                            f"{cfg.scaling.num_workers}; use fewer workers or more data")
    if cfg.data.replay is not None:
        from ftdist.data.replay import replay_manifests

        for path, m in zip(cfg.data.replay.paths, replay_manifests(
                cfg.data.replay, manifests["train"], cfg.model.task, cfg.model.num_labels or manifests["train"].num_labels,
                fp, cfg.storage)):
            check_shards_present(m, join_uri(path, "train"), cfg.storage)
    if task == "sequence-classification":  # a weight list that does not fit the data set: one line now
        class_weights(cfg.train.class_weights, manifests["train"].label_counts,
                      cfg.model.num_labels or manifests["train"].num_labels or 0)
    train = manifests["train"]
    return {"label_counts": {s: m.label_counts for s, m in manifests.items()},
            "label_stats": {s: m.label_stats for s, m in manifests.items()},
            "token_lengths": {**train.token_lengths.model_dump(), "rows": train.num_rows, "max_length": train.max_length}
            if train.token_lengths else None,
            "rows": {s: m.num_rows for s, m in manifests.items()}}


def check_run_folder(cfg: RunConfig) -> str:
    """'new', 'resume' or 'completed'; refuse a folder that another config made."""
    run_uri = cfg.run_uri()
    marker = join_uri(run_uri, layout.RUN_MARKER)
    if not storage.exists(marker, cfg.storage):
        if [n for n in storage.listdir(run_uri, cfg.storage) if not n.startswith(layout.LEASE)]:
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
        return "completed"  # the caller reads the summary (read_json: a corrupt one is one line)
    check_resize(info, cfg, run_uri)
    return "resume"


def check_resize(info: dict[str, Any], cfg: RunConfig, run_uri: str) -> None:
    """Say when a run resumes on another number of workers; refuse it where it is not supported.

    A single-task run is re-planned by the workers (``loop.resume_on_another_size``: ZeRO state
    re-partitioned through a universal checkpoint, the interrupted epoch's remaining samples spread
    over the new ranks). A multi-task run keeps one stream position per task and rank, which is not
    re-planned yet: resuming it on another size would repeat and skip samples."""
    saved = info.get("num_workers")
    if saved is None or saved == cfg.scaling.num_workers:
        return
    if cfg.tasks or cfg.data.replay is not None:
        what = "a multi-task run" if cfg.tasks else "a run with data.replay"  # per-source positions: not re-planned
        raise UserError(f"run folder '{run_uri}' was started with {saved} worker(s) and this config asks for "
                        f"{cfg.scaling.num_workers} worker(s); {what} resumes only on the number of "
                        f"workers it started with: set scaling.num_workers={saved}, or use a new run.name")
    print(f"[ftdist] run '{cfg.run.name}' was started on {saved} worker(s), resuming on {cfg.scaling.num_workers}: "
          f"its latest checkpoint is re-partitioned for the new size", flush=True)


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


@contextlib.contextmanager
def unreachable_storage_is_a_user_error() -> Iterator[None]:
    """Before a run starts, storage that never answers is most likely a wrong endpoint (exit 2);
    once it has started, the same failure is an outage (exit 1, rerun to resume)."""
    try:
        yield
    except StorageUnavailable as e:
        raise UserError(str(e).replace("storage unavailable:", "storage unreachable:", 1)) from None
