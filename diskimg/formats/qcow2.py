"""qcow2: QEMU's copy-on-write image format, versions 2 (compat 0.10) and 3 (compat 1.1).

Everything is big-endian and organised in clusters of ``1 << cluster_bits`` bytes (512 B .. 2 MiB):

    cluster 0      header (72 bytes in v2, ``header_length`` >= 104 in v3), then header extensions
                   (type, length, data padded to 8, ending with type 0), then the backing file name
    L1 table       one 64-bit entry per L2 table; bits 9-55 give the L2 table's host offset, 0 means
                   "this whole range is unallocated"
    L2 tables      one cluster each, one entry per guest cluster (64-bit, or 128-bit with extended L2):
                   bits 9-55 host cluster offset, bit 0 reads-as-zero, bit 62 compressed.  A
                   compressed entry instead holds a byte offset and a count of extra 512-byte
                   sectors, split at bit 62 - (cluster_bits - 8).  Extended L2 adds a bitmap for 32
                   subclusters: bits 0-31 allocated, bits 32-63 reads-as-zero.
    refcount table and blocks   reference counts of host clusters (a reader ignores them)
    snapshot table copies of L1 tables (with ids, names, dates) for internal snapshots

An unallocated guest cluster reads from the backing image, or as zeros without one.  The pure
structures below (header, extensions, snapshot entries, L2 entries) parse and pack; the reader
walks the tables on demand with a bounded cache of L2 tables; the writer (at the end) lays images
out as qemu's scripts/qcow2-to-stdout.py does, so that they can be streamed to a pipe.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

from .probing import Detection, OpenOptions, ParentOpener
from ..errors import CorruptImage, DiskImageError, OutputError, UnsupportedFormat, UsageError
from ..host.files import HostFile
from .reader import DiskReader, Extent, ImageInfo, Run, RunKind, Snapshot
from .writer import DiskWriter, option_flag
from .compression import ClusterCompressor, CompressionPool

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

try:  # zstd is a declared dependency, but keep zlib images readable without it
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]

NAME = "qcow2"
MAGIC = b"QFI\xfb"

HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's implementation limit (2 MiB clusters)
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's limit for an L1 table
MAX_L1_ENTRIES = MAX_L1_BYTES // 8
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024
MAX_REFCOUNT_ORDER = 6
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = (1 << 63) - 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entries
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32
SUBCLUSTER_MASK = 0xFFFF_FFFF
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 32 bytes at offset 72
_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")  # 48 bytes
_BITMAPS_EXT = struct.Struct(">IIQQ")  # 24 bytes
_FDE_EXT = struct.Struct(">QQ")

_NATIVE_LITTLE = sys.byteorder == "little"

#: Python exceptions a malformed file may provoke inside parsing code; turned into CorruptImage
_MALFORMED = (struct.error, zlib.error, ValueError, IndexError, KeyError, MemoryError, OverflowError)
if zstandard is not None:
    _MALFORMED = (*_MALFORMED, zstandard.ZstdError)


def _corrupt(message: str, structure: str, offset: int | None = None, path: str | None = None) -> CorruptImage:
    return CorruptImage(message, path=path, offset=offset, structure=structure)


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------


@dataclass
class Qcow2Header:
    """The fixed header at offset 0, fields in file order. ``tail`` keeps any v3 bytes past
    compression_type (up to ``header_length``) so that pack() reproduces what parse() read."""

    magic: bytes = MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    virtual_size: int = 0
    crypt_method: int = CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    # version 3
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 0  # 0 means: the natural length for the version (72, or 112 for v3)
    compression_type: int = COMPRESSION_ZLIB
    tail: bytes = b""

    def __post_init__(self) -> None:
        if not self.header_length:
            self.header_length = HEADER_V2_LENGTH if self.version < 3 else 112

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Guest clusters described by one L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_span(self) -> int:
        """Guest bytes described by one L1 entry."""
        return self.cluster_size * self.l2_entries

    def l1_entries_needed(self, virtual_size: int | None = None) -> int:
        size = self.virtual_size if virtual_size is None else virtual_size
        return -(-size // self.l1_span)

    @classmethod
    def parse(cls, data: bytes) -> Qcow2Header:
        """Parse the header from the start of the file (at least ``header_length`` bytes of it)."""
        if len(data) < HEADER_V2_LENGTH:
            raise _corrupt(f"file too short for a qcow2 header ({len(data)} bytes)", "header", 0)
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
         l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
         snapshots_offset) = _HEADER_V2.unpack_from(data, 0)  # fmt: skip
        if magic != MAGIC:
            raise _corrupt("not a qcow2 image (bad magic)", "header", 0)
        if version not in (2, 3):
            raise UnsupportedFormat(
                f"qcow2 version {version} is not supported (only 2 and 3)",
                format=NAME,
                hint="convert it with qemu-img convert -O qcow2 first" if version == 1 else None,
            )
        header = cls(
            version=version, cluster_bits=cluster_bits, virtual_size=size, l1_size=l1_size,
            l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters, backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size, crypt_method=crypt_method, nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset, header_length=HEADER_V2_LENGTH, magic=magic,
        )  # fmt: skip
        if version == 2:
            return header
        if len(data) < HEADER_V3_MIN_LENGTH:
            raise _corrupt("file too short for a qcow2 v3 header", "header", 0)
        (header.incompatible_features, header.compatible_features, header.autoclear_features,
         header.refcount_order, header.header_length) = _HEADER_V3.unpack_from(data, HEADER_V2_LENGTH)  # fmt: skip
        if header.header_length < HEADER_V3_MIN_LENGTH:
            raise _corrupt(f"header_length {header.header_length} is below the v3 minimum of 104", "header", 100)
        if header.header_length > HEADER_V3_MIN_LENGTH:
            if len(data) < header.header_length:
                raise _corrupt(
                    f"header_length {header.header_length} runs past the data available ({len(data)} bytes)",
                    "header",
                    100,
                )
            header.compression_type = data[HEADER_V3_MIN_LENGTH]
            header.tail = bytes(data[HEADER_V3_MIN_LENGTH + 1 : header.header_length])
        return header

    def pack(self) -> bytes:
        """The header's bytes (``header_length`` long); parse(pack()) gives back an equal header."""
        fixed = _HEADER_V2.pack(
            self.magic, self.version, self.backing_file_offset, self.backing_file_size, self.cluster_bits,
            self.virtual_size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset,
        )  # fmt: skip
        if self.version < 3:
            return fixed
        fixed += _HEADER_V3.pack(
            self.incompatible_features, self.compatible_features, self.autoclear_features,
            self.refcount_order, self.header_length,
        )  # fmt: skip
        extra_length = self.header_length - HEADER_V3_MIN_LENGTH
        if extra_length > 0:
            extra = (bytes([self.compression_type]) + self.tail)[:extra_length]
            fixed += extra + bytes(extra_length - len(extra))
        return fixed


# ---------------------------------------------------------------------------------------------
# Header extensions
# ---------------------------------------------------------------------------------------------


@dataclass
class HeaderExtension:
    type: int
    data: bytes

    def pack(self) -> bytes:
        padding = -len(self.data) % 8
        return _EXT_HEADER.pack(self.type, len(self.data)) + self.data + bytes(padding)


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int


@dataclass
class HeaderExtensions:
    """The header extensions in file order, plus the decoded known ones."""

    items: list[HeaderExtension] = field(default_factory=list)
    backing_format: str | None = None
    #: (feature type 0/1/2, bit) -> name, from the feature name table
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: BitmapsExtension | None = None
    #: (offset, length) of the full-disk-encryption header
    fde: tuple[int, int] | None = None
    data_file: str | None = None
    unknown: list[HeaderExtension] = field(default_factory=list)

    def pack(self) -> bytes:
        """All extensions followed by the end marker."""
        return pack_header_extensions(self.items)


def pack_header_extensions(items: list[HeaderExtension]) -> bytes:
    return b"".join(item.pack() for item in items) + _EXT_HEADER.pack(EXT_END, 0)


def pack_feature_name_table(entries: list[tuple[int, int, str]]) -> bytes:
    """Data of a feature name table extension from (type, bit, name) entries."""
    return b"".join(_FEATURE_ENTRY.pack(kind, bit, name.encode()[:46]) for kind, bit, name in entries)


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_header_extensions(data: bytes, base_offset: int = 0) -> HeaderExtensions:
    """Parse the extension area (from the end of the header to where the extensions must stop).

    ``base_offset`` is the file offset of ``data``, used in error messages only.
    """
    result = HeaderExtensions()
    position = 0
    while position + _EXT_HEADER.size <= len(data):
        kind, length = _EXT_HEADER.unpack_from(data, position)
        if kind == EXT_END:
            break
        start = position + _EXT_HEADER.size
        if length > len(data) - start:
            raise _corrupt(
                f"header extension {kind:#010x} of {length} bytes overflows the header cluster",
                "header extension",
                base_offset + position,
            )
        item = HeaderExtension(kind, bytes(data[start : start + length]))
        result.items.append(item)
        _decode_extension(result, item, base_offset + position)
        position = start + length + (-length % 8)
    return result


def first_cluster_extensions(header: Qcow2Header, first_cluster: bytes) -> HeaderExtensions:
    """The extensions of the first cluster: from the end of the header to the backing file name
    (which qemu writes after them) or the end of the cluster."""
    end = len(first_cluster)
    if header.backing_file_offset and header.backing_file_offset < end:
        end = int(header.backing_file_offset)
    return parse_header_extensions(first_cluster[header.header_length : max(header.header_length, end)],
                                   header.header_length)


