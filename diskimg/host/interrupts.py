"""Ctrl-C while data moves: held back until the loops reach a point where stopping is safe.

A KeyboardInterrupt raised at an arbitrary point of the main thread can leave a lock taken (Python
3.11 runs signal handlers right after a lock is acquired, before the ``with`` body that would
release it) or mark a running thread as stopped (an interrupted ``Thread.join``). The converter's
worker threads and futures would then hang, or write on after the call returned. So, inside
``deferred()``, a first Ctrl-C only sets a flag: the data loops check it between chunks, stop
their threads, and raise KeyboardInterrupt there. A second Ctrl-C raises at once, as usual.

The handler is process-wide, like signals: it is installed only by the main thread, and only
over Python's default handler (a program with its own SIGINT handler keeps it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pending = False
_installed = False


def pending() -> bool:
    """True once Ctrl-C was pressed inside ``deferred()``: threads stop after the piece in hand."""
    return _pending


def check() -> None:
    """Raise the held-back KeyboardInterrupt, if any (a no-op outside ``deferred()``)."""
    if _pending:
        raise KeyboardInterrupt


def _hold_back(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending:
        raise KeyboardInterrupt  # pressed again: the user does not want to wait
    _pending = True


@contextmanager
def deferred() -> Iterator[None]:
    """Hold Ctrl-C back to the next ``check()``; one still pending at the end is raised then."""
    global _pending, _installed
    if (_installed or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    signal.signal(signal.SIGINT, _hold_back)
    _installed = True
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _installed = False
        interrupted, _pending = _pending, False
    if interrupted:
        raise KeyboardInterrupt
