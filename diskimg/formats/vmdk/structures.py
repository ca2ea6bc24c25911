"""VMDK on-disk structures (VMware "Virtual Disk Format 5.0"): the hosted sparse extent header,
the text descriptor and its extent lines, grain tables and the stream-optimized markers.

Pure parse/pack functions; every field an image supplies is checked here, once, and the reader,
``check`` and detection all call these.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ...errors import CorruptImage, UnsupportedFormat

NAME = "vmdk"
SECTOR = 512
MAGIC = b"KDMV"
#: the hosted sparse extent header: magic, version, flags, capacity, grainSize, descriptorOffset,
#: descriptorSize, numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, the four
#: newline-detection bytes, compressAlgorithm, padding (sector counts unless noted)
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
assert _HEADER.size == SECTOR

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
NEWLINE_BYTES = b"\n \r\n"
COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1
#: gdOffset of a stream-optimized extent whose grain directory is in the footer
GD_AT_END = 0xFFFFFFFFFFFFFFFF
#: grain table entries: 0 unallocated, 1 a zero grain (with FLAG_ZERO_GRAIN)
GTE_UNALLOCATED = 0
GTE_ZERO = 1
GTES_PER_GT = 512  # the only value VMware and qemu use; qemu refuses larger ones

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
_MARKER = struct.Struct("<QII")  # value (lba, or sectors of metadata), size (0 for metadata), type

#: grain sizes (sectors) accepted: powers of two from 4 KiB to 1 MiB (qemu accepts up to 128 MiB)
MIN_GRAIN_SECTORS = 8
MAX_GRAIN_SECTORS = 2048
#: caps that bound memory for a hostile header: the grain directory (64 MiB) and the descriptor
MAX_GD_ENTRIES = 1 << 24
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_EXTENTS = 1024
#: 2^63 bytes and more cannot be addressed; VMware's limit is 62 TiB
MAX_CAPACITY_SECTORS = (1 << 63) // SECTOR - 1

#: create types diskimg reads; the others are named and refused with a conversion command
READ_CREATE_TYPES = frozenset({
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
})
#: extent types diskimg reads (descriptor extent lines)
FLAT_TYPES = frozenset({"FLAT", "VMFS"})
SPARSE_TYPES = frozenset({"SPARSE"})
ZERO_TYPES = frozenset({"ZERO"})
NO_PARENT_CID = 0xFFFFFFFF


@dataclass(frozen=True)
class SparseHeader:
    """The header of a hosted sparse extent (sector 0, and in the footer of a stream-optimized one)."""

    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int = 0
    descriptor_size: int = 0
    gtes_per_gt: int = GTES_PER_GT
    rgd_offset: int = 0
    gd_offset: int = 0
    overhead: int = 0
    unclean_shutdown: int = 0
    newline_bytes: bytes = NEWLINE_BYTES
    compress_algorithm: int = COMPRESS_NONE

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zero_grains(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)

    @property
    def grains(self) -> int:
        return -(-self.capacity // self.grain_size)

    @property
    def gd_entries(self) -> int:
        return -(-self.grains // self.gtes_per_gt)

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, self.version, self.flags, self.capacity, self.grain_size, self.descriptor_offset,
            self.descriptor_size, self.gtes_per_gt, self.rgd_offset, self.gd_offset, self.overhead,
            self.unclean_shutdown, self.newline_bytes, self.compress_algorithm,
        )


def parse_header(data: bytes, path: str | None = None, offset: int = 0) -> SparseHeader:
    """The sparse extent header in ``data`` (512 bytes), every field checked as qemu does."""

    def corrupt(message: str) -> CorruptImage:
        return CorruptImage(message, path=path, offset=offset, structure="VMDK sparse extent header")

    if len(data) < SECTOR:
        raise corrupt("file ends inside the sparse extent header")
    (magic, version, flags, capacity, grain_size, descriptor_offset, descriptor_size, gtes_per_gt,
     rgd_offset, gd_offset, overhead, unclean, newline_bytes, compress) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt("no 'KDMV' signature")
    if version not in (1, 2, 3):
        raise UnsupportedFormat(f"VMDK sparse extent version {version} (diskimg reads 1 to 3)", path=path, format=NAME)
    header = SparseHeader(version, flags, capacity, grain_size, descriptor_offset, descriptor_size, gtes_per_gt,
                          rgd_offset, gd_offset, overhead, unclean, newline_bytes, compress)
    if flags & FLAG_NEWLINE_TEST and newline_bytes != NEWLINE_BYTES:
        raise corrupt("newline detection bytes are damaged (the file went through a text-mode transfer)")
    if capacity > MAX_CAPACITY_SECTORS:
        raise corrupt(f"capacity of {capacity} sectors is out of range")
    if grain_size & (grain_size - 1) or not MIN_GRAIN_SECTORS <= grain_size <= MAX_GRAIN_SECTORS:
        raise corrupt(f"grain size of {grain_size} sectors is not a power of two from "
                      f"{MIN_GRAIN_SECTORS} to {MAX_GRAIN_SECTORS}")
    if gtes_per_gt != GTES_PER_GT:
        raise corrupt(f"{gtes_per_gt} entries per grain table (VMDK uses {GTES_PER_GT})")
    if header.gd_entries > MAX_GD_ENTRIES:
        raise corrupt(f"grain directory of {header.gd_entries} entries is too big (at most {MAX_GD_ENTRIES})")
    if header.compressed and compress != COMPRESS_DEFLATE:
        raise UnsupportedFormat(f"VMDK grain compression algorithm {compress} (only deflate exists)",
                                path=path, format=NAME)
    if descriptor_size > MAX_DESCRIPTOR_BYTES // SECTOR:
        raise corrupt(f"embedded descriptor of {descriptor_size} sectors is too big")
    return header


def with_footer(header: SparseHeader, footer: SparseHeader) -> SparseHeader:
    """A stream-optimized extent's header completed by its footer copy (the real gdOffset)."""
    return replace(header, gd_offset=footer.gd_offset, rgd_offset=footer.rgd_offset)