def _decode_extension(result: HeaderExtensions, item: HeaderExtension, offset: int) -> None:
    data = item.data
    if item.type == EXT_BACKING_FORMAT:
        result.backing_format = _text(data)
    elif item.type == EXT_FEATURE_NAMES:
        for index in range(len(data) // _FEATURE_ENTRY.size):
            kind, bit, name = _FEATURE_ENTRY.unpack_from(data, index * _FEATURE_ENTRY.size)
            result.feature_names[(kind, bit)] = _text(name)
    elif item.type == EXT_BITMAPS:
        if len(data) < _BITMAPS_EXT.size:
            raise _corrupt(f"bitmaps extension is {len(data)} bytes, not 24", "header extension", offset)
        result.bitmaps = BitmapsExtension(*_BITMAPS_EXT.unpack_from(data))
    elif item.type == EXT_FDE:
        if len(data) < _FDE_EXT.size:
            raise _corrupt(f"encryption header extension is {len(data)} bytes, not 16", "header extension", offset)
        result.fde = _FDE_EXT.unpack_from(data)
    elif item.type == EXT_DATA_FILE:
        result.data_file = _text(data)
    else:
        result.unknown.append(item)


# ---------------------------------------------------------------------------------------------
# Snapshot table
# ---------------------------------------------------------------------------------------------


@dataclass
class Qcow2Snapshot:
    """One snapshot table entry. ``id`` and ``name`` round-trip undecodable bytes (surrogateescape)."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size_32: int = 0
    extra: bytes = b""

    @property
    def vm_state_size(self) -> int:
        if len(self.extra) >= 8:
            return int.from_bytes(self.extra[0:8], "big")
        return self.vm_state_size_32

    @property
    def disk_size(self) -> int | None:
        """The guest size when the snapshot was taken (absent in old v2 images)."""
        return int.from_bytes(self.extra[8:16], "big") if len(self.extra) >= 16 else None

    @property
    def icount(self) -> int | None:
        return int.from_bytes(self.extra[16:24], "big") if len(self.extra) >= 24 else None

    @property
    def date(self) -> str:
        try:
            moment = datetime.fromtimestamp(self.date_sec, timezone.utc)
        except (OverflowError, OSError, ValueError):  # pragma: no cover - u32 seconds always fit
            return ""
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def pack(self) -> bytes:
        ident = self.id.encode("utf-8", "surrogateescape")
        name = self.name.encode("utf-8", "surrogateescape")
        entry = _SNAPSHOT_ENTRY.pack(
            self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec, self.date_nsec,
            self.vm_clock_nsec, self.vm_state_size_32, len(self.extra),
        )  # fmt: skip
        entry += self.extra + ident + name
        return entry + bytes(-len(entry) % 8)


class SnapshotTableTruncated(CorruptImage):
    """The snapshot table runs past the data given to the parser."""


def parse_snapshot_table(data: bytes, count: int, base_offset: int = 0) -> list[Qcow2Snapshot]:
    """Parse ``count`` entries from the start of ``data`` (the table at file offset ``base_offset``)."""
    snapshots = []
    position = 0
    for index in range(count):
        if position + _SNAPSHOT_ENTRY.size > len(data):
            raise SnapshotTableTruncated(
                f"snapshot table entry {index} runs past the end of the table data",
                offset=base_offset + position,
                structure="snapshot table",
            )
        (l1_offset, l1_size, id_length, name_length, date_sec, date_nsec, vm_clock, vm_state_32,
         extra_size) = _SNAPSHOT_ENTRY.unpack_from(data, position)  # fmt: skip
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise _corrupt(
                f"snapshot table entry {index} has {extra_size} bytes of extra data (limit {MAX_SNAPSHOT_EXTRA})",
                "snapshot table",
                base_offset + position,
            )
        start = position + _SNAPSHOT_ENTRY.size
        end = start + extra_size + id_length + name_length
        if end > len(data):
            raise SnapshotTableTruncated(
                f"snapshot table entry {index} runs past the end of the table data",
                offset=base_offset + position,
                structure="snapshot table",
            )
        extra = bytes(data[start : start + extra_size])
        ident = bytes(data[start + extra_size : start + extra_size + id_length])
        name = bytes(data[start + extra_size + id_length : end])
        snapshots.append(
            Qcow2Snapshot(
                l1_table_offset=l1_offset, l1_size=l1_size,
                id=ident.decode("utf-8", "surrogateescape"), name=name.decode("utf-8", "surrogateescape"),
                date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock, vm_state_size_32=vm_state_32,
                extra=extra,
            )  # fmt: skip
        )
        position = end + (-end % 8)
    return snapshots


def pack_snapshot_table(snapshots: list[Qcow2Snapshot]) -> bytes:
    return b"".join(snapshot.pack() for snapshot in snapshots)


# ---------------------------------------------------------------------------------------------
# L2 entries
# ---------------------------------------------------------------------------------------------


class L2Entry(NamedTuple):
    """A decoded L2 entry. kind: "unallocated", "zero", "normal" or "compressed"."""

    kind: str
    host_offset: int = 0
    #: compressed clusters: bytes to read from host_offset (may reach into the next cluster)
    compressed_length: int = 0
    copied: bool = False


def compressed_field_shift(cluster_bits: int) -> int:
    """Bit where the sector count of a compressed descriptor starts (x in the specification)."""
    return 62 - (cluster_bits - 8)


def decode_l2_entry(entry: int, cluster_bits: int, extended: bool = False) -> L2Entry:
    """Decode the first 64 bits of an L2 entry (with extended L2 the zero flag is unused)."""
    copied = bool(entry & OFLAG_COPIED)
    if entry & OFLAG_COMPRESSED:
        shift = compressed_field_shift(cluster_bits)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
        return L2Entry("compressed", offset, sectors * 512 - (offset & 511), copied)
    offset = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO and not extended:
        return L2Entry("zero", offset, 0, copied)
    if offset:
        return L2Entry("normal", offset, 0, copied)
    return L2Entry("unallocated", 0, 0, copied)


def encode_compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster whose ``length`` bytes start at byte ``host_offset``."""
    shift = compressed_field_shift(cluster_bits)
    sectors = (host_offset + length - 1) // 512 - host_offset // 512 + 1
    if host_offset >> shift or sectors - 1 >= 1 << (cluster_bits - 8) or length <= 0:
        raise ValueError("compressed cluster does not fit an L2 descriptor")
    return OFLAG_COMPRESSED | ((sectors - 1) << shift) | host_offset


def decode_subcluster_bitmap(bitmap: int) -> tuple[int, int]:
    """(allocated bits, reads-as-zero bits) of an extended L2 entry's second half."""
    return bitmap & SUBCLUSTER_MASK, (bitmap >> 32) & SUBCLUSTER_MASK


def subcluster_kind(entry: int, bitmap: int, index: int) -> str:
    """"normal", "zero", "unallocated" or "compressed" for subcluster ``index`` of an extended entry."""
    if entry & OFLAG_COMPRESSED:
        return "compressed"
    allocated, zero = decode_subcluster_bitmap(bitmap)
    bit = 1 << index
    if allocated & zero & bit or (allocated and not entry & L2E_OFFSET_MASK):
        raise ValueError("invalid subcluster bitmap")
    if zero & bit:
        return "zero"
    if allocated & bit:
        return "normal"
    return "unallocated"


# ---------------------------------------------------------------------------------------------
# Tables: L1, L2, refcount table and blocks, bitmap directory
# ---------------------------------------------------------------------------------------------


def parse_u64_table(data: bytes) -> array:
    """Big-endian u64 entries (an L1, L2, refcount or bitmap table) as an array; a partial last
    entry is left out."""
    table = array("Q")
    table.frombytes(data[: len(data) - len(data) % 8])
    if _NATIVE_LITTLE:
        table.byteswap()
    return table


def parse_refcount_table(data: bytes) -> array:
    """The refcount table: refcount block offsets in bits 9-63 (``REFT_OFFSET_MASK``; 0 = no block)."""
    return parse_u64_table(data)


def decode_refcount_block(data: bytes, refcount_order: int) -> array:
    """The refcounts in one refcount block (``refcount_bits = 1 << refcount_order``), as an array
    ('H' up to 16 bits, 'Q' above). Sub-byte widths are packed least significant bits first."""
    bits = 1 << refcount_order
    if bits == 16:
        values = array("H", bytes(data))
        if _NATIVE_LITTLE:
            values.byteswap()
        return values
    if bits == 8:
        return array("H", list(data))
    if bits > 16:
        width = bits // 8
        if width == 8:
            values = array("Q", bytes(data))
            if _NATIVE_LITTLE:
                values.byteswap()
            return values
        raw = array("I", bytes(data[: len(data) - len(data) % 4]))
        if _NATIVE_LITTLE:
            raw.byteswap()
        return array("Q", raw)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    out = array("H", bytes(2 * len(data) * per_byte))
    for i, byte in enumerate(data):
        if byte:
            for k in range(per_byte):
                out[i * per_byte + k] = (byte >> (k * bits)) & mask
    return out


def pack_refcounts(counts: array, refcount_bits: int) -> bytes:
    """A refcount block's bytes from its counts (an array whose items are ``refcount_bits`` wide, or
    bytes for widths below 8): big-endian entries; sub-byte entries from the least significant bit."""
    if refcount_bits >= 8:
        if counts.itemsize > 1 and _NATIVE_LITTLE:
            counts = array(counts.typecode, counts)
            counts.byteswap()
        return counts.tobytes()
    raw = counts.tobytes()
    per_byte = 8 // refcount_bits
    packed = 0
    for index in range(per_byte):
        shift = index * refcount_bits
        table = bytes(((value << shift) & 0xFF) for value in range(256))
        packed |= int.from_bytes(raw[index::per_byte].translate(table), "big")
    return packed.to_bytes(len(raw) // per_byte, "big")


def parse_bitmap_directory(data: bytes, count: int) -> list[tuple[int, int]]:
    """(bitmap_table_offset, bitmap_table_size) of each entry of a bitmap directory."""
    entries = []
    position = 0
    for index in range(count):
        if position + 24 > len(data):
            raise CorruptImage(f"bitmap directory entry {index} runs past the directory", structure="bitmap directory")
        table_offset, table_size, _flags, _type, _granularity, name_size, extra = struct.unpack_from(
            ">QIIBBHI", data, position
        )
        entries.append((table_offset, table_size))
        position += 24 + extra + name_size
        position += -position % 8
    return entries


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


#: the u32 (big-endian) version after the magic: 1 for qcow, 2 or 3 for qcow2
VERSION_FIELD = 4


def header_version(head: bytes) -> int | None:
    """The version field of a qcow or qcow2 header, or None when ``head`` is too short to hold it."""
    if len(head) < VERSION_FIELD + 4:
        return None
    return int.from_bytes(head[VERSION_FIELD : VERSION_FIELD + 4], "big")


def probe(head: bytes, tail: bytes, file_size: int) -> Detection | None:
    """A qcow2 v2/v3 header at offset 0 (v1 "qcow" is left to the detection module)."""
    if len(head) < 8 or head[:4] != MAGIC:
        return None
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        return None
    compat = "0.10" if version == 2 else "1.1"
    description = f"qcow2 v{version} (compat {compat})"
    hint = None
    try:
        header = Qcow2Header.parse(head)
    except DiskImageError:
        description += ", truncated or damaged header"
    else:
        description += f", virtual size {header.virtual_size} bytes"
        if MIN_CLUSTER_BITS <= header.cluster_bits <= 63:
            description += f", cluster size {header.cluster_size}"
        if header.crypt_method in (CRYPT_AES, CRYPT_LUKS):
            method = "AES" if header.crypt_method == CRYPT_AES else "LUKS"
            description += f", encrypted ({method})"
            hint = _DECRYPT_HINT
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            description += ", external data file"
            hint = _DATA_FILE_HINT
        if header.backing_file_offset:
            description += ", has a backing file"
    return Detection(
        format=NAME, description=description, subformat=f"v{version}", version=str(version), readable=True, hint=hint
    )


_DECRYPT_HINT = (
    "decrypt with qemu-img convert --object secret,id=sec0,file=PASSPHRASE_FILE "
    "--image-opts driver=qcow2,file.filename=IMAGE,encrypt.key-secret=sec0 -O qcow2 OUTPUT first"
)
_DATA_FILE_HINT = "make a self-contained copy with qemu-img convert -O qcow2 (run from the image's folder) first"


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

_HOST, _ZERO, _BACKING, _ENCODED = RunKind.HOST, RunKind.ZERO, RunKind.BACKING, RunKind.ENCODED


def check_header(header: Qcow2Header, extensions: HeaderExtensions, file_size: int) -> None:
    """Whether the header makes sense: the one rule for the reader and ``diskimg check``, so that
    neither calls "clean" a header the other (or qemu) refuses.

    Raises UnsupportedFormat for what diskimg does not take (unknown incompatible features,
    encryption methods or compression types, an external data file, clusters above 2 MiB) and
    CorruptImage for fields no valid image has (a virtual size past 2^63 - 1, an L1 or refcount
    table that is misplaced or of an impossible size, a backing file name too long or outside
    the first cluster or the file). Tables lying past the end of the file are not judged here: the
    reader refuses them, ``check`` counts them as truncation, as qemu-img check does.
    """
    incompatible = header.incompatible_features
    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = []
        for bit in range(64):
            if unknown >> bit & 1:
                label = extensions.feature_names.get((FEATURE_INCOMPATIBLE, bit))
                names.append(f"{bit} ({label!r})" if label else str(bit))
        plural = "s" if len(names) > 1 else ""
        raise UnsupportedFormat(
            f"unknown incompatible feature bit{plural} {', '.join(names)}",
            format=NAME,
            hint="the image needs a newer qcow2 implementation; convert it with a qemu-img that knows the feature",
        )
    if header.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise UnsupportedFormat(f"unknown qcow2 encryption method {header.crypt_method}", format=NAME)
    if incompatible & INCOMPAT_DATA_FILE:
        name = extensions.data_file or "(unnamed)"
        raise UnsupportedFormat(f"external data file {name!r} is not supported", format=NAME, hint=_DATA_FILE_HINT)
    compression = header.compression_type
    if compression not in COMPRESSION_NAMES:
        raise UnsupportedFormat(f"unknown qcow2 compression type {compression}", format=NAME)
    if bool(incompatible & INCOMPAT_COMPRESSION) != (compression != COMPRESSION_ZLIB):
        raise _corrupt(f"compression type {compression} does not agree with incompatible feature bit 3", "header", 72)
    if compression == COMPRESSION_ZSTD and zstandard is None:  # pragma: no cover
        raise UnsupportedFormat("zstd-compressed qcow2 needs the 'zstandard' package", format=NAME)
    cluster_size = header.cluster_size
    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _corrupt(
            f"extended L2 entries need clusters of at least 16 KiB (cluster_bits {header.cluster_bits})", "header", 20
        )
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise _corrupt(f"refcount_order {header.refcount_order} is above the maximum of 6", "header", 96)
    if header.virtual_size > MAX_VIRTUAL_SIZE:
        raise _corrupt(f"virtual size {header.virtual_size} is too large", "header", 24)
    needed = header.l1_entries_needed()
    if needed > MAX_L1_ENTRIES:
        raise _corrupt(f"virtual size {header.virtual_size} needs an L1 table above the 32 MiB limit", "header", 24)
    _check_l1_place(header.l1_table_offset, header.l1_size, cluster_size, "L1 table")
    if header.l1_size < needed:
        raise _corrupt(
            f"L1 table of {header.l1_size} entries is too small for virtual size {header.virtual_size} "
            f"({needed} needed)",
            "header",
            36,
        )
    if header.refcount_table_clusters == 0:
        raise _corrupt("the image has no refcount table", "header", 56)
    if header.refcount_table_clusters > MAX_REFCOUNT_TABLE_BYTES // cluster_size:
        raise _corrupt(
            f"refcount table of {header.refcount_table_clusters} clusters exceeds the 8 MiB limit", "header", 56
        )
    if header.refcount_table_offset % cluster_size:
        raise _corrupt(f"refcount table offset {header.refcount_table_offset} is not cluster aligned", "header", 48)
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise _corrupt(f"{header.nb_snapshots} snapshots exceed the limit of {MAX_SNAPSHOTS}", "header", 60)
    if header.nb_snapshots and header.snapshots_offset % cluster_size:
        raise _corrupt(f"snapshot table offset {header.snapshots_offset} is not cluster aligned", "header", 64)
    offset, size = header.backing_file_offset, header.backing_file_size
    if offset:
        if size > MAX_BACKING_NAME:
            raise _corrupt(f"backing file name of {size} bytes is longer than 1023", "header", 16)
        if offset + size > cluster_size or offset + size > file_size:
            raise _corrupt(
                f"backing file name ({size} bytes at offset {offset}) lies outside the first cluster or the file",
                "header",
                8,
            )


def _check_l1_place(offset: int, entries: int, cluster_size: int, what: str) -> None:
    if entries > MAX_L1_ENTRIES:
        raise _corrupt(f"{what} of {entries} entries exceeds the 32 MiB limit", what)
    if entries and offset % cluster_size:
        raise _corrupt(f"{what} offset {offset} is not cluster aligned", what, offset)


def _check_l1_inside(offset: int, entries: int, file_size: int, what: str) -> None:
    if entries and offset + entries * 8 > file_size:
        raise _corrupt(
            f"{what} ({entries} entries at offset {offset}) runs past the end of the file ({file_size} bytes)",
            what,
            offset,
        )


class FirstCluster(NamedTuple):
    """What the first cluster of a qcow2 file holds, as :func:`read_first_cluster` found it."""

    header: Qcow2Header
    #: the header extensions (empty when ``error`` is set)
    extensions: HeaderExtensions
    #: the cluster's bytes (fewer when the file is shorter; only the first 4 KiB when the cluster
    #: size is out of range): the backing file name lies here too
    data: bytes
    #: why the extensions could not be read: cluster_bits outside 9..21, a header longer than its
    #: cluster, or an extension overflowing the cluster. The reader raises it; ``check`` reports it.
    error: DiskImageError | None = None


def read_first_cluster(host: HostFile) -> FirstCluster:
    """The header (from the first 4 KiB) and its extensions (from the first cluster), shared by the
    reader, ``diskimg check`` and the validator, which differ only in what they do with ``error``.

    Raises what :meth:`Qcow2Header.parse` raises: without a header there is nothing to report on.
    """
    file_size = host.size
    head = host.pread(min(file_size, 4096), 0)
    header = Qcow2Header.parse(head)
    cluster_bits = header.cluster_bits
    if cluster_bits < MIN_CLUSTER_BITS:
        error = _corrupt(f"cluster_bits {cluster_bits} is below the minimum of 9 (512-byte clusters)", "header", 20)
        return FirstCluster(header, HeaderExtensions(), head, error)
    if cluster_bits > MAX_CLUSTER_BITS:
        error = UnsupportedFormat(
            f"cluster size 2^{cluster_bits} is larger than the 2 MiB limit (cluster_bits {cluster_bits})",
            format=NAME,
        )
        return FirstCluster(header, HeaderExtensions(), head, error)
    cluster_size = header.cluster_size
    data = head[:cluster_size] if len(head) >= cluster_size else host.pread(min(file_size, cluster_size), 0)
    if header.header_length > cluster_size:
        error = _corrupt(f"header_length {header.header_length} exceeds the cluster size {cluster_size}", "header", 100)
        return FirstCluster(header, HeaderExtensions(), data, error)
    try:
        extensions = first_cluster_extensions(header, data)
    except CorruptImage as exc:
        return FirstCluster(header, HeaderExtensions(), data, exc)
    return FirstCluster(header, extensions, data)


class Qcow2Reader(DiskReader):
    format = NAME
    #: L2 tables kept in memory: at most this many bytes, and this many tables
    L2_CACHE_BYTES = 32 * 1024 * 1024
    L2_CACHE_TABLES = 4096

    def __init__(
        self,
        host: HostFile,
        header: Qcow2Header,
        extensions: HeaderExtensions,
        snapshots: list[Qcow2Snapshot],
        l1: array,
        l1_offset: int,
        virtual_size: int,
        backing_file: str | None,
        snapshot: Qcow2Snapshot | None = None,
    ) -> None:
        super().__init__(host, virtual_size)
        self.header = header
        self.extensions = extensions
        self.snapshots = snapshots
        self.snapshot = snapshot
        self._backing_name = backing_file
        self._l1 = l1
        self._l1_offset = l1_offset
        self._cluster_bits = header.cluster_bits
        self._cluster_size = header.cluster_size
        self._extended = header.extended_l2
        self._l2_entries = header.l2_entries
        self._span_shift = header.cluster_bits + (header.l2_entries.bit_length() - 1)
        self._file_size = host.size
        self._zstd = header.compression_type == COMPRESSION_ZSTD
        self._compressed_shift = compressed_field_shift(header.cluster_bits)
        self._cache: OrderedDict[int, array] = OrderedDict()
        self._cache_limit = max(1, min(self.L2_CACHE_TABLES, self.L2_CACHE_BYTES // self._cluster_size))
        self._cache_lock = threading.Lock()
        self._decoded: tuple[int, bytes] | None = None
        #: L2 table offset -> the L1 index that uses it; at most one per file cluster, as tables
        #: past the end of the file are refused
        self._l2_owners: dict[int, int] = {}

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions | None = None) -> Qcow2Reader:
        options = options or OpenOptions()
        try:
            reader = cls._open(host, options)
        except _MALFORMED as exc:
            raise CorruptImage(f"malformed qcow2 metadata: {exc}", path=host.name, structure="header") from None
        except DiskImageError as exc:
            if exc.path is None:
                exc.path = host.name
            raise
        if reader._backing_name and open_parent is not None:
            reader.parent = open_parent([reader._backing_name], reader.extensions.backing_format)
        return reader

    @classmethod
    def _open(cls, host: HostFile, options: OpenOptions) -> Qcow2Reader:
        file_size = host.size
        header, extensions, first_cluster, error = read_first_cluster(host)
        if error is not None:
            raise error
        cluster_size = header.cluster_size

        check_header(header, extensions, file_size)
        cls._check_readable(header, file_size)
        backing_file = cls._backing_name_from(header, first_cluster)
        snapshots = cls._read_snapshots(host, header, file_size)

        selected = None
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        virtual_size = header.virtual_size
        if options.snapshot is not None:
            selected = _find_snapshot(snapshots, options.snapshot)
            if selected is None:
                available = ", ".join(f"{s.id} ({s.name!r})" for s in snapshots) or "none"
                raise UsageError(
                    f"no snapshot with id or name {options.snapshot!r}; available: {available}", path=host.name
                )
            l1_offset, l1_size = selected.l1_table_offset, selected.l1_size
            if selected.disk_size is not None:
                virtual_size = selected.disk_size
            if virtual_size > MAX_VIRTUAL_SIZE or header.l1_entries_needed(virtual_size) > MAX_L1_ENTRIES:
                raise _corrupt(f"snapshot {selected.id} has an impossible disk size {virtual_size}", "snapshot table")
            what = f"snapshot {selected.id} L1 table"
            _check_l1_place(l1_offset, l1_size, cluster_size, what)
            _check_l1_inside(l1_offset, l1_size, file_size, what)
        # qemu addresses the guest in 512-byte sectors and ignores a partial last sector
        virtual_size -= virtual_size % 512
        l1 = parse_u64_table(host.pread(l1_size * 8, l1_offset)) if l1_size else array("Q")
        if len(l1) != l1_size:
            raise _corrupt("L1 table runs past the end of the file", "L1 table", l1_offset)
        return cls(host, header, extensions, snapshots, l1, l1_offset, virtual_size, backing_file, selected)

    @staticmethod
    def _check_readable(header: Qcow2Header, file_size: int) -> None:
        """What this reader refuses beyond :func:`check_header`: encrypted guest data, and tables
        that lie past the end of the file (``check`` reports those as truncation, as qemu-img does)."""
        if header.crypt_method in (CRYPT_AES, CRYPT_LUKS):
            method = "AES" if header.crypt_method == CRYPT_AES else "LUKS"
            raise UnsupportedFormat(f"encrypted ({method}) qcow2 images are not supported", format=NAME,
                                    hint=_DECRYPT_HINT)
        _check_l1_inside(header.l1_table_offset, header.l1_size, file_size, "L1 table")
        if header.refcount_table_offset >= file_size:
            raise _corrupt(f"refcount table offset {header.refcount_table_offset} is past the end of the file",
                           "header", 48)
        if header.nb_snapshots and header.snapshots_offset + 40 * header.nb_snapshots > file_size:
            raise _corrupt(f"snapshot table ({header.nb_snapshots} entries at offset {header.snapshots_offset}) "
                           "lies past the end of the file", "header", 64)

    @staticmethod
    def _backing_name_from(header: Qcow2Header, first_cluster: bytes) -> str | None:
        """The backing file name (its place was checked by :func:`check_header`)."""
        offset, size = header.backing_file_offset, header.backing_file_size
        raw = first_cluster[offset : offset + size] if offset else b""
        return os.fsdecode(raw) if raw else None

    @staticmethod
    def _read_snapshots(host: HostFile, header: Qcow2Header, file_size: int) -> list[Qcow2Snapshot]:
        count = header.nb_snapshots
        if not count:
            return []
        offset = header.snapshots_offset
        available = min(file_size - offset, MAX_SNAPSHOT_TABLE_BYTES)
        want = min(available, max(4096, count * 128))
        while True:
            data = host.pread(want, offset)
            try:
                return parse_snapshot_table(data, count, offset)
            except SnapshotTableTruncated:
                if want >= available:
                    raise
                want = min(available, want * 4)

    # -- facts -----------------------------------------------------------------------------------

    @property
    def backing_file(self) -> str | None:
        return self._backing_name

    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    def info(self) -> ImageInfo:
        header = self.header
        incompat = header.incompatible_features
        features = []
        if header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            features.append("lazy_refcounts")
        if self._extended:
            features.append("extended_l2")
        if incompat & INCOMPAT_DIRTY:
            features.append("dirty")
        if incompat & INCOMPAT_CORRUPT:
            features.append("corrupt")
        if header.compression_type != COMPRESSION_ZLIB:
            features.append(f"compression_type={COMPRESSION_NAMES[header.compression_type]}")
        if self.extensions.bitmaps is not None:
            features.append("bitmaps")
        snapshots = [
            Snapshot(
                id=s.id,
                name=s.name,
                virtual_size=s.disk_size if s.disk_size is not None else header.virtual_size,
                date=s.date,
                vm_state_size=s.vm_state_size,
            )
            for s in self.snapshots
        ]
        details = {
            "compat": "0.10" if header.version == 2 else "1.1",
            "refcount_bits": header.refcount_bits,
            "cluster_bits": header.cluster_bits,
            "l1_size": header.l1_size,
            "header_length": header.header_length,
            "compression_type": COMPRESSION_NAMES[header.compression_type],
            "lazy_refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "extended_l2": self._extended,
            "dirty": bool(incompat & INCOMPAT_DIRTY),
            "corrupt": bool(incompat & INCOMPAT_CORRUPT),
            "encrypted": header.crypt_method != CRYPT_NONE,
            "data_file": self.extensions.data_file,
            "incompatible_features": incompat,
            "compatible_features": header.compatible_features,
            "autoclear_features": header.autoclear_features,
            "nb_snapshots": header.nb_snapshots,
            "bitmaps": self.extensions.bitmaps.nb_bitmaps if self.extensions.bitmaps else 0,
            "header_virtual_size": header.virtual_size,
            "snapshot": self.snapshot.id if self.snapshot else None,
        }
        if incompat & INCOMPAT_DIRTY:
            details["note_dirty"] = "refcounts may be stale (lazy refcounts; not cleanly closed); data is readable"
        if incompat & INCOMPAT_CORRUPT:
            details["note_corrupt"] = "qemu marked the image corrupt; it is read as is and must not be written"
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=f"v{header.version}",
            version=str(header.version),
            cluster_size=self._cluster_size,
            features=features,
            backing_file=self._backing_name,
            backing_format=self.extensions.backing_format if self._backing_name else None,
            snapshots=snapshots,
            details=details,
        )

    # -- mapping ---------------------------------------------------------------------------------

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        try:
            yield from self._walk(start, end)
        except _MALFORMED as exc:
            raise CorruptImage(
                f"malformed qcow2 mapping near guest offset {start}: {exc}", path=self.path, structure="L2 table"
            ) from None

    def _walk(self, start: int, end: int) -> Iterator[Run]:
        """Runs over [start, end): table pieces over whole clusters, merged, then clipped."""
        mask = self._cluster_size - 1
        span_shift = self._span_shift
        unallocated = _BACKING if self._backing_name else _ZERO
        l1 = self._l1
        l1_length = len(l1)
        stop = (end + mask) & ~mask
        position = start & ~mask
        pk = -1  # pending run: kind, start, length, host offset, extra
        ps = pl = ph = px = 0
        while position < stop:
            index = position >> span_shift
            if index >= l1_length:
                pieces = [(position, stop - position, unallocated, 0, 0)]
                chunk_end = stop
            else:
                chunk_end = min((index + 1) << span_shift, stop)
                entry = l1[index]
                l2_offset = entry & L1E_OFFSET_MASK
                if not l2_offset:
                    pieces = [(position, chunk_end - position, unallocated, 0, 0)]
                else:
                    owner = self._l2_owners.setdefault(l2_offset, index)
                    if owner != index:
                        # corrupt (qemu-img check counts the table's refcount wrong), and an L1 of
                        # such entries would make a small file describe petabytes of data
                        raise CorruptImage(
                            f"L1 entries {owner} and {index} point at the same L2 table {l2_offset:#x}",
                            path=self.path, offset=self._l1_offset + 8 * index, structure="L1 table",
                        )
                    table = self._l2_table(l2_offset, index)
                    pieces = self._scan_l2(table, l2_offset, position, chunk_end, unallocated)
            for s, l, k, h, x in pieces:
                if s + l <= start or s >= end:  # a subcluster piece outside the request
                    continue
                if k == pk and ps + pl == s and k != _ENCODED and (k != _HOST or ph + pl == h):
                    pl += l
                    continue
                if pk >= 0:
                    yield _clip(ps, pl, pk, ph, px, start, end)
                pk, ps, pl, ph, px = k, s, l, h, x
            position = chunk_end
        if pk >= 0:
            yield _clip(ps, pl, pk, ph, px, start, end)

    def _l2_table(self, offset: int, l1_index: int) -> array:
        with self._cache_lock:
            table = self._cache.get(offset)
            if table is not None:
                self._cache.move_to_end(offset)
                return table
        cluster_size = self._cluster_size
        if offset % cluster_size:
            raise CorruptImage(
                f"L2 table offset {offset:#x} (L1 index {l1_index}) is not cluster aligned",
                path=self.path,
                offset=self._l1_offset + 8 * l1_index,
                structure="L1 table",
            )
        if offset + cluster_size > self._file_size:
            raise CorruptImage(
                f"L2 table at host offset {offset:#x} (L1 index {l1_index}) lies past the end of the file",
                path=self.path,
                offset=self._l1_offset + 8 * l1_index,
                structure="L1 table",
            )
        table = parse_u64_table(self.host.pread(cluster_size, offset))
        if len(table) * 8 != cluster_size:
            raise CorruptImage("L2 table read came short", path=self.path, offset=offset, structure="L2 table")
        with self._cache_lock:
            self._cache[offset] = table
            while len(self._cache) > self._cache_limit:
                self._cache.popitem(last=False)
        return table

    def _scan_l2(
        self, table: array, l2_offset: int, position: int, chunk_end: int, unallocated: RunKind
    ) -> list[tuple[int, int, RunKind, int, int]]:
        """Pieces for the whole clusters [position, chunk_end) described by one L2 table."""
        cluster_bits = self._cluster_bits
        cluster_size = self._cluster_size
        first = (position >> cluster_bits) & (self._l2_entries - 1)
        count = (chunk_end - position) >> cluster_bits
        width = 2 if self._extended else 1
        entries = table[first * width : (first + count) * width]
        if entries.count(0) == len(entries):
            return [(position, chunk_end - position, unallocated, 0, 0)]
        pieces: list[tuple[int, int, RunKind, int, int]] = []
        file_size = self._file_size
        mask = cluster_size - 1
        run_kind = -1  # the piece being extended: kind, start, length, host offset
        run_start = run_length = run_host = 0
        guest = position
        if self._extended:
            iterator = iter(entries)
            pairs = zip(iterator, iterator)
        else:
            pairs = zip(entries, repeat(-1))
        for number, (entry, bitmap) in enumerate(pairs):
            kind = unallocated
            host = 0
            if entry & OFLAG_COMPRESSED:
                if run_kind >= 0:
                    pieces.append((run_start, run_length, run_kind, run_host, 0))
                    run_kind = -1
                pieces.append(self._compressed_piece(entry, guest, l2_offset, first + number))
                guest += cluster_size
                continue
            if bitmap < 0:  # standard entry
                if entry & OFLAG_ZERO:
                    kind = _ZERO
                else:
                    host = entry & L2E_OFFSET_MASK
                    if host:
                        kind = _HOST
            else:  # extended entry
                allocated = bitmap & SUBCLUSTER_MASK
                zero = bitmap >> 32
                host = entry & L2E_OFFSET_MASK
                if allocated & zero or (allocated and not host):
                    raise CorruptImage(
                        f"invalid subcluster bitmap {bitmap:#018x} for guest offset {guest}",
                        path=self.path,
                        offset=l2_offset + 16 * (first + number),
                        structure="L2 table",
                    )
                if allocated == SUBCLUSTER_MASK:
                    kind = _HOST
                elif zero == SUBCLUSTER_MASK:
                    kind = _ZERO
                elif allocated or zero:
                    if run_kind >= 0:
                        pieces.append((run_start, run_length, run_kind, run_host, 0))
                        run_kind = -1
                    self._subcluster_pieces(
                        pieces, guest, host, allocated, zero, unallocated, l2_offset + 16 * (first + number)
                    )
                    guest += cluster_size
                    continue
            if kind is _HOST:
                if host & mask:
                    raise CorruptImage(
                        f"cluster offset {host:#x} for guest offset {guest} is not cluster aligned",
                        path=self.path,
                        offset=l2_offset + 8 * width * (first + number),
                        structure="L2 table",
                    )
                if host + cluster_size > file_size:
                    raise self._past_eof(guest, host, cluster_size, l2_offset + 8 * width * (first + number))
                if run_kind == _HOST and run_host + run_length == host:
                    run_length += cluster_size
                else:
                    if run_kind >= 0:
                        pieces.append((run_start, run_length, run_kind, run_host, 0))
                    run_kind, run_start, run_length, run_host = _HOST, guest, cluster_size, host
            elif kind == run_kind:
                run_length += cluster_size
            else:
                if run_kind >= 0:
                    pieces.append((run_start, run_length, run_kind, run_host, 0))
                run_kind, run_start, run_length, run_host = kind, guest, cluster_size, 0
            guest += cluster_size
        if run_kind >= 0:
            pieces.append((run_start, run_length, run_kind, run_host, 0))
        return pieces

    def _past_eof(self, guest: int, host: int, length: int, entry_offset: int) -> CorruptImage:
        """The error for guest data whose host range does not lie wholly inside the file. (qemu
        would read zeros past the end; a cut data cluster means a truncated image, so say so.)"""
        return CorruptImage(
            f"image is truncated: guest offset {guest} maps to host offset {host} "
            f"({length} bytes), past the end of the file ({self._file_size} bytes)",
            path=self.path,
            offset=entry_offset,
            structure="L2 table",
        )

    def _subcluster_pieces(
        self, pieces: list, guest: int, host: int, allocated: int, zero: int, unallocated: RunKind, entry_offset: int
    ) -> None:
        size = self._cluster_size // SUBCLUSTERS
        if host & (self._cluster_size - 1):
            raise CorruptImage(
                f"cluster offset {host:#x} for guest offset {guest} is not cluster aligned",
                path=self.path,
                offset=entry_offset,
                structure="L2 table",
            )
        index = 0
        while index < SUBCLUSTERS:
            bit = 1 << index
            kind = _HOST if allocated & bit else _ZERO if zero & bit else unallocated
            run_end = index + 1
            while run_end < SUBCLUSTERS:
                bit = 1 << run_end
                following = _HOST if allocated & bit else _ZERO if zero & bit else unallocated
                if following != kind:
                    break
                run_end += 1
            start = guest + index * size
            length = (run_end - index) * size
            if kind is _HOST:
                if host + (run_end * size) > self._file_size:
                    raise self._past_eof(start, host + index * size, length, entry_offset)
                pieces.append((start, length, kind, host + index * size, 0))
            else:
                pieces.append((start, length, kind, 0, 0))
            index = run_end

    def _compressed_piece(self, entry: int, guest: int, l2_offset: int, index: int) -> tuple:
        shift = self._compressed_shift
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self._cluster_bits - 8)) - 1)) + 1
        length = sectors * 512 - (host & 511)
        if host >= self._file_size:
            raise CorruptImage(
                f"compressed cluster for guest offset {guest} starts at host offset {host}, past the end of "
                f"the file ({self._file_size} bytes)",
                path=self.path,
                offset=l2_offset + (16 if self._extended else 8) * index,
                structure="L2 table",
            )
        return (guest, self._cluster_size, _ENCODED, host, length)

    # -- compressed clusters -----------------------------------------------------------------------

    def _read_encoded(self, run: Run) -> bytes:
        cluster_start = run.start & ~(self._cluster_size - 1)
        cached = self._decoded
        if cached is not None and cached[0] == run.host_offset:
            data = cached[1]
        else:
            data = self._decompress(run.host_offset, run.extra, cluster_start)
            self._decoded = (run.host_offset, data)
        offset = run.start - cluster_start
        if offset == 0 and run.length == len(data):
            return data
        return data[offset : offset + run.length]

    def _decompress(self, host: int, length: int, guest: int) -> bytes:
        cluster_size = self._cluster_size
        # compressed data may end at the end of the file, inside its last sector: a short read is fine
        stored = self.host.pread(length, host)
        try:
            if self._zstd:
                reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True)
                parts = []
                produced = 0
                while produced < cluster_size:
                    part = reader.read(cluster_size - produced)
                    if not part:
                        break
                    parts.append(part)
                    produced += len(part)
                data = b"".join(parts)
            else:
                data = zlib.decompressobj(-15).decompress(stored, cluster_size)
        except _MALFORMED as exc:
            raise CorruptImage(
                f"compressed cluster for guest offset {guest} does not decompress: {exc}",
                path=self.path,
                offset=host,
                structure="compressed cluster",
            ) from None
        if len(data) != cluster_size:
            raise CorruptImage(
                f"compressed cluster for guest offset {guest} decompresses to {len(data)} bytes, "
                f"not {cluster_size}",
                path=self.path,
                offset=host,
                structure="compressed cluster",
            )
        return data


