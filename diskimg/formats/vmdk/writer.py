"""The VMDK writer, plan then stream.

``streamOptimized`` (what vSphere OVA import and other clouds take) is forward-only by design:
header and descriptor, then each grain as a marker with its deflate-compressed bytes, each grain
table after its grains, the grain directory, the footer (a copy of the header that locates the
directory) and the end-of-stream marker; so it goes to a file or a pipe alike. Grains are
compressed in worker threads (``compression.CompressionPool``).

``monolithicSparse`` (VMware Workstation) puts its redundant and primary grain directories and
tables before the data, as qemu-img does: the grains come from an exact plan, metadata first.
"""

from __future__ import annotations

import os
import zlib
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from ...errors import OutputError, UsageError
from ..compression import ClusterCompressor, CompressionPool
from ..reader import Extent, ExtentKind
from ..writer import DiskWriter, OutputTarget, option_flag
from .structures import (
    COMPRESS_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NEWLINE_TEST,
    FLAG_REDUNDANT_GT,
    FLAG_ZERO_GRAIN,
    GD_AT_END,
    GTES_PER_GT,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    MAX_GD_ENTRIES,
    NAME,
    NO_PARENT_CID,
    SECTOR,
    ExtentLine,
    SparseHeader,
    pack_descriptor,
    pack_metadata_marker,
)

