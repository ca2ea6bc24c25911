"""XFS, read-only: v4 (no checksums) and v5 (CRC-protected metadata), the data device only.

On-disk layout (all integers big-endian):

* The file system is cut into *allocation groups* (AGs) of ``agblocks`` blocks; the primary
  superblock (``XFSB``) is sector 0 of AG 0. A *file system block number* (as stored in extent
  records and btree pointers) is ``agno << agblklog | agbno``; its byte position is
  ``(agno * agblocks + agbno) * blocksize``.
* An *inode number* is ``agno << (agblklog + inopblog) | agbno << inopblog | slot``: inode ``slot``
  of block ``agbno`` in AG ``agno``.
* An inode (``IN``) is a core (96 bytes in versions 1 and 2, 176 in version 3, which v5 uses)
  followed by the *literal area*, split at ``forkoff * 8`` between the data fork and the
  extended-attribute fork. The data fork is ``local`` (the bytes themselves: short-form
  directories, short symlinks), ``extents`` (packed 128-bit extent records) or ``btree`` (the root
  of a bmap btree whose leaves, ``BMAP``/``BMA3`` blocks, hold the extent records).
* An extent record: bit 127 unwritten flag, 54 bits logical block, 52 bits file system block,
  21 bits length. Logical blocks no record covers are holes; holes and unwritten extents read
  as zeros.
* Directories: short-form in the inode (a header with the parent and entries of 4-byte inode
  numbers, or 8-byte ones when ``i8count`` is set), else *directory blocks* of
  ``blocksize << dirblklog`` bytes. A single block (``XD2B``/``XDB3``) holds the entries and, at
  its end, a hash index and a tail; larger directories keep data blocks (``XD2D``/``XDD3``) in
  the first 32 GiB of the directory's address space and their hash index (leaf, node and free
  blocks) beyond it. Only the data blocks are read here: every name lives there. A data entry
  is an 8-byte inode number, the name's length and bytes, a file type byte (when the ``ftype``
  feature is on), padding to 8 bytes and a 2-byte tag (the entry's own offset); free space is
  marked by a 0xFFFF tag with its length.
* Symbolic links: the target in the inode (local), or in blocks, which in v5 start with an
  ``XSLM`` header.

* Free space: each AG's AGF (sector 1) roots two btrees of free extents (AG block, length), one
  sorted by block (``ABTB``/``AB3B``) and one by length (``ABTC``/``AB3C``), and the AGFL (sector
  3) lists a few more free blocks kept for the btrees' growth. The internal log is a ring of
  512-byte blocks, each stamped with the cycle (pass over the ring) it was written in; a cleanly
  unmounted log ends, at its head, with an unmount record. ``unused_ranges`` reads free space only
  from a clean log, checks the CRCs of what it reads (v5) and that the two btrees and the AGF agree.

Not read: the realtime device (files flagged realtime are refused), the log's records (a file
system that was not cleanly unmounted is read as the last checkpoint left it), extended
attributes. Reading files verifies no checksum; every magic number, owner, offset, length and
count is checked before use, and a broken structure raises :class:`~diskimg.errors.CorruptImage`.
"""

from __future__ import annotations

import heapq
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastcrc import crc32

from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk
from ..superblocks import (
    XFS_INCOMPAT_NEEDSREPAIR,
    XFS_SUPERBLOCK_SIZE,
    XFS_VERSION_DIRV2,
    XfsSuperblock,
    field_offset,
    parse_xfs_superblock,
)
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

#: v5 incompatible features this reader understands: ftype, sparse inodes, meta uuid, bigtime,
#: needsrepair, 64-bit extent counters, exchange-range, parent pointers (the last two change
#: nothing that is read here)
KNOWN_INCOMPAT = 0xFF

NULL_FSBLOCK = (1 << 64) - 1
#: the directory's data blocks lie below this byte offset of its address space
DIR_LEAF_OFFSET = 1 << 35
#: a bmap btree is never this deep (2^48 extents in half-full 512-byte blocks need about 13 levels)
MAX_BTREE_LEVELS = 16
#: directory data read before the directory is taken as corrupt
MAX_DIRECTORY_BYTES = 512 << 20
#: symbolic link targets are at most this long (MAXPATHLEN)
MAX_SYMLINK = 1024
#: metadata blocks kept in memory (bytes)
CACHE_BYTES = 8 << 20
#: directories whose name -> inode maps are kept for lookups, and their largest size
CACHED_DIRECTORIES = 16
CACHED_DIRECTORY_ENTRIES = 1 << 16
#: parsed inodes kept (a path lookup stats every directory on the way)
CACHED_INODES = 1024

INODE_MAGIC = b"IN"
BMAP_MAGIC = {4: b"BMAP", 5: b"BMA3"}
BLOCK_DIR_MAGIC = {4: b"XD2B", 5: b"XDB3"}
DATA_DIR_MAGIC = {4: b"XD2D", 5: b"XDD3"}
SYMLINK_MAGIC = b"XSLM"
#: header sizes: long-format btree blocks, directory data blocks, remote symlink blocks (v5)
BMAP_HEADER = {4: 24, 5: 72}
DIR_DATA_HEADER = {4: 16, 5: 64}
SYMLINK_HEADER = 56
#: the inode core of versions 1 and 2 (version 3 adds fields after it): magic, mode, version,
#: format, 16-bit link count, uid, gid, link count, project id (2 halves), 64-bit extent count (or
#: padding), atime, mtime, ctime, size, blocks, extent size hint, extent count, attribute extent
#: count, attribute fork offset, attribute fork format, DMAPI fields, flags, generation
INODE_CORE_V2 = struct.Struct(">2sHBBHIIIHHQQ8sQQQIIHBbIHHI")
#: inode core sizes by inode version: the literal area (data fork) starts here
INODE_CORE = {1: 100, 2: 100, 3: 176}

FORMAT_DEV, FORMAT_LOCAL, FORMAT_EXTENTS, FORMAT_BTREE = 0, 1, 2, 3

S_IFMT = 0o170000
FILE_TYPES = {0o100000: FileType.FILE, 0o040000: FileType.DIRECTORY, 0o120000: FileType.SYMLINK}
OTHER_TYPES = (0o010000, 0o020000, 0o060000, 0o140000)  # fifo, char, block, socket
#: a directory entry's ftype byte: 0 unknown, 1 file, 2 directory, 3-6 devices, fifo, socket,
#: 7 symlink, 8 whiteout
DIRENT_TYPES = {1: FileType.FILE, 2: FileType.DIRECTORY, 7: FileType.SYMLINK}

#: di_flags bits named in Stat.flags
INODE_FLAGS = {0x8: "immutable", 0x10: "append", 0x20: "sync", 0x40: "noatime", 0x80: "nodump"}
DIFLAG_REALTIME = 0x1
DIFLAG2_BIGTIME = 0x8
DIFLAG2_NREXT64 = 0x10
BIGTIME_EPOCH_OFFSET = 1 << 31  # bigtime counts nanoseconds from 1901-12-13T20:45:52Z

# -- free space (unused_ranges) -------------------------------------------------------------------------

