"""The VMDK reader: a descriptor (embedded in a hosted sparse extent, or a text file of its own)
and the extents it lists, laid end to end: hosted sparse (grain directory and tables, zero grains,
deflate-compressed grains of stream-optimized extents), flat (``-flat.vmdk``, VMFS) and zero.

Extent files are named by the descriptor, which is untrusted: they are opened only inside the
descriptor's directory (``confined_path``), never through a path that leads out of it.
"""

from __future__ import annotations

import bisect
import os
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from ...errors import BackingFileError, CorruptImage, UnsupportedFormat
from ...host.files import HostFile, confined_path
from ..foreign import convert_commands
from ..probing import OpenOptions, ParentOpener
from ..reader import DiskReader, ImageInfo, Run, RunKind
from .structures import (
    FLAT_TYPES,
    GD_AT_END,
    GRAIN_MARKER_SIZE,
    GTE_UNALLOCATED,
    GTE_ZERO,
    MAGIC,
    MARKER_EOS,
    MARKER_FOOTER,
    MAX_DESCRIPTOR_BYTES,
    NAME,
    READ_CREATE_TYPES,
    SECTOR,
    SPARSE_TYPES,
    ZERO_TYPES,
    Descriptor,
    ExtentLine,
    SparseHeader,
    parse_descriptor,
    parse_grain_table,
    parse_header,
    parse_marker,
    with_footer,
)

#: grain tables kept in memory per sparse extent (2 KiB each): 8 MiB, 16 GiB of guest disk
_GT_CACHE = 4096
#: a stretch of the file read at once for the compressed grains it holds
_GRAIN_SPAN = 8 << 20
_windows = threading.local()
_COWD = b"COWD"
_SESPARSE = (0xCAFEBABE).to_bytes(8, "little")


@dataclass
class _Extent:
    """One extent of the disk, at guest bytes [start, start + length)."""

    index: int
    start: int
    length: int
    type: str  # "zero", "flat" or "sparse"
    host: HostFile | None = None
    own_file: bool = False  # host is the reader's own file: HOST runs, copied without decoding
    data_offset: int = 0  # flat: bytes into the file
    header: SparseHeader | None = None
    directory: array[int] = field(default_factory=lambda: array("I"))
    tables: dict[int, array[int]] = field(default_factory=dict)
    tables_present: list[int] = field(default_factory=list)  # directory entries that name a table

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def markers(self) -> bool:
        return self.header is not None and self.header.markers

    def grain_table(self, table_index: int) -> array[int] | None:
        """Grain table ``table_index`` of a sparse extent (None where the directory has none),
        read once and kept in a bounded cache."""
        header = self.header
        assert header is not None and self.host is not None
        table = self.tables.get(table_index)
        if table is not None:
            return table
        sector = self.directory[table_index]
        if sector == 0:
            return None
        size = header.gtes_per_gt * 4
        data = self.host.read_at(sector * SECTOR, size)
        if len(data) != size:
            raise CorruptImage(
                f"grain table {table_index} at byte {sector * SECTOR} runs past the end of the file",
                path=self.host.name, offset=sector * SECTOR, structure="VMDK grain table",
            )
        table = parse_grain_table(data)
        if len(self.tables) >= _GT_CACHE:
            self.tables.clear()
        self.tables[table_index] = table
        return table


