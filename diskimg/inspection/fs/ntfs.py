"""NTFS, read only: enough of the Windows file system to find and read the files of a system volume.

Everything is little-endian. The layout, as far as a reader needs it:

    boot sector     (``superblocks.py``) bytes per sector (0x0B), sectors per cluster (0x0D; above 0x80 it is
                    ``1 << (256 - value)``), total sectors (0x28), cluster of $MFT (0x30), and the
                    sizes of an MFT record (0x40) and of an index record (0x44): a positive value
                    counts clusters, a negative one ``-n`` means ``1 << n`` bytes
    $MFT            the master file table, itself file 0: an array of fixed-size records, one per
                    file, read through the runlist of its own $DATA attribute
    MFT record      'FILE', an update sequence array (the last two bytes of every 512-byte block
                    were replaced on disk by a check value, their real contents kept in the array),
                    a header (flags, link count, base record), then attributes until 0xFFFFFFFF
    attribute       type, length, name; a resident one holds its value, a non-resident one a
                    runlist: (length, LCN delta) pairs of variable width, deltas signed and
                    relative to the previous run, a run without delta being sparse (zeros)
    $ATTRIBUTE_LIST the attributes of a file that did not fit its base record, by extension record
    directories     a B+tree of $FILE_NAME keys: the root node in $INDEX_ROOT, the other nodes in
                    'INDX' records (with the same fixups) inside $INDEX_ALLOCATION, an entry with a
                    sub-node pointing to the node of the names that sort before it

Files are named by their MFT record number. Records 0 to 15 are the file system's own metafiles
($MFT, $Bitmap, $Extend, ...); they are not listed, nor are 8.3 aliases. Symbolic links are reparse
points (Windows symlinks and junctions, translated to guest paths when they point into this volume,
which is taken to be drive C: unless told otherwise) or Interix links as ntfs-3g writes them.
Compressed data (LZNT1, in units of 16 clusters) is decoded; encrypted (EFS) files and files whose
data a reparse point holds elsewhere (WOF, deduplication) are recognised and their reading refused.

Free space (``unused_ranges``, for ``--sparsify``) is the clusters whose bit is clear in $Bitmap (file 6).
It is not trusted, as ntfs-3g does not mount such a volume read-write, when $Volume's flags say dirty,
when Windows is hibernated on the volume (hiberfil.sys's header), or when $LogFile's newest restart page
records an unclean shutdown or Windows' cached metadata (version 2.0, fast startup).
"""

from __future__ import annotations

import bisect
import re
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...bitmaps import clear_bit_runs
from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk
from ..superblocks import NtfsBootSector, field_offset, parse_ntfs_boot_sector
from .base import (
    MAX_DIRECTORY_ENTRIES,
    DirEntry,
    FileType,
    GuestFileSystem,
    GuestPathError,
    NotSparsifiable,
    Stat,
    join_adjacent,
    read_volume,
)

#: the stride of update sequence fixups, whatever the sector size
FIXUP_BLOCK = 512

# MFT record numbers
MFT_RECORD = 0
LOGFILE_RECORD = 2
VOLUME_RECORD = 3
ROOT_RECORD = 5
BITMAP_RECORD = 6  # $Bitmap: one bit per cluster, set when the cluster is in use
UPCASE_RECORD = 10
FIRST_USER_RECORD = 16  # records below hold the metafiles

# attribute types
ATTR_STANDARD_INFORMATION = 0x10
ATTR_VOLUME_INFORMATION = 0x70  # in $Volume: reserved (8 bytes), major and minor version, flags (u16)
ATTR_ATTRIBUTE_LIST = 0x20
ATTR_FILE_NAME = 0x30
ATTR_DATA = 0x80
ATTR_INDEX_ROOT = 0x90
ATTR_INDEX_ALLOCATION = 0xA0
ATTR_REPARSE_POINT = 0xC0
ATTR_END = 0xFFFFFFFF

# attribute header flags
ATTR_COMPRESSION_MASK = 0x00FF
ATTR_ENCRYPTED = 0x4000
ATTR_SPARSE = 0x8000

# $VOLUME_INFORMATION flags
VOLUME_IS_DIRTY = 0x0001  # Windows runs chkdsk at the next boot

# hibernation: Windows writes its memory image to hiberfil.sys in the root, whose first 4 KiB header
# starts with one of these while the image waits to be resumed (ntfs-3g refuses such a volume, and a
# hiberfil.sys shorter than the header as well)
HIBERFILE = "hiberfil.sys"
HIBERFILE_HEADER_SIZE = 4096
HIBERNATION_MAGICS = (b"hibr", b"HIBR", b"wake")

# $LogFile (the journal): two restart pages, at 0 and at the system page size, then log record pages.
# ntfs-3g's rules: the file is looked at in 4 KiB log pages, at most 4 GiB of it, and must hold the two
# restart pages and 48 record pages; restart pages are looked for at 0, 512, 1024, ... until a record
# page, or an empty (0xFF-filled) block after a used one
LOGFILE_BLOCK = 512
LOG_PAGE_SIZE = 4096
MIN_LOG_RECORD_PAGES = 48
MAX_LOGFILE_SIZE = 1 << 32
#: bytes of $Bitmap read at a time by ``unused_ranges`` (8 Mi clusters)
FREE_SPACE_CHUNK = 1 << 20
#: a restart page's system page size, read whole (the specification's are 4 KiB; larger is refused)
MAX_RESTART_PAGE = 64 << 10
EMPTY_LOG_BLOCK = b"\xff\xff\xff\xff"
RESTART_MAGICS = (b"RSTR", b"CHKD")  # CHKD: rewritten by chkdsk
LOG_RECORD_MAGIC = b"RCRD"
#: restart page header: magic, usa offset and count, chkdsk LSN, system and log page sizes, restart
#: area offset, minor and major version (30 bytes)
RESTART_PAGE_HEADER = struct.Struct("<4sHHqIIHhh")
#: restart area: current LSN, log clients, free and in-use client lists, flags, sequence number bits,
#: restart area length, client array offset, file size, last LSN data length, log record header
#: length, log page data offset
RESTART_AREA = struct.Struct("<qHHHHIHHqIHH")
RESTART_AREA_FILE_SIZE = 24  # the offset of file_size: what lies before it must be in the first block
#: a log client record: oldest LSN, client restart LSN, previous and next client (then 140 more bytes)
LOG_CLIENT_RECORD = struct.Struct("<qqHH")
LOG_CLIENT_RECORD_SIZE = 0xA0
LOGFILE_NO_CLIENT = 0xFFFF
RESTART_VOLUME_IS_CLEAN = 0x0002
#: restart page versions ntfs-3g knows; 2.0 means Windows kept metadata in its cache (fast startup)
LOGFILE_VERSIONS = ((1, 1), (2, 0))
LOGFILE_CACHED_VERSION = (2, 0)

# MFT record flags
RECORD_IN_USE = 0x1
#: an MFT reference: the record number in its low 48 bits, a sequence number above
RECORD_NUMBER_MASK = (1 << 48) - 1

# $FILE_NAME namespaces: a DOS-only name is the 8.3 alias of a long name
NAMESPACE_DOS = 2

SLASH = 0x2F  # no NTFS name holds it, nor NUL

# index entry flags
INDEX_ENTRY_NODE = 0x1
INDEX_ENTRY_END = 0x2

