"""qcow2 on-disk structures: the one home of every qcow2 rule the reader, the writer, ``check`` and
detection share (qemu's qcow2.h, read as a specification; big-endian throughout).

The file is organised in clusters of ``1 << cluster_bits`` bytes (512 B .. 2 MiB):

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

Pure functions only: bytes in, values out (and back). An unallocated guest cluster reads from the
backing image, or as zeros without one; :func:`decode_l2_table` is the one decoder of L2 entries.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from typing import NamedTuple

from ...errors import CorruptImage, UnsupportedFormat

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


#: the u32 (big-endian) version after the magic: 1 for qcow, 2 or 3 for qcow2
VERSION_FIELD = 4


def header_version(head: bytes) -> int | None:
    """The version field of a qcow or qcow2 header, or None when ``head`` is too short to hold it."""
    if len(head) < VERSION_FIELD + 4:
        return None
    return int.from_bytes(head[VERSION_FIELD : VERSION_FIELD + 4], "big")


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
        return datetime.fromtimestamp(self.date_sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

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
            )
        )  # fmt: skip
        position = end + (-end % 8)
    return snapshots


def pack_snapshot_table(snapshots: list[Qcow2Snapshot]) -> bytes:
    return b"".join(snapshot.pack() for snapshot in snapshots)


# ---------------------------------------------------------------------------------------------
# L2 entries
# ---------------------------------------------------------------------------------------------


# What an L2 entry reads as: qemu's cluster and subcluster types (qcow2.h), one code each. Decoded
# by decode_l2_table alone, for the reader, ``check`` and every other caller.
#: no host cluster: reads from the backing file, or as zeros without one
L2_UNALLOCATED = 0
#: no host cluster: reads as zeros
L2_ZERO = 1
#: reads from its host cluster
L2_NORMAL = 2
#: reads as zeros; its host cluster stays allocated (preallocated)
L2_ZERO_ALLOC = 3
#: extended L2, no subcluster allocated: reads from the backing file; its host cluster stays allocated
L2_UNALLOCATED_ALLOC = 4
#: extended L2: subclusters in different states (:func:`subcluster_runs` splits the bitmap)
L2_SUBCLUSTERS = 5
#: a compressed cluster: the run's host offset is a byte offset, its extra the bytes to read
L2_COMPRESSED = 6
#: extended L2: the bitmap contradicts itself or the entry (qemu: QCOW2_SUBCLUSTER_INVALID)
L2_INVALID = 7

#: (state, first entry, entries, host offset of the first, extra): entries [first, first + entries)
#: of one L2 table in one state. ``extra`` is the stored length of a compressed cluster and the
#: bitmap of an L2_SUBCLUSTERS or L2_INVALID entry, 0 otherwise.
L2Run = tuple[int, int, int, int, int]


class InvalidL2Entry(CorruptImage, ValueError):
    """An L2 entry whose bits contradict each other (also a ValueError, as the entry helpers raised)."""


def compressed_field_shift(cluster_bits: int) -> int:
    """Bit where the sector count of a compressed descriptor starts (x in the specification)."""
    return 62 - (cluster_bits - 8)


def decode_l2_table(table: array[int], first: int, count: int, cluster_bits: int, extended: bool) -> list[L2Run]:
    """The one decoder of L2 entries: entries [first, first + count) of an L2 table (as
    :func:`parse_u64_table` gives it; two words per entry with extended L2) as runs in one state.

    Neighbouring entries in one state form one run, those with host clusters only while their
    clusters follow each other in the file; compressed, L2_SUBCLUSTERS and L2_INVALID entries are
    runs of one. As qemu: the zero flag (bit 0) means nothing with extended L2, whose bitmap is
    invalid where a subcluster is both allocated and zero, or allocated without a host cluster.
    Where the host offset lies (cluster aligned, inside the file) is the caller's to judge.
    """
    if extended:
        words = table[2 * first : 2 * (first + count)]
    else:
        words = table[first : first + count]
    if words.count(0) == len(words):
        return [(L2_UNALLOCATED, first, count, 0, 0)]
    cluster_size = 1 << cluster_bits
    shift = compressed_field_shift(cluster_bits)
    compressed_offset_mask = (1 << shift) - 1
    sectors_mask = (1 << (cluster_bits - 8)) - 1
    runs: list[L2Run] = []
    state = -1  # the run being extended: state, first entry, entries, first host, next host
    start = length = first_host = next_host = 0
    if extended:
        pairs = iter(words)
        entries: Iterator[tuple[int, int]] = zip(pairs, pairs, strict=True)
    else:
        entries = zip(words, repeat(-1))
    for index, (entry, bitmap) in enumerate(entries, first):
        if entry & OFLAG_COMPRESSED:
            if state >= 0:
                runs.append((state, start, length, first_host, 0))
                state = -1
            host = entry & compressed_offset_mask
            stored = (((entry >> shift) & sectors_mask) + 1) * 512 - (host & 511)
            runs.append((L2_COMPRESSED, index, 1, host, stored))
            continue
        host = entry & L2E_OFFSET_MASK
        if bitmap < 0:  # standard entry
            if entry & OFLAG_ZERO:
                kind = L2_ZERO_ALLOC if host else L2_ZERO
            else:
                kind = L2_NORMAL if host else L2_UNALLOCATED
        else:
            allocated = bitmap & SUBCLUSTER_MASK
            zero = bitmap >> 32
            if allocated & zero or (allocated and not host):
                kind = L2_INVALID
            elif allocated == SUBCLUSTER_MASK:
                kind = L2_NORMAL
            elif zero == SUBCLUSTER_MASK:
                kind = L2_ZERO_ALLOC if host else L2_ZERO
            elif not bitmap:
                kind = L2_UNALLOCATED_ALLOC if host else L2_UNALLOCATED
            else:
                kind = L2_SUBCLUSTERS
            if kind in (L2_SUBCLUSTERS, L2_INVALID):
                if state >= 0:
                    runs.append((state, start, length, first_host, 0))
                    state = -1
                runs.append((kind, index, 1, host, bitmap))
                continue
        if kind == state and host == next_host:
            length += 1
            if host:
                next_host += cluster_size
            continue
        if state >= 0:
            runs.append((state, start, length, first_host, 0))
        state, start, length, first_host, next_host = kind, index, 1, host, host + cluster_size if host else 0
    if state >= 0:
        runs.append((state, start, length, first_host, 0))
    return runs


#: the states of subclusters: allocated, reads as zeros, neither
_SUBCLUSTER_STATES = (L2_NORMAL, L2_ZERO, L2_UNALLOCATED)


def subcluster_runs(bitmap: int) -> list[tuple[int, int, int]]:
    """(first subcluster, count, state) runs of a valid extended L2 bitmap: L2_NORMAL (allocated),
    L2_ZERO (reads as zeros) or L2_UNALLOCATED."""
    allocated = bitmap & SUBCLUSTER_MASK
    zero = bitmap >> 32
    masks = (allocated, zero, SUBCLUSTER_MASK & ~(allocated | zero))
    runs = []
    index = 0
    while index < SUBCLUSTERS:
        bit = 1 << index
        which = 0 if allocated & bit else 1 if zero & bit else 2
        rest = ~(masks[which] >> index)  # lowest set bit: where the run ends
        length = (rest & -rest).bit_length() - 1
        runs.append((index, length, _SUBCLUSTER_STATES[which]))
        index += length
    return runs


class L2Entry(NamedTuple):
    """One decoded L2 entry. kind: "unallocated", "zero", "normal" or "compressed"."""

    kind: str
    host_offset: int = 0
    #: compressed clusters: bytes to read from host_offset (may reach into the next cluster)
    compressed_length: int = 0
    copied: bool = False


#: qemu's cluster types, from the first 64 bits of an entry: with extended L2 an entry with a host
#: cluster is a "normal" cluster whatever its bitmap says
_CLUSTER_KINDS = {L2_UNALLOCATED: "unallocated", L2_ZERO: "zero", L2_ZERO_ALLOC: "zero", L2_NORMAL: "normal",
                  L2_UNALLOCATED_ALLOC: "normal"}
#: what a subcluster reads as
_SUBCLUSTER_KINDS = {L2_UNALLOCATED: "unallocated", L2_UNALLOCATED_ALLOC: "unallocated", L2_ZERO: "zero",
                     L2_ZERO_ALLOC: "zero", L2_NORMAL: "normal", L2_COMPRESSED: "compressed"}


def decode_l2_entry(entry: int, cluster_bits: int, extended: bool = False) -> L2Entry:
    """The cluster type of one L2 entry from its first 64 bits (:func:`decode_l2_table`)."""
    words = array("Q", (entry, 0) if extended else (entry,))
    ((state, _, _, host, extra),) = decode_l2_table(words, 0, 1, cluster_bits, extended)
    copied = bool(entry & OFLAG_COPIED)
    if state == L2_COMPRESSED:
        return L2Entry("compressed", host, extra, copied)
    return L2Entry(_CLUSTER_KINDS[state], host, 0, copied)


def subcluster_kind(entry: int, bitmap: int, index: int) -> str:
    """"normal", "zero", "unallocated" or "compressed": what subcluster ``index`` of an extended L2
    entry reads as (:func:`decode_l2_table`); InvalidL2Entry where the bitmap is invalid anywhere."""
    # the cluster size only places a compressed cluster's bytes, not what the entry reads as
    ((state, _, _, _, extra),) = decode_l2_table(array("Q", (entry, bitmap)), 0, 1, MIN_EXTENDED_L2_CLUSTER_BITS,
                                                 True)
    if state == L2_INVALID:
        raise InvalidL2Entry(f"invalid subcluster bitmap {bitmap:#018x} in L2 entry {entry:#x}", structure="L2 table")
    if state == L2_SUBCLUSTERS:
        state = next(kind for start, length, kind in subcluster_runs(extra) if start <= index < start + length)
    return _SUBCLUSTER_KINDS[state]


def encode_compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster whose ``length`` bytes start at byte ``host_offset``."""
    shift = compressed_field_shift(cluster_bits)
    sectors = (host_offset + length - 1) // 512 - host_offset // 512 + 1
    if host_offset >> shift or sectors - 1 >= 1 << (cluster_bits - 8) or length <= 0:
        raise ValueError("compressed cluster does not fit an L2 descriptor")
    return OFLAG_COMPRESSED | ((sectors - 1) << shift) | host_offset