class VmdkReader(DiskReader):
    format = NAME

    def __init__(self, host: HostFile, descriptor: Descriptor, create_type: str, extents: list[_Extent],
                 opened: list[HostFile]) -> None:
        super().__init__(host, extents[-1].end if extents else 0)
        self.descriptor = descriptor
        self.create_type = create_type
        self._extents = extents
        self._opened = opened  # the extent files this reader opened (not its own file)
        self._decoded: tuple[int, int, bytes] | None = None  # the last grain decompressed

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> VmdkReader:
        head = host.read_at(0, SECTOR)
        opened: list[HostFile] = []
        try:
            if head[:4] == MAGIC:
                sparse = _open_sparse(host, 0, 0, own_file=True)
                assert sparse.header is not None
                descriptor = _embedded_descriptor(host, sparse.header)
                extents = [sparse]
                create_type = descriptor.create_type or ("streamOptimized" if sparse.header.compressed
                                                         else "monolithicSparse")
            else:
                _refuse_other_extent(head, host.name)
                descriptor = _descriptor_file(host)
                create_type = descriptor.create_type or "unknown"
                _refuse_create_type(create_type, host.name)
                extents = _open_extents(host, descriptor, opened)
            reader = cls(host, descriptor, create_type, extents, opened)
            if descriptor.has_parent and open_parent is not None:
                reader._open_parent(open_parent)
            return reader
        except BaseException:
            for extent_host in opened:
                extent_host.close()
            raise

    def _open_parent(self, open_parent: ParentOpener) -> None:
        hint = self.descriptor.parent_hint
        if hint is None:
            raise BackingFileError("is a VMDK snapshot whose descriptor names no parent (parentFileNameHint)",
                                   path=self.path)
        parent = open_parent([hint], None)
        parent_cid = getattr(parent, "cid", None)
        if isinstance(parent, VmdkReader) and parent_cid != self.descriptor.parent_cid:
            parent.close()
            raise BackingFileError(
                f"parent {hint!r} has CID {parent_cid:08x}, but this snapshot expects "
                f"{self.descriptor.parent_cid:08x} (the parent changed after the snapshot was taken)",
                path=self.path,
            )
        self.parent = parent

    # -- metadata ------------------------------------------------------------------------------

    @property
    def cid(self) -> int | None:
        return self.descriptor.cid

    @property
    def backing_file(self) -> str | None:
        if not self.descriptor.has_parent:
            return None
        return self.descriptor.parent_hint or f"<parent CID {self.descriptor.parent_cid:08x}>"

    @property
    def _first_sparse(self) -> SparseHeader | None:
        return next((extent.header for extent in self._extents if extent.header is not None), None)

    def info(self) -> ImageInfo:
        header = self._first_sparse
        ddb = self.descriptor.ddb
        details: dict[str, Any] = {
            "cid": None if self.cid is None else f"{self.cid:08x}",
            "parent_cid": f"{self.descriptor.parent_cid:08x}",
            "adapter_type": ddb.get("ddb.adapterType"),
            "hwversion": ddb.get("ddb.virtualHWVersion"),
            "extents": [
                {"type": line.type, "file": line.filename, "sectors": line.sectors, "offset": line.offset}
                for line in self.descriptor.extents
            ],
        }
        features = []
        if header is not None:
            if header.compressed:
                features.append("compressed")
            if header.zero_grains:
                features.append("zeroed-grain")
        hosts = [self.host, *self._opened]
        allocated = [h.allocated_bytes for h in hosts]
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=sum(h.size for h in hosts),
            allocated_bytes=None if None in allocated else sum(a for a in allocated if a is not None),
            subformat=self.create_type,
            version=None if header is None else str(header.version),
            cluster_size=None if header is None else header.grain_bytes,
            creator=ddb.get("ddb.toolsVersion") and f"VMware Tools {ddb['ddb.toolsVersion']}",
            features=features,
            backing_file=self.backing_file,
            backing_format=NAME if self.descriptor.has_parent else None,
            details=details,
        )

    # -- runs ------------------------------------------------------------------------------------

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        for extent in self._extents:
            if extent.end <= start or extent.start >= end:
                continue
            first, last = max(start, extent.start), min(end, extent.end)
            if extent.type == "zero":
                yield Run(first, last - first, RunKind.ZERO)
            elif extent.type == "flat":
                host_offset = extent.data_offset + first - extent.start
                if extent.own_file:
                    yield Run(first, last - first, RunKind.HOST, host_offset)
                else:
                    yield Run(first, last - first, RunKind.ENCODED, host_offset, extent.index << 1)
            else:
                yield from self._sparse_runs(extent, first, last)

    def _sparse_runs(self, extent: _Extent, start: int, end: int) -> Iterator[Run]:
        """Runs of a sparse extent, consecutive grains of one kind (and contiguous host bytes) merged."""
        header = extent.header
        assert header is not None
        grain_bytes = header.grain_bytes
        hole = RunKind.BACKING if self.descriptor.has_parent else RunKind.ZERO
        zero_grains = header.zero_grains
        compressed = header.compressed
        direct = extent.own_file and not compressed
        pending: list[Any] | None = None  # [start, length, kind, host_offset, extra]
        position = start
        table_span = grain_bytes * header.gtes_per_gt
        while position < end:
            relative = position - extent.start
            grain = relative // grain_bytes
            within = relative - grain * grain_bytes
            length = min(end - position, grain_bytes - within)
            table = grain // header.gtes_per_gt
            if extent.directory[table] == 0:  # no grain table: unallocated up to the next table there is
                following = bisect.bisect_right(extent.tables_present, table)
                stop = extent.tables_present[following] * table_span if following < len(extent.tables_present) \
                    else extent.length
                length = min(end - position, stop - relative)
                entry = GTE_UNALLOCATED
            else:
                entry = self._grain_entry(extent, grain)
            if entry == GTE_UNALLOCATED:
                kind, host_offset, extra = hole, 0, 0
            elif entry == GTE_ZERO and zero_grains:
                kind, host_offset, extra = RunKind.ZERO, 0, 0
            elif compressed:
                kind, host_offset, extra = RunKind.ENCODED, entry * SECTOR, (extent.index << 1) | 1
            else:
                kind = RunKind.HOST if direct else RunKind.ENCODED
                host_offset, extra = entry * SECTOR + within, extent.index << 1
                self._check_grain(extent, entry, grain)
            if pending is not None and pending[2] is kind and (
                kind in (RunKind.ZERO, RunKind.BACKING)
                or (not compressed and pending[3] + pending[1] == host_offset)
            ):
                pending[1] += length
            else:
                if pending is not None:
                    yield Run(*pending)
                pending = [position, length, kind, host_offset, extra]
            position += length
        if pending is not None:
            yield Run(*pending)

    def _check_grain(self, extent: _Extent, entry: int, grain: int) -> None:
        assert extent.host is not None
        if entry * SECTOR >= extent.host.size:
            raise CorruptImage(
                f"grain {grain} lies at byte {entry * SECTOR}, past the end of the file ({extent.host.size} bytes)",
                path=extent.host.name, structure="VMDK grain table",
            )

    def _grain_entry(self, extent: _Extent, grain: int) -> int:
        assert extent.header is not None
        table_index, slot = divmod(grain, extent.header.gtes_per_gt)
        table = extent.grain_table(table_index)
        return GTE_UNALLOCATED if table is None else table[slot]

    @property
    def sparse_extents(self) -> list[_Extent]:
        """The hosted sparse extents, for ``diskimg check``."""
        return [extent for extent in self._extents if extent.type == "sparse"]

    def _read_encoded(self, run: Run) -> bytes:
        extent = self._extents[run.extra >> 1]
        assert extent.host is not None
        if not run.extra & 1:
            data = extent.host.read_at(run.host_offset, run.length)
            if len(data) != run.length:
                raise CorruptImage(
                    f"extent file is truncated: guest offset {run.start} maps past its end",
                    path=extent.host.name, offset=run.host_offset,
                )
            return data
        assert extent.header is not None
        grain_bytes = extent.header.grain_bytes
        grain_start = run.start - (run.start - extent.start) % grain_bytes
        cached = self._decoded
        if cached is not None and cached[0] == extent.index and cached[1] == run.host_offset:
            data = cached[2]
        else:
            data = _read_grain(extent, run.host_offset, grain_start - extent.start)
            self._decoded = (extent.index, run.host_offset, data)
        offset = run.start - grain_start
        return data[offset : offset + run.length]

    def _fill_runs(self, view: memoryview, offset: int, runs: Iterable[Run]) -> None:
        """As the base class, but compressed grains behind markers are read a stretch of the file at
        a time (a stream-optimized file holds them in guest order): one read for many grains."""
        grains: list[Run] = []
        for run in runs:
            if run.kind is RunKind.ENCODED and run.extra & 1 and self._extents[run.extra >> 1].markers:
                if grains and (run.extra != grains[0].extra or run.host_offset < grains[0].host_offset
                               or run.host_offset - grains[0].host_offset > _GRAIN_SPAN):
                    self._fill_grains(view, offset, grains)
                    grains = []
                grains.append(run)
                continue
            if grains:
                self._fill_grains(view, offset, grains)
                grains = []
            self._fill(view[run.start - offset : run.start - offset + run.length], run)
        if grains:
            self._fill_grains(view, offset, grains)

    def _fill_grains(self, view: memoryview, offset: int, grains: list[Run]) -> None:
        extent = self._extents[grains[0].extra >> 1]
        assert extent.header is not None and extent.host is not None
        grain_bytes = extent.header.grain_bytes
        start = grains[0].host_offset
        end = min(grains[-1].host_offset + GRAIN_MARKER_SIZE + _max_stored(grain_bytes), extent.host.size)
        window = memoryview(_window_buffer(max(0, end - start)))[: max(0, end - start)]
        window = window[: extent.host.readinto_at(start, window)]
        for run in grains:
            grain_start = run.start - (run.start - extent.start) % grain_bytes
            grain_offset = grain_start - extent.start
            stored = _framed_grain(extent, window, run.host_offset - start, run.host_offset, grain_offset)
            data = _inflate_grain(extent, stored, run.host_offset, grain_offset)
            within = run.start - grain_start
            view[run.start - offset : run.start - offset + run.length] = memoryview(data)[within : within + run.length]

    def close_extent_files(self) -> None:
        """Close the extent files the descriptor named (the reader's own file stays open)."""
        for extent_host in self._opened:
            extent_host.close()
        self._opened = []

    def close(self) -> None:
        if not self.closed:
            self.close_extent_files()
        super().close()