#: the allocation group's headers: superblock, AGF, AGI and AGFL, one sector each
AG_HEADER_SECTORS = 4
AGF_SECTOR, AGFL_SECTOR = 1, 3
AGF_MAGIC = b"XAGF"
AGF_VERSION = 1
AGFL_MAGIC = b"XAFL"
#: where the CRC32C of each version 5 structure lies (each covers its sector or block, that field zeroed)
SB_CRC_OFFSET = 224
AGF_CRC_OFFSET = 216
AGFL_CRC_OFFSET = 32
SHORT_BTREE_CRC_OFFSET = 52
#: the version 5 AGFL's header (magic, AG number, UUID, LSN, CRC) before its block numbers
AGFL_HEADER = 36
#: free-space btree blocks: by block number and by size, per version
FREE_SPACE_MAGIC = {("bno", 4): b"ABTB", ("bno", 5): b"AB3B", ("cnt", 4): b"ABTC", ("cnt", 5): b"AB3C"}
#: short-form (AG-relative) btree block headers: magic, level, records, siblings; v5 adds block
#: address, LSN, UUID, owner AG and CRC
SHORT_BTREE_HEADER = {4: 16, 5: 56}
NULL_AGBLOCK = 0xFFFFFFFF
#: the kernel's XFS_BTREE_MAXLEVELS before 5.19: no free-space btree of a 2^31-block AG is deeper
FREE_SPACE_MAX_LEVELS = 9

#: the log: 512-byte basic blocks, each stamped with its cycle; records start with a header block
LOG_BLOCK = 512
LOG_RECORD_MAGIC = 0xFEEDBABE
#: bytes whose cycle stamps one record header (or extended header) block saves
LOG_HEADER_CYCLE_SIZE = 32768
#: log buffers written at once, and the largest record of version 1 and 2 logs
LOG_MAX_ICLOGS = 8
LOG_MAX_RECORD = {False: 32768, True: 262144}
#: xlog_op_header.oh_flags: this operation is the unmount record
LOG_UNMOUNT_TRANS = 0x20


def _corrupt(message: str, offset: int | None, structure: str) -> CorruptImage:
    return CorruptImage(message, offset=offset, structure=structure)


def _inode_number(node: int) -> int:
    """A node of this driver: an inode number."""
    if not isinstance(node, int):
        raise GuestPathError(f"{node!r} is not an XFS inode number")
    return node


def _log2(value: int) -> int | None:
    """log2 of a power of two, else None."""
    if value <= 0 or value & (value - 1):
        return None
    return value.bit_length() - 1


def check_superblock(sb: XfsSuperblock) -> None:
    """Refuse a primary superblock whose geometry does not add up, or that this reader does not take."""
    where = "XFS superblock"

    def at(name: str) -> int:
        return field_offset(XfsSuperblock, name)

    version, block_size, inode_size = sb.version, sb.block_size, sb.inode_size
    ag_blocks, ag_count = sb.ag_blocks, sb.ag_count
    if version not in (4, 5):
        raise UnsupportedFormat(f"XFS superblock version {version}: only versions 4 and 5 are read")
    if _log2(block_size) != sb.block_log or not 512 <= block_size <= 65536:
        raise _corrupt(f"block size {block_size} (log {sb.block_log})", at("block_size"), where)
    if _log2(inode_size) != sb.inode_log or not 256 <= inode_size <= 2048 or inode_size > block_size:
        raise _corrupt(f"inode size {inode_size} (log {sb.inode_log})", at("inode_size"), where)
    if sb.inodes_per_block != block_size // inode_size or _log2(sb.inodes_per_block) != sb.inodes_per_block_log:
        raise _corrupt(f"{sb.inodes_per_block} inodes per block (log {sb.inodes_per_block_log})",
                       at("inodes_per_block"), where)
    if not 5 <= ag_blocks < 1 << 31 or sb.ag_block_log != (ag_blocks - 1).bit_length() or ag_count == 0:
        raise _corrupt(f"{ag_count} allocation groups of {ag_blocks} blocks (log {sb.ag_block_log})",
                       at("ag_blocks"), where)
    if not (ag_count - 1) * ag_blocks < sb.dblocks <= ag_count * ag_blocks:
        raise _corrupt(f"{sb.dblocks} blocks in {ag_count} groups of {ag_blocks}", at("dblocks"), where)
    if sb.dir_block_size > 65536:
        raise _corrupt(f"directory block log {sb.dir_block_log}", at("dir_block_log"), where)
    if version == 4 and not sb.versionnum & XFS_VERSION_DIRV2:
        raise UnsupportedFormat("XFS v4 with version 1 directories is not read")
    if version == 5 and sb.incompat & ~KNOWN_INCOMPAT:
        raise UnsupportedFormat(f"XFS incompatible features {sb.incompat & ~KNOWN_INCOMPAT:#x} are not read")


@dataclass(frozen=True)
class Inode:
    """The fields of an inode core this reader uses, and its data fork's bytes."""

    number: int
    position: int  # of the inode on the disk (for messages)
    fork_position: int  # of its data fork
    mode: int
    format: int
    uid: int
    gid: int
    nlink: int
    size: int
    nextents: int
    flags: int
    mtime: float
    data_fork: bytes

    @property
    def file_type(self) -> FileType:
        return FILE_TYPES.get(self.mode & S_IFMT, FileType.OTHER)


def parse_inode(raw: bytes, number: int, geometry: XfsSuperblock, position: int = 0) -> Inode:
    """The inode ``number`` from its ``inode_size`` bytes (found at ``position`` of the disk)."""
    where = f"XFS inode {number}"
    if len(raw) < geometry.inode_size or raw[:2] != INODE_MAGIC:
        raise _corrupt("bad inode magic", position, where)
    (_magic, mode, version, fmt, onlink, uid, gid, nlink, _projid_lo, _projid_hi, big_nextents, _atime,
     mtime_raw, _ctime, size, _nblocks, _extsize, nextents, _anextents, forkoff, _aformat, _dmevmask, _dmstate,
     flags, _gen) = INODE_CORE_V2.unpack_from(raw)
    if version not in ((3,) if geometry.version == 5 else (1, 2)):
        raise _corrupt(f"inode version {version} on a v{geometry.version} file system", position, where)
    if version == 1:
        nlink = onlink
    flags2 = struct.unpack_from(">Q", raw, 120)[0] if version == 3 else 0
    if version == 3 and struct.unpack_from(">Q", raw, 152)[0] != number:
        raise _corrupt("inode records another inode number", position, where)
    if flags2 & DIFLAG2_NREXT64:
        if not geometry.nrext64:
            raise _corrupt("64-bit extent counter without the feature", position, where)
        nextents = big_nextents
    if flags2 & DIFLAG2_BIGTIME:
        seconds, nanoseconds = divmod(struct.unpack_from(">Q", mtime_raw)[0], 10**9)
        mtime = seconds - BIGTIME_EPOCH_OFFSET + nanoseconds / 1e9
    else:
        seconds, nanoseconds = struct.unpack_from(">iI", mtime_raw)
        mtime = seconds + nanoseconds / 1e9
    core = INODE_CORE[version]
    literal = geometry.inode_size - core
    fork_size = forkoff * 8 if forkoff else literal
    if fork_size > literal:
        raise _corrupt(f"attribute fork offset {forkoff} past the inode", position, where)
    if size >= 1 << 63:
        raise _corrupt(f"size {size}", position, where)
    kind = mode & S_IFMT
    if kind not in FILE_TYPES and kind not in OTHER_TYPES:
        raise _corrupt(f"mode {mode:#o}", position, where)
    allowed = {
        0o100000: (FORMAT_EXTENTS, FORMAT_BTREE),
        0o040000: (FORMAT_LOCAL, FORMAT_EXTENTS, FORMAT_BTREE),
        0o120000: (FORMAT_LOCAL, FORMAT_EXTENTS, FORMAT_BTREE),
    }.get(kind, (FORMAT_DEV,))
    if fmt not in allowed:
        raise _corrupt(f"data fork format {fmt} for mode {mode:#o}", position, where)
    return Inode(number=number, position=position, fork_position=position + core, mode=mode, format=fmt, uid=uid,
                 gid=gid, nlink=nlink, size=size, nextents=nextents, flags=flags, mtime=mtime,
                 data_fork=bytes(raw[core : core + fork_size]))


