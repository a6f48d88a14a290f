"""Ctrl-C and SIGTERM end a run the same way: a cancel, with the finished maps kept.

Batch schedulers (Slurm, SGE, Kubernetes) stop a job with SIGTERM and kill it
a grace period later. :func:`cancel_on_signals` turns the first SIGINT or
SIGTERM into a cooperative cancel — the running job stops at its next model
evaluation and is recorded as ``cancelled``, the manifest says ``cancelled``
— and a second one into :class:`KeyboardInterrupt`, for a model evaluation
that would not end in time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def cancel_on_signals(cancel: threading.Event) -> Iterator[list[int]]:
    """Within the block, SIGINT/SIGTERM set ``cancel`` (the second one raises ``KeyboardInterrupt``).

    Yields the list of signal numbers received. Outside the main thread
    (where Python cannot install handlers) the block runs unchanged.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