# --- opening ---------------------------------------------------------------------------------------


def _refuse_other_extent(head: bytes, path: str) -> None:
    """ESX COWD and seSparse extents are named, and the conversion command given."""
    if head[:4] == _COWD or head[:8] == _SESPARSE:
        kind = "ESX COWD (vmfsSparse)" if head[:4] == _COWD else "seSparse"
        raise UnsupportedFormat(
            f"VMDK {kind} extent: diskimg does not read this extent type",
            path=path, format=NAME, hint=f"convert the descriptor that lists it first: "
            f"{convert_commands('vmdk', 'DESCRIPTOR.vmdk')}",
        )


def _refuse_create_type(create_type: str, path: str) -> None:
    if create_type not in READ_CREATE_TYPES:
        raise UnsupportedFormat(
            f"VMDK descriptor of create type {create_type!r}: diskimg reads "
            + ", ".join(sorted(READ_CREATE_TYPES)),
            path=path, format=NAME, hint=f"convert it first: {convert_commands('vmdk', path)}",
        )


def _descriptor_file(host: HostFile) -> Descriptor:
    if host.size > MAX_DESCRIPTOR_BYTES:
        raise UnsupportedFormat(
            "is neither a VMDK sparse extent nor a VMDK descriptor (too large for a text descriptor)",
            path=host.name, format=NAME,
        )
    return parse_descriptor(host.read_at(0, host.size), path=host.name)


