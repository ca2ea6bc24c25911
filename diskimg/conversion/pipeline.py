"""Conversion: a reader's extents and data, fed in order to a writer of the target format.

Data is read in 2 MiB chunks (preads release the GIL, so reading overlaps zero detection and
writing), checked for zeros at the requested granularity, and only non-zero ranges reach the
writer: from two threads at once where the writer takes writes in any order (a file), otherwise in
order with one thread reading ahead (a pipe, a hashed output, an archive member). A writer that
must know its exact allocation before the first byte (qcow2 or dynamic VHD on a pipe) gets a plan
refined by a pre-scan of the source's DATA extents: that costs one extra read of the allocated
data, never of the zero regions.

Output goes to a temporary file beside the target, renamed into place when complete; on any failure
or interrupt nothing is left at the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, get_args

from ..choices import Backend, DiskFormat, FormatName, UsedBackend, VhdSizeRule
from ..detection.image import Source, open_image
from ..detection.probe import detect
from ..errors import DiskImageError, UnsupportedFormat, UsageError
from ..formats import WRITERS, canonical_format
from ..formats.probing import FORMAT_ALIASES
from ..formats.reader import DiskReader, Extent, ExtentKind
from ..formats.writer import DiskWriter, parse_options
from ..host import interrupts
from ..host.files import io_buffer
from .outputs import output_target, temporary_beside
from .zeroes import nonzero_runs

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .hashing import ContentHasher
    from .sparsify import SparsifiedVolume

CHUNK = 2 * 1024 * 1024  # smaller writes are throttled less by the kernel under dirty-page pressure
PREFETCH = 3  # chunks read ahead: bounds memory to a few chunks whatever the disk size
WORKERS = 2  # threads converting chunks at once where the writer allows it

#: called with (phase, bytes done, bytes in total)
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ConvertResult:
    """What ``convert`` did. Every figure means the same whichever backend converted."""

    source: str
    target: str
    #: the source's format as detected (with the qemu-img backend, any format qemu-img reads)
    source_format: str
    target_format: DiskFormat
    virtual_size: int
    #: guest bytes of data carried from the source into the output: the source's data less the
    #: zero ranges left as holes (each ``zero_granularity`` piece holding a non-zero byte counts
    #: whole; with ``zero_granularity`` 0, all of ``allocated_bytes``). A property of the guest
    #: content: either backend gives the same figure.
    bytes_read: int
    #: bytes written to the output file (holes excluded)
    bytes_written: int
    #: guest bytes the source's allocation map marks as data (backing layers included), before any
    #: zero detection: what ``diskimg map`` (or ``qemu-img map``) calls data
    allocated_bytes: int
    seconds: float
    backend: UsedBackend
    #: with checksum=True: SHA-256 of the output file and the guest content hash (diskimg.conversion.hashing)
    sha256: str | None = None
    content_hash: str | None = None
    #: a source read through a compressed stream (sources.py): the decompression passes made (a
    #: pre-scan for zeros, or a gzip stream's size counted at open, costs one pass each)
    decompression_passes: int | None = None
    #: with sparsify=True: each volume of the disk, whether its unused space was left out and why not,
    #: and ``sparsified_bytes``, the source's data it no longer carries (sparsify.SparsifiedVolume)
    sparsified: list[SparsifiedVolume] | None = None
    #: with sparsify=True: the volumes' ``sparsified_bytes`` added up
    sparsified_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    source: Source | DiskReader,
    target: str | os.PathLike[str],
    output_format: FormatName | None = None,
    *,
    options: Mapping[str, str] | str | None = None,
    compress: bool = False,
    align: int | None = None,
    zero_granularity: int = 4096,
    checksum: bool = False,
    backend: Backend = "auto",
    source_format: FormatName | str | None = None,
    allow_backing: bool = False,
    snapshot: str | None = None,
    vhd_size: VhdSizeRule = "auto",
    force: bool = False,
    progress: ProgressCallback | None = None,
    sparsify: bool = False,
) -> ConvertResult:
    """Convert ``source`` (a path, a file object, or an open DiskReader, which is left open) to
    ``target`` (a path, or ``"-"`` for standard output) in ``output_format`` (by default the one
    the target's extension names, else raw: :func:`format_for_target`). ``source_format`` forces
    the source's format (with the qemu-img backend, any format qemu-img reads).

    ``options`` are the target format's ``-o`` options; ``align`` rounds the virtual size up to a
    multiple of it (the added tail reads as zeros); ``zero_granularity`` is the size of the zero
    ranges left unwritten, like ``qemu-img convert -S`` (0 writes every allocated byte);
    ``checksum`` computes the output's SHA-256 and the guest content hash in the same pass.
    ``backend``: ``native``, ``qemu-img`` (for formats diskimg detects but does not read), or
    ``auto`` (native when it can). ``sparsify`` leaves out what the guest's file systems do not use
    (``conversion/sparsify.py``): those ranges read as zeros in the output; the native backend only.
    """
    target_format = canonical_format(output_format or format_for_target(target))
    writer_options = parse_options(options) if isinstance(options, str) or options is None else dict(options)
    check_align(align)
    if backend not in get_args(Backend):
        raise UsageError(f"unknown backend {backend!r}: auto, native or qemu-img")
    if sparsify and backend == "qemu-img":
        raise UsageError("the qemu-img backend cannot sparsify (qemu-img does not read the guest's file systems): "
                         "use --backend native or auto")
    if backend != "native" and not isinstance(source, DiskReader) and (
            backend == "qemu-img" or _needs_qemu_img(source, source_format)):
        if sparsify:
            raise UsageError("diskimg does not read the source's format itself, and qemu-img, which converts it, "
                             "cannot sparsify: convert it to qcow2 or raw first, then sparsify that")
        return _convert_with_qemu_img(
            source, target, target_format, writer_options, compress, zero_granularity, checksum,
            source_format, snapshot, allow_backing, force, progress,
        )
    writer_class = WRITERS.get(target_format)
    if writer_class is None:
        raise UnsupportedFormat(f"writing {target_format} is not implemented yet", format=target_format)
    started = time.monotonic()
    # a DiskReader given as the source is used as is and left open (unpack reads on after it)
    opened = source if isinstance(source, DiskReader) else open_image(
        source, canonical_format(source_format) if source_format else None, allow_backing=allow_backing,
        snapshot=snapshot, vhd_size=vhd_size)
    # A compressed qcow2 cannot be streamed (hashing the output as it is written needs a stream):
    # to a file, its SHA-256 is taken from the finished file instead, with a second read.
    hash_afterwards = checksum and compress and os.fspath(target) != "-"
    with contextlib.ExitStack() as stack:
        if opened is not source:
            stack.enter_context(opened)
        reader, sparsify_plan = opened, None
        if sparsify:
            from .sparsify import sparsified  # the file-system readers load only when asked for

            reader, sparsify_plan = sparsified(opened)
        virtual_size = aligned_size(reader.virtual_size, align)
        output = stack.enter_context(output_target(
            target, force, reader.path, checksum and not hash_afterwards,
            needed=lambda: writer_class.measure(virtual_size, with_zero_tail(
                reader.extents(), reader.virtual_size, virtual_size), writer_options, compress)))
        # closed before the output: no thread of the writer may outlive the file it writes into
        writer = stack.enter_context(contextlib.closing(
            writer_class(output, virtual_size, writer_options, compress)))
        with interrupts.deferred():
            scanned = bool(writer.requires_exact_plan and zero_granularity and not map_is_plan(reader))
            if scanned:
                plan: Iterable[Extent] = list(scan_for_zeroes(reader, zero_granularity, progress))
            else:
                plan = reader.extents()
            tally = Tally(reader.virtual_size, progress)
            writer.plan(with_zero_tail(plan, reader.virtual_size, virtual_size))
            extents = plan if isinstance(plan, list) else reader.extents()
            hasher = _content_hasher(virtual_size) if checksum else None
            if writer.concurrent_writes and hasher is None and not reader.forward_only:
                _feed_concurrently(reader, extents, zero_granularity, writer, tally)
            else:
                feed_in_order(reader, extents, zero_granularity, writer, tally, hasher)
            writer.finish()
        # the feed walked the scanned plan, or the sparsified map: the source's own map is walked again
        # (metadata only)
        allocated = data_bytes(opened.extents()) if scanned or sparsify_plan is not None else tally.allocated
        result = ConvertResult(
            source=reader.path,
            target=os.fspath(target),
            source_format=reader.format,
            target_format=target_format,
            virtual_size=virtual_size,
            bytes_read=tally.bytes_read,
            bytes_written=output.bytes_written,
            allocated_bytes=allocated,
            seconds=round(time.monotonic() - started, 3),
            backend="native",
            sha256=output.sha256,
            content_hash=hasher.hexdigest() if hasher is not None else None,
            decompression_passes=getattr(opened, "decompression_passes", None),
        )
        if sparsify_plan is not None:
            from .sparsify import report

            result.sparsified = report(sparsify_plan, opened.extents())
            result.sparsified_bytes = sum(volume.sparsified_bytes for volume in result.sparsified)
    if hash_afterwards:
        result.sha256 = _file_sha256(os.fspath(target))
        result.seconds = round(time.monotonic() - started, 3)
    return result


@dataclass
class MeasureResult:
    """What ``diskimg measure`` answers: the output file's size, without writing it."""

    target_format: DiskFormat
    virtual_size: int
    #: the file size for the source's allocation (its map, refined by a content scan with -S)
    required: int
    #: the file size if every byte of the disk were data
    fully_allocated: int
    #: bytes the plan counts as data
    data_bytes: int
    scanned: bool
    #: with sparsify=True: each volume of the disk with the bytes its file system frees
    #: (``sparsified_bytes``: data of the plan without --sparsify that reads as zeros with it), or why
    #: it is kept whole
    sparsified: list[SparsifiedVolume] | None = None
    #: with sparsify=True: the file size without --sparsify (``required`` is the size with it)
    required_unsparsified: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    source: Source,
    output_format: FormatName,
    *,
    options: Mapping[str, str] | str | None = None,
    compress: bool = False,
    align: int | None = None,
    zero_granularity: int = 0,
    source_format: FormatName | None = None,
    allow_backing: bool = False,
    snapshot: str | None = None,
    vhd_size: VhdSizeRule = "auto",
    sparsify: bool = False,
) -> MeasureResult:
    """The size ``convert`` would write in ``output_format``, from the source's extents; with
    ``zero_granularity`` the DATA extents are also read to find the zero ranges (as a pipe
    conversion plans). For compressed qcow2 the figure is an upper bound. ``sparsify``: the size
    with the guest's unused space left out, beside the size without it, and what each volume frees."""
    target_format = canonical_format(output_format)
    writer_class = WRITERS[target_format]
    writer_options = parse_options(options) if isinstance(options, str) or options is None else dict(options)
    writer_class.check_options(writer_options)
    check_align(align)
    with open_image(source, source_format, allow_backing=allow_backing, snapshot=snapshot,
                    vhd_size=vhd_size) as reader:
        virtual_size = aligned_size(reader.virtual_size, align)
        sparsify_plan = None
        if sparsify:
            from .sparsify import sparsified

            sparsify_plan = sparsified(reader)[1]
        plan = list(scan_for_zeroes(reader, zero_granularity, None) if zero_granularity else reader.extents())
        plan = list(with_zero_tail(plan, reader.virtual_size, virtual_size))
        unsparsified, volumes = None, None
        if sparsify_plan is not None:
            from .sparsify import carve, report

            volumes = report(sparsify_plan, plan)
            unsparsified, plan = plan, list(carve(plan, sparsify_plan.ranges))
        planned_data = data_bytes(plan)
        try:
            required = writer_class.measure(virtual_size, plan, writer_options, compress)
            fully_allocated = writer_class.fully_allocated(virtual_size, writer_options, compress)
            required_unsparsified = None if unsparsified is None else writer_class.measure(
                virtual_size, unsparsified, writer_options, compress)
        except DiskImageError as exc:  # the options are checked: what is left is this disk (too large...)
            exc.path = exc.path or reader.path
            raise
        return MeasureResult(
            target_format=target_format,
            virtual_size=virtual_size,
            required=required,
            fully_allocated=fully_allocated,
            data_bytes=planned_data,
            scanned=bool(zero_granularity),
            sparsified=volumes,
            required_unsparsified=required_unsparsified,
        )


