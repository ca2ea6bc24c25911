"""Conversion: a reader's extents and data, fed in order to a writer of the target format.

Data is read in 4 MiB chunks by a background thread (preads release the GIL, so reading overlaps
zero detection and writing), checked for zeros at the requested granularity, and only non-zero
ranges reach the writer. Output goes to a temporary file beside the target, renamed into place
when complete; on any failure or interrupt nothing is left at the target.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .detection import VhdSizeRule
from .errors import OutputError, UnsupportedFormat
from .formats import WRITERS, canonical_format
from .image import Source, open_image
from .reader import DiskReader, ExtentKind
from .writer import OutputTarget
from .zeroes import nonzero_runs

CHUNK = 4 * 1024 * 1024
PREFETCH = 3  # chunks read ahead: bounds memory to a few chunks whatever the disk size

#: called with (bytes of the virtual disk done, virtual size)
ProgressCallback = Callable[[int, int], None]


@dataclass
class ConvertResult:
    source: str
    target: str
    source_format: str
    target_format: str
    virtual_size: int
    bytes_read: int
    bytes_written: int
    seconds: float
    backend: str = "native"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    source: Source,
    target: str | os.PathLike[str],
    format: str = "raw",
    *,
    source_format: str | None = None,
    allow_backing: bool = False,
    snapshot: str | None = None,
    vhd_size: VhdSizeRule = "auto",
    force: bool = False,
    zero_granularity: int = 4096,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert ``source`` to ``target`` (a path, or ``"-"`` for standard output) in ``format``.

    ``zero_granularity`` is the size of the zero ranges left unwritten (holes, unallocated
    clusters), like ``qemu-img convert -S``; 0 writes every byte of the allocated data.
    """
    target_format = canonical_format(format)
    writer_class = WRITERS.get(target_format)
    if writer_class is None:
        raise UnsupportedFormat(f"writing {target_format} is not implemented yet", format=target_format)
    started = time.monotonic()
    reader = open_image(
        source, source_format, allow_backing=allow_backing, snapshot=snapshot, vhd_size=vhd_size
    )
    with reader, _output(target, force, reader) as output:
        writer = writer_class(output, reader.virtual_size)
        writer.plan(reader.extents())
        bytes_read = 0
        for offset, data, done in _nonzero_data(reader, zero_granularity):
            if data is not None:
                writer.write(offset, data)
                bytes_read += len(data)
            if progress is not None:
                progress(done, reader.virtual_size)
        writer.finish()
        return ConvertResult(
            source=reader.path,
            target=os.fspath(target),
            source_format=reader.format,
            target_format=target_format,
            virtual_size=reader.virtual_size,
            bytes_read=bytes_read,
            bytes_written=output.bytes_written,
            seconds=round(time.monotonic() - started, 3),
        )


def _nonzero_data(reader: DiskReader, granularity: int) -> Iterator[tuple[int, memoryview | None, int]]:
    """(offset, non-zero data or None, bytes of the disk done) in offset order."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()

        def chunks() -> Iterator[tuple[int, int]]:
            for extent in reader.extents():
                if extent.kind is ExtentKind.DATA:
                    position = extent.start
                    while position < extent.end:
                        step = min(CHUNK - position % CHUNK, extent.end - position)
                        yield position, step
                        position += step

        for offset, length in chunks():
            pending.append((offset, pool.submit(reader.read, offset, length)))
            if len(pending) > PREFETCH:
                yield from _split(*_take(pending), granularity)
        while pending:
            yield from _split(*_take(pending), granularity)
    yield reader.virtual_size, None, reader.virtual_size


def _take(pending: deque) -> tuple[int, bytes]:
    offset, future = pending.popleft()
    return offset, future.result()


def _split(offset: int, data: bytes, granularity: int) -> Iterator[tuple[int, memoryview | None, int]]:
    view = memoryview(data)
    for start, end in nonzero_runs(data, granularity):
        yield offset + start, view[start:end], offset + end
    yield offset + len(data), None, offset + len(data)


@contextlib.contextmanager
def _output(target: str | os.PathLike[str], force: bool, source: DiskReader) -> Iterator[OutputTarget]:
    """An OutputTarget on standard output, or on a temporary file renamed to ``target`` on success."""
    if os.fspath(target) == "-":
        sys.stdout.flush()
        yield OutputTarget(sys.stdout.fileno(), "<stdout>")
        return
    path = os.path.abspath(os.fspath(target))
    if os.path.exists(path):
        if os.path.realpath(path) == os.path.realpath(source.path):
            raise OutputError("is the source image; refusing to overwrite it", path=path)
        if not force:
            raise OutputError("already exists (pass --force to replace it)", path=path)
    directory = os.path.dirname(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".part")
    except OSError as exc:
        raise OutputError(f"cannot create a file in {directory}: {exc.strerror}", path=path) from None
    try:
        yield OutputTarget(fd, path)
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