def _embedded_descriptor(host: HostFile, header: SparseHeader) -> Descriptor:
    """The descriptor inside a sparse extent; an empty one when the extent has none."""
    if header.descriptor_offset == 0 or header.descriptor_size == 0:
        return Descriptor(create_type=None, cid=None, parent_cid=0xFFFFFFFF, parent_hint=None, extents=())
    offset = header.descriptor_offset * SECTOR
    length = header.descriptor_size * SECTOR
    if offset + length > host.size:
        raise CorruptImage("embedded descriptor lies past the end of the file", path=host.name, offset=offset,
                           structure="VMDK descriptor")
    return parse_descriptor(host.read_at(offset, length), path=host.name, offset=offset)


def _open_extents(host: HostFile, descriptor: Descriptor, opened: list[HostFile]) -> list[_Extent]:
    """The extents a descriptor file lists, their files opened inside its directory."""
    if not descriptor.extents:
        raise CorruptImage("VMDK descriptor lists no extents", path=host.name, structure="VMDK descriptor")
    if not os.path.isfile(host.name):
        raise UnsupportedFormat("a VMDK descriptor read from a stream cannot reach its extent files",
                                path=host.name, format=NAME)
    directory = os.path.dirname(os.path.realpath(host.name))
    extents: list[_Extent] = []
    files: dict[str, HostFile] = {}  # each extent file opened once, however many lines name it
    position = 0
    for index, line in enumerate(descriptor.extents):
        length = line.sectors * SECTOR
        if line.type in ZERO_TYPES:
            extents.append(_Extent(index, position, length, "zero"))
        elif line.type in FLAT_TYPES | SPARSE_TYPES:
            path = _extent_path(host.name, directory, line)
            extent_host = files.get(path)
            if extent_host is None:
                extent_host = files[path] = HostFile(path)
                opened.append(extent_host)
            if line.type in FLAT_TYPES:
                extents.append(_open_flat(extent_host, index, position, line))
            else:
                sparse = _open_sparse(extent_host, index, position, own_file=False)
                assert sparse.header is not None
                if sparse.header.capacity < line.sectors:
                    raise CorruptImage(
                        f"extent {line.filename!r} holds {sparse.header.capacity} sectors, but the descriptor "
                        f"gives it {line.sectors}",
                        path=host.name, structure="VMDK descriptor",
                    )
                sparse.length = length
                extents.append(sparse)
        else:
            raise UnsupportedFormat(
                f"VMDK extent type {line.type} ({line.filename!r}): diskimg reads FLAT, VMFS, SPARSE and ZERO",
                path=host.name, format=NAME, hint=f"convert it first: {convert_commands('vmdk', host.name)}",
            )
        position += length
    return extents


