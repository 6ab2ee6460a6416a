"""Loading a model and its tokenizer for a task, from a hub id, a local folder, ``pkg://`` or object storage."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from ftdist import storage
from ftdist.config import ModelSection, StorageSection
from ftdist.redaction import redact_uri
from ftdist.errors import UserError
from ftdist.export_files import EXPORT_MARKER, listed_files, mismatches
from ftdist.tasks import auto_model_class

log = logging.getLogger(__name__)
COMPLETE_MARKER = ".ftdist-complete"
CACHE_DIR = os.environ.get("FTDIST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ftdist"))


def resolve_model_path(path: str, cfg: StorageSection | None = None) -> str:
    """A path ``from_pretrained`` can load: remote URIs are fetched into a local cache, once per node and
    version (the cache is keyed by the URI *and* its content, so a replaced export is fetched anew)."""
    if storage.is_remote(path):
        return _cached_remote_model(path, cfg or StorageSection())
    if path.startswith(("pkg://", "file://")) or os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        local = storage.local_path(path)
        if not os.path.isdir(local):
            raise UserError(f"model path '{path}' not found; give a local save_pretrained() folder, "
                            f"s3://bucket/prefix, pkg://package/folder or a hub id")
        return local
    return path  # a hub id; from_pretrained resolves it (offline: from the HF cache only)


class _VersionChanged(Exception):
    """The remote folder changed while it was downloaded (a new version is being published)."""


@dataclasses.dataclass(frozen=True)
class RemoteVersion:
    """What identifies the content under a remote prefix now.

    An ftdist export names its files in its marker (``export_files``): the marker's text is the
    version and the list is what the download is checked against. Any other folder (a model a user
    uploaded) is identified by its listing: every object's path, size and ETag (or modification time)."""

    digest: str
    marker_text: str | None
    files: dict[str, dict[str, Any]] | None


