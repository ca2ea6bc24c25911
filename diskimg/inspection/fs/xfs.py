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

Not read: the realtime device (files flagged realtime are refused), the log (a file system that
was not cleanly unmounted is read as the last checkpoint left it), extended attributes. Checksums
are not verified; every magic number, owner, offset, length and count is checked before use, and
a broken structure raises :class:`~diskimg.errors.CorruptImage`.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk
from ..superblocks import XFS_SUPERBLOCK_SIZE, XFS_VERSION_DIRV2, XfsSuperblock, field_offset, parse_xfs_superblock
from .base import MAX_DIRECTORY_ENTRIES, DirEntry, FileType, GuestFileSystem, GuestPathError, Stat, read_volume

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

    def _entries(self, node: int) -> Iterator[DirEntry]:
        inode = self._inode(node)
        if inode.file_type is not FileType.DIRECTORY:
            raise GuestPathError(f"inode {node} is not a directory")
        where = f"XFS inode {node} directory"
        count = 0
        for name, number, ftype in self._directory_entries(inode):
            count += 1
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
