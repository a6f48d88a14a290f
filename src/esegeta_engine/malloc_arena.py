"""One malloc arena for a process the engine owns, so the model thread allocates like the main thread.

Every job runs on a *model thread* (:mod:`esegeta_engine.watchdog`). glibc gives each thread that
allocates its own malloc arena, and a thread's arena hands its heaps (64 MB each) back to the
system as soon as they are empty, so the large, short-lived tensors of a 3D network's forward
and backward passes fault their pages in again step after step. The main thread's arena keeps
its memory up to glibc's trim threshold. Measured with Captum alone (no engine code) on the
bundled U-Net at 64³, Integrated Gradients with 16 steps: 32 % more page faults and 8–9 % more
CPU time on a second thread than on the main thread; with one arena the difference was gone
(``benchmarks/bench_engine_overhead.py``).

:func:`share_malloc_arena` sets glibc's ``M_ARENA_MAX`` to 1 (what ``MALLOC_ARENA_MAX=1`` does),
so every thread allocates from the main arena. Only the ``esegeta`` console command calls it,
first thing: it owns its process, and the limit holds only if it is set before a second thread
allocates. A library caller (napari, a notebook) keeps its process's own settings. A
``MALLOC_ARENA_MAX`` in the environment wins; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter number for the arena limit (``malloc.h``)."""


def share_malloc_arena() -> bool:
    """Make every thread of this process allocate from glibc's main arena; True if it was set.

    Call it before any other thread starts (later threads that already allocated keep their arenas).
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: another C library's mallopt means something else
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))