# reparse tags
TAG_SYMLINK = 0xA000000C
TAG_MOUNT_POINT = 0xA0000003  # a junction
TAG_DEDUP = 0x80000013
TAG_WOF = 0x80000017  # Windows Overlay Filter: data compressed into a named stream
SYMLINK_RELATIVE = 0x1

# Interix (Services for Unix, ntfs-3g) special files: a system file whose data starts with a magic
INTERIX_SYMLINK = b"IntxLNK\x01"
INTERIX_DEVICES = (b"IntxCHR\x00", b"IntxBLK\x00")
MAX_INTERIX_DATA = 8 + 2 * 4096

FILE_ATTRIBUTE_SYSTEM = 0x0004
FILE_ATTRIBUTE_REPARSE_POINT = 0x0400
FILE_NAME_DIRECTORY = 0x10000000  # in $FILE_NAME's copy of the attributes: has a $I30 index

#: $STANDARD_INFORMATION file attribute bits -> Stat.flags names
FILE_ATTRIBUTE_FLAGS = {
    0x0001: "readonly",
    0x0002: "hidden",
    0x0004: "system",
    0x0020: "archive",
    0x0200: "sparse",
    0x0400: "reparse",
    0x0800: "compressed",
    0x1000: "offline",
    0x4000: "encrypted",
}

# 100 ns intervals from 1601-01-01 to 1970-01-01
NT_EPOCH_OFFSET = 116444736000000000

# caps on what an image may make us hold or walk
MAX_RECORD_SIZE = 64 << 10
MAX_CLUSTER_SIZE = 2 << 20
MAX_RUNS = 1 << 18
MAX_ATTRIBUTE_LIST = 4 << 20
MAX_EXTENSION_RECORDS = 16384
MAX_INDEX_DEPTH = 32
UPCASE_SIZE = 65536 * 2
# caches: MFT records and INDX nodes by bytes, files by count and by the runs they hold
RECORD_CACHE_BYTES = 4 << 20
INDEX_CACHE_BYTES = 4 << 20
FILE_CACHE = 256
FILE_CACHE_RUNS = 1 << 20