def remote_version(path: str, cfg: StorageSection) -> RemoteVersion:
    """The current version of the folder at ``path`` (one GET of the marker, else one listing)."""
    fs, root = storage.filesystem(path, cfg)
    root = root.rstrip("/")

    def probe() -> RemoteVersion:
        try:
            text: str | None = fs.cat_file(f"{root}/{EXPORT_MARKER}").decode()
        except FileNotFoundError:
            text = None
        files = listed_files(text) if text is not None else None
        if text is not None and files is not None:
            return RemoteVersion(hashlib.sha256(text.encode()).hexdigest(), text, files)
        fs.invalidate_cache(root)
        try:
            entries = fs.find(root, detail=True)
        except FileNotFoundError:
            entries = {}
        listing = sorted((os.path.relpath(name, root), info.get("size"),
                          str(info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")))
                         for name, info in entries.items() if info.get("type") != "directory")
        if not listing:
            return RemoteVersion("", None, None)
        return RemoteVersion(hashlib.sha256(json.dumps(listing).encode()).hexdigest(), text, None)

    return storage.retrying(probe, path, "reading the model's version", cfg)


# How long a reader waits for an export that is being replaced to be complete again (a large model's
# upload takes minutes); a module setting so tests can shorten it.
PUBLISH_WAIT_S = 900.0


def _cached_remote_model(path: str, cfg: StorageSection) -> str:
    models = os.path.join(CACHE_DIR, "models")
    uri_key = hashlib.sha256(path.encode()).hexdigest()[:16]
    deadline = time.monotonic() + PUBLISH_WAIT_S
    delay = 0.5
    while True:
        version = remote_version(path, cfg)
        if not version.digest:  # before anything is written to the cache
            raise UserError(f"model '{redact_uri(path)}' does not exist (nothing under that prefix); "
                            f"check model.path (and storage.endpoint_url)")
        dest = os.path.join(models, f"{uri_key}-{version.digest[:16]}")
        if os.path.exists(os.path.join(dest, COMPLETE_MARKER)):
            return dest
        with _node_lock(os.path.join(models, uri_key + ".lock")):
            # Re-checked under the lock: another worker of this node may have finished meanwhile.
            if os.path.exists(os.path.join(dest, COMPLETE_MARKER)):
                return dest
            try:
                _download_model(path, dest, cfg, version)
            except _VersionChanged:
                if time.monotonic() > deadline:
                    raise UserError(f"model '{redact_uri(path)}' kept changing while it was downloaded for "
                                    f"{PUBLISH_WAIT_S:.0f} s (a new export being published?); rerun when the "
                                    f"upload has finished") from None
            else:
                _remove_other_versions(models, uri_key, keep=dest)
                return dest
        log.info("model '%s' is being replaced; reading it again in %.1f s", redact_uri(path), delay)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _remove_other_versions(models: str, uri_key: str, keep: str) -> None:
    """Older cached versions of the same URI (and partial downloads: we hold the node lock) go."""
    import shutil

    for name in os.listdir(models):
        full = os.path.join(models, name)
        if full != keep and (name == uri_key or name.startswith(uri_key + "-")) and os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)


@contextlib.contextmanager
def _node_lock(lock_path: str) -> Iterator[None]:
    """An exclusive lock among the processes of this node (``flock`` on a file next to the cache entry).

    Why: workers sharing a node start together with a cold cache; without it each downloaded the
    model and replaced the folder another worker was already loading from."""
    import fcntl

    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_model(path: str, dest: str, cfg: StorageSection, version: RemoteVersion) -> None:
    """Fetch ``version`` of ``path`` into a private folder, check it, and publish it at ``dest`` in one rename.

    Called under the node lock; a folder at ``dest`` without the complete marker is what a crashed
    download left behind, never a folder anyone loads from, so removing it is safe. Raises
    _VersionChanged when what arrived is not ``version`` (a new export is being uploaded)."""
    import shutil

    tmp = f"{dest}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if version.files is not None and version.marker_text is not None:
            _download_listed(path, tmp, cfg, version.files)
            with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
                f.write(version.marker_text)
            if mismatches(tmp, version.files):
                raise _VersionChanged()
        else:
            storage.download_dir(path, tmp, cfg)
            if remote_version(path, cfg).digest != version.digest:
                raise _VersionChanged()
        if not os.path.exists(os.path.join(tmp, "config.json")) and not os.path.exists(
                os.path.join(tmp, "tokenizer_config.json")):
            raise UserError(f"model '{redact_uri(path)}' has no config.json/tokenizer_config.json; "
                            f"point model.path at a save_pretrained() folder")
        open(os.path.join(tmp, COMPLETE_MARKER), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_listed(path: str, local_dir: str, cfg: StorageSection, files: dict[str, dict[str, Any]]) -> None:
    """Exactly the files an export's marker lists (a file gone meanwhile means a new version is coming)."""
    fs, root = storage.filesystem(path, cfg)
    root = root.rstrip("/")

    def get() -> None:
        for rel in files:
            target = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fs.get_file(f"{root}/{rel}", target)
            except FileNotFoundError:
                raise _VersionChanged() from None

    storage.retrying(get, path, "downloading", cfg)


def _hub_error(path: str, e: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "this machine is offline (HF_HUB_OFFLINE=1): use a local folder or s3:// copy" if offline else \
        "check the hub id, or use a local folder / s3:// copy"
    return UserError(f"cannot load model/tokenizer '{path}' ({type(e).__name__}); {hint}")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None,
                   cfg: StorageSection | None = None) -> Any:
    """A fast tokenizer; GPT-style tokenizers without a pad token pad with EOS (masked out anyway)."""
    from transformers import AutoTokenizer

    local = resolve_model_path(path, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(local, use_fast=True, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer '{path}' has neither a pad nor an eos token; add one to the tokenizer")
        tok.pad_token = tok.eos_token
    return tok


def load_model(m: ModelSection, num_labels: int | None, label_names: list[str] | None, pad_token_id: int,
               cfg: StorageSection | None = None, zero3_config: dict[str, Any] | None = None) -> Any:
    """The HF model for ``m.task``, fp32 master weights (mixed precision is applied by autocast),
    wrapped with LoRA adapters when ``model.lora`` is set.

    With ``zero3_config`` (the run's DeepSpeed config, ZeRO-3) the model is built and loaded straight
    into partitions (transformers' DeepSpeed integration: ``zero.Init`` while constructing, each
    weight gathered, filled and re-partitioned while loading), so no rank ever holds the whole model."""
    from transformers import AutoConfig

    local = resolve_model_path(m.path, cfg)
    kw: dict[str, Any] = {"trust_remote_code": m.trust_remote_code, "revision": m.revision}
    try:
        config = AutoConfig.from_pretrained(local, **kw)
    except (OSError, ValueError) as e:
        raise _hub_error(m.path, e) from None
    config.pad_token_id = pad_token_id if getattr(config, "pad_token_id", None) is None else config.pad_token_id
    if m.task == "sequence-classification":
        if num_labels is None:
            raise UserError("model.num_labels is not set and the data set names no labels; set model.num_labels")
        names = label_names or [str(i) for i in range(num_labels)]
        config.num_labels = num_labels
        config.id2label = {i: n for i, n in enumerate(names)}
        config.label2id = {n: i for i, n in enumerate(names)}
    cls = auto_model_class(m.task)
    try:
        with partitioned_construction(zero3_config):
            model = _load_with_attention(cls, local, config, m.attn_implementation, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{m.path}' for task {m.task}: {str(e).splitlines()[0][:160]}") from None
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if m.lora is not None:
        from ftdist.lora import apply_lora

        model = apply_lora(model, m.lora, m.task, m.path, checkpointing=m.gradient_checkpointing)
    return model


@contextlib.contextmanager
def partitioned_construction(zero3_config: dict[str, Any] | None) -> Iterator[None]:
    """Inside: transformers builds models under ``deepspeed.zero.Init`` and loads weights partition by
    partition. The switch is process-wide (a weak reference transformers keeps), so it is turned off
    on the way out: a model built later in this process (the merged LoRA export) is a plain one."""
    if zero3_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(zero3_config)  # noqa: F841 - alive only while this block runs
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def supported_attention(model_cls: Any, config: Any, requested: str | None) -> tuple[str | None, str | None]:
    """(the attention implementation to load with, a one-line warning or None), decided from what the
    architecture declares (transformers' ``_supports_flash_attn`` / ``_supports_sdpa`` class flags) and
    what this machine has (flash-attn installed and a GPU it supports), before anything is loaded.

    The README's fallbacks: flash_attention_2 -> sdpa, and sdpa -> the model's default (eager) for an
    architecture without an SDPA path. Why not refuse: the same config then runs on a laptop and on a
    GPU cluster, only slower where flash-attn is absent."""
    from transformers.utils import is_flash_attn_2_available

    mapping = getattr(model_cls, "_model_mapping", None)  # an Auto class: the concrete class for this config
    concrete = mapping[type(config)] if mapping is not None and type(config) in mapping else model_cls
    name = concrete.__name__
    attn, warning = requested, None
    if attn == "flash_attention_2":
        if not is_flash_attn_2_available():
            attn, warning = "sdpa", ("model.attn_implementation=flash_attention_2 needs the flash-attn package and a "
                                     "GPU it supports, not found here; using sdpa (pip install flash-attn on GPU nodes)")
        elif not getattr(concrete, "_supports_flash_attn", False):
            attn, warning = "sdpa", f"{name} has no flash_attention_2 path; using sdpa"
    if attn == "sdpa" and not getattr(concrete, "_supports_sdpa", False):
        reason = f"{name} has no sdpa path; using its default attention"
        attn, warning = None, f"{warning.rsplit(';', 1)[0]}, and {reason}" if warning else reason
    return attn, warning


def _load_with_attention(cls: Any, local: str, config: Any, requested: str | None, **kw: Any) -> Any:
    """Load once, with the attention :func:`supported_attention` picks (its warning logged once)."""
    attn, warning = supported_attention(cls, config, requested)
    if warning:
        log.warning(warning)
    extra = {"attn_implementation": attn} if attn else {}
    try:
        return _from_pretrained_quietly(cls, local, config=config, **extra, **kw)
    except ImportError as e:
        raise ValueError(str(e)) from None  # a missing package: one line via the caller


# Top-level modules that fine-tuning adds on purpose (HF's task heads): starting them from random
# weights is expected. Anything else missing from the checkpoint means the wrong model was given.
TASK_HEADS = ("classifier", "pre_classifier", "score", "lm_head", "qa_outputs", "cls")  # cls: BERT's masked-LM head


def _from_pretrained_quietly(cls: Any, local: str, **kw: Any) -> Any:
    """``from_pretrained`` without transformers' per-load report and progress bar (which every worker
    prints, and which flags the new task head as if it were a problem); warns only when weights
    outside the task head are missing from the checkpoint."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # A classifier continued from another classifier's export (a sequence of tasks) finds a head of
        # another size there: that head starts new, as from a pre-trained model; any other mismatch is refused.
        model, info = cls.from_pretrained(local, output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    mismatched = [str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or []]
    wrong = [k for k in mismatched if k.split(".")[0] not in TASK_HEADS]
    if wrong:
        raise ValueError(f"the checkpoint's {wrong[0]} has another shape than this model's (the config and the weights "
                         f"of {local} disagree)")
    if mismatched:
        log.info("task head of another size in the checkpoint, initialised new: %s", ", ".join(mismatched))
    missing = sorted(info.get("missing_keys") or [])
    # BERT's pooler is trained only by next-sentence prediction or a classification head: a masked-LM
    # model has none (ftdist's masked-LM export carries the base model's, export.carry_base_pooler; one
    # made elsewhere may lack it), and a base without one is no sign of the wrong model.
    foreign = [k for k in missing if k.split(".")[0] not in TASK_HEADS and ".pooler." not in f".{k}"]
    if foreign:
        log.warning("%d weight(s) are not in the checkpoint at %s and start random (%s%s); is model.path the "
                    "pre-trained model you meant?", len(foreign), local, ", ".join(foreign[:4]),
                    ", ..." if len(foreign) > 4 else "")
    elif missing and _first_rank():  # the same on every rank: said once
        log.info("[ftdist] new task head initialised: %s", ", ".join(missing))
    return model


def _first_rank() -> bool:
    """Rank 0 of the worker group, or a process outside one."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
