"""Structural check of a VMDK for ``diskimg check``, like ``qemu-img check``: the header, footer,
descriptor and extent files are checked by opening the disk (structures.py and the reader); then
every grain table entry of every sparse extent: inside the file, outside the metadata, no grain
used twice, compressed grains framed by a readable marker, and the redundant tables agreeing with
the primary ones. Only metadata is read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...host.files import HostFile
from ..probing import OpenOptions
from .reader import VmdkReader, _Extent
from .structures import (
    FLAG_REDUNDANT_GT,
    GRAIN_MARKER_SIZE,
    GTE_UNALLOCATED,
    GTE_ZERO,
    SECTOR,
    parse_grain_table,
)

#: (kind, message, offset, structure), as CheckResult.add takes them
Report = Callable[[str, str, "int | None", "str | None"], None]


@dataclass
class VmdkCheckCounts:
    total_grains: int = 0
    allocated_grains: int = 0
    compressed_grains: int = 0


def check_vmdk(host: HostFile, report: Report) -> VmdkCheckCounts:
    """Check the disk whose descriptor or sparse extent ``host`` is; problems go to ``report``."""
    counts = VmdkCheckCounts()
    reader = VmdkReader.open(host, None, OpenOptions())
    try:
        for extent in reader.sparse_extents:
            _check_extent(extent, report, counts)
    finally:
        reader.close_extent_files()
    return counts


def _check_extent(extent: _Extent, report: Report, counts: VmdkCheckCounts) -> None:
    header, host = extent.header, extent.host
    assert header is not None and host is not None  # a sparse extent has both
    grain_bytes = header.grain_bytes
    metadata_end = header.overhead * SECTOR
    used: dict[int, int] = {}
    counts.total_grains += header.grains
    for table_index in extent.tables_present:
        table = extent.grain_table(table_index)
        assert table is not None  # tables_present lists the directory entries that name a table
        table_offset = extent.directory[table_index] * SECTOR
        if table_offset < SECTOR * (1 + header.descriptor_size):
            report("corruption", f"{host.name}: grain table {table_index} overlaps the header or descriptor",
                   table_offset, "VMDK grain directory")
        for slot, sector in enumerate(table):
            grain = table_index * header.gtes_per_gt + slot
            if sector == GTE_UNALLOCATED or grain >= header.grains or (sector == GTE_ZERO and header.zero_grains):
                continue
            counts.allocated_grains += 1
            where = table_offset + 4 * slot
            start = sector * SECTOR
            if metadata_end and start < metadata_end:
                report("corruption", f"{host.name}: grain {grain} at byte {start} lies inside the metadata "
                       f"(the first {metadata_end} bytes)", where, "VMDK grain table")
                continue
            if sector in used:
                report("corruption", f"{host.name}: grains {used[sector]} and {grain} share the sector {sector}",
                       where, "VMDK grain table")
                continue
            used[sector] = grain
            if header.compressed:
                counts.compressed_grains += 1
                _check_compressed(extent, grain, start, where, report)
            elif start + grain_bytes > host.size:
                report("corruption", f"{host.name}: grain {grain} at byte {start} runs past the end of the file",
                       where, "VMDK grain table")
    if header.flags & FLAG_REDUNDANT_GT and header.rgd_offset:
        _check_redundant(extent, report)


def _check_compressed(extent: _Extent, grain: int, start: int, where: int, report: Report) -> None:
    header, host = extent.header, extent.host
    assert header is not None and host is not None
    if header.markers:
        marker = host.read_at(start, GRAIN_MARKER_SIZE)
        size = int.from_bytes(marker[8:12], "little") if len(marker) == GRAIN_MARKER_SIZE else 0
        if size == 0 or start + GRAIN_MARKER_SIZE + size > host.size:
            report("corruption", f"{host.name}: compressed grain {grain} at byte {start} has no valid marker or "
                   "runs past the end of the file", where, "VMDK grain table")
        elif int.from_bytes(marker[:8], "little") != grain * header.grain_size:
            report("warning", f"{host.name}: the marker of compressed grain {grain} names another sector",
                   start, "VMDK grain marker")
    elif start >= host.size:
        report("corruption", f"{host.name}: compressed grain {grain} lies past the end of the file", where,
               "VMDK grain table")


def _check_redundant(extent: _Extent, report: Report) -> None:
    header, host = extent.header, extent.host
    assert header is not None and host is not None
    length = header.gd_entries * 4
    offset = header.rgd_offset * SECTOR
    data = host.read_at(offset, length)
    if len(data) != length:
        report("corruption", f"{host.name}: the redundant grain directory lies past the end of the file", offset,
               "VMDK redundant grain directory")
        return
    table_bytes = header.gtes_per_gt * 4
    for table_index, sector in enumerate(parse_grain_table(data)):
        primary = extent.grain_table(table_index) if extent.directory[table_index] else None
        copy = host.read_at(sector * SECTOR, table_bytes) if sector else b""
        if sector and len(copy) != table_bytes:
            report("corruption", f"{host.name}: redundant grain table {table_index} lies past the end of the file",
                   offset + 4 * table_index, "VMDK redundant grain directory")
        elif primary is not None and sector and parse_grain_table(copy) != primary:
            report("warning", f"{host.name}: redundant grain table {table_index} differs from the primary one",
                   sector * SECTOR, "VMDK redundant grain table")