def map_is_plan(reader: DiskReader) -> bool:
    """Whether a forward-only source's allocation map (a sparse tar member's) is taken as the exact
    plan as it is: a pre-scan for zeros would cost another decompression pass."""
    return reader.forward_only and any(extent.kind is ExtentKind.ZERO for extent in reader.extents())


#: target file extensions that name a format, for a conversion not told one
_EXTENSION_FORMATS = {".qcow2": "qcow2", ".vhd": "vhd", ".vpc": "vhd", ".raw": "raw", ".img": "raw", ".vhdx": "vhdx",
                      ".vdi": "vdi"}


def format_for_target(target: str | os.PathLike[str]) -> str:
    """The format a target's name promises (.qcow2; .vhd or .vpc; .raw or .img), else raw (also
    for standard output): a file named out.qcow2 must not silently hold RAW data."""
    extension = os.path.splitext(os.fspath(target))[1].lower()
    return _EXTENSION_FORMATS.get(extension, "raw")


def check_align(align: int | None) -> None:
    """Refuse an alignment that is not whole sectors: the rounded-up disk would end in a partial
    sector, which no format stores and every reader ignores."""
    if align is not None and (align <= 0 or align % 512):
        raise UsageError(f"--align must be a positive multiple of 512 bytes (such as 1M), not {align}")


