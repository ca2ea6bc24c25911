"""The batch journal: one JSON line per finished job, so that a rerun skips what finished.

Each line is appended with one ``write`` on a file opened with O_APPEND, then fsynced: a line is
either whole or, after a power cut in the middle of it, a torn last line that fails to parse and is
ignored (its job simply runs again). A job counts as finished only for the same ``id`` and the same
plan line (``key``, a hash of the line), so an edited line runs again.

An entry::

    {"id": "web1", "key": "3f2a...", "op": "convert", "outcome": "ok" | "no" | "error",
     "exit_code": 0, "result": {... the command's --json ...} | "error": "diskimg: error: ...",
     "read_bytes": 123, "written_bytes": 456, "seconds": 1.5, "finished": "2026-12-07T00:12:03Z"}
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import OutputError

#: a journal line is one job's result; a larger line is not ours
MAX_ENTRY = 64 << 20


def read_journal(path: str) -> dict[str, dict[str, Any]]:
    """The entries of the journal at ``path`` by job reference (``id@key``); none if it does not
    exist. Lines that do not parse (a torn last line) are skipped; a job journaled twice keeps its
    last entry."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        f = open(path, "rb")  # noqa: SIM115 - opened apart so only its errors are translated; `with f` below
    except FileNotFoundError:
        return entries
    except OSError as exc:
        raise OutputError(f"cannot read the journal: {exc.strerror}", path=path) from None
    with f:
        for line in f:
            if len(line) > MAX_ENTRY:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("key"), str):
                entries[f"{entry['id']}@{entry['key']}"] = entry
    return entries


class Journal:
    """The journal open for appending: ``record`` makes one entry durable before returning."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
            _lock(self._fd, path)
            size = os.fstat(self._fd).st_size
            if size and not _ends_with_newline(path, size):
                os.write(self._fd, b"\n")  # a torn last line stays alone on its line
        except OSError as exc:
            raise OutputError(f"cannot write the journal: {exc.strerror}", path=path) from None

    def record(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write (is the disk full?)")
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"cannot write the journal: {exc.strerror}", path=self.path) from None

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ends_with_newline(path: str, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _lock(fd: int, path: str) -> None:
    """One batch at a time per journal: two would run the same jobs twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError("the journal is in use by another batch", path=path) from None