def _clip(s: int, l: int, k: RunKind, h: int, x: int, start: int, end: int) -> Run:  # noqa: E741
    if s < start:
        cut = start - s
        s = start
        l -= cut
        if k is _HOST:
            h += cut
    if s + l > end:
        l = end - s  # noqa: E741
    return Run(s, l, k, h, x)


def _find_snapshot(snapshots: list[Qcow2Snapshot], wanted: str) -> Qcow2Snapshot | None:
    """By id first, then by name (as qemu's snapshot lookups do)."""
    for snapshot in snapshots:
        if snapshot.id == wanted:
            return snapshot
    for snapshot in snapshots:
        if snapshot.name == wanted:
            return snapshot
    return None


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------
#
# Layout (one for files and pipes, as in qemu's scripts/qcow2-to-stdout.py):
#
#     cluster 0         header, feature name table (v3, clusters above 4 KiB, as qemu writes it)
#     refcount table    sized with the refcount blocks by a fixed-point loop (blocks count themselves)
#     refcount blocks
#     L1 table
#     L2 tables         one per L1 range the plan touches, in guest order
#     data              clusters in guest order (compressed clusters packed byte after byte)
#
# On a streaming target (a pipe, or while the output's SHA-256 is computed) the plan is exact and
# everything is known before the first byte: the metadata is written first, then every planned
# cluster (a hole, or zeros, where no data arrives).  On a seekable file the plan is an upper
# bound: the metadata space is reserved from it, data clusters are allocated in arrival order, and
# the real tables are written into the reserved space at the end; reserved clusters left unused
# have refcount 0 (holes that ``qemu-img check`` calls neither leaks nor errors).

