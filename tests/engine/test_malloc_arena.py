"""One malloc arena for the console command: a second thread allocates from the main arena."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

CHILD = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from esegeta_engine.malloc_arena import share_malloc_arena
    shared = share_malloc_arena() if sys.argv[1] == "share" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.fdopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    kept = []
    def work():  # blocks a thread keeps (arena memory, below the mmap threshold)
        kept.extend(libc.malloc(64 * 1024) for _ in range(64))
    t = threading.Thread(target=work)
    t.start(); t.join()
    fd, path = tempfile.mkstemp()
    stream = libc.fdopen(fd, b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    text = open(path).read()
    os.unlink(path)
    print(shared, text.count("<heap nr="))
""")


def _arenas(mode: str, env: dict | None = None) -> tuple[str, int]:
    import os

    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1])


def test_a_thread_gets_its_own_arena_unless_the_command_shares_the_main_one():
    try:
        import ctypes

        ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:
        pytest.skip("not glibc")
    assert _arenas("default") == ("False", 2)  # glibc's default: the thread's own arena
    assert _arenas("share") == ("True", 1)  # every thread in the main arena
    # a setting of the user's own is left as it is
    assert _arenas("share", {"MALLOC_ARENA_MAX": "4"}) == ("False", 2)