@dataclass(frozen=True)
class Extent:
    """A run of ``count`` blocks of a file from logical block ``offset`` at file system block ``start``."""

    offset: int
    start: int
    count: int
    unwritten: bool


def parse_extent(raw: bytes, at: int = 0) -> Extent:
    """One packed 128-bit extent record."""
    high, low = struct.unpack_from(">QQ", raw, at)
    return Extent(offset=(high >> 9) & ((1 << 54) - 1), start=((high & 0x1FF) << 43) | (low >> 21),
                  count=low & ((1 << 21) - 1), unwritten=bool(high >> 63))


def parse_shortform_dir(data: bytes, has_ftype: bool, base: int = 0) -> tuple[int, list[tuple[bytes, int, int]]]:
    """The parent inode and the (name, inode, ftype) entries of a short-form directory (found at
    ``base`` of the disk)."""
    where = "XFS short-form directory"
    if len(data) < 6:
        raise _corrupt("short-form directory header truncated", base, where)
    count, i8count = data[0], data[1]
    width = 8 if i8count else 4
    if len(data) < 2 + width:
        raise _corrupt("short-form directory header truncated", base, where)
    parent = int.from_bytes(data[2 : 2 + width], "big")
    entries = []
    pos = 2 + width
    for _ in range(count):
        if pos + 3 > len(data):
            raise _corrupt("short-form entry past the directory", base + pos, where)
        name_length = data[pos]
        name_at = pos + 3  # after the length and a 2-byte offset hint
        end = name_at + name_length + has_ftype + width
        if name_length == 0 or end > len(data):
            raise _corrupt(f"short-form entry of name length {name_length}", base + pos, where)
        ftype = data[name_at + name_length] if has_ftype else 0
        entries.append((data[name_at : name_at + name_length], int.from_bytes(data[end - width : end], "big"), ftype))
        pos = end
    return parent, entries


def parse_data_block(block: bytes, version: int, has_ftype: bool, single: bool,
                     base: int = 0) -> list[tuple[bytes, int, int]]:
    """The (name, inode, ftype) entries of a directory data block ('.' and '..' included), found at
    ``base`` of the disk. ``single``: the block of a one-block directory, whose hash index and tail
    end the block."""
    where = "XFS directory block"
    magic = (BLOCK_DIR_MAGIC if single else DATA_DIR_MAGIC)[version]
    if block[:4] != magic:
        raise _corrupt(f"directory block magic {block[:4]!r}, not {magic!r}", base, where)
    end = len(block)
    if single:
        leaf_count = struct.unpack_from(">I", block, end - 8)[0]
        end -= 8 + 8 * leaf_count
    pos = DIR_DATA_HEADER[version]
    if end < pos:
        raise _corrupt("directory block hash index overlaps its header", base, where)
    entries = []
    while pos < end:
        if block[pos : pos + 2] == b"\xff\xff":  # free space: tag, length
            length = struct.unpack_from(">H", block, pos + 2)[0] if pos + 4 <= end else 0
            if length < 8 or length % 8 or pos + length > end:
                raise _corrupt(f"free space of {length} bytes", base + pos, where)
            pos += length
            continue
        if pos + 12 > end:
            raise _corrupt("directory entry past the block", base + pos, where)
        number, name_length = struct.unpack_from(">QB", block, pos)
        size = (8 + 1 + name_length + has_ftype + 2 + 7) & ~7
        if name_length == 0 or pos + size > end:
            raise _corrupt(f"directory entry of name length {name_length}", base + pos, where)
        if struct.unpack_from(">H", block, pos + size - 2)[0] != pos:
            raise _corrupt("directory entry tag does not match its offset", base + pos, where)
        name = block[pos + 9 : pos + 9 + name_length]
        entries.append((name, number, block[pos + 9 + name_length] if has_ftype else 0))
        pos += size
    return entries


def _extent_hash(start: int, blocks: int) -> int:
    """A 64-bit mix of one free extent: summed over a btree's records, it tells two trees' sets apart."""
    value = (start << 32 | blocks) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 29
    return value * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF


def crc_ok(raw: bytes, offset: int) -> bool:
    """Whether the little-endian CRC32C at ``offset`` of a version 5 structure matches its bytes
    (that field counted as zeros)."""
    stored = int.from_bytes(raw[offset : offset + 4], "little")
    return stored == crc32.iscsi(raw[:offset] + bytes(4) + raw[offset + 4 :])


@dataclass(frozen=True)
class Agf:
    """An allocation group's free space header (``xfs_agf``, sector 1 of the AG)."""

    magic: bytes
    version: int
    seqno: int
    length: int
    bno_root: int
    cnt_root: int
    rmap_root: int
    bno_level: int
    cnt_level: int
    rmap_level: int
    fl_first: int
    fl_last: int
    fl_count: int
    free_blocks: int
    longest: int
    uuid: bytes
    refcount_root: int
    refcount_level: int


def parse_agf(raw: bytes) -> Agf:
    """The AGF's fields (the UUID and the refcount btree's root are version 5's; zeros before)."""
    (magic, version, seqno, length, bno_root, cnt_root, rmap_root, bno_level, cnt_level, rmap_level, fl_first,
     fl_last, fl_count, free_blocks, longest, _btree_blocks, uuid, _rmap_blocks, _refcount_blocks, refcount_root,
     refcount_level) = struct.unpack_from(">4s15I16s4I", raw)
    return Agf(magic=magic, version=version, seqno=seqno, length=length, bno_root=bno_root, cnt_root=cnt_root,
               rmap_root=rmap_root, bno_level=bno_level, cnt_level=cnt_level, rmap_level=rmap_level,
               fl_first=fl_first, fl_last=fl_last, fl_count=fl_count, free_blocks=free_blocks, longest=longest,
               uuid=uuid, refcount_root=refcount_root, refcount_level=refcount_level)


