"""Every access to a URI goes through here: local paths, ``s3://`` (any S3-compatible endpoint),
any other fsspec URL, and ``pkg://python_package/sub/path`` (files a PyPI package ships).

The rest of ftdist passes URIs plus the ``storage`` config section, never credentials. Credentials
come from the standard AWS chain (environment incl. ``AWS_ENDPOINT_URL``, profiles, web identity /
IRSA, instance roles) or from ``storage.options`` whose values may be ``${env:NAME}`` references,
resolved here, at the last moment, in the process that opens the filesystem.

Transient errors (5xx, throttling, timeouts, connection resets) are retried with exponential
backoff inside ``storage.retries`` / ``storage.retry_budget_s``; then, like every permanent
error (missing object, access denied), they become a one-line :class:`UserError` naming the URI.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from ftdist.config import StorageSection
from ftdist.redaction import redact_uri, resolve_env_refs
from ftdist.errors import StorageUnavailable, UserError
from ftdist.uri import join_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "AllAccessDisabled"}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith(("file://", "pkg://"))


def resolve_pkg(uri: str) -> str:
    """``pkg://module/sub/path`` -> the local path inside the installed package ``module``."""
    rest = uri[len("pkg://"):]
    module, _, sub = rest.partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{uri}': Python package '{module}' is not installed; pip install it "
                        f"(the demo's packages: make install)")
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


def local_path(uri: str) -> str:
    """The local filesystem path of a non-remote URI (``pkg://``, ``file://`` or a plain path)."""
    if uri.startswith("pkg://"):
        return resolve_pkg(uri)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return os.path.expanduser(uri)


def _s3_kwargs(cfg: StorageSection, client_retries: bool) -> dict[str, Any]:
    opts = resolve_env_refs(dict(cfg.options))
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    config_kwargs = dict(opts.pop("config_kwargs", {}) or {})
    config_kwargs.setdefault("connect_timeout", 5)
    config_kwargs.setdefault("read_timeout", 60)
    # One retry layer per access path. ftdist's own calls go through `retrying` below (budget-bounded,
    # logged, classified), so botocore's retries are off there (one attempt per call) and s3fs's are
    # switched off where the filesystem is built: nested, the layers multiplied (storage.retries: 2
    # meant 12 requests to a failing endpoint). Ray's controller reads and writes the run folder through
    # its own pyarrow filesystem, which `retrying` cannot wrap: there botocore retries (standard mode).
    attempts = cfg.retries + 1 if client_retries else 1
    config_kwargs.setdefault("retries", {"total_max_attempts": attempts, "mode": "standard"})
    return {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs,
            "skip_instance_cache": True, **opts}


@functools.lru_cache(maxsize=16)
def _cached_fs(protocol: str, cfg_json: str, client_retries: bool = False) -> fsspec.AbstractFileSystem:
    cfg = StorageSection.model_validate_json(cfg_json)
    if protocol in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", **_s3_kwargs(cfg, client_retries))
        fs.retries = 1  # s3fs's own loop (a class attribute, not a constructor option): one attempt
        return fs
    return fsspec.filesystem(protocol, **resolve_env_refs(dict(cfg.options)))


def filesystem(uri: str, cfg: StorageSection) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(local_path(uri))
    protocol, _, path = uri.partition("://")
    return _cached_fs(protocol, cfg.model_dump_json()), path