def _extent_path(descriptor_path: str, directory: str, line: ExtentLine) -> str:
    assert line.filename is not None
    path = confined_path(directory, line.filename, [directory])
    if path is None:
        raise BackingFileError(
            f"extent file {line.filename!r} lies outside the descriptor's directory ({directory})",
            path=descriptor_path,
        )
    if not os.path.isfile(path):
        raise BackingFileError(f"extent file {line.filename!r} not found beside the descriptor",
                               path=descriptor_path)
    return path


def _open_flat(host: HostFile, index: int, start: int, line: ExtentLine) -> _Extent:
    data_offset = line.offset * SECTOR
    needed = data_offset + line.sectors * SECTOR
    if needed > host.size:
        raise CorruptImage(
            f"flat extent holds {host.size} bytes, but the descriptor needs {needed}", path=host.name,
            structure="VMDK flat extent",
        )
    return _Extent(index, start, line.sectors * SECTOR, "flat", host, False, data_offset)


def _open_sparse(host: HostFile, index: int, start: int, own_file: bool) -> _Extent:
    """A hosted sparse extent: its header (completed by the footer when the grain directory is
    at the end) and its grain directory, every table inside the file."""
    header = parse_header(host.read_at(0, SECTOR), path=host.name)
    if header.gd_offset == GD_AT_END:
        header = _footer_header(host, header)
    directory_offset = header.gd_offset * SECTOR
    directory_bytes = header.gd_entries * 4
    if header.gd_offset == 0 or directory_offset + directory_bytes > host.size:
        raise CorruptImage(
            f"grain directory ({header.gd_entries} entries at sector {header.gd_offset}) lies outside the file "
            f"({host.size} bytes)",
            path=host.name, offset=directory_offset, structure="VMDK grain directory",
        )
    directory = parse_grain_table(host.read_at(directory_offset, directory_bytes))
    table_bytes = header.gtes_per_gt * 4
    for number, sector in enumerate(directory):
        if sector and sector * SECTOR + table_bytes > host.size:
            raise CorruptImage(
                f"grain table {number} at sector {sector} lies past the end of the file ({host.size} bytes)",
                path=host.name, offset=directory_offset + 4 * number, structure="VMDK grain directory",
            )
    return _Extent(index, start, header.capacity * SECTOR, "sparse", host, own_file, header=header,
                   directory=directory, tables_present=[n for n, sector in enumerate(directory) if sector])


def _footer_header(host: HostFile, header: SparseHeader) -> SparseHeader:
    """The header copy in a stream-optimized extent's footer: footer marker, header, end-of-stream."""
    tail_offset = host.size - 3 * SECTOR
    tail = host.read_at(tail_offset, 3 * SECTOR) if tail_offset >= SECTOR else b""
    if len(tail) != 3 * SECTOR:
        raise CorruptImage("stream-optimized VMDK too short for its footer", path=host.name,
                           structure="VMDK footer")
    marker, eos = parse_marker(tail), parse_marker(tail[2 * SECTOR :])
    if marker.is_grain or marker.type != MARKER_FOOTER or eos.is_grain or eos.type != MARKER_EOS or eos.value:
        raise CorruptImage("stream-optimized VMDK does not end with a footer and an end-of-stream marker "
                           "(the file is incomplete)", path=host.name, offset=tail_offset, structure="VMDK footer")
    footer = parse_header(tail[SECTOR : 2 * SECTOR], path=host.name, offset=tail_offset + SECTOR)
    if footer.gd_offset == GD_AT_END:
        raise CorruptImage("the footer does not locate the grain directory", path=host.name,
                           offset=tail_offset + SECTOR, structure="VMDK footer")
    return with_footer(header, footer)