#: qemu 7.2's feature name table, in its order
FEATURE_NAME_TABLE = [
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
]
#: qemu leaves the feature name table out for clusters of 4 KiB and less (room for a backing name)
FEATURE_TABLE_MIN_CLUSTER = 4096 + 1

_COMPAT_VERSIONS = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}
#: zlib level for -c (qemu uses Z_DEFAULT_COMPRESSION) and zstd level (qemu uses zstd's default, 3)
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3
#: deflate window qemu inflates with (windowBits -12): a larger window would corrupt reads in qemu
ZLIB_WBITS = -12


@dataclass(frozen=True)
class Qcow2WriterSettings:
    """The ``-o`` options of the qcow2 writer, checked."""

    version: int = 3
    cluster_bits: int = 16
    compression_type: int = COMPRESSION_ZLIB
    refcount_order: int = 4
    lazy_refcounts: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _flag(options: dict, key: str) -> bool:
    return option_flag(options, key, NAME)


def writer_settings(options: dict) -> Qcow2WriterSettings:
    """Check the qcow2 writer's ``-o`` options (qemu-img's names, values and rules)."""
    from ..units import parse_size

    compat = str(options.get("compat", "1.1")).strip().lower()
    if compat not in _COMPAT_VERSIONS:
        raise UsageError(f"qcow2 option compat={compat!r}: expected 1.1 (v3, the default) or 0.10 (v2)")
    version = _COMPAT_VERSIONS[compat]
    cluster_size = parse_size(str(options.get("cluster_size", "64k")))
    if cluster_size & (cluster_size - 1) or not 1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS:
        raise UsageError(
            f"qcow2 option cluster_size={options.get('cluster_size')}: must be a power of two from 512 to 2M"
        )
    kind = str(options.get("compression_type", "zlib")).strip().lower()
    types = {name: number for number, name in COMPRESSION_NAMES.items()}
    if kind not in types:
        raise UsageError(f"qcow2 option compression_type={kind!r}: expected zlib or zstd")
    if types[kind] != COMPRESSION_ZLIB:
        if version < 3:
            raise UsageError("compression_type=zstd needs compat=1.1 (a v3 image)")
        if zstandard is None:  # pragma: no cover
            raise UsageError("compression_type=zstd needs the 'zstandard' package")
    text = str(options.get("refcount_bits", "16")).strip()
    bits = int(text) if text.isdigit() else 0
    if bits not in (1, 2, 4, 8, 16, 32, 64):
        raise UsageError(f"qcow2 option refcount_bits={text!r}: must be a power of two from 1 to 64")
    if bits != 16 and version < 3:
        raise UsageError("refcount widths other than 16 bits need compat=1.1 (a v3 image)")
    lazy = _flag(options, "lazy_refcounts")
    if lazy and version < 3:
        raise UsageError("lazy_refcounts=on needs compat=1.1 (a v3 image)")
    preallocation = str(options.get("preallocation", "off")).strip().lower()
    if preallocation != "off":
        raise UsageError(f"qcow2 option preallocation={preallocation!r}: diskimg writes sparse images only (off)")
    if _flag(options, "extended_l2"):
        raise UsageError("qcow2 option extended_l2=on is not supported by the diskimg writer (off only)")
    return Qcow2WriterSettings(
        version=version,
        cluster_bits=cluster_size.bit_length() - 1,
        compression_type=types[kind],
        refcount_order=bits.bit_length() - 1,
        lazy_refcounts=lazy,
    )


