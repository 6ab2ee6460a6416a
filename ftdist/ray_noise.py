"""Lines Ray's processes print that say nothing to an ftdist user, kept out of the driver's output.

Ray forwards every line its worker processes write to the driver. A few of Ray's own are printed on
every run and are not about the run: the ``PreemptionWatcher`` actor's "constructor arguments in the
object store" E-line (Ray Train creates that actor itself), and Train's ``PlacementGroupCleaner``
saying it cannot query the controller while the State API starts, and the raylet's warning that
many worker processes start at once (a sweep's trials each start a Train controller and workers). A
user reads them as errors.

The filter wraps the handler Ray installs on its log dispatcher (``ray._private``, so every access is
guarded: with another Ray the lines simply come through). Only whole lines that match the patterns
below are dropped; a worker's other lines, and these when Ray words them differently, pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: Ray's own lines that every run prints and that ask nothing of the user (patterns, searched per line).
BENIGN = (
    re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
    re.compile(r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"),
    # the raylet, when a sweep's trials start their Train controllers and workers together: the number of
    # processes is the trials' (each trial's controller and workers), nothing the user can change
    re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node: \S+ with address: \S+, which is "
               r"\d+x the maximum expected startup concurrency"),
)

_HANDLER = "ray_print_logs"  # the name ray._private.worker gives the handler that prints forwarded lines


def is_benign(line: str) -> bool:
    return any(p.search(line) for p in BENIGN)


def filtered(handler: Callable[..., None]) -> Callable[..., None]:
    """``handler`` for a batch of forwarded lines, without the benign ones (nothing at all if none is left)."""

    def handle(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = data.get("lines")
        if isinstance(lines, list):
            kept = [line for line in lines if not (isinstance(line, str) and is_benign(line))]
            if not kept and lines:
                return
            data = {**data, "lines": kept}
        handler(data, *args, **kwargs)

    handle.ftdist_filtered = True  # type: ignore[attr-defined]
    return handle


def quiet_ray_noise() -> bool:
    """Wrap the driver's print handler once (after ``ray.init`` installed it), and the function that
    prints the raylet's messages; False where this Ray has no such handler (then nothing changes)."""
    _wrap_error_printer()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handlers = getattr(dispatcher, "handlers", None)
    lock = getattr(dispatcher, "_lock", None)
    if not isinstance(handlers, list) or lock is None:
        return False
    with lock:
        found = False
        for i, (name, handler) in enumerate(list(dispatcher.handlers)):
            if name == _HANDLER:
                found = True
                if not getattr(handler, "ftdist_filtered", False):
                    dispatcher.handlers[i] = (name, filtered(handler))
    return found


def _wrap_error_printer() -> None:
    """The raylet's messages (published through the GCS) reach the driver by another path than the
    workers' lines: ``ray._private.worker.listen_error_messages`` hands them to the module's
    ``print_to_stdstream``, looked up at each call, so a wrapped one filters them too."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if callable(printer) and not getattr(printer, "ftdist_filtered", False):
        ray_worker.print_to_stdstream = filtered(printer)