def agfl_active(fl_first: int, fl_last: int, fl_count: int, size: int) -> int | None:
    """How many AGFL slots lie from ``fl_first`` to ``fl_last`` (wrapping at ``size``), or None when
    the AGF's list does not add up (the kernel resets such a list: xfs_agfl_needs_reset)."""
    if fl_first >= size or fl_last >= size or fl_count > size:
        return None
    if not fl_count:
        return 0
    active = fl_last - fl_first + 1 if fl_last >= fl_first else size - fl_first + fl_last + 1
    return active if active == fl_count else None


@dataclass(frozen=True)
class LogRecordHeader:
    """The fields of a log record header (``xlog_rec_header``) that tell where a record ends."""

    cycle: int
    version: int
    length: int  # bytes of the record's data
    operations: int
    uuid: bytes
    size: int  # of the log buffer, version 2

    def header_blocks(self, v2: bool) -> int:
        """Blocks of the header: one, or with large version 2 buffers extended headers after it."""
        if v2 and self.version & 2 and self.size > LOG_HEADER_CYCLE_SIZE:
            return -(-self.size // LOG_HEADER_CYCLE_SIZE)
        return 1


def parse_log_record_header(block: bytes) -> LogRecordHeader | None:
    """The record header in a log block (magic, cycle, version, length, LSN, tail LSN, CRC, previous
    block, operations, the saved cycle words, format, UUID, buffer size), None without its magic."""
    magic, cycle, version, length = struct.unpack_from(">4I", block)
    if magic != LOG_RECORD_MAGIC:
        return None
    operations = struct.unpack_from(">I", block, 40)[0]
    uuid, size = struct.unpack_from(">16sI", block, 304)
    return LogRecordHeader(cycle=cycle, version=version, length=length, operations=operations, uuid=uuid, size=size)


def log_block_cycle(block: bytes) -> int:
    """The cycle a log block was written in: the header's h_cycle, else the stamp that replaced
    the block's first word."""
    first, second = struct.unpack_from(">II", block)
    return int(second if first == LOG_RECORD_MAGIC else first)


class XfsLog:
    """The internal log, read as its 512-byte blocks: where its head is and whether the last record
    before the head is the unmount record, found the way the kernel's log recovery (and
    xfs_repair, xfs_logprint) find them. Raises NotSparsifiable where the log does not add up."""

    def __init__(self, read: Callable[[int, int], bytes], blocks: int, v2: bool, uuid: bytes) -> None:
        self._read, self.blocks, self.v2, self.uuid = read, blocks, v2, uuid
        record = LOG_MAX_RECORD[v2] // LOG_BLOCK
        #: blocks the in-flight buffers may have left half-written before the head, and one record's
        self._window = min(blocks, LOG_MAX_ICLOGS * record)
        self._record_blocks = min(blocks, record)

    def _cycle(self, block: int) -> int:
        return log_block_cycle(self._read(block, 1))

    def _cycle_start(self, first: int, last: int, cycle: int) -> int:
        """The first block from which the blocks up to ``last`` have ``cycle`` (a binary search)."""
        middle = (first + last) // 2
        while middle not in (first, last):
            if self._cycle(middle) == cycle:
                last = middle
            else:
                first = middle
            middle = (first + last) // 2
        return last

    def _find_cycle(self, start: int, count: int, cycle: int) -> int | None:
        """The first of ``count`` blocks from ``start`` written in ``cycle``, or None."""
        step = LOG_HEADER_CYCLE_SIZE // LOG_BLOCK
        for chunk in range(start, start + count, step):
            take = min(step, start + count - chunk)
            data = self._read(chunk, take)
            for index in range(take):
                if log_block_cycle(data[index * LOG_BLOCK : index * LOG_BLOCK + 8]) == cycle:
                    return chunk + index
        return None

    def _last_header(self, end: int, start: int) -> tuple[int, LogRecordHeader] | None:
        """The last record header in blocks [start, end), or None."""
        for block in range(end - 1, start - 1, -1):
            header = parse_log_record_header(self._read(block, 1))
            if header is not None:
                return block, header
        return None

    def _back_over_torn_record(self, start: int, head: int, extra: int) -> int | None:
        """``head``, or the start of the record before it when that record does not end exactly
        there (a torn write); None when no header lies in [0, head) and ``start`` is 0."""
        found = self._last_header(head, start)
        if found is None:
            if start:
                raise NotSparsifiable(f"the log has no record header in blocks {start}-{head - 1}")
            return None
        block, header = found
        if head - block + extra != -(-header.length // LOG_BLOCK) + header.header_blocks(self.v2):
            return block
        return head

    def head(self) -> int:
        """The block where the next record would be written (0 for a log never written to)."""
        n = self.blocks
        first_cycle = self._cycle(0)
        if first_cycle == 0:
            return 0
        last_cycle = self._cycle(n - 1)
        if last_cycle == 0:  # the log was not written round once yet
            if first_cycle != 1:
                raise NotSparsifiable(f"the log is inconsistent: its first block is of cycle {first_cycle}")
            head = self._cycle_start(0, n - 1, 0)
            scan = min(self._window, head)
            hole = self._find_cycle(head - scan, scan, 0)
            head = hole if hole is not None else head
            verified = self._back_over_torn_record(head - scan, head, 0)
            if verified is None:
                raise NotSparsifiable("the log has no record header before its head")
            return verified
        if first_cycle == last_cycle:  # every block of one cycle: the head is at the end, unless holes remain
            head, stop = n, last_cycle - 1
        else:
            stop = last_cycle
            head = self._cycle_start(0, n - 1, last_cycle)
        scan = self._window
        if head >= scan:
            hole = self._find_cycle(head - scan, scan, stop)
            head = hole if hole is not None else head
        else:
            hole = self._find_cycle(n - (scan - head), scan - head, stop - 1)
            if hole is None:
                hole = self._find_cycle(0, head, stop)
            head = hole if hole is not None else head
        scan = self._record_blocks
        if head >= scan:
            verified = self._back_over_torn_record(head - scan, head, 0)
            if verified is None:
                raise NotSparsifiable("the log has no record header before its head")
            head = verified
        else:
            verified = self._back_over_torn_record(0, head, 0)
            if verified is None:
                wrapped = self._back_over_torn_record(n - (scan - head), n, head)
                if wrapped is None:
                    raise NotSparsifiable("the log has no record header before its head")
                if wrapped != n:
                    head = wrapped
            else:
                head = verified
        return 0 if head == n else head

    def clean(self) -> bool:
        """Whether the log was cleanly unmounted: the last record before the head, ending at the
        head, holds one operation flagged as the unmount record (a log never written counts as clean)."""
        n = self.blocks
        head = self.head()
        if head == 0 and self._cycle(0) == 0:
            return True
        reach = self._record_blocks + LOG_MAX_RECORD[self.v2] // LOG_HEADER_CYCLE_SIZE
        found = self._last_header(head, max(0, head - reach))
        if found is None and head < reach:
            found = self._last_header(n, max(head, n - (reach - head)))
        if found is None:
            return False
        block, header = found
        if any(header.uuid) and header.uuid != self.uuid:
            raise NotSparsifiable("the log's records belong to another file system (their UUID differs)")
        data = (block + header.header_blocks(self.v2)) % n
        if (data + -(-header.length // LOG_BLOCK)) % n != head or header.operations != 1:
            return False
        return bool(self._read(data, 1)[9] & LOG_UNMOUNT_TRANS)


class XfsFileSystem(GuestFileSystem[int]):
    """An XFS file system at ``[offset, offset + length)`` of ``disk``; nodes are inode numbers."""

    type = "xfs"

    def __init__(self, disk: Disk, offset: int, length: int) -> None:
        self._disk = disk
        self._offset = offset
        self._length = length
        geometry = parse_xfs_superblock(self._read_raw(0, XFS_SUPERBLOCK_SIZE, "XFS superblock"))
        if geometry is None:
            raise _corrupt("not an XFS superblock", 0, "XFS superblock")
        check_superblock(geometry)
        #: the primary superblock, checked
        self.geometry = geometry
        if geometry.size > length:
            raise _corrupt(f"file system of {geometry.size} bytes in a volume of {length}",
                           field_offset(XfsSuperblock, "dblocks"), "XFS superblock")
        self.case_insensitive = geometry.ascii_ci
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = max(16, CACHE_BYTES // geometry.block_size)
        self._directories: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._inodes: OrderedDict[int, tuple[Inode, Stat]] = OrderedDict()
        self.root = geometry.root_inode
        if not self._stat(self.root).is_dir:
            raise _corrupt("the root inode is not a directory", field_offset(XfsSuperblock, "root_inode"),
                           "XFS superblock")

    # -- positions and reads ---------------------------------------------------------------------

    def _read_raw(self, position: int, length: int, structure: str) -> bytes:
        """``length`` bytes at ``position`` of the file system, which must lie inside it."""
        return read_volume(self._disk, self._offset, self._length, position, length, structure)

    def _block_position(self, fsblock: int, count: int, structure: str, referrer: int | None = None) -> int:
        """The byte position (in the file system) of block ``fsblock``, checked for ``count`` blocks;
        ``referrer``: the disk offset of the structure that points there (for messages)."""
        g = self.geometry
        ag, ag_block = fsblock >> g.ag_block_log, fsblock & ((1 << g.ag_block_log) - 1)
        linear = ag * g.ag_blocks + ag_block
        if ag >= g.ag_count or ag_block + count > g.ag_blocks or linear + count > g.dblocks:
            raise _corrupt(f"block {fsblock} (+{count}) outside the file system", referrer, structure)
        return linear * g.block_size

    def _metadata_block(self, fsblock: int, structure: str, referrer: int | None) -> tuple[bytes, int]:
        """One metadata block and its disk offset, through the bounded cache."""
        position = self._block_position(fsblock, 1, structure, referrer)
        data = self._cache.get(position)
        if data is None:
            data = self._read_raw(position, self.geometry.block_size, structure)
            self._cache[position] = data
            if len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(position)
        return data, self._offset + position

    # -- free space --------------------------------------------------------------------------------

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The free extents of every AG's by-block btree and the blocks on its free list (AGFL), once
        the log is known clean and each AG's maps agree: AGF, AGFL and btree blocks checked (CRCs,
        owners, siblings, key order), the two free-space btrees holding the same extents, the AGF's
        free and longest counts matching them, and no free extent on the log, the btrees' roots or
        the AG's headers. Every AG is checked before this returns; the ranges are then read again
        AG by AG."""
        self._check_clean()
        for ag in range(self.geometry.ag_count):
            self._check_ag(ag)
        return join_adjacent(self._free_extents())

    def _check_clean(self) -> None:
        g = self.geometry
        where = "XFS superblock"
        if not 512 <= g.sector_size <= min(g.block_size, 32768) or g.sector_size & (g.sector_size - 1):
            raise _corrupt(f"sector size {g.sector_size}", field_offset(XfsSuperblock, "sector_size"), where)
        if g.version == 5 and not crc_ok(self._read_raw(0, g.sector_size, where), SB_CRC_OFFSET):
            raise _corrupt("superblock CRC does not match", 0, where)
        if g.in_progress:
            raise NotSparsifiable("mkfs.xfs did not finish (sb_inprogress is set)")
        if g.incompat & XFS_INCOMPAT_NEEDSREPAIR:
            raise NotSparsifiable("the file system needs xfs_repair (needsrepair is set)")
        if not g.log_start:
            raise NotSparsifiable("the log lies on an external device: whether it is clean cannot be read")
        if not g.log_blocks:
            raise _corrupt("internal log of 0 blocks", field_offset(XfsSuperblock, "log_blocks"), where)
        position = self._block_position(g.log_start, g.log_blocks, "XFS log", field_offset(XfsSuperblock, "log_start"))

        def read(block: int, count: int) -> bytes:
            return self._read_raw(position + block * LOG_BLOCK, count * LOG_BLOCK, "XFS log")

        log = XfsLog(read, g.log_blocks * g.block_size // LOG_BLOCK, g.log_v2, g.uuid)
        if not log.clean():
            raise NotSparsifiable("the log is dirty (not cleanly unmounted): the free-space btrees may call blocks "
                                  "free that the log's changes use")

    def _ag_length(self, ag: int) -> int:
        g = self.geometry
        return min(g.ag_blocks, g.dblocks - ag * g.ag_blocks)

    def _ag_header_blocks(self) -> int:
        """The blocks at each AG's start that hold its four header sectors."""
        return -(-AG_HEADER_SECTORS * self.geometry.sector_size // self.geometry.block_size)

    def _agf(self, ag: int) -> tuple[Agf, list[int]]:
        """The AG's AGF, checked, and the blocks on its free list (sorted)."""
        g = self.geometry
        where = f"XFS AG {ag} AGF"
        start = ag * g.ag_blocks * g.block_size
        length = self._ag_length(ag)
        headers = self._ag_header_blocks()
        raw = self._read_raw(start + AGF_SECTOR * g.sector_size, g.sector_size, where)
        agf = parse_agf(raw)
        at = self._offset + start + AGF_SECTOR * g.sector_size
        if agf.magic != AGF_MAGIC or agf.version != AGF_VERSION or agf.seqno != ag or agf.length != length:
            raise _corrupt(f"AGF magic {agf.magic!r}, version {agf.version}, AG {agf.seqno}, length {agf.length}",
                           at, where)
        if g.version == 5 and (not crc_ok(raw, AGF_CRC_OFFSET) or agf.uuid != g.metadata_uuid):
            raise _corrupt("AGF CRC or UUID does not match", at, where)
        for name, root, level in (("by-block", agf.bno_root, agf.bno_level), ("by-size", agf.cnt_root, agf.cnt_level)):
            if not headers <= root < length or not 1 <= level <= FREE_SPACE_MAX_LEVELS:
                raise _corrupt(f"{name} free-space btree root {root} of level {level}", at, where)
        if agf.free_blocks > length or agf.longest > agf.free_blocks:
            raise _corrupt(f"{agf.free_blocks} free blocks, the longest extent {agf.longest}", at, where)
        size = (g.sector_size - AGFL_HEADER) // 4 if g.version == 5 else g.sector_size // 4
        if agfl_active(agf.fl_first, agf.fl_last, agf.fl_count, size) is None:
            raise NotSparsifiable(f"AG {ag}'s free list does not add up (first {agf.fl_first}, last {agf.fl_last}, "
                                  f"count {agf.fl_count})")
        where = f"XFS AG {ag} AGFL"
        raw = self._read_raw(start + AGFL_SECTOR * g.sector_size, g.sector_size, where)
        at = self._offset + start + AGFL_SECTOR * g.sector_size
        header = 0
        if g.version == 5:
            magic, seqno, uuid = struct.unpack_from(">4sI16s", raw)
            if magic != AGFL_MAGIC or seqno != ag or uuid != g.metadata_uuid or not crc_ok(raw, AGFL_CRC_OFFSET):
                raise _corrupt(f"AGFL magic {magic!r}, AG {seqno}, or its UUID or CRC does not match", at, where)
            header = AGFL_HEADER
        slots = struct.unpack_from(f">{size}I", raw, header)
        free_list = sorted(slots[(agf.fl_first + i) % size] for i in range(agf.fl_count))
        for previous, block in zip([-1, *free_list], free_list, strict=False):
            if block == previous or not headers <= block < length:
                raise NotSparsifiable(f"AG {ag}'s free list holds block {block} twice or outside the AG")
        return agf, free_list

    def _free_space_records(self, ag: int, agf: Agf, tree: str) -> Iterator[tuple[int, int]]:
        """The (first block, blocks) records of the AG's free-space btree ``tree`` ("bno": by block,
        "cnt": by size), in the tree's order, each block checked: magic, level, record count, CRC,
        address, UUID and owner (version 5), siblings at each level, and keys: each child starts at
        its parent's key and keys strictly increase (so no block is read twice)."""
        g = self.geometry
        where = f"XFS AG {ag} {tree} btree"
        length = self._ag_length(ag)
        header = SHORT_BTREE_HEADER[g.version]
        magic = FREE_SPACE_MAGIC[(tree, g.version)]
        root, levels = (agf.bno_root, agf.bno_level) if tree == "bno" else (agf.cnt_root, agf.cnt_level)
        #: per level, the block last read there and its right sibling
        previous: dict[int, tuple[int, int]] = {}
        last_key: tuple[int, int] | None = None

        def order(start: int, count: int) -> tuple[int, int]:
            return (start, 0) if tree == "bno" else (count, start)

        def block_of(agbno: int, level: int, key: tuple[int, int] | None,
                     referrer: int | None) -> tuple[bytes, int, int]:
            """The btree block ``agbno`` at ``level``, checked; its disk offset and record count."""
            if agbno >= length:
                raise _corrupt(f"btree block {agbno} outside the AG", referrer, where)
            block, offset = self._metadata_block(ag << g.ag_block_log | agbno, where, referrer)
            block_magic, block_level, count, left, right = struct.unpack_from(">4sHHII", block)
            capacity = (g.block_size - header) // (8 if level == 0 else 12)
            if block_magic != magic or block_level != level or count > capacity or (not count and key is not None):
                raise _corrupt(f"btree block: magic {block_magic!r}, level {block_level} (not {level}), {count} "
                               "records", offset, where)
            if g.version == 5:
                address, uuid, owner = struct.unpack_from(">Q8x16sI", block, 16)
                expected = (ag * g.ag_blocks + agbno) << (g.block_log - 9)
                if address != expected or uuid != g.metadata_uuid or owner != ag or \
                        not crc_ok(block, SHORT_BTREE_CRC_OFFSET):
                    raise _corrupt("btree block's address, UUID, owner or CRC does not match", offset, where)
            before, before_right = previous.get(level, (NULL_AGBLOCK, agbno))
            if left != before or before_right != agbno:
                raise _corrupt(f"btree block's left sibling {left} is not {before}", offset, where)
            previous[level] = agbno, right
            first = struct.unpack_from(">II", block, header) if count else None
            if key is not None and first is not None and order(*first) != key:
                raise _corrupt(f"btree block does not start at its key {key}", offset, where)
            return block, offset, count

        def walk(agbno: int, level: int, key: tuple[int, int] | None,
                 referrer: int | None) -> Iterator[tuple[int, int]]:
            nonlocal last_key
            block, offset, count = block_of(agbno, level, key, referrer)
            if level == 0:
                for index in range(count):
                    start, blocks = struct.unpack_from(">II", block, header + 8 * index)
                    if not blocks or start + blocks > length:
                        raise _corrupt(f"free extent {start}+{blocks} empty or outside the AG", offset, where)
                    if last_key is not None and order(start, blocks) <= last_key:
                        raise _corrupt(f"free extent {start}+{blocks} out of order", offset, where)
                    last_key = order(start, blocks)
                    yield start, blocks
                return
            capacity = (g.block_size - header) // 12
            for index in range(count):
                child_key = order(*struct.unpack_from(">II", block, header + 8 * index))
                child = struct.unpack_from(">I", block, header + 8 * capacity + 4 * index)[0]
                yield from walk(child, level - 1, child_key, offset)

        yield from walk(root, levels - 1, None, None)
        for level, (_, right) in previous.items():
            if right != NULL_AGBLOCK:
                raise _corrupt(f"the last btree block of level {level} has a right sibling {right}", None, where)

    def _check_ag(self, ag: int) -> None:
        """NotSparsifiable unless the AG's two free-space btrees hold the same extents, the AGF counts
        them, and none lies on the AG's headers, a btree root, the free list or the log."""
        g = self.geometry
        agf, free_list = self._agf(ag)
        taken = [(0, self._ag_header_blocks(), "the AG's headers")]
        taken += [(block, block + 1, "the free list") for block in free_list]
        taken += [(root, root + 1, "a btree root") for root, level in (
            (agf.bno_root, 1), (agf.cnt_root, 1), (agf.rmap_root, agf.rmap_level),
            (agf.refcount_root, agf.refcount_level)) if level]
        log_ag, log_block = g.log_start >> g.ag_block_log, g.log_start & ((1 << g.ag_block_log) - 1)
        if log_ag == ag:
            taken.append((log_block, log_block + g.log_blocks, "the log"))
        taken.sort()
        sums = []
        for tree in ("bno", "cnt"):
            total = records = longest = fingerprint = 0
            end = index = 0
            for start, blocks in self._free_space_records(ag, agf, tree):
                records += 1
                total += blocks
                longest = max(longest, blocks)
                fingerprint = (fingerprint + _extent_hash(start, blocks)) & 0xFFFFFFFFFFFFFFFF
                if tree != "bno":
                    continue
                if start < end:
                    raise _corrupt(f"free extents of AG {ag} overlap at block {start}", None, f"XFS AG {ag} bno btree")
                end = start + blocks
                while index < len(taken) and taken[index][1] <= start:
                    index += 1
                if index < len(taken) and taken[index][0] < end:
                    raise NotSparsifiable(f"AG {ag}'s free extent {start}+{blocks} overlaps {taken[index][2]}")
            sums.append((records, total, fingerprint))
            if total != agf.free_blocks or longest != agf.longest:
                raise NotSparsifiable(f"AG {ag}'s {tree} btree holds {total} free blocks (longest {longest}), its AGF "
                                      f"counts {agf.free_blocks} (longest {agf.longest})")
        if sums[0] != sums[1]:
            raise NotSparsifiable(f"AG {ag}'s two free-space btrees do not hold the same extents")

    def _free_extents(self) -> Iterator[tuple[int, int]]:
        """Each AG's free extents and free-list blocks in block order, as byte ranges of the volume."""
        g = self.geometry
        for ag in range(g.ag_count):
            agf, free_list = self._agf(ag)
            base = ag * g.ag_blocks
            extents = heapq.merge(self._free_space_records(ag, agf, "bno"), ((block, 1) for block in free_list))
            for start, blocks in extents:
                yield (base + start) * g.block_size, blocks * g.block_size

    def _inode(self, node: int) -> Inode:
        return self._cached_inode(_inode_number(node))[0]

    def _stat(self, node: int) -> Stat:
        return self._cached_inode(_inode_number(node))[1]

    def _cached_inode(self, number: int) -> tuple[Inode, Stat]:
        """The inode and its Stat, through a bounded cache (a lookup stats each directory on the way)."""
        cached = self._inodes.get(number)
        if cached is not None:
            self._inodes.move_to_end(number)
            return cached
        inode = self._parse_inode(number)
        flags = frozenset(name for bit, name in INODE_FLAGS.items() if inode.flags & bit)
        kind = inode.file_type
        cached = inode, Stat(type=kind, size=inode.size if kind is not FileType.OTHER else 0, node=number,
                             mode=inode.mode & 0o7777, uid=inode.uid, gid=inode.gid, mtime=inode.mtime,
                             nlink=inode.nlink, flags=flags)
        self._inodes[number] = cached
        if len(self._inodes) > CACHED_INODES:
            self._inodes.popitem(last=False)
        return cached

    def _parse_inode(self, number: int) -> Inode:
        g = self.geometry
        where = f"XFS inode {number}"
        ag = number >> (g.ag_block_log + g.inodes_per_block_log)
        ag_block = (number >> g.inodes_per_block_log) & ((1 << g.ag_block_log) - 1)
        slot = number & ((1 << g.inodes_per_block_log) - 1)
        if number == 0 or ag >= g.ag_count or ag_block >= g.ag_blocks:
            raise _corrupt("inode number outside the file system", None, where)
        block, block_offset = self._metadata_block(ag << g.ag_block_log | ag_block, where, None)
        at = slot * g.inode_size
        return parse_inode(block[at : at + g.inode_size], number, g, block_offset + at)

    # -- block maps --------------------------------------------------------------------------------

    def _extents(self, inode: Inode, first: int = 0) -> Iterator[Extent]:
        """The extents of ``inode``'s data fork from the one holding logical block ``first`` on,
        in order, each checked to lie in the file system and after the one before."""
        where = f"XFS inode {inode.number} block map"
        if inode.format == FORMAT_EXTENTS:
            if inode.nextents * 16 > len(inode.data_fork):
                raise _corrupt(f"{inode.nextents} extents do not fit in the inode", inode.position, where)
            records: Iterator[Extent] = (parse_extent(inode.data_fork, 16 * i) for i in range(inode.nextents))
        elif inode.format == FORMAT_BTREE:
            records = self._btree_extents(inode, first)
        else:
            raise _corrupt(f"data fork format {inode.format} has no block map", inode.position, where)
        previous_end = 0
        seen = 0
        for extent in records:
            seen += 1
            if seen > inode.nextents:
                raise _corrupt(f"more extents than the {inode.nextents} the inode counts", inode.position, where)
            if extent.count == 0 or extent.offset < previous_end or extent.offset + extent.count > 1 << 54:
                raise _corrupt(f"extent at logical block {extent.offset} out of order or empty", inode.position,
                               where)
            previous_end = extent.offset + extent.count
            if previous_end <= first:
                continue
            self._block_position(extent.start, extent.count, where, inode.position)
            yield extent

    def _btree_extents(self, inode: Inode, first: int) -> Iterator[Extent]:
        """The bmap btree's records from the leaf that holds logical block ``first``, then the leaves
        to its right (each leaf's records start after the previous ones', so a loop is refused).
        Each child must start at the key its parent gives for it."""
        g = self.geometry
        where = f"XFS inode {inode.number} bmap btree"
        fork = inode.data_fork
        if len(fork) < 4:
            raise _corrupt("btree root truncated", inode.fork_position, where)
        level, count = struct.unpack_from(">HH", fork, 0)
        capacity = (len(fork) - 4) // 16
        if not 1 <= level <= MAX_BTREE_LEVELS or not 1 <= count <= capacity:
            raise _corrupt(f"btree root of level {level} with {count} records", inode.fork_position, where)
        key, child = self._btree_child(fork, 4, count, capacity, first)
        block_offset = inode.fork_position
        header = BMAP_HEADER[g.version]
        node_capacity = (g.block_size - header) // 16
        while True:
            level -= 1
            block, block_offset = self._btree_block(inode, child, level, block_offset)
            count = struct.unpack_from(">H", block, 6)[0]
            starts_at = parse_extent(block, header).offset if level == 0 else struct.unpack_from(">Q", block, header)[0]
            if starts_at != key:
                raise _corrupt(f"btree block does not start at its key {key}", block_offset, where)
            if level == 0:
                break
            key, child = self._btree_child(block, header, count, node_capacity, first)
        while True:
            for i in range(count):
                yield parse_extent(block, header + 16 * i)
            child = struct.unpack_from(">Q", block, 16)[0]  # right sibling
            if child == NULL_FSBLOCK:
                return
            block, block_offset = self._btree_block(inode, child, 0, block_offset)
            count = struct.unpack_from(">H", block, 6)[0]

    def _btree_block(self, inode: Inode, fsblock: int, level: int, referrer: int) -> tuple[bytes, int]:
        """A bmap btree block of ``inode`` at ``level``, its header checked; and its disk offset."""
        g = self.geometry
        where = f"XFS inode {inode.number} bmap btree"
        block, offset = self._metadata_block(fsblock, where, referrer)
        magic, block_level, count = struct.unpack_from(">4sHH", block, 0)
        if magic != BMAP_MAGIC[g.version] or block_level != level or \
                not 1 <= count <= (g.block_size - BMAP_HEADER[g.version]) // 16:
            raise _corrupt(f"btree block: magic {magic!r}, level {block_level} (not {level}), {count} records",
                           offset, where)
        if g.version == 5 and struct.unpack_from(">Q", block, 56)[0] != inode.number:
            raise _corrupt("btree block belongs to another inode", offset, where)
        return block, offset

    @staticmethod
    def _btree_child(node: bytes, at: int, count: int, capacity: int, first: int) -> tuple[int, int]:
        """The last key at or before logical block ``first`` (or the first key), and its pointer."""
        keys = struct.unpack_from(f">{count}Q", node, at)
        chosen = 0
        for i, key in enumerate(keys):
            if key > first:
                break
            chosen = i
        return keys[chosen], struct.unpack_from(">Q", node, at + 8 * capacity + 8 * chosen)[0]

    # -- directories -----------------------------------------------------------------------------

    def _directory_entries(self, inode: Inode) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, ftype) of every entry, '.' and '..' left out."""
        g = self.geometry
        where = f"XFS inode {inode.number} directory"
        if inode.format == FORMAT_LOCAL:
            if inode.size > len(inode.data_fork):
                raise _corrupt(f"short-form directory of {inode.size} bytes", inode.position, where)
            yield from parse_shortform_dir(inode.data_fork[: inode.size], g.has_ftype, inode.fork_position)[1]
            return
        # the data blocks end at the directory's size (its hash index lies beyond, from 32 GiB)
        if inode.size > MAX_DIRECTORY_BYTES or inode.size % g.dir_block_size:
            raise _corrupt(f"directory of {inode.size} bytes", inode.position, where)
        per_block = 1 << g.dir_block_log
        leaf_block = DIR_LEAF_OFFSET // g.block_size
        data_blocks = inode.size // g.block_size
        pending: list[int] = []  # positions of the fs blocks of the directory block being gathered
        single: bool | None = None
        for extent in self._extents(inode):
            if extent.offset >= leaf_block:
                break
            if extent.unwritten:
                raise _corrupt("unwritten extent in a directory", inode.position, where)
            if extent.offset + extent.count > data_blocks:
                raise _corrupt("directory data block past the directory's size", inode.position, where)
            for logical in range(extent.offset, extent.offset + extent.count):
                if (logical % per_block == 0) != (not pending):
                    raise _corrupt(f"directory block at logical block {logical} is incomplete", inode.position,
                                   where)
                pending.append(self._block_position(extent.start + logical - extent.offset, 1, where))
                if len(pending) < per_block:
                    continue
                block = b"".join(self._read_raw(p, g.block_size, where) for p in pending)
                block_offset = self._offset + pending[0]
                pending = []
                if single is None:
                    single = block[:4] == BLOCK_DIR_MAGIC[g.version]
                elif single:
                    raise _corrupt("a one-block directory has more blocks", block_offset, where)
                if g.version == 5 and struct.unpack_from(">Q", block, 40)[0] != inode.number:
                    raise _corrupt("directory block belongs to another inode", block_offset, where)
                for entry in parse_data_block(block, g.version, g.has_ftype, single, block_offset):
                    if entry[0] not in (b".", b".."):
                        yield entry
        if pending:
            raise _corrupt("directory ends inside a directory block", inode.position, where)

    def _entries(self, node: int) -> Iterator[DirEntry[int]]:
        inode = self._inode(node)
        if inode.file_type is not FileType.DIRECTORY:
            raise GuestPathError(f"inode {node} is not a directory")
        where = f"XFS inode {node} directory"
        for count, (name, number, ftype) in enumerate(self._directory_entries(inode), 1):
            if count > MAX_DIRECTORY_ENTRIES:
                raise _corrupt(f"more than {MAX_DIRECTORY_ENTRIES} entries", inode.position, where)
            if b"/" in name or b"\0" in name or name in (b".", b".."):
                raise _corrupt(f"directory entry named {name!r}", inode.position, where)
            if ftype > 8:
                raise _corrupt(f"directory entry type {ftype}", inode.position, where)
            kind = DIRENT_TYPES.get(ftype, FileType.OTHER if ftype else None)
            yield DirEntry(name.decode("utf-8", "surrogateescape"), number, kind)

    def _lookup(self, directory: int, name: str) -> int | None:
        """Looks ``name`` up in a cached name -> inode map of the directory (few directories kept)."""
        directory = _inode_number(directory)
        names = self._directories.get(directory)
        if names is None:
            names = {}
            for entry in self._entries(directory):
                names[entry.name.casefold() if self.case_insensitive else entry.name] = _inode_number(entry.node)
            if len(names) <= CACHED_DIRECTORY_ENTRIES:
                self._directories[directory] = names
                if len(self._directories) > CACHED_DIRECTORIES:
                    self._directories.popitem(last=False)
        else:
            self._directories.move_to_end(directory)
        return names.get(name.casefold() if self.case_insensitive else name)

    # -- files and links ---------------------------------------------------------------------------

    def _read(self, node: int, offset: int, length: int) -> bytes:
        inode = self._inode(node)
        if inode.file_type is not FileType.FILE:
            raise GuestPathError(f"inode {node} is not a regular file")
        if inode.flags & DIFLAG_REALTIME:
            raise UnsupportedFormat(f"XFS inode {node}: data on the realtime device is not read")
        end = min(offset + length, inode.size)
        if offset >= end:
            return b""
        block_size = self.geometry.block_size
        out = bytearray(end - offset)  # holes and unwritten extents stay zero
        for extent in self._extents(inode, offset // block_size):
            start = max(offset, extent.offset * block_size)
            stop = min(end, (extent.offset + extent.count) * block_size)
            if start >= end:
                break
            if extent.unwritten or start >= stop:
                continue
            position = self._block_position(extent.start, extent.count, f"XFS inode {node} data")
            out[start - offset : stop - offset] = self._read_raw(
                position + start - extent.offset * block_size, stop - start, f"XFS inode {node} data")
        return bytes(out)

    def _readlink(self, node: int) -> str:
        inode = self._inode(node)
        where = f"XFS inode {node} symbolic link"
        if inode.file_type is not FileType.SYMLINK:
            raise GuestPathError(f"inode {node} is not a symbolic link")
        if not 0 < inode.size <= MAX_SYMLINK:
            raise _corrupt(f"symbolic link of {inode.size} bytes", inode.position, where)
        if inode.format == FORMAT_LOCAL:
            if inode.size > len(inode.data_fork):
                raise _corrupt(f"inline symbolic link of {inode.size} bytes", inode.position, where)
            target = inode.data_fork[: inode.size]
        else:
            target = self._remote_symlink(inode)
        if b"\0" in target:
            raise _corrupt("symbolic link target holds a NUL", inode.position, where)
        return target.decode("utf-8", "surrogateescape")

    def _remote_symlink(self, inode: Inode) -> bytes:
        """A target kept in blocks: v5 blocks carry an ``XSLM`` header saying which bytes they hold."""
        g = self.geometry
        where = f"XFS inode {inode.number} symbolic link"
        pieces: list[bytes] = []
        have = 0
        expected = 0
        for extent in self._extents(inode):
            if extent.offset != expected or extent.unwritten:
                raise _corrupt("symbolic link blocks with a hole", inode.position, where)
            expected = extent.offset + extent.count
            for i in range(extent.count):
                if have >= inode.size:
                    break
                block, block_offset = self._metadata_block(extent.start + i, where, inode.position)
                if g.version == 5:
                    magic, at, length = struct.unpack_from(">4sII", block, 0)
                    owner = struct.unpack_from(">Q", block, 32)[0]
                    if magic != SYMLINK_MAGIC or owner != inode.number or at != have or \
                            not 0 < length <= min(inode.size - have, g.block_size - SYMLINK_HEADER):
                        raise _corrupt(f"symbolic link block: magic {magic!r}, bytes {at}+{length}", block_offset,
                                       where)
                    piece = block[SYMLINK_HEADER : SYMLINK_HEADER + length]
                else:
                    piece = block[: inode.size - have]
                pieces.append(piece)
                have += len(piece)
        if have != inode.size:
            raise _corrupt(f"symbolic link blocks hold {have} of {inode.size} bytes", inode.position, where)
        return b"".join(pieces)
