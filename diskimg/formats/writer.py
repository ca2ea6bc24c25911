"""The DiskWriter contract: plan, then stream.

A writer is told the virtual size and the planned allocation (the source's extents) first, then
receives data in increasing offset order, then ``finish()``. Knowing the layout up front lets every
format write its output in one forward pass, so the target may be a pipe.

On a *streaming* target (a pipe, or any output whose SHA-256 is computed as it is written) a
writer must emit bytes strictly in file order, so its metadata comes first and the plan must be
exact: every planned data cluster or block is written, with zeros where no data arrives. On a
seekable file the plan is an upper bound: writers allocate only what receives data and write their
metadata last into space laid out from the plan.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..errors import OutputError, UsageError
from .reader import Extent, ExtentKind

ZERO_CHUNK = bytes(4 << 20)


class Writable(Protocol):
    def write(self, data: memoryview, /) -> object: ...


class OutputTarget:
    """Where a writer's bytes go: a regular file, a device (a block device written at positions), a
    pipe, or a file object written in order (a member inside an archive being compressed)."""

    def __init__(self, fd: int | Writable, name: str, *, hash_output: bool = False) -> None:
        self.name = name
        if isinstance(fd, int):
            self.fd, self._stream = fd, None
            mode = os.fstat(fd).st_mode
            self.seekable = stat.S_ISREG(mode) or stat.S_ISBLK(mode)
            self.is_regular_file = stat.S_ISREG(mode)
        else:
            self.fd, self._stream = -1, fd
            self.seekable = self.is_regular_file = False
        self._sha256: Any = None
        if hash_output:
            import hashlib  # loads OpenSSL: only when the output is hashed (start-up time)

            self._sha256 = hashlib.sha256()
        #: writers must write in file order (and plan exactly) on a streaming target; a device is
        #: one too: it is written in order, zeros included (its old contents are not holes)
        self.streaming = not self.is_regular_file or hash_output
        self.position = 0  # where the next sequential write goes
        self.bytes_written = 0  # bytes actually written (holes excluded)
        self._count_lock = threading.Lock()  # positional writes may come from several threads

    @property
    def sha256(self) -> str | None:
        return None if self._sha256 is None else self._sha256.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append at the current position."""
        view = memoryview(data).cast("B")
        if self._sha256 is not None:
            self._sha256.update(view)
        if self.seekable:
            self._pwrite_all(view, self.position)
            self.position += len(view)
            return
        if self._stream is not None:
            self._stream.write(view)
            self.position += len(view)
            self.bytes_written += len(view)
            return
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.position += written
                self.bytes_written += written
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", path=self.name) from None

    def skip(self, length: int) -> None:
        """Advance over ``length`` zero bytes: a hole in a regular file, zeros on a pipe or device."""
        if length <= 0:
            return
        if self.is_regular_file:
            if self._sha256 is not None:
                for _ in range(length // len(ZERO_CHUNK)):
                    self._sha256.update(ZERO_CHUNK)
                self._sha256.update(memoryview(ZERO_CHUNK)[: length % len(ZERO_CHUNK)])
            self.position += length
            return
        while length > 0:
            step = min(length, len(ZERO_CHUNK))
            self.write(memoryview(ZERO_CHUNK)[:step])
            length -= step

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write at an offset, outside the sequential stream (seekable, non-streaming targets only)."""
        if self.streaming:
            raise AssertionError("positional write on a streaming target")
        self._pwrite_all(memoryview(data).cast("B"), offset)

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        try:
            while view:
                if hasattr(os, "pwrite"):
                    written = os.pwrite(self.fd, view, offset)
                else:  # Windows: no positional write, so seek and write under the lock
                    with self._count_lock:
                        os.lseek(self.fd, offset, os.SEEK_SET)
                        written = os.write(self.fd, view)
                view = view[written:]
                offset += written
                with self._count_lock:
                    self.bytes_written += written
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", path=self.name) from None

    def finish(self, size: int | None = None) -> None:
        """Give a regular file its full length (``size``, or the stream position), a trailing hole included."""
        size = self.position if size is None else size
        if self.is_regular_file:
            try:
                if os.fstat(self.fd).st_size < size:
                    os.ftruncate(self.fd, size)
            except OSError as exc:
                raise OutputError(f"cannot set the file size: {exc.strerror}", path=self.name) from None


class DiskWriter:
    """Base of the format writers.

    ``OPTIONS`` maps each ``-o`` key a format takes to a short description; ``create`` checks them.
    """

    format: str = ""
    OPTIONS: Mapping[str, str] = {}

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        self.check_options(options)
        if compress and not self.supports_compression:
            raise UsageError(f"{self.format} output cannot be compressed (-c is for qcow2)")
        self.target = target
        self.virtual_size = virtual_size
        self.options = dict(options)
        self.compress = compress
        self._written_to = 0  # guest offset up to which in-order data has been written

    def _accepted(self, offset: int, data: bytes | memoryview, disk_size: int) -> memoryview:
        """``data`` as a flat byte view; data out of order (unless ``concurrent_writes``) or past
        the disk is refused: it means the source changed under the conversion."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = offset + len(view)
        if offset < 0 or end > disk_size or (offset < self._written_to and not self.concurrent_writes):
            raise OutputError(
                f"{self.format} writer: data at {offset}..{end} is out of order or past the disk's {disk_size} bytes",
                path=self.target.name,
            )
        return view

    supports_compression = False

    @classmethod
    def check_options(cls, options: Mapping[str, str]) -> None:
        """Refuse ``-o`` keys this format does not take (values are checked by each writer)."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise UsageError(f"{cls.format} does not take option(s) {', '.join(unknown)} (it takes: {known})")

    @property
    def concurrent_writes(self) -> bool:
        """True when ``write`` may be called from several threads at once, for disjoint ranges in
        any order (a positional file format on a seekable, non-streaming target). The converter
        then calls ``reserve`` for every range first, strictly in offset order, from one thread at
        a time: writers allocate there, so that their output does not depend on thread timing."""
        return False

    def reserve(self, offset: int, length: int) -> None:
        """Allocate room for non-zero data at [offset, offset + length) (``concurrent_writes`` only)."""

    @property
    def requires_exact_plan(self) -> bool:
        """True when the writer must know exactly which ranges hold data before the first byte."""
        return False

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """The size of the output file this format writes for the plan ``extents``."""
        raise NotImplementedError

    @classmethod
    def fully_allocated(cls, virtual_size: int, options: Mapping[str, str] | None, compress: bool = False) -> int:
        """The output size were every byte of the disk data (``qemu-img measure``'s "fully
        allocated"): a figure for comparison, so a limit on what a writer can write (qcow2's
        refcount table) does not stop it."""
        return cls.measure(virtual_size, [Extent(0, virtual_size, ExtentKind.DATA)], options, compress)

    def plan(self, extents: Iterable[Extent]) -> None:
        """Take the planned allocation, covering [0, virtual_size) in order, before any data."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Guest bytes at ``offset``; offsets only increase between calls (unless
        ``concurrent_writes``). ``data`` is valid only during the call: keep a copy if needed."""
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the output (trailing metadata, padding)."""
        self.target.finish()

    def close(self) -> None:
        """Stop any background work, however the conversion ended: called before the output is
        closed, so that no thread of the writer still writes into it."""