def pyarrow_filesystem(uri: str, cfg: StorageSection) -> tuple[Any, str]:
    """(pyarrow FileSystem, path) for Ray's ``RunConfig(storage_filesystem=..., storage_path=...)``."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), filesystem(uri, cfg)[1]
    protocol, _, path = uri.partition("://")
    fs = _cached_fs(protocol, cfg.model_dump_json(), client_retries=True)  # Ray's calls: see _s3_kwargs
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------
# Errors and retries


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = str(err.get("Code", "")) or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code
    return ""


def has_error_code(exc: BaseException, codes: set[str]) -> bool:
    """Whether ``exc`` or an exception it was raised from carries one of the S3 error ``codes``."""
    return any(_error_code(e) in codes for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def classify(exc: BaseException) -> str:
    """'missing', 'denied', 'transient' or 'other' for an exception raised by a storage call."""
    for e in _chain(exc):
        code = _error_code(e)
        if code in _DENIED_CODES or isinstance(e, PermissionError):
            return "denied"
        if code in ("NoSuchBucket", "NoSuchKey", "404") or isinstance(e, FileNotFoundError):
            return "missing"
        if code in _TRANSIENT_CODES:
            return "transient"
        name = type(e).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ResponseStreamingError",
                    "IncompleteReadError", "ProtocolError", "ServerTimeoutError") or isinstance(
                e, (ConnectionError, TimeoutError)):
            return "transient"
    return "other"


def user_error_for(exc: BaseException, uri: str, action: str) -> UserError:
    kind = classify(exc)
    uri = redact_uri(uri)
    if kind == "denied":
        return UserError(f"access denied to '{uri}' while {action}; check the credentials "
                         f"(AWS_* environment, profile, IRSA role) and the bucket policy")
    if kind == "missing":
        return UserError(f"'{uri}' does not exist ({action}); check the URI")
    if kind == "transient":
        return UserError(f"storage unreachable or failing for '{uri}' while {action} after retries "
                         f"({type(exc).__name__}); check the endpoint (storage.endpoint_url / AWS_ENDPOINT_URL) "
                         f"and retry; storage.retry_budget_s sets how long ftdist waits")
    return UserError(f"storage error on '{uri}' while {action}: {type(exc).__name__}: {redact_uri(str(exc))[:200]}")


def retrying(fn: Callable[[], T], uri: str, action: str, cfg: StorageSection) -> T:
    """Run ``fn`` retrying transient storage errors with jittered exponential backoff, bounded
    by ``cfg.retries`` attempts and ``cfg.retry_budget_s`` seconds; then fail naming ``uri``."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as a UserError or as is
            kind = classify(exc)
            elapsed = time.monotonic() - start
            if kind == "transient" and attempt < cfg.retries and elapsed < cfg.retry_budget_s:
                delay = min(2.0 ** attempt * 0.5, 10.0, max(cfg.retry_budget_s - elapsed, 0.1))
                delay *= 0.5 + random.random() / 2
                log.warning("transient storage error on %s (%s), retry %d/%d in %.1fs", redact_uri(uri),
                            type(exc).__name__, attempt + 1, cfg.retries, delay)
                time.sleep(delay)
                attempt += 1
                continue
            if kind == "other":
                raise
            if kind == "transient":
                raise StorageUnavailable(
                    f"storage unavailable: '{redact_uri(uri)}' failed while {action} after {attempt} retries in "
                    f"{elapsed:.0f}s ({type(exc).__name__}); check the S3 service and storage.endpoint_url / "
                    f"AWS_ENDPOINT_URL, then rerun the same command to resume") from None
            raise user_error_for(exc, uri, action) from None


# ---------------------------------------------------------------------------------------------
# Operations (all by URI)


def exists(uri: str, cfg: StorageSection) -> bool:
    fs, path = filesystem(uri, cfg)
    return retrying(lambda: fs.exists(path), uri, "checking it exists", cfg)


def read_bytes(uri: str, cfg: StorageSection) -> bytes:
    fs, path = filesystem(uri, cfg)
    return retrying(lambda: fs.cat_file(path), uri, "reading", cfg)


def read_text(uri: str, cfg: StorageSection) -> str:
    return read_bytes(uri, cfg).decode()


