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
walks the tables on demand with a bounded cache of L2 tables.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from typing import NamedTuple

from ..detection import Detection, OpenOptions, ParentOpener
from ..errors import CorruptImage, DiskImageError, UnsupportedFormat, UsageError
from ..hostfile import HostFile
from ..reader import DiskReader, ImageInfo, Run, RunKind, Snapshot

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

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 32 bytes at offset 72
_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")  # 48 bytes
_BITMAPS_EXT = struct.Struct(">IIQQ")  # 24 bytes
_FDE_EXT = struct.Struct(">QQ")

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
# Detection
# ---------------------------------------------------------------------------------------------


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

_NATIVE_LITTLE = sys.byteorder == "little"
_HOST, _ZERO, _BACKING, _ENCODED = RunKind.HOST, RunKind.ZERO, RunKind.BACKING, RunKind.ENCODED


def _load_table(data: bytes) -> array:
    table = array("Q")
    table.frombytes(data[: len(data) - len(data) % 8])
    if _NATIVE_LITTLE:
        table.byteswap()
    return table


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
        head = host.pread(min(file_size, 4096), 0)
        header = Qcow2Header.parse(head)
        cluster_bits = header.cluster_bits
        if cluster_bits < MIN_CLUSTER_BITS:
            raise _corrupt(f"cluster_bits {cluster_bits} is below the minimum of 9 (512-byte clusters)", "header", 20)
        if cluster_bits > MAX_CLUSTER_BITS:
            raise UnsupportedFormat(
                f"cluster size 2^{cluster_bits} is larger than the 2 MiB limit (cluster_bits {cluster_bits})",
                format=NAME,
            )
        cluster_size = header.cluster_size
        if header.header_length > cluster_size:
            raise _corrupt(
                f"header_length {header.header_length} exceeds the cluster size {cluster_size}", "header", 100
            )
        if header.header_length > len(head):
            head = host.pread(min(file_size, cluster_size), 0)
            header = Qcow2Header.parse(head)
        # the first cluster holds the header, its extensions and the backing file name
        if len(head) >= cluster_size:
            first_cluster = head[:cluster_size]
        else:
            first_cluster = host.pread(min(file_size, cluster_size), 0)

        extension_end = len(first_cluster)
        if header.backing_file_offset and header.backing_file_offset < extension_end:
            extension_end = int(header.backing_file_offset)
        extensions = parse_header_extensions(
            first_cluster[header.header_length : max(header.header_length, extension_end)], header.header_length
        )

        cls._check_features(header, extensions)
        cls._check_layout(header, file_size)
        backing_file = cls._backing_name_from(header, first_cluster, file_size)
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
            cls._check_l1(l1_offset, l1_size, cluster_size, file_size, f"snapshot {selected.id} L1 table")
        # qemu addresses the guest in 512-byte sectors and ignores a partial last sector
        virtual_size -= virtual_size % 512
        l1 = _load_table(host.pread(l1_size * 8, l1_offset)) if l1_size else array("Q")
        if len(l1) != l1_size:
            raise _corrupt("L1 table runs past the end of the file", "L1 table", l1_offset)
        return cls(host, header, extensions, snapshots, l1, l1_offset, virtual_size, backing_file, selected)

    @staticmethod
    def _check_features(header: Qcow2Header, extensions: HeaderExtensions) -> None:
        unknown = header.incompatible_features & ~INCOMPAT_KNOWN
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
        if header.crypt_method:
            if header.crypt_method in (CRYPT_AES, CRYPT_LUKS):
                method = "AES" if header.crypt_method == CRYPT_AES else "LUKS"
                raise UnsupportedFormat(
                    f"encrypted ({method}) qcow2 images are not supported", format=NAME, hint=_DECRYPT_HINT
                )
            raise UnsupportedFormat(f"unknown qcow2 encryption method {header.crypt_method}", format=NAME)
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            name = extensions.data_file or "(unnamed)"
            raise UnsupportedFormat(f"external data file {name!r} is not supported", format=NAME, hint=_DATA_FILE_HINT)
        compression = header.compression_type
        if compression not in COMPRESSION_NAMES:
            raise UnsupportedFormat(f"unknown qcow2 compression type {compression}", format=NAME)
        if bool(header.incompatible_features & INCOMPAT_COMPRESSION) != (compression != COMPRESSION_ZLIB):
            raise _corrupt(
                f"compression type {compression} does not agree with incompatible feature bit 3", "header", 72
            )
        if compression == COMPRESSION_ZSTD and zstandard is None:  # pragma: no cover
            raise UnsupportedFormat("zstd-compressed qcow2 needs the 'zstandard' package", format=NAME)
        if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
            raise _corrupt(
                f"extended L2 entries need clusters of at least 16 KiB (cluster_bits {header.cluster_bits})",
                "header",
                20,
            )
        if header.refcount_order > MAX_REFCOUNT_ORDER:
            raise _corrupt(f"refcount_order {header.refcount_order} is above the maximum of 6", "header", 96)

    @classmethod
    def _check_layout(cls, header: Qcow2Header, file_size: int) -> None:
        cluster_size = header.cluster_size
        if header.virtual_size > MAX_VIRTUAL_SIZE:
            raise _corrupt(f"virtual size {header.virtual_size} is too large", "header", 24)
        needed = header.l1_entries_needed()
        if needed > MAX_L1_ENTRIES:
            raise _corrupt(
                f"virtual size {header.virtual_size} needs an L1 table above the 32 MiB limit", "header", 24
            )
        if header.l1_size > MAX_L1_ENTRIES:
            raise _corrupt(f"L1 table of {header.l1_size} entries exceeds the 32 MiB limit", "header", 36)
        if header.l1_size < needed:
            raise _corrupt(
                f"L1 table of {header.l1_size} entries is too small for virtual size {header.virtual_size} "
                f"({needed} needed)",
                "header",
                36,
            )
        cls._check_l1(header.l1_table_offset, header.l1_size, cluster_size, file_size, "L1 table")
        if header.refcount_table_clusters == 0:
            raise _corrupt("the image has no refcount table", "header", 56)
        if header.refcount_table_clusters > MAX_REFCOUNT_TABLE_BYTES // cluster_size:
            raise _corrupt(
                f"refcount table of {header.refcount_table_clusters} clusters exceeds the 8 MiB limit", "header", 56
            )
        if header.refcount_table_offset % cluster_size or header.refcount_table_offset >= file_size:
            raise _corrupt(
                f"refcount table offset {header.refcount_table_offset} is unaligned or past the end of the file",
                "header",
                48,
            )
        if header.nb_snapshots > MAX_SNAPSHOTS:
            raise _corrupt(f"{header.nb_snapshots} snapshots exceed the limit of {MAX_SNAPSHOTS}", "header", 60)
        if header.nb_snapshots:
            offset = header.snapshots_offset
            if offset % cluster_size or offset + 40 * header.nb_snapshots > file_size:
                raise _corrupt(
                    f"snapshot table offset {offset} is unaligned or the table lies past the end of the file",
                    "header",
                    64,
                )

    @staticmethod
    def _check_l1(offset: int, entries: int, cluster_size: int, file_size: int, what: str) -> None:
        if entries > MAX_L1_ENTRIES:
            raise _corrupt(f"{what} of {entries} entries exceeds the 32 MiB limit", what)
        if not entries:
            return
        if offset % cluster_size:
            raise _corrupt(f"{what} offset {offset} is not cluster aligned", what, offset)
        if offset + entries * 8 > file_size:
            raise _corrupt(
                f"{what} ({entries} entries at offset {offset}) runs past the end of the file ({file_size} bytes)",
                what,
                offset,
            )

    @staticmethod
    def _backing_name_from(header: Qcow2Header, first_cluster: bytes, file_size: int) -> str | None:
        offset, size = header.backing_file_offset, header.backing_file_size
        if not offset:
            return None
        if size > MAX_BACKING_NAME:
            raise _corrupt(f"backing file name of {size} bytes is longer than 1023", "header", 16)
        if offset + size > header.cluster_size or offset + size > file_size:
            raise _corrupt(
                f"backing file name ({size} bytes at offset {offset}) lies outside the first cluster or the file",
                "header",
                8,
            )
        raw = first_cluster[offset : offset + size]
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
        table = _load_table(self.host.pread(cluster_size, offset))
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