def planned_blocks(extents: Iterable[Extent], block_size: int, entries: int) -> bytearray:
    """One byte per block of a block-table format (VHD, VDI), 1 where a planned DATA extent
    overlaps the block: the blocks a streaming writer allocates before any data arrives."""
    planned = bytearray(entries)
    disk_end = entries * block_size
    for extent in extents:
        if extent.kind is not ExtentKind.DATA or extent.length <= 0:
            continue
        start, end = max(0, extent.start), min(extent.end, disk_end)
        if start >= end:
            continue
        first, last = start // block_size, (end - 1) // block_size
        planned[first : last + 1] = b"\x01" * (last - first + 1)
    return planned


_TRUE = ("on", "yes", "true", "y", "1")
_FALSE = ("off", "no", "false", "n", "0")


def option_flag(options: Mapping[str, str], key: str, format_name: str, default: bool = False) -> bool:
    """An on/off ``-o`` option as qemu-img spells it (``default`` when absent), or a UsageError."""
    value = str(options.get(key, "on" if default else "off")).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{format_name} option {key}={value!r}: expected on or off")


def parse_options(text: str | None) -> dict[str, str]:
    """``-o`` options as qemu-img takes them: ``k=v,k2=v2``; ``,,`` is a literal comma."""
    options: dict[str, str] = {}
    if not text:
        return options
    for item in text.replace(",,", "\0").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            value = "on"  # qemu-img accepts a bare flag such as "force_size"
        options[key.strip().replace("-", "_")] = value.replace("\0", ",")
    return options