def write_bytes(uri: str, data: bytes, cfg: StorageSection) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic);
    object stores publish a PUT atomically anyway."""
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    retrying(lambda: fs.pipe_file(path, data), uri, "writing", cfg)


def write_text(uri: str, text: str, cfg: StorageSection) -> None:
    write_bytes(uri, text.encode(), cfg)


def listdir(uri: str, cfg: StorageSection) -> list[str]:
    """Names (not paths) directly under ``uri``; empty if it does not exist."""
    fs, path = filesystem(uri, cfg)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False, refresh=True) if is_remote(uri) else fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

    return retrying(ls, uri, "listing", cfg)


def download_dir(uri: str, local_dir: str, cfg: StorageSection) -> str:
    """Copy a folder to ``local_dir`` (returned). Local sources are copied too, so callers may modify."""
    fs, path = filesystem(uri, cfg)
    os.makedirs(local_dir, exist_ok=True)
    if not is_remote(uri):
        if not os.path.isdir(path):
            raise UserError(f"'{redact_uri(uri)}' is not a folder; check the URI")
        shutil.copytree(path, local_dir, dirs_exist_ok=True)
        return local_dir

    def get() -> None:
        files = [f for f in fs.find(path) if not f.endswith("/")]
        if not files:
            raise FileNotFoundError(uri)
        for f in files:
            rel = os.path.relpath(f, path)
            dest = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(f, dest)

    retrying(get, uri, "downloading", cfg)
    return local_dir


def upload_dir(local_dir: str, uri: str, cfg: StorageSection, last: str | None = None) -> None:
    """Publish a local folder at ``uri`` so readers never see it half-written.

    Local: copy to a sibling temp folder, then exchange it with the old folder in one atomic rename
    (Linux ``renameat2``), so a reader sees the old folder or the new one, never none. Object stores
    have no rename, so the file named ``last`` (a completion marker such as a manifest) is uploaded only
    after every other file, and (with ``last``) files of the previous version that the new one lacks are
    removed after it; readers check the marker (model exports also list their files in it: ``export_files``).
    """
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        swap_in_local_dir(tmp, path)
        return
    root = path.rstrip("/")
    # Only a versioned publish (one with a completion marker: exports, data splits) replaces the folder's
    # content; without one (TensorBoard's event files) files of earlier processes stay.
    before = set(retrying(lambda: _relative_files(fs, root), uri, "listing", cfg)) if last is not None else set()
    files = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*") if p.is_file())
    if last in files:
        files.remove(last)
        files.append(last)
    for rel in files:
        dest = f"{root}/{rel}"
        src = os.path.join(local_dir, rel)
        retrying(lambda: fs.put_file(src, dest), f"{uri.rstrip('/')}/{rel}", "uploading", cfg)
    stale = sorted(before - set(files))
    if stale:
        retrying(lambda: fs.rm([f"{root}/{rel}" for rel in stale]), uri, "removing the previous version's files", cfg)


def _relative_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Paths of every object under the remote prefix ``root``, relative to it, fresh (no listing cache)."""
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
        return sorted(str(f)[len(root) + 1:] for f in fs.find(root) if not str(f).endswith("/"))
    except FileNotFoundError:
        return []


def swap_in_local_dir(new: str, path: str) -> None:
    """Put the local folder ``new`` at ``path`` atomically, removing what was there.

    Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the two in one step; elsewhere (or on filesystems
    without it) two renames, which leave a moment with no folder at ``path``."""
    if os.path.exists(path) and _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
        return
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(new, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(staged: str, uri: str, cfg: StorageSection, last: str) -> None:
    """Put the complete folder ``staged`` (written beside ``uri``) in the place of ``uri``.

    Why: a rerun that fails must leave the previous folder as it was, so the new one is written
    aside and only a complete one replaces it. Local: one atomic exchange (:func:`swap_in_local_dir`;
    a file or link at ``uri``: renamed away first). Object stores have no rename: the old completion
    marker ``last`` is deleted first (readers then see the folder as incomplete), the staged
    objects are copied over server-side, objects the new folder lacks are deleted, ``last`` is
    copied after every other object, and the staged prefix is removed.
    """
    fs, path = filesystem(uri, cfg)
    src = filesystem(staged, cfg)[1]
    if not is_remote(uri):
        if not os.path.lexists(path) or os.path.isdir(path) and not os.path.islink(path):
            swap_in_local_dir(src, path)
            return
        old = None
        if os.path.lexists(path):
            old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(src, path)
        if old and os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        elif old:
            os.remove(old)
        return

    new = retrying(lambda: _relative_files(fs, src), staged, "listing", cfg)
    old_names = retrying(lambda: _relative_files(fs, path), uri, "listing", cfg)
    if last in old_names:
        retrying(lambda: fs.rm_file(f"{path}/{last}"), join_uri(uri, last), "removing", cfg)
    for rel in [n for n in new if n != last]:
        retrying(lambda: fs.copy(f"{src}/{rel}", f"{path}/{rel}"), join_uri(uri, rel), "writing", cfg)
    for rel in sorted(set(old_names) - set(new)):
        retrying(lambda: fs.rm_file(f"{path}/{rel}"), join_uri(uri, rel), "removing", cfg)
    if last in new:
        retrying(lambda: fs.copy(f"{src}/{last}", f"{path}/{last}"), join_uri(uri, last), "writing", cfg)
    remove(staged, cfg)


def remove(uri: str, cfg: StorageSection) -> None:
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return

    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    retrying(rm, uri, "removing", cfg)