def _u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _u64(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def _utf16(raw: bytes) -> str:
    return raw.decode("utf-16-le", errors="replace")


def _utf16_units(raw: bytes) -> array[int]:
    """Little-endian 16-bit values (UTF-16 code units, the $UpCase table) as an array."""
    units = array("H", raw[: len(raw) & ~1])
    if sys.byteorder == "big":
        units.byteswap()
    return units


# -- boot sector -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootSector:
    """The geometry a reader needs (sizes in bytes), checked: from the boot sector ``superblocks.py`` parses."""

    bytes_per_sector: int
    cluster_size: int
    total_sectors: int
    mft_lcn: int
    mft_record_size: int
    index_record_size: int
    serial: int


def _record_size(value: int, cluster_size: int, what: str, where: int) -> int:
    """A record size field: positive counts clusters, negative ``-n`` means ``1 << n`` bytes."""
    size = value * cluster_size if value > 0 else 1 << min(-value, 31)
    if not FIXUP_BLOCK <= size <= MAX_RECORD_SIZE or size & (size - 1):
        raise CorruptImage(f"NTFS {what} size {size} is not a power of two from 512 to 64 KiB",
                           offset=where, structure="NTFS boot sector")
    return size


def parse_boot_sector(sector: bytes, where: int = 0) -> BootSector:
    """The geometry in an NTFS boot sector (``where``: its offset on the disk, for messages), checked."""
    boot = parse_ntfs_boot_sector(sector)
    if boot is None:
        raise CorruptImage("no NTFS boot sector", offset=where, structure="NTFS boot sector")

    def at(name: str) -> int:
        return where + field_offset(NtfsBootSector, name)

    cluster = boot.cluster_size
    if cluster is None or cluster > MAX_CLUSTER_SIZE or cluster & (cluster - 1):
        raise CorruptImage(f"NTFS cluster size {cluster} is not valid", offset=at("bytes_per_sector"),
                           structure="NTFS boot sector")
    return BootSector(
        bytes_per_sector=boot.bytes_per_sector,
        cluster_size=cluster,
        total_sectors=boot.total_sectors,
        mft_lcn=boot.mft_lcn,
        mft_record_size=_record_size(boot.clusters_per_mft_record, cluster, "MFT record",
                                     at("clusters_per_mft_record")),
        index_record_size=_record_size(boot.clusters_per_index_record, cluster, "index record",
                                       at("clusters_per_index_record")),
        serial=boot.serial,
    )


# -- fixups, attributes, runlists ------------------------------------------------------------------------


def apply_fixups(block: bytes, magic: bytes, where: int, structure: str) -> bytes:
    """``block`` with its update sequence undone; a torn or forged block is corruption."""
    if block[:4] != magic:
        raise CorruptImage(f"{structure} does not start with {magic!r}", offset=where, structure=structure)
    usa_offset = _u16(block, 4)
    usa_count = _u16(block, 6)
    blocks = len(block) // FIXUP_BLOCK
    if usa_count != blocks + 1 or usa_offset < 8 or usa_offset & 1 or usa_offset + 2 * usa_count > FIXUP_BLOCK - 2:
        raise CorruptImage(f"{structure} update sequence array ({usa_count} at {usa_offset}) does not fit",
                           offset=where, structure=structure)
    fixed = bytearray(block)
    check = block[usa_offset : usa_offset + 2]
    for index in range(blocks):
        end = (index + 1) * FIXUP_BLOCK - 2
        if block[end : end + 2] != check:
            raise CorruptImage(f"{structure} update sequence mismatch in its block {index}",
                               offset=where + end, structure=structure)
        saved = usa_offset + 2 * (index + 1)
        fixed[end : end + 2] = block[saved : saved + 2]
    return bytes(fixed)


@dataclass(frozen=True)
class Attribute:
    """One attribute header as found in one MFT record (a non-resident one may be one piece of several)."""

    type: int
    name: str
    flags: int
    record: int
    value: bytes = b""  # resident
    resident: bool = True
    lowest_vcn: int = 0
    highest_vcn: int = -1
    compression_unit: int = 0
    allocated_size: int = 0
    data_size: int = 0
    initialized_size: int = 0
    runs: tuple[tuple[int, int, int], ...] = ()  # (vcn, clusters, lcn or -1 for sparse)


def _signed(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def parse_runlist(data: bytes, start: int, first_vcn: int, where: int) -> list[tuple[int, int, int]]:
    """The runs of a mapping pairs array at ``data[start:]``: (vcn, clusters, lcn), lcn -1 when sparse."""
    runs: list[tuple[int, int, int]] = []
    vcn, lcn, pos = first_vcn, 0, start
    while pos < len(data) and data[pos]:
        header = data[pos]
        length_size, delta_size = header & 0x0F, header >> 4
        if not 1 <= length_size <= 8 or delta_size > 8 or pos + 1 + length_size + delta_size > len(data):
            raise CorruptImage(f"malformed runlist header 0x{header:02x}", offset=where + pos, structure="NTFS runlist")
        count = _signed(data[pos + 1 : pos + 1 + length_size])
        if count <= 0:
            raise CorruptImage(f"runlist run of {count} clusters", offset=where + pos, structure="NTFS runlist")
        if delta_size:
            lcn += _signed(data[pos + 1 + length_size : pos + 1 + length_size + delta_size])
            if lcn < 0:
                raise CorruptImage(f"runlist LCN {lcn} is negative", offset=where + pos, structure="NTFS runlist")
            runs.append((vcn, count, lcn))
        else:
            runs.append((vcn, count, -1))
        if len(runs) > MAX_RUNS:
            raise CorruptImage(f"runlist of more than {MAX_RUNS} runs", offset=where, structure="NTFS runlist")
        vcn += count
        pos += 1 + length_size + delta_size
    if pos >= len(data):
        raise CorruptImage("runlist runs past its attribute", offset=where + start, structure="NTFS runlist")
    return runs


def parse_attributes(record: bytes, number: int, where: int) -> list[Attribute]:
    """The attributes of one (fixed-up) MFT record, up to the end marker."""
    used = _u32(record, 24)
    if used > len(record):
        used = len(record)
    pos = _u16(record, 20)
    attributes: list[Attribute] = []
    while True:
        if pos & 7 or pos + 4 > used:
            raise CorruptImage(f"MFT record {number}: attributes run past the record", offset=where + pos,
                               structure="MFT record")
        kind = _u32(record, pos)
        if kind == ATTR_END:
            return attributes
        length = _u32(record, pos + 4)
        non_resident = record[pos + 8] if pos + 8 < used else 0
        if length < (64 if non_resident else 24) or length & 7 or pos + length > used:
            raise CorruptImage(f"MFT record {number}: attribute 0x{kind:x} of {length} bytes does not fit",
                               offset=where + pos, structure="MFT attribute")
        raw = bytes(record[pos : pos + length])
        name_length, name_offset, flags = raw[9], _u16(raw, 10), _u16(raw, 12)
        if name_length and name_offset + 2 * name_length > length:
            raise CorruptImage(f"MFT record {number}: attribute name runs past its attribute", offset=where + pos,
                               structure="MFT attribute")
        name = _utf16(raw[name_offset : name_offset + 2 * name_length]) if name_length else ""
        if non_resident:
            lowest, highest = _signed(raw[16:24]), _signed(raw[24:32])
            runs_offset = _u16(raw, 32)
            allocated, size, initialized = _u64(raw, 40), _u64(raw, 48), _u64(raw, 56)
            if lowest < 0 or runs_offset < 64 or runs_offset >= length:
                raise CorruptImage(f"MFT record {number}: non-resident attribute 0x{kind:x} is malformed",
                                   offset=where + pos, structure="MFT attribute")
            runs = parse_runlist(raw, runs_offset, lowest, where + pos)
            mapped = sum(run[1] for run in runs)
            if (highest >= lowest and mapped != highest - lowest + 1) or (highest < lowest and mapped):
                raise CorruptImage(f"MFT record {number}: runlist of attribute 0x{kind:x} maps {mapped} clusters, "
                                   f"its header VCNs {lowest}..{highest}", offset=where + pos, structure="NTFS runlist")
            attribute = Attribute(kind, name, flags, number, resident=False, lowest_vcn=lowest, highest_vcn=highest,
                                  compression_unit=raw[34], allocated_size=allocated, data_size=size,
                                  initialized_size=initialized, runs=tuple(runs))
        else:
            value_length, value_offset = _u32(raw, 16), _u16(raw, 20)
            if value_offset + value_length > length:
                raise CorruptImage(f"MFT record {number}: resident attribute 0x{kind:x} runs past its attribute",
                                   offset=where + pos, structure="MFT attribute")
            value = raw[value_offset : value_offset + value_length]
            attribute = Attribute(kind, name, flags, number, value=value, data_size=value_length,
                                  initialized_size=value_length, allocated_size=value_length)
        attributes.append(attribute)
        pos += length


def parse_attribute_list(value: bytes, where: int) -> list[int]:
    """The MFT record number of each $ATTRIBUTE_LIST entry (type, length, name, VCN, record, id)."""
    records = []
    pos = 0
    while pos + 26 <= len(value):
        length = _u16(value, pos + 4)
        if length < 26 or pos + length > len(value):
            raise CorruptImage(f"$ATTRIBUTE_LIST entry of {length} bytes", offset=where, structure="$ATTRIBUTE_LIST")
        records.append(_u64(value, pos + 16) & RECORD_NUMBER_MASK)
        pos += length
    return records


# -- $LogFile restart pages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPage:
    """What a consistent $LogFile restart page says of the journal's state."""

    version: tuple[int, int]
    lsn: int  # the current LSN (the chkdsk LSN of a page rewritten by chkdsk)
    client_in_use_list: int
    flags: int

    @property
    def clean(self) -> bool:
        """No client has the journal open, or the volume was marked clean (ntfs_is_logfile_clean)."""
        return self.client_in_use_list == LOGFILE_NO_CLIENT or bool(self.flags & RESTART_VOLUME_IS_CLEAN)


def _restart_area_problem(page: bytes, area: int, system_page: int) -> str | None:
    """Why the restart area at ``page[area:]`` is inconsistent (ntfs-3g's checks), or None."""
    if area + RESTART_AREA_FILE_SIZE > LOGFILE_BLOCK - 2:
        return "its fields run into the first block's fixup"
    if area + RESTART_AREA.size > system_page:
        return "it runs past its page"
    (_lsn, clients, free_list, in_use, _flags, sequence_bits, area_length, client_array, file_size, _last,
     header_length, data_offset) = RESTART_AREA.unpack_from(page, area)
    if client_array & 7 or area + client_array > LOGFILE_BLOCK - 2:
        return f"client array offset {client_array}"
    needed = client_array + clients * LOG_CLIENT_RECORD_SIZE
    if area + needed > system_page or area + area_length > system_page or needed > area_length:
        return f"restart area of {area_length} bytes for {clients} clients"
    if any(head != LOGFILE_NO_CLIENT and head >= clients for head in (free_list, in_use)):
        return "client lists past the client array"
    if sequence_bits != 67 - max(file_size, 0).bit_length():
        return f"{sequence_bits} sequence number bits for a file of {file_size} bytes"
    if header_length & 7 or data_offset & 7:
        return "record header length or page data offset not a multiple of 8"
    return None


def _client_lists_problem(page: bytes, area: int) -> str | None:
    """Why the free and in-use client lists of a fixed-up restart page are broken, or None: each
    entry inside the array, the first without a previous one, no list longer than the array."""
    fields = RESTART_AREA.unpack_from(page, area)
    clients, free_list, in_use, array_start = fields[1], fields[2], fields[3], area + fields[7]
    budget = clients
    for head in (free_list, in_use):
        index, first = head, True
        while index != LOGFILE_NO_CLIENT:
            if not budget or index >= clients:
                return "client lists loop or leave the array"
            _oldest, _restart, previous, following = LOG_CLIENT_RECORD.unpack_from(
                page, array_start + index * LOG_CLIENT_RECORD_SIZE)
            if first and previous != LOGFILE_NO_CLIENT:
                return "the first client of a list has a previous one"
            first, budget, index = False, budget - 1, following
    return None


def parse_restart_page(page: bytes, position: int) -> RestartPage | None:
    """The state a $LogFile restart page (``page``: its whole system page, read at ``position`` of
    $LogFile) records, or None when it is not consistent by ntfs-3g's checks (such a page is passed
    over: another may be valid)."""
    if len(page) < LOGFILE_BLOCK or page[:4] not in RESTART_MAGICS:
        return None
    (magic, usa_offset, usa_count, chkdsk_lsn, system_page, log_page, area, minor,
     major) = RESTART_PAGE_HEADER.unpack_from(page)
    for size in (system_page, log_page):
        if size < LOGFILE_BLOCK or size & (size - 1):
            return None
    if system_page != len(page) or position not in (0, system_page) or (major, minor) not in LOGFILE_VERSIONS:
        return None
    protected = magic != b"CHKD" or usa_count != 0  # chkdsk may leave its page without fixups
    usa_end = usa_offset + 2 * usa_count
    if protected and (usa_count != 1 + system_page // LOGFILE_BLOCK or usa_offset < RESTART_PAGE_HEADER.size
                      or usa_end > LOGFILE_BLOCK - 2):
        return None
    if area & 7 or area < (usa_end if protected else RESTART_PAGE_HEADER.size) or area > system_page:
        return None
    if magic == b"RSTR" and chkdsk_lsn:
        return None
    if _restart_area_problem(page, area, system_page) is not None:
        return None
    (lsn, _clients, _free_list, in_use, flags, _bits, area_length, *_rest) = RESTART_AREA.unpack_from(page, area)
    if protected:
        try:
            page = apply_fixups(page, magic, position, "$LogFile restart page")
        except CorruptImage:  # a torn page: fatal only when the restart area reaches past the first block
            if area + area_length > LOGFILE_BLOCK - 2:
                return None
    if magic == b"RSTR" and in_use != LOGFILE_NO_CLIENT and _client_lists_problem(page, area) is not None:
        return None
    return RestartPage((major, minor), lsn if magic == b"RSTR" else chkdsk_lsn, in_use, flags)


# -- directory indexes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """One entry of a $I30 index node: a file name (``raw_name``: UTF-16LE) or the node's end."""

    record: int
    raw_name: bytes
    namespace: int
    file_flags: int
    child: int | None  # VCN of the sub-node holding the names that sort before this one
    last: bool

    @property
    def name(self) -> str:
        return _utf16(self.raw_name)


@dataclass
class IndexNode:
    """The entries of one B+tree node, in order, the end entry last; ``keys`` are the names as
    NTFS collates them (folded on the first lookup through the node)."""

    entries: list[IndexEntry]
    keys: list[tuple[int, ...]] | None = None


def parse_index_entries(node: bytes, header: int, where: int, structure: str) -> list[IndexEntry]:
    """The entries of an index node whose header (entries offset, used length) is at ``node[header:]``."""
    first = header + _u32(node, header)
    end = header + _u32(node, header + 4)
    if first < header + 16 or end > len(node) or first > end:
        raise CorruptImage(f"{structure}: entries [{first}, {end}) outside the node", offset=where + header,
                           structure=structure)
    entries = []
    pos = first
    while True:
        if pos + 16 > end:
            raise CorruptImage(f"{structure}: no end entry", offset=where + pos, structure=structure)
        length, key_length, flags = _u16(node, pos + 8), _u16(node, pos + 10), _u16(node, pos + 12)
        needed = 16 + (8 if flags & INDEX_ENTRY_NODE else 0)
        if length < needed or length & 7 or pos + length > end:
            raise CorruptImage(f"{structure}: index entry of {length} bytes", offset=where + pos, structure=structure)
        child = _u64(node, pos + length - 8) if flags & INDEX_ENTRY_NODE else None
        if flags & INDEX_ENTRY_END:
            entries.append(IndexEntry(0, b"", 0, 0, child, True))
            return entries
        key = pos + 16
        name_chars = node[key + 64] if key + 66 <= end else 0
        if key_length < 66 or 16 + key_length > length - (8 if child is not None else 0) or \
                66 + 2 * name_chars > key_length:
            raise CorruptImage(f"{structure}: file name key of {key_length} bytes", offset=where + pos,
                               structure=structure)
        raw_name = bytes(node[key + 66 : key + 66 + 2 * name_chars])
        units = _utf16_units(raw_name)
        if not units or 0 in units or SLASH in units:
            raise CorruptImage(f"{structure}: file name {_utf16(raw_name)!r} is empty or holds '/' or NUL",
                               offset=where + pos, structure=structure)
        entries.append(IndexEntry(
            record=_u64(node, pos) & RECORD_NUMBER_MASK,
            raw_name=raw_name,
            namespace=node[key + 65],
            file_flags=_u32(node, key + 56),
            child=child,
            last=False,
        ))
        pos += length


# -- reparse points ---------------------------------------------------------------------------------------

_DRIVE_PATH = re.compile(r"^(?:\\\?\?\\|\\\\\?\\)?([A-Za-z]):(\\.*)?$")


def reparse_target(tag: int, data: bytes, drive_letter: str) -> str | None:
    """A symlink's or junction's target as a guest path, or None where it leaves the volume.

    ``data`` follows the reparse header: offsets and lengths of the substitute and print names
    (a symlink adds flags, bit 0 relative), then the names in UTF-16; an absolute target is an NT
    path such as ``\\??\\C:\\Windows``."""
    if tag == TAG_SYMLINK:
        buffer, relative = data[12:], bool(_u32(data, 8) & SYMLINK_RELATIVE)
    elif tag == TAG_MOUNT_POINT:
        buffer, relative = data[8:], False
    else:
        return None
    if len(data) < 8:
        return None
    substitute = _utf16(buffer[_u16(data, 0) : _u16(data, 0) + _u16(data, 2)])
    printed = _utf16(buffer[_u16(data, 4) : _u16(data, 4) + _u16(data, 6)])
    target = substitute or printed
    if not target:
        return None
    if relative:
        return target.replace("\\", "/")
    match = _DRIVE_PATH.match(target)
    if match is None or match.group(1).upper() != drive_letter.upper():
        return None
    return "/" + (match.group(2) or "").replace("\\", "/").strip("/")


# -- the driver -----------------------------------------------------------------------------------------


@dataclass
class Stream:
    """An attribute's value as one readable whole: resident bytes or the runs of all its pieces."""

    size: int
    initialized: int
    flags: int = 0
    compression_unit: int = 0
    resident: bytes | None = None
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & ATTR_COMPRESSION_MASK)


@dataclass
class NtfsFile:
    """What the driver keeps of one file between calls."""

    number: int
    name: str
    stat: Stat
    data: Stream | None
    index_root: bytes | None
    index_allocation: Stream | None
    link: str | None
    reparse_tag: int | None
    root_node: IndexNode | None = None  # parsed on first use

    @property
    def runs(self) -> int:
        """The runs this file holds in memory (what its place in the cache costs)."""
        return sum(len(stream.runs) for stream in (self.data, self.index_allocation) if stream is not None)


class NtfsFileSystem(GuestFileSystem[int]):
    """An NTFS volume read through ``disk`` (see the module docstring)."""

    type = "ntfs"
    case_insensitive = True
    root = ROOT_RECORD

    def __init__(self, disk: Disk, offset: int, length: int, drive_letter: str = "C") -> None:
        self._disk = disk
        self._offset = offset
        self._length = length
        self._drive_letter = drive_letter
        boot = parse_boot_sector(self._volume(0, 512, "NTFS boot sector"), offset)
        self.boot = boot
        self._cluster = boot.cluster_size
        self._clusters = min(boot.total_sectors * boot.bytes_per_sector, length) // boot.cluster_size
        self._record_size = boot.mft_record_size
        self._records: OrderedDict[int, bytes] = OrderedDict()
        self._files: OrderedDict[int, NtfsFile] = OrderedDict()
        self._cached_runs = 0
        self._index_nodes: OrderedDict[tuple[int, int], IndexNode] = OrderedDict()
        self._upcase: array[int] | None = None
        self._decoded: tuple[Stream, int, bytes] | None = None  # the last decompressed unit
        # $MFT: its first record lies where the boot sector says; its $DATA maps the rest
        if not 0 < boot.mft_lcn < self._clusters:
            raise CorruptImage(f"$MFT at cluster {boot.mft_lcn}, outside the volume",
                               offset=offset + field_offset(NtfsBootSector, "mft_lcn"),
                               structure="NTFS boot sector")
        where = boot.mft_lcn * self._cluster
        first = self._fixed_record(self._volume(where, self._record_size, "$MFT"), MFT_RECORD, where)
        pieces = [a for a in parse_attributes(first, MFT_RECORD, offset + where) if a.type == ATTR_DATA and not a.name]
        if not pieces or pieces[0].resident:
            raise CorruptImage("$MFT has no non-resident $DATA", offset=offset + where, structure="$MFT")
        self._mft = self._stream(pieces, "$MFT", complete=False)
        self._records[MFT_RECORD] = first
        # a fragmented $MFT may keep the rest of its runlist in extension records
        self._mft = self._stream([a for a in self._attributes(MFT_RECORD) if a.type == ATTR_DATA and not a.name],
                                 "$MFT")
        if self._mft.size < FIRST_USER_RECORD * self._record_size:
            raise CorruptImage(f"$MFT of {self._mft.size} bytes", offset=offset + where, structure="$MFT")
        if not self._stat(ROOT_RECORD).is_dir:
            raise CorruptImage("the root directory is not a directory", structure="MFT record 5")

    # -- volume and records ----------------------------------------------------------------------------

    def _volume(self, position: int, length: int, structure: str) -> bytes:
        """``length`` bytes at ``position`` of the volume, all of them or CorruptImage."""
        return read_volume(self._disk, self._offset, self._length, position, length, structure)

    def _fixed_record(self, raw: bytes, number: int, where: int) -> bytes:
        if raw[:4] == b"BAAD":
            raise CorruptImage(f"MFT record {number} was marked bad by chkdsk", offset=self._offset + where,
                               structure="MFT record")
        record = apply_fixups(raw, b"FILE", self._offset + where, "MFT record")
        usa_offset, attrs = _u16(record, 4), _u16(record, 20)
        if usa_offset >= 48 and _u32(record, 44) != number:
            raise CorruptImage(f"MFT record {number} says it is record {_u32(record, 44)}",
                               offset=self._offset + where, structure="MFT record")
        if attrs < usa_offset + 2 * _u16(record, 6) or attrs >= len(record):
            raise CorruptImage(f"MFT record {number}: attributes start at {attrs}", offset=self._offset + where,
                               structure="MFT record")
        return record

    def _record(self, number: int) -> bytes:
        """MFT record ``number``, fixed up (cached)."""
        cached = self._records.get(number)
        if cached is not None:
            self._records.move_to_end(number)
            return cached
        position = number * self._record_size
        if number < 0 or position + self._record_size > self._mft.size:
            raise CorruptImage(f"MFT record {number} lies past the end of $MFT ({self._mft.size} bytes)",
                               structure="$MFT")
        raw = self._read_stream(self._mft, position, self._record_size, "$MFT")
        record = self._fixed_record(raw, number, self._host_position(self._mft, position))
        self._records[number] = record
        if len(self._records) * self._record_size > RECORD_CACHE_BYTES:
            self._records.popitem(last=False)
        return record

    def _host_position(self, stream: Stream, position: int) -> int:
        """Where byte ``position`` of a non-resident stream lies in the volume (for messages), or -1."""
        vcn = position // self._cluster
        index = bisect.bisect_right(stream.starts, vcn) - 1
        if index < 0:
            return -1
        start, count, lcn = stream.runs[index]
        if lcn < 0 or vcn >= start + count:
            return -1
        return (lcn + vcn - start) * self._cluster + position % self._cluster

    def _attributes(self, number: int) -> list[Attribute]:
        """Every attribute of file ``number``, those in its extension records included."""
        record = self._record(number)
        where = self._offset + self._host_position(self._mft, number * self._record_size)
        if not _u16(record, 22) & RECORD_IN_USE:
            raise CorruptImage(f"MFT record {number} is not in use", offset=where, structure="MFT record")
        if _u64(record, 32) & RECORD_NUMBER_MASK:
            raise CorruptImage(f"MFT record {number} is an extension record, not a file", offset=where,
                               structure="MFT record")
        attributes = parse_attributes(record, number, where)
        lists = [a for a in attributes if a.type == ATTR_ATTRIBUTE_LIST]
        if not lists:
            return attributes
        listed = self._value(lists[0], MAX_ATTRIBUTE_LIST, f"$ATTRIBUTE_LIST of MFT record {number}")
        extensions = list(dict.fromkeys(n for n in parse_attribute_list(listed, where) if n != number))
        if len(extensions) > MAX_EXTENSION_RECORDS:
            raise CorruptImage(f"MFT record {number}: {len(extensions)} extension records", offset=where,
                               structure="$ATTRIBUTE_LIST")
        for extension in extensions:
            other = self._record(extension)
            there = self._offset + self._host_position(self._mft, extension * self._record_size)
            if not _u16(other, 22) & RECORD_IN_USE or _u64(other, 32) & RECORD_NUMBER_MASK != number:
                raise CorruptImage(f"MFT record {extension} is not an extension of record {number}", offset=there,
                                   structure="$ATTRIBUTE_LIST")
            attributes.extend(a for a in parse_attributes(other, extension, there) if a.type != ATTR_ATTRIBUTE_LIST)
        return attributes

    # -- streams -----------------------------------------------------------------------------------------

    def _stream(self, pieces: list[Attribute], what: str, complete: bool = True) -> Stream:
        """One attribute's pieces (from one or more records) joined into a readable stream; an
        incomplete one (the part of $MFT that maps its own extension records) ends with its runs."""
        if pieces[0].resident:
            value = pieces[0].value
            return Stream(len(value), len(value), pieces[0].flags, resident=value)
        pieces = sorted(pieces, key=lambda a: a.lowest_vcn)
        head = pieces[0]
        runs: list[tuple[int, int, int]] = []
        next_vcn = 0
        for piece in pieces:
            if piece.resident or piece.lowest_vcn != next_vcn:
                raise CorruptImage(f"{what}: attribute pieces do not follow each other (VCN {piece.lowest_vcn}, "
                                   f"expected {next_vcn})", structure="NTFS attribute")
            for vcn, count, lcn in piece.runs:
                if lcn >= 0 and lcn + count > self._clusters:
                    raise CorruptImage(f"{what}: run of clusters {lcn}..{lcn + count - 1} past the volume "
                                       f"({self._clusters} clusters)", structure="NTFS runlist")
                runs.append((vcn, count, lcn))
            if len(runs) > MAX_RUNS:
                raise CorruptImage(f"{what}: more than {MAX_RUNS} runs", structure="NTFS runlist")
            next_vcn = max(next_vcn, piece.highest_vcn + 1)
        if not complete:
            mapped = next_vcn * self._cluster
            return Stream(min(head.data_size, mapped), min(head.initialized_size, mapped), head.flags, runs=runs,
                          starts=[run[0] for run in runs])
        if not head.initialized_size <= head.data_size <= next_vcn * self._cluster:
            raise CorruptImage(f"{what}: sizes (initialized {head.initialized_size}, data {head.data_size}) "
                               f"do not fit its {next_vcn} clusters", structure="NTFS attribute")
        return Stream(head.data_size, head.initialized_size, head.flags, head.compression_unit, runs=runs,
                      starts=[run[0] for run in runs])

    def _value(self, attribute: Attribute, cap: int, what: str) -> bytes:
        """The whole value of a single-piece attribute of at most ``cap`` bytes."""
        if attribute.data_size > cap:
            raise CorruptImage(f"{what} of {attribute.data_size} bytes (more than {cap})", structure="NTFS attribute")
        if attribute.resident:
            return attribute.value
        stream = self._stream([attribute], what)
        return self._read_stream(stream, 0, stream.size, what)

    def _read_stream(self, stream: Stream, position: int, length: int, what: str) -> bytes:
        """Up to ``length`` bytes of a stream at ``position`` (fewer at its end)."""
        end = min(stream.size, position + length)
        if position >= end:
            return b""
        if stream.resident is not None:
            return stream.resident[position:end]
        if stream.compressed:
            return self._read_compressed(stream, position, end, what)
        pieces = []
        initialized = min(stream.initialized, end)
        while position < initialized:
            vcn, inner = divmod(position, self._cluster)
            start, count, lcn = self._run_at(stream, vcn, what)
            take = min(initialized - position, (start + count - vcn) * self._cluster - inner)
            if lcn < 0:
                pieces.append(bytes(take))
            else:
                pieces.append(self._volume((lcn + vcn - start) * self._cluster + inner, take, what))
            position += take
        if position < end:  # past the initialized size: zeros
            pieces.append(bytes(end - position))
        return b"".join(pieces)

    def _run_at(self, stream: Stream, vcn: int, what: str) -> tuple[int, int, int]:
        """The run holding cluster ``vcn`` of a stream."""
        index = bisect.bisect_right(stream.starts, vcn) - 1
        if index < 0 or vcn >= stream.runs[index][0] + stream.runs[index][1]:
            raise CorruptImage(f"{what}: cluster {vcn} of its data is not mapped", structure="NTFS runlist")
        return stream.runs[index]

    def _read_compressed(self, stream: Stream, position: int, end: int, what: str) -> bytes:
        """Bytes of an LZNT1-compressed stream: whole compression units decoded, one kept for the next call."""
        if stream.compression_unit != 4 or self._cluster > 4096:
            raise UnsupportedFormat(f"{what}: NTFS compression unit of {1 << stream.compression_unit} clusters "
                                    f"of {self._cluster} bytes is not supported", format="ntfs")
        unit_clusters = 1 << stream.compression_unit
        unit_size = unit_clusters * self._cluster
        pieces = []
        while position < end:
            unit, inner = divmod(position, unit_size)
            data = self._compression_unit(stream, unit, unit_clusters, what)
            take = min(end - position, unit_size - inner)
            pieces.append(data[inner : inner + take])
            position += take
        return b"".join(pieces)

    def _compression_unit(self, stream: Stream, unit: int, unit_clusters: int, what: str) -> bytes:
        """One compression unit decoded: all sparse is zeros, all allocated is stored as is, and
        otherwise its allocated clusters hold LZNT1 data."""
        if self._decoded is not None and self._decoded[0] is stream and self._decoded[1] == unit:
            return self._decoded[2]
        unit_size = unit_clusters * self._cluster
        first = unit * unit_clusters
        stored = []
        sparse = 0
        vcn = first
        mapped = stream.runs[-1][0] + stream.runs[-1][1] if stream.runs else 0
        while vcn < min(first + unit_clusters, mapped):  # the unit's clusters, past the data size too
            start, count, lcn = self._run_at(stream, vcn, what)
            take = min(start + count, first + unit_clusters) - vcn
            if lcn < 0:
                sparse += take
            elif sparse:
                raise CorruptImage(f"{what}: data after a sparse run in compression unit {unit}",
                                   structure="NTFS compressed attribute")
            else:
                stored.append(self._volume((lcn + vcn - start) * self._cluster, take * self._cluster, what))
            vcn += take
        raw = b"".join(stored)
        if not raw:
            data = bytes(unit_size)
        elif not sparse:  # a unit that did not compress is stored as is
            data = raw
        else:
            data = decompress_lznt1(raw, unit_size, what)
        self._decoded = (stream, unit, data)
        return data

    # -- files --------------------------------------------------------------------------------------------

    def _file(self, number: int) -> NtfsFile:
        cached = self._files.get(number)
        if cached is not None:
            self._files.move_to_end(number)
            return cached
        found = self._load_file(number)
        self._files[number] = found
        self._cached_runs += found.runs
        while len(self._files) > 1 and (len(self._files) > FILE_CACHE or self._cached_runs > FILE_CACHE_RUNS):
            self._cached_runs -= self._files.popitem(last=False)[1].runs
        return found

    def _load_file(self, number: int) -> NtfsFile:
        """A file's Stat and streams, from its attributes (extension records included)."""
        attributes = self._attributes(number)
        record = self._record(number)
        what = f"MFT record {number}"
        file_attributes, mtime = 0, None
        standard = [a for a in attributes if a.type == ATTR_STANDARD_INFORMATION and a.resident]
        if standard and len(standard[0].value) >= 36:
            value = standard[0].value
            mtime = (_u64(value, 8) - NT_EPOCH_OFFSET) / 1e7
            file_attributes = _u32(value, 32)
        names = [a.value for a in attributes if a.type == ATTR_FILE_NAME and a.resident and len(a.value) >= 66]
        names.sort(key=lambda v: v[65] == NAMESPACE_DOS)  # a long name before an 8.3 alias
        name = _utf16(names[0][66 : 66 + 2 * names[0][64]]) if names else ""
        if name:
            what = f"{name!r} (MFT record {number})"
        data_pieces = [a for a in attributes if a.type == ATTR_DATA and not a.name]
        data = self._stream(data_pieces, what) if data_pieces else None
        roots = [a for a in attributes if a.type == ATTR_INDEX_ROOT and a.name == "$I30" and a.resident]
        allocations = [a for a in attributes if a.type == ATTR_INDEX_ALLOCATION and a.name == "$I30"]
        allocation = self._stream(allocations, f"index of {what}") if allocations else None
        flag_names = {label for bit, label in FILE_ATTRIBUTE_FLAGS.items() if file_attributes & bit}
        if data is not None:
            flag_names |= {"compressed"} if data.compressed else set()
            flag_names |= {"encrypted"} if data.flags & ATTR_ENCRYPTED else set()
            flag_names |= {"sparse"} if data.flags & ATTR_SPARSE else set()
        kind = FileType.DIRECTORY if roots else FileType.FILE
        link = None
        tag = None
        reparse = [a for a in attributes if a.type == ATTR_REPARSE_POINT]
        if reparse:
            value = self._value(reparse[0], 16 << 10, f"reparse point of {what}")
            tag = _u32(value, 0)
            if tag in (TAG_SYMLINK, TAG_MOUNT_POINT):
                link = reparse_target(tag, value[8 : 8 + _u16(value, 4)], self._drive_letter)
                kind = FileType.SYMLINK if link is not None else FileType.OTHER
            elif tag == TAG_WOF:
                flag_names.add("compressed")
        elif (kind is FileType.FILE and file_attributes & FILE_ATTRIBUTE_SYSTEM and data is not None
              and 8 <= data.size <= MAX_INTERIX_DATA):
            head = self._read_stream(data, 0, 8, what)
            if head == INTERIX_SYMLINK:
                link = _utf16(self._read_stream(data, 8, data.size - 8, what)).rstrip("\0")
                kind = FileType.SYMLINK
            elif head in INTERIX_DEVICES:
                kind = FileType.OTHER
        if kind is FileType.DIRECTORY and len(roots[0].value) < 32:
            raise CorruptImage(f"{what}: $INDEX_ROOT of {len(roots[0].value)} bytes", structure="$INDEX_ROOT")
        size = 0
        if kind is FileType.FILE:
            size = data.size if data is not None else 0
        elif kind is FileType.SYMLINK and link is not None:
            size = len(link.encode("utf-8", errors="replace"))
        stat = Stat(type=kind, size=size, node=number, mtime=mtime, nlink=_u16(record, 18),
                    flags=frozenset(flag_names))
        return NtfsFile(number, name, stat, data, roots[0].value if roots else None, allocation, link, tag)

    # -- the contract -------------------------------------------------------------------------------------

    def _stat(self, node: int) -> Stat:
        return self._file(node).stat

    def _read(self, node: int, offset: int, length: int) -> bytes:
        found = self._file(node)
        what = f"NTFS file {found.name!r} (MFT record {found.number})"
        if found.stat.type is not FileType.FILE:
            raise GuestPathError(f"{what} is not a regular file")
        if found.data is None:
            return b""
        if found.data.flags & ATTR_ENCRYPTED or "encrypted" in found.stat.flags:
            raise UnsupportedFormat(f"{what} is encrypted (EFS): its data cannot be read", format="ntfs")
        if found.reparse_tag in (TAG_WOF, TAG_DEDUP):
            raise UnsupportedFormat(f"{what} is stored by a reparse point (tag 0x{found.reparse_tag:08x}, "
                                    "WOF or deduplication): its data cannot be read", format="ntfs")
        return self._read_stream(found.data, offset, length, what)

    def _readlink(self, node: int) -> str:
        found = self._file(node)
        if found.link is None:
            raise GuestPathError(f"NTFS file {found.name!r} (MFT record {found.number}) is not a symbolic link")
        return found.link

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The clusters $Bitmap marks free, up to the volume's last cluster (its bits past it, and the
        sectors after the last whole cluster, are never free). NotSparsifiable when the volume is
        marked dirty, Windows is hibernated on it, or its $LogFile holds changes to replay."""
        problem = self._unclean()
        if problem is not None:
            raise NotSparsifiable(problem)
        bitmap = self._file(BITMAP_RECORD).data
        if bitmap is None or bitmap.size * 8 < self._clusters:
            size = 0 if bitmap is None else bitmap.size
            raise CorruptImage(f"$Bitmap of {size} bytes for {self._clusters} clusters", structure="$Bitmap")
        return join_adjacent(self._free_clusters(bitmap))

    def _free_clusters(self, bitmap: Stream) -> Iterator[tuple[int, int]]:
        chunk = FREE_SPACE_CHUNK
        for position in range(0, -(-self._clusters // 8), chunk):
            data = self._read_stream(bitmap, position, chunk, "$Bitmap")
            for first, count in clear_bit_runs(data, self._clusters - position * 8, position * 8):
                yield first * self._cluster, count * self._cluster

    def _unclean(self) -> str | None:
        """Why the volume's state forbids trusting $Bitmap (as ntfs-3g refuses to mount it), or None."""
        info = [a for a in self._attributes(VOLUME_RECORD) if a.type == ATTR_VOLUME_INFORMATION and a.resident]
        if not info or len(info[0].value) < 12:
            raise CorruptImage("$Volume has no $VOLUME_INFORMATION", structure="$Volume")
        if _u16(info[0].value, 10) & VOLUME_IS_DIRTY:
            return "the NTFS volume is marked dirty (Windows checks it with chkdsk at its next boot)"
        hiberfile = self._lookup(ROOT_RECORD, HIBERFILE)
        if hiberfile is not None and self._stat(hiberfile).is_file:
            header = self._read(hiberfile, 0, HIBERFILE_HEADER_SIZE)
            if len(header) < HIBERFILE_HEADER_SIZE:
                return f"{HIBERFILE} is shorter than its header: ntfs-3g takes the volume as hibernated"
            if header[:4] in HIBERNATION_MAGICS:
                return f"Windows is hibernated on the NTFS volume ({HIBERFILE} starts with {header[:4].decode()!r})"
        return self._logfile_problem()

    def _logfile_problem(self) -> str | None:
        """Why $LogFile says the volume was not shut down cleanly (ntfs-3g's ntfs_check_logfile and
        ntfs_is_logfile_clean, and its refusal of version 2.0), or None: empty, or clean."""
        logfile = self._file(LOGFILE_RECORD).data
        if logfile is None or logfile.resident is not None:
            raise CorruptImage("$LogFile has no non-resident data", structure="$LogFile")
        size = min(logfile.size, MAX_LOGFILE_SIZE) & ~(LOG_PAGE_SIZE - 1)
        if size < (2 + MIN_LOG_RECORD_PAGES) * LOG_PAGE_SIZE:
            return f"$LogFile of {logfile.size} bytes is too small to be checked"
        empty = True
        pages: list[RestartPage] = []
        position = 0
        while position < size:
            block = self._read_stream(logfile, position, LOGFILE_BLOCK, "$LogFile")
            if block[:4] != EMPTY_LOG_BLOCK:
                empty = False
            elif not empty:
                break
            if block[:4] == LOG_RECORD_MAGIC:
                break
            if block[:4] in RESTART_MAGICS:
                page_size = _u32(block, 16)
                page = None
                if LOGFILE_BLOCK <= page_size <= MAX_RESTART_PAGE and position + page_size <= logfile.size:
                    page = parse_restart_page(self._read_stream(logfile, position, page_size, "$LogFile"), position)
                if page is not None:
                    pages.append(page)
                    if position:
                        break
            position = position * 2 if position else LOGFILE_BLOCK
        if empty:
            return None
        if not pages:
            return "$LogFile is not empty but holds no valid restart page"
        current = pages[-1] if len(pages) == 2 and pages[1].lsn > pages[0].lsn else pages[0]
        if current.version == LOGFILE_CACHED_VERSION:
            return ("Windows kept the NTFS volume's metadata in its cache ($LogFile version 2.0: fast startup, "
                    "or an unclean shutdown)")
        if not current.clean:
            return "the NTFS $LogFile records an unclean shutdown: changes wait to be replayed"
        return None

    def _entries(self, node: int) -> Iterator[DirEntry[int]]:
        seen = 0
        for entry in self._index(self._directory(node)):
            if entry.namespace == NAMESPACE_DOS or entry.record < FIRST_USER_RECORD:
                continue  # 8.3 aliases, metafiles and the root's '.'
            seen += 1
            if seen > MAX_DIRECTORY_ENTRIES:
                raise CorruptImage(f"directory {node} has more than {MAX_DIRECTORY_ENTRIES} entries",
                                   structure="NTFS index")
            yield DirEntry(entry.name, entry.record, _entry_type(entry.file_flags))

    def _lookup(self, directory: int, name: str) -> int | None:
        """A walk down the B+tree, names compared upper-cased by the volume's $UpCase as NTFS sorts them."""
        found = self._directory(directory)
        wanted = self._fold(name.encode("utf-16-le", errors="surrogatepass"))
        node = self._root_node(found)
        visited: set[int] = set()
        while True:
            if node.keys is None:
                node.keys = [self._fold(entry.raw_name) for entry in node.entries[:-1]]
            index = bisect.bisect_left(node.keys, wanted)
            entry = node.entries[index]  # the first name not sorting before ``name``, or the end entry
            if index < len(node.keys) and node.keys[index] == wanted:
                return entry.record if entry.record >= FIRST_USER_RECORD else None
            if entry.child is None:
                return None
            if len(visited) >= MAX_INDEX_DEPTH or entry.child in visited:
                raise CorruptImage(f"index of {found.name!r} is deeper than {MAX_INDEX_DEPTH} or loops",
                                   structure="NTFS index")
            visited.add(entry.child)
            node = self._index_node(found, entry.child)

    # -- directories -------------------------------------------------------------------------------------

    def _directory(self, node: int) -> NtfsFile:
        found = self._file(node)
        if found.index_root is None or found.stat.type is not FileType.DIRECTORY:
            raise GuestPathError(f"NTFS file {found.name!r} (MFT record {found.number}) is not a directory")
        return found

    def _root_node(self, directory: NtfsFile) -> IndexNode:
        if directory.root_node is None:
            root = directory.index_root
            assert root is not None
            if _u32(root, 0) != ATTR_FILE_NAME:
                raise CorruptImage(f"directory index of {directory.name!r} does not index file names",
                                   structure="$INDEX_ROOT")
            directory.root_node = IndexNode(
                parse_index_entries(root, 16, 0, f"$INDEX_ROOT of MFT record {directory.number}"))
        return directory.root_node

    def _index(self, directory: NtfsFile) -> Iterator[IndexEntry]:
        """Every entry of a directory, in order: only nodes reached from the root, each once."""
        visited: set[int] = set()

        def walk(entries: list[IndexEntry], depth: int) -> Iterator[IndexEntry]:
            for entry in entries:
                if entry.child is not None:
                    if depth >= MAX_INDEX_DEPTH or entry.child in visited:
                        raise CorruptImage(f"index of {directory.name!r} is deeper than {MAX_INDEX_DEPTH} or loops",
                                           structure="NTFS index")
                    visited.add(entry.child)
                    yield from walk(self._index_node(directory, entry.child).entries, depth + 1)
                if not entry.last:
                    yield entry

        yield from walk(self._root_node(directory).entries, 0)

    def _index_node(self, directory: NtfsFile, vcn: int) -> IndexNode:
        """The entries of the INDX record at ``vcn`` of a directory's $INDEX_ALLOCATION (cached)."""
        key = (directory.number, vcn)
        cached = self._index_nodes.get(key)
        if cached is not None:
            self._index_nodes.move_to_end(key)
            return cached
        root = directory.index_root
        assert root is not None
        what = f"index of MFT record {directory.number}"
        block_size = _u32(root, 8)
        if not FIXUP_BLOCK <= block_size <= MAX_RECORD_SIZE or block_size & (block_size - 1):
            raise CorruptImage(f"{what}: index record size {block_size}", structure="$INDEX_ROOT")
        allocation = directory.index_allocation
        if allocation is None:
            raise CorruptImage(f"{what}: a sub-node but no $INDEX_ALLOCATION", structure="$INDEX_ROOT")
        unit = self._cluster if block_size >= self._cluster else FIXUP_BLOCK
        position = vcn * unit
        if position + block_size > allocation.size:
            raise CorruptImage(f"{what}: sub-node VCN {vcn} past $INDEX_ALLOCATION ({allocation.size} bytes)",
                               structure="NTFS index")
        where = self._offset + self._host_position(allocation, position)
        block = apply_fixups(self._read_stream(allocation, position, block_size, what), b"INDX", where, "INDX record")
        if _u64(block, 16) != vcn:
            raise CorruptImage(f"{what}: INDX record at VCN {vcn} says VCN {_u64(block, 16)}", offset=where,
                               structure="INDX record")
        node = IndexNode(parse_index_entries(block, 24, where, "INDX record"))
        self._index_nodes[key] = node
        if len(self._index_nodes) * block_size > INDEX_CACHE_BYTES:
            self._index_nodes.popitem(last=False)
        return node

    def _fold(self, raw_name: bytes) -> tuple[int, ...]:
        """A UTF-16LE name upper-cased by the volume's $UpCase table, as NTFS collates names."""
        if self._upcase is None:
            upcase = self._file(UPCASE_RECORD)
            if upcase.data is None or upcase.data.size != UPCASE_SIZE:
                raise CorruptImage("$UpCase is not a 128 KiB table", structure="$UpCase")
            self._upcase = _utf16_units(self._read_stream(upcase.data, 0, UPCASE_SIZE, "$UpCase"))
        upcase_table = self._upcase
        return tuple(upcase_table[unit] for unit in _utf16_units(raw_name))