# ---------------------------------------------------------------------------------------------
# Tables: L1, L2, refcount table and blocks, bitmap directory
# ---------------------------------------------------------------------------------------------


def parse_u64_table(data: bytes) -> array[int]:
    """Big-endian u64 entries (an L1, L2, refcount or bitmap table) as an array; a partial last
    entry is left out."""
    table = array("Q")
    table.frombytes(data[: len(data) - len(data) % 8])
    if _NATIVE_LITTLE:
        table.byteswap()
    return table


def pack_u64_table(table: array[int]) -> bytes:
    """The big-endian bytes of u64 entries (an L1, L2 or refcount table): parse_u64_table's inverse."""
    if _NATIVE_LITTLE:
        table = array("Q", table)
        table.byteswap()
    return table.tobytes()


def parse_refcount_table(data: bytes) -> array[int]:
    """The refcount table: refcount block offsets in bits 9-63 (``REFT_OFFSET_MASK``; 0 = no block)."""
    return parse_u64_table(data)


def decode_refcount_block(data: bytes, refcount_order: int) -> array[int]:
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


def pack_refcounts(counts: array[int], refcount_bits: int) -> bytes:
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

#: what to do with an encrypted image (diskimg has no key)
DECRYPT_HINT = (
    "decrypt with qemu-img convert --object secret,id=sec0,file=PASSPHRASE_FILE "
    "--image-opts driver=qcow2,file.filename=IMAGE,encrypt.key-secret=sec0 -O qcow2 OUTPUT first"
)
#: what to do with an image whose data lies in an external file
DATA_FILE_HINT = "make a self-contained copy with qemu-img convert -O qcow2 (run from the image's folder) first"


# ---------------------------------------------------------------------------------------------
# Header rules
# ---------------------------------------------------------------------------------------------


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
        raise UnsupportedFormat(f"external data file {name!r} is not supported", format=NAME, hint=DATA_FILE_HINT)
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
    check_l1_place(header.l1_table_offset, header.l1_size, cluster_size, "L1 table")
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


def check_l1_place(offset: int, entries: int, cluster_size: int, what: str) -> None:
    """An L1 table (the active one or a snapshot's) of a size qemu takes, cluster aligned."""
    if entries > MAX_L1_ENTRIES:
        raise _corrupt(f"{what} of {entries} entries exceeds the 32 MiB limit", what)
    if entries and offset % cluster_size:
        raise _corrupt(f"{what} offset {offset} is not cluster aligned", what, offset)
