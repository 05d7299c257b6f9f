"""Memory a node daemon gives back after a node let go of its models: cycles
collected, the heap trimmed, large blocks on mappings of their own (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Final

# Blocks this large (model weights and load buffers) get a mapping of their own;
# smaller ones (a 640x640 float image is 4.7 MiB) stay on the heap, which is
# cheaper for what a task allocates.  32 MiB (glibc's own ceiling) still let
# restarts grow RSS by 55-75 MB now and then; 1 and 8 MiB kept it flat.
MMAP_THRESHOLD: Final = 8 * 1024 * 1024
M_MMAP_THRESHOLD: Final = -3  # mallopt() parameter, <malloc.h>


def collect_garbage() -> None:
    """After a node let go of its models: free the ones caught in reference cycles.

    The daemon froze its startup objects out of the cyclic collector
    (:func:`daemon.gctune.settle`), the models included: one in a cycle would
    never be freed.  Unfreeze, collect, freeze again (one full collection, on
    the loop thread so finalizers run where they expect to).
    """
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()


def trim_heap() -> None:
    """Hand freed heap back to the kernel (blocking: run off the loop).

    glibc keeps freed memory in its arenas (one per thread that allocated,
    the model loader threads among them), so the RSS of a daemon that had
    unloaded its models stayed up.  ``malloc_trim(0)`` returns it; a libc
    without it (musl) has nothing to do here.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def pin_mmap_threshold() -> None:
    """Give every allocation of :data:`MMAP_THRESHOLD` or more its own mapping.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is
    freed, so once the first models were unloaded the next ones' buffers came
    from the heap instead and stayed there, fragmented: even with
    :func:`trim_heap` RSS rose by 50-130 MB on some restarts and not on others.
    A fixed threshold turns that adjustment off, and a mapped block goes back
    to the kernel when it is freed.  Set once, before the first model loads.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