def _entry_type(file_flags: int) -> FileType | None:
    """The type an index entry's $FILE_NAME flags tell, where they tell it for sure."""
    if file_flags & (FILE_ATTRIBUTE_REPARSE_POINT | FILE_ATTRIBUTE_SYSTEM):  # a link, or an Interix one
        return None
    return FileType.DIRECTORY if file_flags & FILE_NAME_DIRECTORY else FileType.FILE


# -- LZNT1 --------------------------------------------------------------------------------------------------

LZNT1_CHUNK = 4096


def decompress_lznt1(data: bytes, size: int, what: str) -> bytes:
    """LZNT1 (NTFS compression): chunks of 4 KiB, each stored or LZ77-coded, to ``size`` bytes."""
    out = bytearray()
    pos = 0
    while pos + 2 <= len(data) and len(out) < size:
        header = _u16(data, pos)
        if header == 0:
            break
        end = pos + 2 + (header & 0x0FFF) + 1
        if end > len(data):
            raise CorruptImage(f"{what}: LZNT1 chunk runs past its compression unit", structure="LZNT1")
        if not header & 0x8000:  # stored
            out += data[pos + 2 : end]
        else:
            out += _lznt1_chunk(data, pos + 2, end, what)
        pos = end
        if len(out) % LZNT1_CHUNK:  # a short chunk is padded with zeros
            out += bytes(LZNT1_CHUNK - len(out) % LZNT1_CHUNK)
    if len(out) < size:
        out += bytes(size - len(out))
    return bytes(out[:size])


def _lznt1_chunk(data: bytes, pos: int, end: int, what: str) -> bytearray:
    chunk = bytearray()
    while pos < end:
        tags = data[pos]
        pos += 1
        for bit in range(8):
            if pos >= end:
                break
            if not tags >> bit & 1:
                chunk.append(data[pos])
                pos += 1
                continue
            if pos + 2 > end:
                raise CorruptImage(f"{what}: LZNT1 token cut short", structure="LZNT1")
            token = _u16(data, pos)
            pos += 2
            length_bits = 12
            here = len(chunk) - 1
            while here >= 0x10:
                length_bits -= 1
                here >>= 1
            back = (token >> length_bits) + 1
            count = (token & ((1 << length_bits) - 1)) + 3
            if back > len(chunk) or len(chunk) + count > LZNT1_CHUNK:
                raise CorruptImage(f"{what}: LZNT1 back reference out of range", structure="LZNT1")
            start = len(chunk) - back
            if back >= count:
                chunk += chunk[start : start + count]
            else:  # the copy overlaps what it writes: the last ``back`` bytes repeat
                chunk += (chunk[start:] * (count // back + 1))[:count]
    return chunk