def aligned_size(size: int, align: int | None) -> int:
    return size if not align else -(-size // align) * align


def _data_chunks(extents: Iterable[Extent]) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of the DATA extents, cut at CHUNK boundaries."""
    for extent in extents:
        if extent.kind is ExtentKind.DATA:
            position = extent.start
            while position < extent.end:
                step = min(CHUNK - position % CHUNK, extent.end - position)
                yield position, step
                position += step


def read_ahead(reader: DiskReader, extents: Iterable[Extent]) -> Iterator[tuple[int, bytearray, int]]:
    """The DATA extents' bytes in order, read by a background thread a few chunks ahead, as
    (guest offset, buffer, length): the chunk is ``buffer[:length]``.

    Chunks are read into a small ring of reused buffers (fresh large buffers would cost the kernel
    a page fault per 4 KiB), valid until the next chunk is taken. The whole buffer is handed out,
    not a slice or a view: a bytearray is searched for zeros in place (``nonzero_runs``), a view
    would have to be copied first.
    """
    from concurrent.futures import ThreadPoolExecutor  # loaded when used (start-up time)

    ring = [bytearray(CHUNK) for _ in range(PREFETCH + 2)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[tuple[int, bytearray, int, Future[int]]] = deque()
        for index, (offset, length) in enumerate(_data_chunks(extents)):
            buffer = ring[index % len(ring)]
            read = pool.submit(reader.readinto_at, offset, memoryview(buffer)[:length])
            pending.append((offset, buffer, length, read))
            if len(pending) > PREFETCH:
                yield _taken(*pending.popleft())
        while pending:
            yield _taken(*pending.popleft())


def _taken(offset: int, buffer: bytearray, length: int, read: Future[int]) -> tuple[int, bytearray, int]:
    interrupts.check()
    read.result()
    return offset, buffer, length


class Tally:
    """Counts what the feed read and reports progress (from one thread at a time)."""

    def __init__(self, virtual_size: int, progress: ProgressCallback | None) -> None:
        self.virtual_size = virtual_size
        self.progress = progress
        self.allocated = 0  # bytes of DATA extents
        self.bytes_read = 0  # non-zero bytes passed to the writer
        self.position = 0  # progress reported so far: never goes back, though windows finish in any order

    def done(self, position: int) -> None:
        self.position = max(self.position, position)
        if self.progress is not None:
            self.progress("convert", self.position, self.virtual_size)


def data_bytes(extents: Iterable[Extent]) -> int:
    """The bytes the DATA extents cover."""
    return sum(extent.length for extent in extents if extent.kind is ExtentKind.DATA)


def with_zero_tail(extents: Iterable[Extent], size: int, virtual_size: int) -> Iterator[Extent]:
    """The extents, plus the zero tail that --align added."""
    yield from extents
    if virtual_size > size:
        yield Extent(size, virtual_size - size, ExtentKind.ZERO)


def feed_in_order(
    reader: DiskReader,
    extents: Iterable[Extent],
    granularity: int,
    writer: DiskWriter,
    tally: Tally,
    hasher: ContentHasher | None,
) -> None:
    """Non-zero data to the writer in offset order, hashing it on the way when asked."""
    hashed = 0
    for offset, buffer, length in read_ahead(reader, extents):
        tally.allocated += length
        view = memoryview(buffer)
        for start, end in nonzero_runs(buffer, granularity, 0, length):
            writer.write(offset + start, view[start:end])
            tally.bytes_read += end - start
            if hasher is not None:
                hasher.skip_zeros(offset + start - hashed)
                hasher.update(view[start:end])
                hashed = offset + end
        tally.done(offset + length)
    if hasher is not None:
        hasher.skip_zeros(writer.virtual_size - hashed)
    tally.done(reader.virtual_size)


def _feed_concurrently(
    reader: DiskReader, extents: Iterable[Extent], granularity: int, writer: DiskWriter, tally: Tally
) -> None:
    """CHUNK-sized windows read, checked and written by WORKERS threads at once, in any order.

    Page-cache copies are CPU work for the kernel: two threads writing move data about twice as
    fast as one on a 2-core machine (qemu-img does the same with its coroutines). Each thread takes
    the next window itself: a task queue with futures cost a third more time in measurements.

    All the DATA pieces of one CHUNK-aligned window go to one thread: two threads never write into
    the same window, so never into the same qcow2 cluster (clusters divide CHUNK) even when two
    DATA extents share one. Allocation happens in ``reserve``, in window order (a VHD block larger
    than a window is allocated once and then written in disjoint pieces).
    """
    windows = enumerate(_windows(_data_chunks(extents)))
    state = threading.Condition(threading.Lock())  # guards the window sequence and the fields below
    failures: list[BaseException] = []
    exhausted = False  # every window has been taken
    running = 0  # threads that may take a window: they may be writing
    reporting = threading.Lock()  # guards the tally: one progress report at a time
    turn = _Turnstile()

    def over() -> bool:
        """No window is to be taken any more (``state`` held)."""
        return exhausted or bool(failures) or interrupts.pending()

    def convert_window(buffer: bytearray, start: int, index: int, pieces: list[tuple[int, int]]) -> None:
        window = pieces[0][0] - pieces[0][0] % CHUNK
        ranges = []  # (offset, view into the buffer) of the window's non-zero data
        failure: BaseException | None = None
        try:
            for offset, length in pieces:
                first = start + offset - window
                view = memoryview(buffer)[first : first + length]
                reader.readinto_at(offset, view)
                ranges += [(offset + begin, view[begin:end])
                           for begin, end in nonzero_runs(buffer, granularity, first, first + length)]
        except BaseException as exc:
            failure = exc
        turn.wait(index)  # allocation in offset order, whatever the threads' timing
        try:
            if failure is None:
                for offset, view in ranges:
                    writer.reserve(offset, len(view))
        finally:
            turn.advance(index)
        if failure is not None:
            raise failure
        for offset, view in ranges:
            writer.write(offset, view)
        offset, length = pieces[-1]
        with reporting:
            tally.allocated += sum(length for _, length in pieces)
            tally.bytes_read += sum(len(view) for _, view in ranges)
            tally.done(offset + length)

    def work() -> None:
        nonlocal exhausted, running
        with state:
            if over():  # started late: the output may be closed already
                return
            running += 1
        try:
            buffer, start = io_buffer(CHUNK)
            while True:
                with state:
                    if over():
                        return
                    item = next(windows, None)
                    if item is None:
                        exhausted = True
                        return
                convert_window(buffer, start, *item)
        except BaseException as exc:
            with state:
                failures.append(exc)
        finally:
            with state:
                running -= 1
                state.notify_all()

    def wait_until_stopped() -> None:
        with state:
            state.wait_for(lambda: running == 0 and over())

    # Not Thread.join: on Python 3.11 a join interrupted by Ctrl-C marks the thread as stopped
    # while it still runs. A first Ctrl-C is held back (``interrupts``): the threads see it, finish
    # the window in hand and stop; then it is raised here.
    try:
        for number in range(WORKERS):
            threading.Thread(target=work, name=f"diskimg-convert-{number}", daemon=True).start()
        wait_until_stopped()
    except BaseException as exc:  # a second Ctrl-C: the threads still stop before the output closes
        failures.append(exc)
        wait_until_stopped()
        raise
    interrupts.check()
    if failures:
        raise failures[0]
    tally.done(reader.virtual_size)


class _Turnstile:
    """Lets numbered tasks through one at a time, in number order."""

    def __init__(self) -> None:
        self._next = 0
        self._condition = threading.Condition()

    def wait(self, index: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._next == index)

    def advance(self, index: int) -> None:
        """Let the next task through (called exactly once per task, even when it failed)."""
        with self._condition:
            self._next = index + 1
            self._condition.notify_all()


def _windows(chunks: Iterable[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """(offset, length) pieces grouped by the CHUNK-aligned window they lie in (none crosses one)."""
    group: list[tuple[int, int]] = []
    for offset, length in chunks:
        if group and group[0][0] // CHUNK != offset // CHUNK:
            yield group
            group = []
        group.append((offset, length))
    if group:
        yield group


def scan_for_zeroes(reader: DiskReader, granularity: int, progress: ProgressCallback | None) -> Iterator[Extent]:
    """The reader's extents with the zero ranges inside its DATA extents turned into ZERO extents."""
    data_start = data_end = 0  # the DATA extent being grown
    for offset, buffer, length in read_ahead(reader, reader.extents()):
        for start, end in nonzero_runs(buffer, granularity, 0, length):
            if offset + start != data_end:
                if data_end > data_start:
                    yield Extent(data_start, data_end - data_start, ExtentKind.DATA)
                yield Extent(data_end, offset + start - data_end, ExtentKind.ZERO)
                data_start = offset + start
            data_end = offset + end
        if progress is not None:
            progress("scan", offset + length, reader.virtual_size)
    if progress is not None:  # the zero regions after the last data are scanned too, from the map
        progress("scan", reader.virtual_size, reader.virtual_size)
    if data_end > data_start:
        yield Extent(data_start, data_end - data_start, ExtentKind.DATA)
    if data_end < reader.virtual_size:
        yield Extent(data_end, reader.virtual_size - data_end, ExtentKind.ZERO)


# -- the qemu-img backend --------------------------------------------------------------------------

_QEMU_FORMAT = {"vhd": "vpc"}


def _needs_qemu_img(source: Source, source_format: str | None) -> bool:
    """True for a source diskimg recognises but does not read (VMDK, VHDX, VDI, ...)."""
    if source_format is not None:
        return source_format.lower() not in FORMAT_ALIASES
    if not isinstance(source, (str, os.PathLike)):
        return False
    detection = detect(source)
    return not detection.readable and detection.inner_format is None and detection.hint is not None and \
        detection.format not in ("iso9660", "luks")


def _convert_with_qemu_img(
    source: Source,
    target: str | os.PathLike[str],
    target_format: DiskFormat,
    options: dict[str, str],
    compress: bool,
    zero_granularity: int,
    checksum: bool,
    source_format: str | None,
    snapshot: str | None,
    allow_backing: bool,
    force: bool,
    progress: ProgressCallback | None,
) -> ConvertResult:
    """Convert with qemu-img (argument lists, never a shell), mapping its errors and progress to ours.

    The result's figures mean what the native path's do: ``allocated_bytes`` from the source's map,
    ``bytes_read`` counted over the data of the output qemu-img wrote (the same guest content)."""
    qemu_img = shutil.which("qemu-img")
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError("the qemu-img backend needs a source path, not a file object")
    detection = detect(source)
    if qemu_img is None:
        raise UnsupportedFormat(
            f"{detection.description}: diskimg reads VHD, VHDX, qcow2 and RAW, and qemu-img (the backend for "
            "other formats) is not installed (apt-get install qemu-utils)",
            path=os.fspath(source), format=detection.format,
        )
    if os.fspath(target) == "-":
        raise UsageError("the qemu-img backend cannot write to a pipe (qemu-img needs a seekable file)")
    started = time.monotonic()
    input_format = _QEMU_FORMAT.get(source_format or detection.format, source_format or detection.format)
    argv = [qemu_img, "convert", "-p", "-f", input_format, "-O", _QEMU_FORMAT.get(target_format, target_format),
            "-S", str(zero_granularity)]
    if options:
        argv += ["-o", ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())]
    if compress:
        argv.append("-c")
    if snapshot is not None:
        argv += ["-l", snapshot]
    with temporary_beside(target, force, os.fspath(source)) as temporary:
        argv += [os.fspath(source), temporary]
        import subprocess  # only this backend runs a program: loaded when used (start-up time)

        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        for percent in _qemu_progress(proc.stdout):
            if progress is not None:
                progress("convert", int(percent * 100), 10000)
        error = proc.stderr.read()
        if proc.wait() != 0:
            message = _qemu_message(error, proc.returncode).replace(temporary, os.fspath(target))  # not our temporary
            raise DiskImageError(f"qemu-img convert failed: {message}", path=os.fspath(source))
        allocated = _source_data_bytes(qemu_img, source, input_format, source_format, snapshot, allow_backing)
        with open_image(temporary, target_format) as written:
            hasher = _content_hasher(written.virtual_size) if checksum else None
            # with -S 0 all the source's data is carried; else it is counted over the output's data
            # (qemu-img does not report it), in the same pass as the hash when one is asked for
            carried = carried_bytes(written, zero_granularity, hasher) if zero_granularity or hasher else 0
            result = ConvertResult(
                source=os.fspath(source), target=os.fspath(target), source_format=detection.format,
                target_format=target_format, virtual_size=written.virtual_size,
                bytes_read=carried if zero_granularity else allocated,
                bytes_written=os.stat(temporary).st_size, allocated_bytes=allocated,
                seconds=0.0, backend="qemu-img",
            )
            if hasher is not None:
                # qemu-img wrote the file: its SHA-256 takes another read of it
                result.sha256, result.content_hash = _file_sha256(temporary), hasher.hexdigest()
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _source_data_bytes(qemu_img: str, source: str | os.PathLike[str], input_format: str, source_format: str | None,
                       snapshot: str | None, allow_backing: bool) -> int:
    """The data bytes of the source's allocation map, as ``qemu-img map`` gives it; for an internal
    snapshot (which ``qemu-img map`` cannot select: qcow2 only, a format diskimg reads), diskimg's map."""
    if snapshot is not None:
        with open_image(source, canonical_format(source_format) if source_format else None,
                        allow_backing=allow_backing, snapshot=snapshot) as reader:
            return data_bytes(reader.extents())
    import json
    import subprocess

    proc = subprocess.run([qemu_img, "map", "--output=json", "-f", input_format, os.fspath(source)],
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        raise DiskImageError(f"qemu-img map failed: {_qemu_message(proc.stderr, proc.returncode)}",
                             path=os.fspath(source))
    return sum(entry["length"] for entry in json.loads(proc.stdout) if entry.get("data"))


def _qemu_message(stderr: bytes, returncode: int) -> str:
    """The line of a failed qemu-img run that says why."""
    error = stderr.decode(errors="replace").strip()
    return error.splitlines()[-1].removeprefix("qemu-img: ") if error else f"exit status {returncode}"


def _qemu_progress(stream: Any) -> Iterator[float]:
    """Percentages from qemu-img's ``-p`` output: ``    (12.34/100%)`` separated by carriage returns."""
    buffer = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        buffer += chunk
        *records, buffer = buffer.replace(b"\n", b"\r").split(b"\r")
        for record in records:
            text = record.strip().strip(b"()")
            if text.endswith(b"/100%"):
                with contextlib.suppress(ValueError):
                    yield float(text[: -len(b"/100%")])


def _file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _content_hasher(virtual_size: int) -> ContentHasher:
    from .hashing import ContentHasher  # hashlib loads OpenSSL: only when a checksum is asked for

    return ContentHasher(virtual_size)


def content_hash_of(reader: DiskReader) -> str:
    hasher = _content_hasher(reader.virtual_size)
    carried_bytes(reader, 0, hasher)
    return hasher.hexdigest()


def carried_bytes(reader: DiskReader, granularity: int, hasher: ContentHasher | None = None) -> int:
    """One pass over the reader's data: the bytes a conversion at ``granularity`` carries (its
    non-zero ranges, as ``ConvertResult.bytes_read`` counts them), hashing the content when asked."""
    carried = position = 0
    for offset, buffer, length in read_ahead(reader, reader.extents()):
        carried += sum(end - start for start, end in nonzero_runs(buffer, granularity, 0, length))
        if hasher is not None:
            hasher.skip_zeros(offset - position)
            hasher.update(memoryview(buffer)[:length])
            position = offset + length
    if hasher is not None:
        hasher.skip_zeros(reader.virtual_size - position)
    return carried
