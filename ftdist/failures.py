"""Failure -> message: what a failed Ray Train run tells the user, in one line.

Ray wraps what a worker raised (``WorkerGroupError`` per rank, ``ControllerError``); these
functions walk the exception chain and recover ftdist's own errors (a user error raised on a
worker, a storage outage) or describe each failed rank. Pure: no Ray import, unit-tested on
exception chains built the way Ray builds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ftdist.redaction import redact_uri
from ftdist.errors import UserError
from ftdist.storage import classify


def error_line_from_ray(exc: BaseException, error_class: str) -> str | None:
    """The one line of an ftdist error named ``error_class`` that a worker raised: Ray wraps it and
    keeps only the remote traceback's text, so it is found there by its class name."""
    text = "\n".join(str(e) for e in _exc_chain(exc))
    m = re.search(rf"{error_class}: (.+)", text)
    return m.group(1).strip() if m else None


def user_error_from_ray(exc: BaseException) -> UserError | None:
    """A UserError raised inside a worker, as a UserError again."""
    line = error_line_from_ray(exc, "UserError")
    return UserError(line) if line is not None else None


def storage_outage_from_ray(exc: BaseException) -> str | None:
    """A worker's StorageUnavailable (storage down beyond the retry budget): its line."""
    return error_line_from_ray(exc, "StorageUnavailable")


def diverged_loss_from_ray(exc: BaseException) -> str | None:
    """A worker's LossDiverged (NaN or infinite training loss): its line."""
    return error_line_from_ray(exc, "LossDiverged")


def memory_limit_from_ray(exc: BaseException) -> str | None:
    """A worker's MemoryLimitExceeded (scaling.enforce_memory_limit): its line."""
    return error_line_from_ray(exc, "MemoryLimitExceeded")


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
        stack += [x for x in (e.__cause__, e.__context__) if x is not None] + list(getattr(e, "exceptions", []) or [])
        stack += [v for v in getattr(e, "worker_failures", {}).values()] if isinstance(
            getattr(e, "worker_failures", None), dict) else []