SUBFORMATS = ("monolithicSparse", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
GRAIN_SECTORS = 128  # 64 KiB, as VMware and qemu-img write
DESCRIPTOR_SECTORS = 20  # qemu-img's embedded descriptor area
ZLIB_LEVEL = 6  # qemu-img: Z_DEFAULT_COMPRESSION
GT_SECTORS = GTES_PER_GT * 4 // SECTOR
_GRAIN_BYTES = GRAIN_SECTORS * SECTOR


@dataclass(frozen=True)
class VmdkWriterSettings:
    subformat: str
    adapter_type: str
    hwversion: str
    zeroed_grain: bool


def writer_settings(options: Mapping[str, str]) -> VmdkWriterSettings:
    """The ``-o`` options as qemu-img names them, checked; anything else is a usage error."""
    subformat = options.get("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise UsageError(f"vmdk subformat {subformat!r}: diskimg writes {' and '.join(SUBFORMATS)}")
    adapter_type = options.get("adapter_type", "ide")
    if adapter_type not in ADAPTER_TYPES:
        raise UsageError(f"vmdk adapter_type {adapter_type!r}: expected one of {', '.join(ADAPTER_TYPES)}")
    compat6 = option_flag(options, "compat6", NAME)
    hwversion = options.get("hwversion", "undefined")
    if compat6 and hwversion != "undefined":
        raise UsageError("vmdk options compat6 and hwversion cannot be given together")
    if hwversion == "undefined":
        hwversion = "6" if compat6 else "4"
    elif not hwversion.isdigit() or not 1 <= int(hwversion) <= 99:
        raise UsageError(f"vmdk hwversion {hwversion!r}: expected a virtual hardware version number")
    return VmdkWriterSettings(subformat, adapter_type, hwversion, option_flag(options, "zeroed_grain", NAME))


def _descriptor(settings: VmdkWriterSettings, capacity: int, extent_name: str) -> bytes:
    heads = 16 if settings.adapter_type == "ide" else 255
    ddb = {
        "ddb.virtualHWVersion": settings.hwversion,
        "ddb.geometry.cylinders": str(capacity // (63 * heads)),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": "63",
        "ddb.adapterType": settings.adapter_type,
    }
    cid = int.from_bytes(os.urandom(4), "little") or 1
    text = pack_descriptor(settings.subformat, cid, [ExtentLine("RW", capacity, "SPARSE", extent_name)], ddb,
                           NO_PARENT_CID)
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise UsageError(f"vmdk descriptor for output name {extent_name!r} is too long")
    return text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0")


def _sectors(length: int) -> int:
    return -(-length // SECTOR)


#: a batch of grains to compress: the grains, in slot order, and the buffer holding them
_Batch: TypeAlias = "tuple[list[int], bytearray]"


def _pack_table(entries: array[int]) -> bytes:
    table = array("I", entries)
    if array("I", [1]).tobytes() != (1).to_bytes(4, "little"):
        table.byteswap()
    data = table.tobytes()
    return data + bytes(-len(data) % SECTOR)


def _planned_grains(extents: Iterable[Extent], grains: int) -> list[int]:
    """The grains a plan's DATA extents touch, in order."""
    planned: list[int] = []
    for extent in extents:
        if extent.kind is not ExtentKind.DATA or not extent.length:
            continue
        first = max(extent.start // _GRAIN_BYTES, planned[-1] + 1 if planned else 0)
        last = min((extent.end - 1) // _GRAIN_BYTES, grains - 1)
        planned.extend(range(first, last + 1))
    return planned


class VmdkWriter(DiskWriter):
    format = NAME
    OPTIONS: Mapping[str, str] = {
        "subformat": "monolithicSparse (default) or streamOptimized",
        "adapter_type": "ide (default), buslogic, lsilogic or legacyESX",
        "hwversion": "virtual hardware version in the descriptor (default 4)",
        "compat6": "on or off (default): hardware version 6",
        "zeroed_grain": "on or off (default): set the zeroed-grain flag (monolithicSparse)",
    }

    #: grains given to a compression thread at once (2 MiB)
    BATCH_GRAINS = 32

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.settings = writer_settings(self.options)
        self.capacity = _sectors(virtual_size)
        self.disk_size = self.capacity * SECTOR
        self.grains = -(-self.capacity // GRAIN_SECTORS)
        self.gd_entries = -(-self.grains // GTES_PER_GT)
        if self.gd_entries > MAX_GD_ENTRIES:
            raise UsageError(f"a vmdk disk of {virtual_size} bytes is too large for a sparse extent")
        self.stream = self.settings.subformat == "streamOptimized"
        name = os.path.basename(target.name)
        self._extent_name = name if name.endswith(".vmdk") else "disk.vmdk"
        self._started = False
        # streamOptimized: the grain table being filled, the directory, the batch being assembled
        self._directory = array("I", bytes(4 * self.gd_entries))
        self._table = array("I", bytes(4 * GTES_PER_GT))
        self._table_index = -1
        self._pool: CompressionPool[_Batch, _Batch, tuple[bytes, list[int]]] | None = None
        self._compressor = ClusterCompressor(_GRAIN_BYTES, _GRAIN_BYTES, zlib_level=ZLIB_LEVEL, zlib_wbits=15)
        self._buffer = bytearray(self.BATCH_GRAINS * _GRAIN_BYTES)
        self._free_buffers: list[bytearray] = []
        self._batch: list[int] = []  # grains of the batch, in slot order
        # monolithicSparse: planned grain -> its sector in the file
        self._grain_sector: dict[int, int] = {}

    # -- sizes ------------------------------------------------------------------------------------

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """Exact for monolithicSparse; for streamOptimized an upper bound (grains stored uncompressed)."""
        settings = writer_settings(dict(options or {}))
        capacity = _sectors(virtual_size)
        grains = -(-capacity // GRAIN_SECTORS)
        gd_entries = -(-grains // GTES_PER_GT)
        planned = _planned_grains(extents, grains)
        if settings.subformat == "streamOptimized":
            tables = len({grain // GTES_PER_GT for grain in planned})
            grain_record = _sectors(12 + _GRAIN_BYTES + 64)  # marker, stored deflate blocks, zlib framing
            return SECTOR * (GRAIN_SECTORS + len(planned) * grain_record + tables * (1 + GT_SECTORS)
                             + 1 + _sectors(4 * gd_entries) + 3)
        return SECTOR * (cls._sparse_overhead(gd_entries) + len(planned) * GRAIN_SECTORS)

    @staticmethod
    def _sparse_overhead(gd_entries: int) -> int:
        metadata = 1 + DESCRIPTOR_SECTORS + 2 * (_sectors(4 * gd_entries) + gd_entries * GT_SECTORS)
        return -(-metadata // GRAIN_SECTORS) * GRAIN_SECTORS

    @property
    def requires_exact_plan(self) -> bool:
        return not self.stream  # tables come first: only grains with data are allocated

    # -- plan ---------------------------------------------------------------------------------------

    def plan(self, extents: Iterable[Extent]) -> None:
        if self._started:
            raise UsageError("vmdk writer: plan() given twice")
        if self.stream:
            self._start_stream()
        else:
            self._write_sparse_metadata(_planned_grains(extents, self.grains))

    def _ensure_started(self) -> None:
        if not self._started:
            self.plan([Extent(0, self.disk_size, ExtentKind.DATA)] if self.disk_size else [])

    # -- streamOptimized ----------------------------------------------------------------------------

    def _header(self, gd_offset: int, overhead: int, flags: int, rgd_offset: int = 0) -> bytes:
        return SparseHeader(
            version=3 if self.stream else (2 if self.settings.zeroed_grain else 1),
            flags=flags,
            capacity=self.capacity,
            grain_size=GRAIN_SECTORS,
            descriptor_offset=1,
            descriptor_size=DESCRIPTOR_SECTORS,
            rgd_offset=rgd_offset,
            gd_offset=gd_offset,
            overhead=overhead,
            compress_algorithm=COMPRESS_DEFLATE if self.stream else 0,
        ).pack()

    _STREAM_FLAGS = FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS

    def _start_stream(self) -> None:
        self._started = True
        self.target.write(self._header(GD_AT_END, GRAIN_SECTORS, self._STREAM_FLAGS))
        self.target.write(_descriptor(self.settings, self.capacity, self._extent_name))
        self.target.skip((GRAIN_SECTORS - 1 - DESCRIPTOR_SECTORS) * SECTOR)
        self._pool = CompressionPool("vmdk-compress")

    def _assemble(self, offset: int, view: memoryview) -> None:
        """Copy data into whole grains of the batch buffer; a batch stays within one grain table."""
        position, end = offset, offset + len(view)
        while position < end:
            grain = position // _GRAIN_BYTES
            grain_start = grain * _GRAIN_BYTES
            piece_end = min(end, grain_start + _GRAIN_BYTES)
            if not self._batch or self._batch[-1] != grain:
                if len(self._batch) == self.BATCH_GRAINS or (
                    self._batch and self._batch[0] // GTES_PER_GT != grain // GTES_PER_GT
                ):
                    self._submit()
                slot = len(self._batch) * _GRAIN_BYTES
                if position != grain_start or piece_end != grain_start + _GRAIN_BYTES:
                    self._buffer[slot : slot + _GRAIN_BYTES] = bytes(_GRAIN_BYTES)
                self._batch.append(grain)
            slot = (len(self._batch) - 1) * _GRAIN_BYTES
            self._buffer[slot + position - grain_start : slot + piece_end - grain_start] = view[
                position - offset : piece_end - offset
            ]
            position = piece_end

    def _submit(self) -> None:
        assert self._pool is not None
        if self._batch:
            self._pool.submit(self._pack_batch, (self._batch, self._buffer), (self._batch, self._buffer))
            self._buffer = self._free_buffers.pop() if self._free_buffers else bytearray(len(self._buffer))
            self._batch = []
        self._drain(self._pool.max_inflight)

    def _pack_batch(self, batch: _Batch) -> tuple[bytes, list[int]]:
        """Grain markers with their compressed grains, sector-padded, as one blob (worker thread).
        A grain deflate cannot shrink is stored in deflate's stored form, still a zlib stream."""
        grains, buffer = batch
        view = memoryview(buffer)
        slices = [view[slot * _GRAIN_BYTES : (slot + 1) * _GRAIN_BYTES] for slot in range(len(grains))]
        records = []
        for grain, data, packed in zip(grains, slices, self._compressor.batch(slices), strict=True):
            if packed is None:
                packed = zlib.compress(data, 0)
            record = (grain * GRAIN_SECTORS).to_bytes(8, "little") + len(packed).to_bytes(4, "little") + packed
            records.append(record + bytes(-len(record) % SECTOR))
        return b"".join(records), [len(record) // SECTOR for record in records]

    def _drain(self, keep: int) -> None:
        assert self._pool is not None
        for (grains, buffer), (blob, sectors) in self._pool.completed(keep):
            table_index = grains[0] // GTES_PER_GT
            if table_index != self._table_index:
                self._flush_table()
                self._table_index = table_index
            sector = self.target.position // SECTOR
            for grain, count in zip(grains, sectors, strict=True):
                self._table[grain % GTES_PER_GT] = sector
                sector += count
            self.target.write(blob)
            self._free_buffers.append(buffer)

    def _flush_table(self) -> None:
        """The grain table of the grains just written, after them, behind its marker."""
        if self._table_index < 0:
            return
        self.target.write(pack_metadata_marker(GT_SECTORS, MARKER_GT))
        self._directory[self._table_index] = self.target.position // SECTOR
        self.target.write(_pack_table(self._table))
        self._table = array("I", bytes(4 * GTES_PER_GT))
        self._table_index = -1

    def _finish_stream(self) -> None:
        self._submit()
        self._drain(0)
        self._flush_table()
        directory = _pack_table(self._directory)
        self.target.write(pack_metadata_marker(len(directory) // SECTOR, MARKER_GD))
        gd_offset = self.target.position // SECTOR
        self.target.write(directory)
        self.target.write(pack_metadata_marker(1, MARKER_FOOTER))
        self.target.write(self._header(gd_offset, GRAIN_SECTORS, self._STREAM_FLAGS))
        self.target.write(pack_metadata_marker(0, MARKER_EOS))

    # -- monolithicSparse ---------------------------------------------------------------------------

    def _write_sparse_metadata(self, planned: list[int]) -> None:
        """Header, descriptor, redundant and primary directories with all their tables (as qemu-img
        lays them out), the planned grains' entries filled in; the grains follow in guest order."""
        self._started = True
        gd_sectors = _sectors(4 * self.gd_entries)
        tables_sectors = self.gd_entries * GT_SECTORS
        rgd = 1 + DESCRIPTOR_SECTORS
        gd = rgd + gd_sectors + tables_sectors
        overhead = self._sparse_overhead(self.gd_entries)
        tables = array("I", bytes(4 * self.gd_entries * GTES_PER_GT))
        sector = overhead
        for grain in planned:
            tables[grain] = sector
            self._grain_sector[grain] = sector
            sector += GRAIN_SECTORS
        flags = FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT | (FLAG_ZERO_GRAIN if self.settings.zeroed_grain else 0)
        target = self.target
        target.write(self._header(gd, overhead, flags, rgd))
        target.write(_descriptor(self.settings, self.capacity, self._extent_name))
        packed_tables = _pack_table(tables)
        for directory_start in (rgd, gd):
            first_table = directory_start + gd_sectors
            directory = array("I", range(first_table, first_table + tables_sectors, GT_SECTORS))
            target.write(_pack_table(directory))
            target.write(packed_tables)
        target.skip((overhead - gd - gd_sectors - tables_sectors) * SECTOR)
        self._end_sector = sector

    def _write_sparse(self, offset: int, view: memoryview) -> None:
        position, end = offset, offset + len(view)
        while position < end:
            grain = position // _GRAIN_BYTES
            sector = self._grain_sector.get(grain)
            if sector is None:
                raise OutputError(
                    f"vmdk writer: data at guest offset {position} lies outside the planned allocation "
                    "(the source changed during the conversion?)",
                    path=self.target.name,
                )
            piece_end = min(end, (grain + 1) * _GRAIN_BYTES)
            host = sector * SECTOR + position - grain * _GRAIN_BYTES
            self.target.skip(host - self.target.position)
            self.target.write(view[position - offset : piece_end - offset])
            position = piece_end

    # -- the DiskWriter calls -----------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.disk_size)
        if not len(view):
            return
        self._ensure_started()
        self._written_to = offset + len(view)
        if self.stream:
            self._assemble(offset, view)
        else:
            self._write_sparse(offset, view)

    def finish(self) -> None:
        self._ensure_started()
        if self.stream:
            self._finish_stream()
        else:
            self.target.skip(self._end_sector * SECTOR - self.target.position)
        self.target.finish()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

