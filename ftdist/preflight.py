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
from ftdist.config import RunConfig, StorageSection, config_record, dump_config
from ftdist.data.naming import CONFIG_KEYS, named_as
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

    _check_run_max_length(cfg, cfg.data.max_length, f"data.max_length {cfg.data.max_length}",
                          "set data.max_length to {limit} or less")
    print(f"[ftdist] preparing data set {cfg.data.path} from {cfg.data.prepare.input}", flush=True)
    t0 = time.time()
    with named_as(CONFIG_KEYS):  # errors name the config keys the user wrote, not data prepare's flags
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
    train = manifests["train"]
    if train.max_length:  # token ids: rows are as long as the preparation allowed
        _check_run_max_length(cfg, train.max_length, f"data set '{cfg.data.path}' holds rows of up to "
                              f"{train.max_length} tokens (prepared with --max-length/data.max_length "
                              f"{train.max_length}), which", "prepare it again with --max-length/data.max_length "
                              "{limit} or less")
    else:  # raw text: tokenized with data.max_length at read time
        _check_run_max_length(cfg, cfg.data.max_length, f"data.max_length {cfg.data.max_length}",
                              "set data.max_length to {limit} or less")
    if cfg.data.replay is not None:
        from ftdist.data.replay import replay_manifests

        for path, m in zip(cfg.data.replay.paths, replay_manifests(
                cfg.data.replay, manifests["train"], cfg.model.task, cfg.model.num_labels or manifests["train"].num_labels,
                fp, cfg.storage)):
            check_shards_present(m, join_uri(path, "train"), cfg.storage)
    if task == "sequence-classification":  # a weight list that does not fit the data set: one line now
        class_weights(cfg.train.class_weights, manifests["train"].label_counts,
                      cfg.model.num_labels or manifests["train"].num_labels or 0)
    return {"label_counts": {s: m.label_counts for s, m in manifests.items()},
            "label_stats": {s: m.label_stats for s, m in manifests.items()},
            "token_lengths": {**train.token_lengths.model_dump(), "rows": train.num_rows, "max_length": train.max_length}
            if train.token_lengths else None,
            "rows": {s: m.num_rows for s, m in manifests.items()}}


# Models whose position ids start after the padding index (padding_idx + 1, i.e. 2 with pad id 1):
# RoBERTa's max_position_embeddings 514 hold 512 tokens.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                            "roberta-prelayernorm", "longformer", "mpnet", "ibert", "markuplm"}


def position_limit(model_config: Any) -> tuple[int, str] | None:
    """Tokens per row the model can embed, and why (for the error line); None when its config sets no
    absolute limit (T5's relative positions). A longer row fails inside the first forward pass on
    every worker, and a rerun fails the same way: hence a check before Ray starts."""
    n = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(n, int) or not 0 < n < 10**7:
        return None
    why = f"max_position_embeddings {n}"
    if getattr(model_config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        offset = int(getattr(model_config, "pad_token_id", None) or 0) + 1
        return n - offset, f"{why}, less {offset}: its position ids start after the padding index"
    return n, why


def check_max_length(max_length: int, what: str, fix: str, model_path: str | None,
                     storage_cfg: StorageSection | None = None, trust_remote_code: bool = False,
                     revision: str | None = None) -> None:
    """Refuse rows longer than the model's positions in one line: ``what`` names the setting,
    ``fix`` says what to do (``{limit}`` is filled in). A model whose config cannot be read here
    (a tokenizer-only folder, an unreachable hub) is left to the later checks."""
    from transformers import AutoConfig

    from ftdist.modeling import resolve_model_path

    if model_path is None:
        return
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_path, storage_cfg),
                                            trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError):
        return
    limit = position_limit(config)
    if limit is not None and max_length > limit[0]:
        raise UserError(f"{what} is more than model '{model_path}' can read: {limit[0]} tokens ({limit[1]}); "
                        + fix.format(limit=limit[0]))


def _check_run_max_length(cfg: RunConfig, max_length: int, what: str, fix: str) -> None:
    check_max_length(max_length, what, fix, cfg.model.path, cfg.storage, cfg.model.trust_remote_code,
                     cfg.model.revision)


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
