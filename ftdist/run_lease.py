"""One driver per run folder: a lease file the driver creates atomically and renews while it runs.

Why: two drivers on one run folder (a job retried while the first still runs, the same command in two
terminals) both trained into it, interleaving checkpoints and the exactly-once records. The lease is
created with an exclusive create (a hard link on local disk; a conditional PUT, ``If-None-Match: *``,
on S3) and replaced only by a compare-and-swap (under ``flock`` on local disk; ``If-Match`` on S3), renewed every ``RENEW_S`` seconds and deleted when the driver ends. A second driver that finds a
live lease refuses in one line. A lease whose driver was killed is taken over once it has expired (at
once when the holder was on this host and its process is gone, as after Ctrl-C or a crash), so resumes
and restarted drivers keep working; a takeover on S3 is a conditional PUT on the stale lease's ETag, so
two drivers taking over at once cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import StorageSection
from ftdist.errors import UserError
from ftdist.redaction import redact_uri
from ftdist.uri import join_uri

log = logging.getLogger(__name__)
TTL_S = 45.0  # a killed driver's lease (on another host) is taken over this long after its last renewal
RENEW_S = 10.0


@dataclass
class _Seen:
    record: dict[str, Any]
    etag: str | None  # S3: the object's ETag (conditional takeover); local: None


@dataclass
class Lease:
    uri: str
    token: str
    cfg: StorageSection
    ttl: float
    etag: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _record(token: str, ttl: float) -> dict[str, Any]:
    now = time.time()
    return {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "renewed_at": now,
            "expires_at": now + ttl}


def _precondition_failed(exc: BaseException) -> bool:
    return storage.has_error_code(exc, {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def _read(uri: str, cfg: StorageSection) -> _Seen | None:
    fs, path = storage.filesystem(uri, cfg)
    if not storage.is_remote(uri):
        try:
            with open(path) as f:
                return _Seen(json.load(f), None)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return _Seen({}, None)  # unreadable: treated as expired (created atomically, so never half-written)

    def get() -> _Seen | None:
        try:
            etag = str(fs.info(path, refresh=True).get("ETag"))
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return _Seen(json.loads(data), etag)
        except json.JSONDecodeError:
            return _Seen({}, etag)

    return storage.retrying(get, uri, "reading the run's lease", cfg)


def _put(uri: str, cfg: StorageSection, record: dict[str, Any], replacing: _Seen | None) -> str | None | bool:
    """Write the lease only if nobody changed it since ``replacing`` was read (None: only if absent).
    Returns False when someone else won, else the new ETag (S3) or None (local)."""
    fs, path = storage.filesystem(uri, cfg)
    data = json.dumps(record).encode()
    if not storage.is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            if replacing is None:
                try:
                    os.link(tmp, path)  # fails if the lease exists: an exclusive create with its content
                except FileExistsError:
                    return False
                return None
            import fcntl

            with open(f"{path}.lock", "a") as lock:  # compare-and-swap among this host's processes
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = _read(uri, cfg)
                if current is None or current.record != replacing.record:
                    return False
                os.replace(tmp, path)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def put() -> str | bool:
        cond = {"IfNoneMatch": "*"} if replacing is None else {"IfMatch": replacing.etag}
        try:
            out = fs.pipe_file(path, data, **cond)
        except Exception as exc:  # noqa: BLE001 - a lost race is an answer, anything else is retried/raised
            if _precondition_failed(exc):
                return False
            raise
        return str((out or {}).get("ETag") or fs.info(path, refresh=True).get("ETag"))

    return storage.retrying(put, uri, "writing the run's lease", cfg)


def _holder_gone(record: dict[str, Any]) -> bool:
    """True when the lease is expired, or its driver ran on this host and its process no longer exists."""
    if not record or float(record.get("expires_at", 0)) < time.time():
        return True
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def acquire(run_uri: str, cfg: StorageSection, ttl: float = TTL_S) -> Lease:
    """Hold the run folder's lease (a UserError naming the holder if another driver holds it)."""
    uri = join_uri(run_uri, layout.LEASE)
    token = uuid.uuid4().hex
    for _ in range(5):  # a lost race means someone else holds it now: re-read and decide again
        seen = _read(uri, cfg)
        if seen is not None and not _holder_gone(seen.record):
            r = seen.record
            left = max(0, float(r.get("expires_at", 0)) - time.time())
            raise UserError(
                f"run folder '{redact_uri(run_uri)}' is in use by another ftdist driver (host {r.get('host')}, "
                f"pid {r.get('pid')}); wait for it to end, or set run.name to train a new run (a killed driver's "
                f"lease expires {ttl:.0f} s after its last renewal: {left:.0f} s from now)")
        if seen is not None and seen.record.get("host"):
            log.warning("taking over the lease of run folder %s from a driver that is gone (host %s, pid %s)",
                        redact_uri(run_uri), seen.record.get("host"), seen.record.get("pid"))
        etag = _put(uri, cfg, _record(token, ttl), seen)
        if etag is not False:
            lease = Lease(uri, token, cfg, ttl, etag if isinstance(etag, str) else None)
            lease.thread = threading.Thread(target=_renew_loop, args=(lease,), name="ftdist-lease", daemon=True)
            lease.thread.start()
            return lease
    raise UserError(f"run folder '{redact_uri(run_uri)}' is contended by other ftdist drivers; run one at a time")


def _renew_loop(lease: Lease) -> None:
    while not lease.stop.wait(RENEW_S):
        try:
            seen = _read(lease.uri, lease.cfg)
            if seen is None or seen.record.get("token") != lease.token:
                log.error("the lease of %s was taken by another driver; this driver's checkpoints may now "
                          "interleave with it", redact_uri(lease.uri))
                return
            etag = _put(lease.uri, lease.cfg, _record(lease.token, lease.ttl), seen)
            if isinstance(etag, str):
                lease.etag = etag
        except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; the lease lasts TTL_S
            log.warning("could not renew the lease of %s: %s", redact_uri(lease.uri), type(exc).__name__)


def release(lease: Lease) -> None:
    """Stop renewing and delete the lease if it is still ours."""
    lease.stop.set()
    if lease.thread is not None:
        lease.thread.join(timeout=RENEW_S + 5)
    with contextlib.suppress(Exception):
        seen = _read(lease.uri, lease.cfg)
        if seen is not None and seen.record.get("token") == lease.token:
            storage.remove(lease.uri, lease.cfg)
    if not storage.is_remote(lease.uri):  # a run refused after taking the lease leaves no empty folder
        path = storage.local_path(lease.uri)
        with contextlib.suppress(OSError):
            os.remove(f"{path}.lock")
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))


@contextlib.contextmanager
def held(run_uri: str, cfg: StorageSection) -> Iterator[Lease]:
    """The run folder's lease for the duration of the block."""
    lease = acquire(run_uri, cfg)
    try:
        yield lease
    finally:
        release(lease)