# --- markers (stream-optimized) ---------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    value: int  # the grain's first sector (grain marker) or the metadata's sector count
    size: int  # compressed bytes following (grain marker); 0 for metadata markers
    type: int  # MARKER_* for metadata markers; meaningless for grain markers

    @property
    def is_grain(self) -> bool:
        return self.size != 0


def parse_marker(data: bytes) -> Marker:
    if len(data) < _MARKER.size:
        raise ValueError("short marker")
    return Marker(*_MARKER.unpack_from(data))


def pack_metadata_marker(sectors: int, marker_type: int) -> bytes:
    return _MARKER.pack(sectors, 0, marker_type).ljust(SECTOR, b"\0")


def pack_grain_marker(lba: int, compressed: bytes) -> bytes:
    """A grain marker with its compressed data, padded to whole sectors."""
    record = struct.pack("<QI", lba, len(compressed)) + compressed
    return record + bytes(-len(record) % SECTOR)


GRAIN_MARKER_SIZE = 12  # lba u64 + size u32, then the compressed bytes


def parse_grain_table(data: bytes) -> array[int]:
    table = array("I")
    table.frombytes(data)
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        table.byteswap()
    return table


# --- the descriptor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtentLine:
    """One extent line: ``RW 8388608 SPARSE "disk-s001.vmdk"`` (FLAT lines may add a sector offset)."""

    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int = 0  # sectors into the file (FLAT / VMFS)


@dataclass(frozen=True)
class Descriptor:
    create_type: str | None
    cid: int | None
    parent_cid: int
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]
    ddb: dict[str, str] = field(default_factory=dict)
    version: int | None = None

    @property
    def has_parent(self) -> bool:
        return self.parent_cid != NO_PARENT_CID

    @property
    def sectors(self) -> int:
        return sum(extent.sectors for extent in self.extents)


_ASSIGNMENT = re.compile(r'^\s*([A-Za-z0-9_.]+)\s*=\s*"?([^"]*)"?\s*$')
_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')


def parse_descriptor(data: bytes, path: str | None = None, offset: int = 0) -> Descriptor:
    """The text descriptor (a separate file, or the area embedded in a sparse extent)."""

    def corrupt(message: str) -> CorruptImage:
        return CorruptImage(message, path=path, offset=offset, structure="VMDK descriptor")

    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise corrupt(f"descriptor larger than {MAX_DESCRIPTOR_BYTES} bytes")
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    values: dict[str, str] = {}
    ddb: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        extent = _EXTENT.match(stripped)
        if extent:
            access, sectors, kind, filename, start = extent.groups()
            if len(extents) >= MAX_EXTENTS:
                raise corrupt(f"more than {MAX_EXTENTS} extents")
            if kind not in ZERO_TYPES and filename is None:
                raise corrupt(f"line {number}: {kind} extent without a file name")
            extents.append(ExtentLine(access, int(sectors), kind, filename, int(start or 0)))
            continue
        assignment = _ASSIGNMENT.match(stripped)
        if assignment is None:
            raise corrupt(f"line {number} is neither a setting nor an extent: {stripped[:60]!r}")
        key, value = assignment.groups()
        (ddb if key.startswith("ddb.") else values)[key] = value
    parent_cid = _hex(values.get("parentCID", "ffffffff"), "parentCID", corrupt)
    cid = _hex(values["CID"], "CID", corrupt) if "CID" in values else None
    version = values.get("version")
    descriptor = Descriptor(
        create_type=values.get("createType"),
        cid=cid,
        parent_cid=NO_PARENT_CID if parent_cid is None else parent_cid,
        parent_hint=values.get("parentFileNameHint") or None,
        extents=tuple(extents),
        ddb=ddb,
        version=int(version) if version and version.isdigit() else None,
    )
    if descriptor.sectors > MAX_CAPACITY_SECTORS:
        raise corrupt("the extents add up to 2^63 bytes or more")
    return descriptor


def _hex(value: str, key: str, corrupt: Callable[[str], CorruptImage]) -> int:
    try:
        return int(value, 16) & 0xFFFFFFFF
    except ValueError:
        raise corrupt(f"{key} {value!r} is not hexadecimal") from None


def pack_descriptor(
    create_type: str, cid: int, extents: list[ExtentLine], ddb: dict[str, str], parent_cid: int = NO_PARENT_CID
) -> bytes:
    """The descriptor text as VMware and qemu-img lay it out."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
        "",
        "# Extent description",
    ]
    for extent in extents:
        line = f"{extent.access} {extent.sectors} {extent.type}"
        if extent.filename is not None:
            line += f' "{extent.filename}"'
            if extent.offset:
                line += f" {extent.offset}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += [f'{key} = "{value}"' for key, value in ddb.items()]
    return ("\n".join(lines) + "\n").encode()