class Qcow2Layout(NamedTuple):
    """Where everything goes in a written image, in clusters (see the layout above)."""

    cluster_bits: int
    l1_size: int  # entries
    l1_clusters: int
    l2_tables: int
    refcount_table_clusters: int
    refcount_blocks: int
    data_clusters: int

    @property
    def refcount_table_offset(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_blocks_offset(self) -> int:
        return (1 + self.refcount_table_clusters) << self.cluster_bits

    @property
    def l1_offset(self) -> int:
        return (1 + self.refcount_table_clusters + self.refcount_blocks) << self.cluster_bits

    @property
    def l2_offset(self) -> int:
        return self.l1_offset + (self.l1_clusters << self.cluster_bits)

    @property
    def data_offset(self) -> int:
        return self.l2_offset + (self.l2_tables << self.cluster_bits)

    @property
    def total_clusters(self) -> int:
        return (self.data_offset >> self.cluster_bits) + self.data_clusters


def plan_layout(
    cluster_bits: int, refcount_order: int, virtual_size: int, l2_tables: int, data_clusters: int,
    *, writable: bool = True,
) -> Qcow2Layout:
    """The layout of an image with this many L2 tables and data clusters. The refcount table and
    blocks size themselves by a fixed-point loop: the blocks must count every cluster, their own
    and the table's included. ``writable``: refuse a layout whose refcount table qemu would refuse
    (off for a size that is only reported, as qemu-img measure reports it)."""
    cluster_size = 1 << cluster_bits
    span_bits = 2 * cluster_bits - 3
    l1_size = -(-virtual_size >> span_bits)
    if l1_size > MAX_L1_ENTRIES:
        raise UsageError(
            f"a virtual size of {virtual_size} bytes needs an L1 table above qemu's 32 MiB limit with "
            f"{cluster_size}-byte clusters: use a larger cluster_size"
        )
    l1_clusters = -(-l1_size * 8 >> cluster_bits)
    per_block = (cluster_size * 8) >> refcount_order
    fixed = 1 + l1_clusters + l2_tables + data_clusters
    table_clusters, blocks = 1, 0
    while True:
        need_blocks = -(-(fixed + table_clusters + blocks) // per_block)
        need_table = max(1, -(-need_blocks * 8 >> cluster_bits))
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    if writable and table_clusters << cluster_bits > MAX_REFCOUNT_TABLE_BYTES:
        raise UsageError(
            f"the image would need a refcount table above qemu's 8 MiB limit with {cluster_size}-byte clusters "
            "and these refcount_bits: use a larger cluster_size"
        )
    return Qcow2Layout(cluster_bits, l1_size, l1_clusters, l2_tables, table_clusters, blocks, data_clusters)


def plan_clusters(extents, cluster_bits: int, virtual_size: int) -> tuple[array, array, bytearray, int]:
    """The guest clusters the DATA extents touch: (run starts, run ends) in cluster numbers, merged;
    one byte per L1 entry, 1 where the range holds a planned cluster; and the cluster count."""
    from .reader import ExtentKind

    starts, ends = array("Q"), array("Q")
    l2_bits = cluster_bits - 3
    planned_l1 = bytearray(-(-virtual_size >> (cluster_bits + l2_bits)))
    count = 0
    run_start = run_end = -1

    def close() -> None:
        nonlocal count
        starts.append(run_start)
        ends.append(run_end)
        count += run_end - run_start
        first, last = run_start >> l2_bits, (run_end - 1) >> l2_bits
        planned_l1[first : last + 1] = b"\x01" * (last - first + 1)

    for extent in extents:
        if extent.kind is not ExtentKind.DATA or extent.length <= 0:
            continue
        start, end = max(0, extent.start), min(extent.start + extent.length, virtual_size)
        if start >= end:
            continue
        first, stop = start >> cluster_bits, ((end - 1) >> cluster_bits) + 1
        if first < run_start:
            raise UsageError("qcow2 writer: the planned extents are not in increasing order")
        if first <= run_end:
            run_end = max(run_end, stop)
            continue
        if run_end > run_start >= 0:
            close()
        run_start, run_end = first, stop
    if run_end > run_start >= 0:
        close()
    return starts, ends, planned_l1, count


_REFCOUNT_TYPECODES = {8: "B", 16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}


class Qcow2Writer(DiskWriter):
    """Writes qcow2 v3 (compat 1.1) or v2 (compat 0.10) images in one forward pass, to files and
    pipes, optionally with compressed clusters (files only). See the layout notes above.

    On a seekable file without compression, ``write`` may be called from several threads at once
    (``concurrent_writes``): host clusters are allocated under a lock in the order data arrives,
    so data clusters follow guest order up to the interleaving of the chunks in flight.
    """

    format = NAME
    OPTIONS = {
        "compat": "1.1 (v3, default) or 0.10 (v2, for old consumers)",
        "cluster_size": "a power of two from 512 to 2M (default 64k)",
        "compression_type": "zlib (default) or zstd (needs compat=1.1) for -c",
        "refcount_bits": "refcount width: 1, 2, 4, 8, 16 (default), 32 or 64",
        "lazy_refcounts": "on or off (default): sets the lazy refcounts feature bit (compat=1.1)",
        "preallocation": "off only (the image is sparse)",
        "extended_l2": "off only",
    }
    supports_compression = True

    #: guest bytes given to a compression thread at once
    BATCH_BYTES = 2 << 20

    def __init__(self, target: Any, virtual_size: int, options: Any, compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.settings = writer_settings(self.options)
        if compress and target.streaming:
            raise UsageError(
                "compressed qcow2 (-c) cannot be streamed (to a pipe, or hashed as it is written): the "
                "compressed sizes must be known before the tables that precede the data; write to a file"
            )
        self._cb = self.settings.cluster_bits
        self._cs = 1 << self._cb
        self._l2_bits = self._cb - 3
        #: qemu addresses the guest in 512-byte sectors: a partial last sector is rounded up
        self.disk_size = -(-virtual_size // 512) * 512
        plan_layout(self._cb, self.settings.refcount_order, self.disk_size, 0, 0)  # size limits, early
        self._layout: Qcow2Layout | None = None
        self._planned_l1 = bytearray()
        # streaming: the planned runs of guest clusters (first, count, first host cluster)
        self._rg, self._rn, self._rh = array("Q"), array("Q"), array("Q")
        self._cursor = 0  # the run the last write went to
        # seekable: the L2 tables being built (L1 index -> entries), allocation and its limits
        self._tables: dict[int, array] = {}
        self._empty_table = bytes(self._cs)
        self._next_free = 0  # next free host cluster
        self._capacity = 0  # host clusters the reserved refcount blocks cover
        self._lock = threading.Lock()
        #: a block device keeps old bytes where nothing is written: new clusters are zeroed there
        self._zero_fill = not getattr(target, "is_regular_file", True)
        self._pool: CompressionPool | None = None  # compression (-c only)
        self._io: ThreadPoolExecutor | None = None  # writes of compressed batches
        self._pending_io: deque = deque()  # (future, buffer) of writes not yet waited for

    # -- sizes -----------------------------------------------------------------------------------

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """The output file's size for this plan, uncompressed: exact on a streaming target (where the
        plan is exact); on a seekable file, where only clusters receiving data are allocated, an
        upper bound. With ``compress`` an upper bound too (compressed clusters never take more host
        clusters than they would uncompressed)."""
        return cls._planned_size(virtual_size, extents, options, writable=True)

    @classmethod
    def fully_allocated(cls, virtual_size: int, options: Mapping[str, str] | None, compress: bool = False) -> int:
        from .reader import ExtentKind

        return cls._planned_size(virtual_size, [Extent(0, virtual_size, ExtentKind.DATA)], options, writable=False)

    @classmethod
    def _planned_size(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                      writable: bool) -> int:
        settings = writer_settings(dict(options or {}))
        size = -(-virtual_size // 512) * 512
        _, _, planned_l1, clusters = plan_clusters(extents, settings.cluster_bits, size)
        layout = plan_layout(settings.cluster_bits, settings.refcount_order, size, planned_l1.count(1), clusters,
                             writable=writable)
        return layout.total_clusters << settings.cluster_bits

    @property
    def requires_exact_plan(self) -> bool:
        return self.target.streaming

    @property
    def concurrent_writes(self) -> bool:
        return not self.target.streaming and not self.compress

    # -- plan ------------------------------------------------------------------------------------

    def plan(self, extents: Any) -> None:
        if self._layout is not None:
            raise UsageError("qcow2 writer: plan() given twice")
        starts, ends, planned_l1, clusters = plan_clusters(extents, self._cb, self.disk_size)
        layout = plan_layout(self._cb, self.settings.refcount_order, self.disk_size, planned_l1.count(1), clusters)
        self._layout = layout
        self._planned_l1 = planned_l1
        target = self.target
        data_cluster = layout.data_offset >> self._cb
        self._next_free = data_cluster
        if target.streaming:
            host = data_cluster
            for start, end in zip(starts, ends):
                self._rg.append(start)
                self._rn.append(end - start)
                self._rh.append(host)
                host += end - start
            self._write_streaming_metadata()
        else:
            per_block = (self._cs * 8) >> self.settings.refcount_order
            self._capacity = layout.refcount_blocks * per_block
            if self.compress:
                self._start_compression()

    def _ensure_plan(self) -> None:
        if self._layout is None:
            from .reader import Extent, ExtentKind

            self.plan([Extent(0, self.disk_size, ExtentKind.DATA)] if self.disk_size else [])

    # -- data ------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.disk_size)
        length = len(view)
        end = offset + length
        concurrent = self.concurrent_writes
        if not length:
            return
        if self._layout is None:
            with self._lock:
                self._ensure_plan()
        if not concurrent:
            self._written_to = end
        if self.compress:
            self._assemble(offset, view)
        elif self.target.streaming:
            self._write_streaming(offset, view)
        else:
            self._write_positional(offset, view)

    def reserve(self, offset: int, length: int) -> None:
        """Allocate host clusters for [offset, offset + length) in the order data arrives (which the
        converter keeps to guest order), so that the file's layout does not depend on thread timing.
        On a block device new clusters are zero-filled by ``write``, which must allocate them itself."""
        if not length or self.compress or self.target.streaming or self._zero_fill:
            return
        with self._lock:
            self._ensure_plan()
            self._allocate(offset >> self._cb, (offset + length - 1) >> self._cb)

    def _unplanned(self, offset: int) -> OutputError:
        return OutputError(
            f"qcow2 writer: data at guest offset {offset} lies outside the planned allocation "
            "(the source changed during the conversion?)",
            path=self.target.name,
        )

    def _write_streaming(self, offset: int, view: memoryview) -> None:
        """Exact plan: the host offset of every planned cluster is known; write in file order."""
        cb, target = self._cb, self.target
        end = offset + len(view)
        first, last = offset >> cb, (end - 1) >> cb
        rg, rn = self._rg, self._rn
        index, runs = self._cursor, len(rg)
        while index < runs and rg[index] + rn[index] <= first:
            index += 1
        self._cursor = index
        if index == runs or rg[index] > first:
            raise self._unplanned(offset)
        if last >= rg[index] + rn[index]:
            raise self._unplanned((rg[index] + rn[index]) << cb)
        host = ((self._rh[index] + first - rg[index]) << cb) + (offset & (self._cs - 1))
        if host < target.position:
            raise AssertionError(f"qcow2 writer: host offset {host} behind the output position {target.position}")
        target.skip(host - target.position)
        target.write(view)

    def _write_positional(self, offset: int, view: memoryview) -> None:
        """Seekable file: host clusters for the guest clusters the data touches (allocated under
        the lock, in arrival order), then positional writes outside it."""
        cb = self._cb
        end = offset + len(view)
        target = self.target
        with self._lock:
            pieces = self._allocate(offset >> cb, (end - 1) >> cb)
            if self._zero_fill:  # the parts of new clusters this data leaves, zeroed before anyone writes there
                zeros = memoryview(self._empty_table)
                for guest, count, host, new in pieces:
                    if new:
                        start, stop = max(offset, guest << cb), min(end, (guest + count) << cb)
                        target.pwrite(zeros[: start - (guest << cb)], host << cb)
                        target.pwrite(zeros[: ((guest + count) << cb) - stop], (host << cb) + stop - (guest << cb))
        for guest, count, host, _new in pieces:
            start, stop = max(offset, guest << cb), min(end, (guest + count) << cb)
            target.pwrite(view[start - offset : stop - offset], (host << cb) + start - (guest << cb))

    def _allocate(self, first: int, last: int) -> list[tuple[int, int, int, bool]]:
        """(guest cluster, count, host cluster, newly allocated) runs covering clusters [first, last].

        Ranges with no allocated cluster are allocated at once; a cluster allocated already (by
        earlier data ending inside it, or by another thread's data) is reused, one at a time."""
        pieces: list[tuple[int, int, int, bool]] = []
        cb, l2_bits = self._cb, self._l2_bits
        mask = (1 << l2_bits) - 1
        guest = first
        while guest <= last:
            stop = min(last + 1, ((guest >> l2_bits) + 1) << l2_bits)  # within one L2 table
            table = self._tables.get(guest >> l2_bits)
            if table is not None:
                rest = table[guest & mask : ((stop - 1) & mask) + 1]
                if rest.count(0) != len(rest):
                    entry = table[guest & mask]
                    if entry:
                        self._add_piece(pieces, guest, 1, (entry & L2E_OFFSET_MASK) >> cb, False)
                    else:
                        self._add_piece(pieces, guest, 1, self._new_clusters(guest, 1), True)
                    guest += 1
                    continue
            self._add_piece(pieces, guest, stop - guest, self._new_clusters(guest, stop - guest), True)
            guest = stop
        return pieces

    def _new_clusters(self, guest: int, count: int) -> int:
        """Allocate and map ``count`` host clusters for guest clusters from ``guest``; the first."""
        self._check_room(guest, guest + count - 1, count)
        host = self._next_free
        self._next_free += count
        self._map_range(guest, count, host)
        return host

    def _add_piece(self, pieces: list, guest: int, count: int, host: int, new: bool) -> None:
        if pieces:
            last_guest, last_count, last_host, last_new = pieces[-1]
            if last_guest + last_count == guest and last_host + last_count == host and (
                last_new == new or not self._zero_fill
            ):
                pieces[-1] = (last_guest, last_count + count, last_host, last_new and new)
                return
        pieces.append((guest, count, host, new))

    def _check_room(self, first: int, last: int, count: int) -> None:
        """Seekable mode: clusters [first, last] lie in planned L1 ranges, and ``count`` more host
        clusters stay within what the reserved refcount blocks cover."""
        l2_bits = self._l2_bits
        if self._planned_l1.find(b"\0", first >> l2_bits, (last >> l2_bits) + 1) >= 0:
            raise self._unplanned(first << self._cb)
        if self._next_free + count > self._capacity:
            raise self._unplanned(first << self._cb)

    def _table(self, l1_index: int) -> array:
        table = self._tables.get(l1_index)
        if table is None:
            table = self._tables[l1_index] = array("Q", self._empty_table)
        return table

    def _map_range(self, guest: int, count: int, host: int) -> None:
        """L2 entries for ``count`` uncompressed clusters from ``guest``, at host clusters from ``host``."""
        cb, cs, l2_bits = self._cb, self._cs, self._l2_bits
        mask = (1 << l2_bits) - 1
        while count:
            step = min(count, (1 << l2_bits) - (guest & mask))
            first = (host << cb) | OFLAG_COPIED
            self._table(guest >> l2_bits)[guest & mask : (guest & mask) + step] = array(
                "Q", range(first, first + (step << cb), cs)
            )
            guest, host, count = guest + step, host + step, count - step

    # -- compression -----------------------------------------------------------------------------
    #
    # The data is copied, whole clusters, into batch buffers (zeros where nothing was written; the
    # data given to write() is valid only during the call); a thread pool compresses each batch;
    # results are placed in order. Clusters stored uncompressed are written straight from the
    # batch buffer (runs of them in one write); compressed clusters are packed byte after byte in
    # the host cluster being filled, kept in a small buffer until it is full or given up. Buffers
    # are recycled: no fresh memory (page faults) per chunk of data.

    def _start_compression(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # only compression uses pools: loaded then

        self._pool = CompressionPool("qcow2-compress")
        self._max_inflight = self._pool.max_inflight
        # writes go through one more thread, so that the copies into the page cache overlap the
        # rest; a batch buffer is reused once its writes are done
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcow2-write")
        self._writes: list = []  # (data, file offset) of the batch being placed
        zstd = self.settings.compression_type == COMPRESSION_ZSTD
        # qemu: compressed data must fit in cluster_size - 1 bytes
        self._compressor = ClusterCompressor(self._cs, self._cs - 1, zlib_level=ZLIB_LEVEL, zlib_wbits=ZLIB_WBITS,
                                             zstd_level=ZSTD_LEVEL if zstd else None)
        self._slots = max(1, self.BATCH_BYTES >> self._cb)  # clusters per batch
        self._free_buffers: list[bytearray] = []
        self._buffer = bytearray(self._slots << self._cb)
        self._used = 0  # slots of the buffer taken
        self._batch_g: list[int] = []  # guest clusters of the completed slots, in slot order
        self._asm_g = -1  # the guest cluster being assembled in the last slot taken
        self._hrc = array("I")  # refcount of each host data cluster
        self._data_cluster = self._next_free
        self._rpos = -1  # host byte where the next compressed cluster goes (-1: no cluster being filled)
        self._rlast = -1  # the host cluster being filled; its bytes are in _rbuf (two clusters: it may spill)
        self._rbuf = bytearray(2 * self._cs)
        order = self.settings.refcount_order
        self._max_refcount = min((1 << (1 << order)) - 1, 0xFFFFFFFF)

    def _assemble(self, offset: int, view: memoryview) -> None:
        """Copy the data into whole clusters of the batch buffer."""
        cb, cs = self._cb, self._cs
        position, end = offset, offset + len(view)
        while position < end:
            cluster = position >> cb
            cluster_start = cluster << cb
            piece_end = min(end, cluster_start + cs)
            if cluster != self._asm_g:
                self._complete_assembled()
                if self._used == self._slots:
                    self._submit()
                slot = self._used << cb
                if position == cluster_start and piece_end == cluster_start + cs:
                    count = min((end - position) >> cb, self._slots - self._used)
                    self._buffer[slot : slot + (count << cb)] = view[position - offset : position - offset + (count << cb)]
                    self._batch_g.extend(range(cluster, cluster + count))
                    self._used += count
                    position += count << cb
                    continue
                self._buffer[slot : slot + cs] = self._empty_table
                self._used += 1
                self._asm_g = cluster
            slot = (self._used - 1) << cb
            self._buffer[slot + position - cluster_start : slot + piece_end - cluster_start] = view[
                position - offset : piece_end - offset
            ]
            position = piece_end

    def _complete_assembled(self) -> None:
        if self._asm_g >= 0:
            self._batch_g.append(self._asm_g)
            self._asm_g = -1

    def _submit(self) -> None:
        """Hand the completed slots to the pool, take a free buffer, place what is done."""
        assert self._asm_g < 0 and self._pool is not None
        if self._batch_g:
            cb = self._cb
            view = memoryview(self._buffer)
            clusters = [view[slot << cb : (slot + 1) << cb] for slot in range(len(self._batch_g))]
            self._pool.submit(self._compressor.batch, clusters, (self._batch_g, self._buffer))
            self._reclaim(2)
            self._buffer = self._free_buffers.pop() if self._free_buffers else bytearray(self._slots << cb)
            self._batch_g = []
            self._used = 0
        self._drain(self._max_inflight)

    def _drain(self, keep: int) -> None:
        """Place the results of the oldest batches, in order, until ``keep`` remain in flight."""
        cb = self._cb
        assert self._pool is not None
        for (clusters, buffer), results in self._pool.completed(keep):
            view = memoryview(buffer)
            writes: list = []
            self._writes = writes
            run_slot = run_host = run_count = 0  # uncompressed clusters contiguous in buffer and file
            for slot, (cluster, packed) in enumerate(zip(clusters, results)):
                if packed is not None:
                    self._place_compressed(cluster, packed)
                    continue
                self._check_room(cluster, cluster, 1)
                host = self._next_free
                self._next_free += 1
                self._hrc.append(1)
                self._map_range(cluster, 1, host)
                if run_count and run_slot + run_count == slot and run_host + run_count == host:
                    run_count += 1
                    continue
                if run_count:
                    writes.append((view[run_slot << cb : (run_slot + run_count) << cb], run_host << cb))
                run_slot, run_host, run_count = slot, host, 1
            if run_count:
                writes.append((view[run_slot << cb : (run_slot + run_count) << cb], run_host << cb))
            self._pending_io.append((self._io.submit(self._write_all, writes), buffer))
            self._reclaim(4)

    def _write_all(self, writes: list) -> None:
        for data, offset in writes:
            self.target.pwrite(data, offset)

    def _reclaim(self, keep: int) -> None:
        """Wait for the oldest writes until ``keep`` remain; their buffers are free again."""
        while len(self._pending_io) > keep:
            future, buffer = self._pending_io.popleft()
            future.result()
            if buffer is not None:
                self._free_buffers.append(buffer)

    def _place_compressed(self, cluster: int, packed: bytes) -> None:
        """Pack a compressed cluster after the previous one, byte after byte, like qemu: it may
        spill into the next host cluster when that one is still free, and a host cluster takes
        no more references than the refcount width allows."""
        cb, cs = self._cb, self._cs
        size = len(packed)
        position = self._rpos
        spills = False
        if position >= 0:
            spills = (position + size - 1) >> cb > self._rlast
            if self._hrc[self._rlast - self._data_cluster] >= self._max_refcount or (
                spills and self._next_free != self._rlast + 1
            ):
                self._close_region()
                position = -1
        self._check_room(cluster, cluster, 1 if position < 0 or spills else 0)
        if position < 0:
            position = self._next_free << cb
            self._rlast = self._next_free
            self._next_free += 1
            self._hrc.append(0)
            self._rbuf[:cs] = self._rbuf[cs:] = self._empty_table
            spills = False
        elif spills:
            self._next_free += 1
            self._hrc.append(0)
        start = position - (self._rlast << cb)
        self._rbuf[start : start + size] = packed
        hrc, base = self._hrc, self._data_cluster
        for host in range(position >> cb, ((position + size - 1) >> cb) + 1):
            hrc[host - base] += 1
        l2_bits = self._l2_bits
        self._table(cluster >> l2_bits)[cluster & ((1 << l2_bits) - 1)] = encode_compressed_entry(position, size, cb)
        if spills:  # the filled cluster is complete; go on in the next one
            self._writes.append((self._rbuf[:cs], self._rlast << cb))
            self._rbuf[:cs] = self._rbuf[cs:]
            self._rbuf[cs:] = self._empty_table
            self._rlast += 1
        self._rpos = position + size
        if self._rpos & (cs - 1) == 0:
            self._close_region()

    def _close_region(self) -> None:
        """Write the cluster being filled with compressed data (its tail stays zero, unused)."""
        if self._rpos >= 0:
            self._writes.append((self._rbuf[: self._cs], self._rlast << self._cb))
            self._rpos = -1

    def _finish_compression(self) -> None:
        self._complete_assembled()
        self._submit()
        self._drain(0)
        self._writes = []
        self._close_region()
        self._pending_io.append((self._io.submit(self._write_all, self._writes), None))
        self._reclaim(0)

    def close(self) -> None:
        """Cancel the batches not started; wait for the compression and the writes in hand."""
        if self._pool is not None:
            self._pool.close()
        for future, _ in self._pending_io:
            if not future.cancel():  # running or done
                future.exception()
        self._pending_io.clear()
        if self._io is not None:
            self._io.shutdown(wait=True)  # idle by now: quick
        self._pool = self._io = None

    # -- metadata --------------------------------------------------------------------------------

    def _header_cluster(self) -> bytes:
        layout = self._layout
        assert layout is not None
        settings = self.settings
        zstd = settings.compression_type == COMPRESSION_ZSTD
        header = Qcow2Header(
            version=settings.version,
            cluster_bits=self._cb,
            virtual_size=self.disk_size,
            l1_size=layout.l1_size,
            l1_table_offset=layout.l1_offset if layout.l1_size else 0,
            refcount_table_offset=layout.refcount_table_offset,
            refcount_table_clusters=layout.refcount_table_clusters,
            incompatible_features=INCOMPAT_COMPRESSION if zstd else 0,
            compatible_features=COMPAT_LAZY_REFCOUNTS if settings.lazy_refcounts else 0,
            refcount_order=settings.refcount_order,
            compression_type=settings.compression_type,
        )
        data = header.pack()
        if settings.version >= 3:
            items = []
            if self._cs >= FEATURE_TABLE_MIN_CLUSTER:
                items.append(HeaderExtension(EXT_FEATURE_NAMES, pack_feature_name_table(FEATURE_NAME_TABLE)))
            data += pack_header_extensions(items)
        return data + bytes(self._cs - len(data))

    def _refcount_table(self, blocks: int) -> bytes:
        layout = self._layout
        assert layout is not None
        table = array("Q", bytes(layout.refcount_table_clusters << self._cb))
        first = layout.refcount_blocks_offset
        table[:blocks] = array("Q", range(first, first + (blocks << self._cb), self._cs))
        if _NATIVE_LITTLE:
            table.byteswap()
        return table.tobytes()

    def _refcount_blocks(self, blocks: int, segments: list) -> Iterator[bytes]:
        """The first ``blocks`` refcount blocks, from (first cluster, count, value) segments where
        value is a number for all of them, or a sequence with one count per cluster."""
        bits = 1 << self.settings.refcount_order
        per_block = (self._cs * 8) >> self.settings.refcount_order
        typecode = _REFCOUNT_TYPECODES[max(bits, 8)]
        empty = bytes(per_block * array(typecode).itemsize)
        for block in range(blocks):
            low, high = block * per_block, (block + 1) * per_block
            counts = array(typecode, empty)
            for start, count, value in segments:
                first, stop = max(start, low), min(start + count, high)
                if first >= stop:
                    continue
                if isinstance(value, int):
                    counts[first - low : stop - low] = array(typecode, [value]) * (stop - first)
                else:
                    counts[first - low : stop - low] = array(typecode, value[first - start : stop - start])
            yield pack_refcounts(counts, bits)

    def _l1_table(self, entries: array) -> bytes:
        layout = self._layout
        assert layout is not None
        if _NATIVE_LITTLE:
            entries = array("Q", entries)
            entries.byteswap()
        raw = entries.tobytes()
        return raw + bytes((layout.l1_clusters << self._cb) - len(raw))

    def _planned_tables(self) -> Iterator[tuple[int, int]]:
        """(slot, L1 index) of each reserved L2 table, in order."""
        planned = self._planned_l1
        index = planned.find(1)
        slot = 0
        while index >= 0:
            yield slot, index
            slot += 1
            index = planned.find(1, index + 1)

    def _streaming_l2_tables(self) -> Iterator[array]:
        """The L2 table of each planned L1 range, in order, from the planned runs."""
        cb, cs, l2_bits = self._cb, self._cs, self._l2_bits
        rg, rn, rh = self._rg, self._rn, self._rh
        runs, run = len(rg), 0
        for _slot, l1_index in self._planned_tables():
            low, high = l1_index << l2_bits, (l1_index + 1) << l2_bits
            table = array("Q", self._empty_table)
            while run < runs and rg[run] < high:
                start, stop = rg[run], rg[run] + rn[run]
                first, last = max(start, low), min(stop, high)
                if first < last:
                    host = ((rh[run] + first - start) << cb) | OFLAG_COPIED
                    table[first - low : last - low] = array("Q", range(host, host + ((last - first) << cb), cs))
                if stop > high:
                    break
                run += 1
            yield table

    @staticmethod
    def _table_bytes(table: array) -> bytes:
        if _NATIVE_LITTLE:
            table = array("Q", table)
            table.byteswap()
        return table.tobytes()

    def _write_streaming_metadata(self) -> None:
        layout = self._layout
        assert layout is not None
        target = self.target
        target.write(self._header_cluster())
        target.write(self._refcount_table(layout.refcount_blocks))
        for block in self._refcount_blocks(layout.refcount_blocks, [(0, layout.total_clusters, 1)]):
            target.write(block)
        l1 = array("Q", bytes(layout.l1_size * 8))
        for slot, l1_index in self._planned_tables():
            l1[l1_index] = (layout.l2_offset + (slot << self._cb)) | OFLAG_COPIED
        target.write(self._l1_table(l1))
        for table in self._streaming_l2_tables():
            target.write(self._table_bytes(table))
        assert target.position == layout.data_offset

    def _write_file_metadata(self) -> None:
        layout = self._layout
        assert layout is not None
        target, cb = self.target, self._cb
        l1 = array("Q", bytes(layout.l1_size * 8))
        used = array("B", bytes(layout.l2_tables))
        for slot, l1_index in self._planned_tables():
            table = self._tables.pop(l1_index, None)
            if table is None:
                continue  # reserved, unused: a hole with refcount 0
            offset = layout.l2_offset + (slot << cb)
            l1[l1_index] = offset | OFLAG_COPIED
            used[slot] = 1
            target.pwrite(self._table_bytes(table), offset)
        assert not self._tables, "an L2 table outside the planned L1 ranges"
        end = self._next_free
        per_block = (self._cs * 8) >> self.settings.refcount_order
        blocks = -(-end // per_block)
        assert blocks <= layout.refcount_blocks
        data_cluster = layout.data_offset >> cb
        segments: list = [
            (0, 1 + layout.refcount_table_clusters + blocks, 1),
            (layout.l1_offset >> cb, layout.l1_clusters, 1),
            (layout.l2_offset >> cb, layout.l2_tables, used),
            (data_cluster, end - data_cluster, self._hrc if self.compress else 1),
        ]
        for number, block in enumerate(self._refcount_blocks(blocks, segments)):
            target.pwrite(block, layout.refcount_blocks_offset + (number << cb))
        target.pwrite(self._refcount_table(blocks), layout.refcount_table_offset)
        if layout.l1_size:
            target.pwrite(self._l1_table(l1), layout.l1_offset)
        target.pwrite(self._header_cluster(), 0)

    # -- the end ---------------------------------------------------------------------------------

    def finish(self) -> None:
        self._ensure_plan()
        layout = self._layout
        assert layout is not None
        target = self.target
        if target.streaming:
            target.skip((layout.total_clusters << self._cb) - target.position)
            target.finish()
            return
        if self.compress:
            self._finish_compression()
        self._write_file_metadata()
        target.finish(self._next_free << self._cb)
