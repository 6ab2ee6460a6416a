"""A worker process's host-memory policy: give freed memory back to the OS, and hold a memory limit.

Why the allocator setting: on a worker whose training state lives in host memory (a CPU run, or ZeRO
offload), glibc's malloc keeps freed blocks of up to 32 MB for reuse instead of returning them. ZeRO-3
gathers and releases each layer's parameters (4-16 MB tensors for a BERT-large layer) on every
forward and backward, and rank 0 reads the whole checkpoint while loading into partitions, so the
process kept ~1.7 GB it no longer used: on a 335M model, 2 CPU workers, ZeRO-3's peak RSS was
ZeRO-0's (bench/RESULTS.md). With blocks of 1 MB and more mapped on their own and unmapped on free,
the peak fell to 5.1 GB from 6.8 GB while ZeRO-0's live peak did not move. It is set only where a
run asked to save memory (ZeRO-3 or an offload), because mapping fresh pages costs page faults: ~20% of
a ZeRO-3 step on CPU (bench/RESULTS.md).

Why a limit: Ray's ``memory`` resource (``scaling.memory_per_worker_gb``) places workers but does not
stop one from growing past it; the kernel's OOM killer then picks a victim on the node (often the
raylet), and the run dies without a word about memory. With ``scaling.enforce_memory_limit`` each
worker caps its data segment (``RLIMIT_DATA``: heap and private writable mappings, which is at
least what it has resident), so an allocation past the limit fails in that worker, and ftdist
reports it in one line (``ftdist.diagnoses``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os() -> bool:
    """Map blocks of 1 MB and more on their own (unmapped when freed) and trim the heap past 1 MB of
    free space at its top. True when the C library took both settings (glibc on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   MMAP_THRESHOLD_BYTES))


def saves_host_memory(zero_stage: int, offload_optimizer: bool, offload_params: bool) -> bool:
    """Whether a run asked to save memory in a way that leaves its state in host memory."""
    return zero_stage == 3 or offload_optimizer or offload_params


def limit_data_segment(limit_bytes: int) -> None:
    """Cap this process's data segment at ``limit_bytes`` (never above a hard limit already set)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_allocation_failure(exc: BaseException) -> bool:
    """An allocation refused by the C library (Python's MemoryError, torch's CPU allocator)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text))