def _grain_error(extent: _Extent, host_offset: int, grain_offset: int, message: str) -> CorruptImage:
    assert extent.host is not None
    return CorruptImage(f"compressed grain at guest offset {extent.start + grain_offset} {message}",
                        path=extent.host.name, offset=host_offset, structure="VMDK compressed grain")


def _max_stored(grain_bytes: int) -> int:
    """The most bytes a compressed grain may take (deflate's stored form and framing included)."""
    return 2 * grain_bytes + SECTOR


def _framed_grain(extent: _Extent, window: memoryview, at: int, host_offset: int, grain_offset: int) -> memoryview:
    """The compressed bytes behind the grain marker at ``window[at:]`` (the file from some offset)."""
    assert extent.header is not None
    marker = window[at : at + GRAIN_MARKER_SIZE]
    if len(marker) != GRAIN_MARKER_SIZE:
        raise _grain_error(extent, host_offset, grain_offset, "lies past the end of the file")
    stored_size = int.from_bytes(marker[8:12], "little")
    if stored_size == 0 or stored_size > _max_stored(extent.header.grain_bytes):
        raise _grain_error(extent, host_offset, grain_offset, f"has an impossible stored size ({stored_size} bytes)")
    stored = window[at + GRAIN_MARKER_SIZE : at + GRAIN_MARKER_SIZE + stored_size]
    if len(stored) != stored_size:
        raise _grain_error(extent, host_offset, grain_offset, "runs past the end of the file")
    return stored


def _read_grain(extent: _Extent, host_offset: int, grain_offset: int) -> bytes:
    """One compressed grain read on its own (after its marker, when the extent has markers), inflated."""
    assert extent.header is not None and extent.host is not None
    grain_bytes = extent.header.grain_bytes
    if extent.header.markers:
        window = memoryview(extent.host.read_at(host_offset, GRAIN_MARKER_SIZE + _max_stored(grain_bytes)))
        stored: bytes | memoryview = _framed_grain(extent, window, 0, host_offset, grain_offset)
    else:
        stored = extent.host.read_at(host_offset, _max_stored(grain_bytes))
    return _inflate_grain(extent, stored, host_offset, grain_offset)


def _inflate_grain(extent: _Extent, stored: bytes | memoryview, host_offset: int, grain_offset: int) -> bytes:
    """A grain's deflate stream inflated to exactly one grain, checked."""
    assert extent.header is not None
    # zlib-ng inflates the same deflate streams faster than zlib; loaded only when a compressed grain
    # is read, since start-up time counts on every command
    from zlib_ng import zlib_ng

    grain_bytes = extent.header.grain_bytes
    decompressor = zlib_ng.decompressobj()
    try:
        data = decompressor.decompress(stored, grain_bytes)
    except cast(type[Exception], zlib_ng.error) as exc:
        raise _grain_error(extent, host_offset, grain_offset, f"does not decompress: {exc}") from None
    if decompressor.unconsumed_tail:
        raise _grain_error(extent, host_offset, grain_offset,
                           f"decompresses to more than the grain size ({grain_bytes} bytes)")
    if len(data) < grain_bytes:
        if not decompressor.eof:
            raise _grain_error(extent, host_offset, grain_offset, "is cut short")
        # VMware compresses the last grain of a disk only up to its capacity
        if len(data) < min(grain_bytes, extent.length - grain_offset):
            raise _grain_error(extent, host_offset, grain_offset,
                               f"decompresses to {len(data)} bytes, less than the grain")
        data += bytes(grain_bytes - len(data))
    return data


def _window_buffer(size: int) -> bytearray:
    """A buffer of at least ``size`` bytes for this thread, reused from call to call."""
    buffer: bytearray | None = getattr(_windows, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _windows.buffer = bytearray(size)
    return buffer
