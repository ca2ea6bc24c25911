"""ext2, ext3 and ext4, read-only: enough of the format to read files, directories and links.

The layout (all integers little-endian; "block" is the file system block of 1 KiB to 64 KiB):

- The superblock lies at byte 1024. It gives the block size, the counts of blocks and inodes, the
  blocks and inodes per block group, the inode size and the feature sets.
- The group descriptor table follows the superblock's block: one 32-byte descriptor per group (64
  bytes, ``s_desc_size``, with the 64bit feature), giving each group's inode table. With meta_bg the
  table is split: from group ``s_first_meta_bg * descriptors-per-block`` on, each run of
  descriptors-per-block groups keeps its block of descriptors in its own first group (after that
  group's superblock backup, if it has one). flex_bg only moves the tables; the descriptors say where.
- Inode ``n`` (from 1; the root is 2) is entry ``(n - 1) % inodes_per_group`` of the inode table of
  group ``(n - 1) // inodes_per_group``. Its 60-byte ``i_block`` holds, by the inode's flags, an
  extent tree root, a classic block map (12 direct blocks, then single, double and triple indirect
  blocks), inline data (with the rest in the in-inode extended attribute "system.data"), or a fast
  symbolic link's target.
- A directory's data is a list of records (inode, rec_len, name_len, file type, name) filling each
  block. Hash-indexed (htree) directories keep the same records in their leaf blocks; their index
  blocks look like records of inode 0 spanning the block (the root's index hides in the ".." record),
  so reading every block linearly finds each name once. metadata_csum adds a 12-byte record of inode
  0 at each block's end.

Reading files verifies no checksum and replays no journal (a file system that needs recovery reads
as it would be mounted with ``noload``).

Free space (``unused_ranges``) comes from the block bitmaps, one block per group, bit ``i`` for the
group's block ``i``. With uninit_bg or metadata_csum a group may be flagged BLOCK_UNINIT: its bitmap
was never written and reads as the kernel builds it (the superblock copy and descriptor blocks at
the group's start, and those of its bitmaps and inode table that lie in it, in use). Only a cleanly
unmounted file system is read (no journal to replay, no orphans, no errors), and only once its maps
agree: checksums where the features keep them, each group's free count, and every group's metadata
marked used in the bitmap of the group holding it (with flex_bg, usually another group).
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from fastcrc import crc16, crc32

from ...errors import CorruptImage, UnsupportedFormat
from ...units import READ_CHUNK
from ..signatures import Disk
from ..superblocks import (
    EXT_CHECKSUM_CRC32C,
    EXT_COMPAT_HAS_JOURNAL,
    EXT_COMPAT_SPARSE_SUPER2,
    EXT_INCOMPAT_COMPRESSION,
    EXT_INCOMPAT_CSUM_SEED,
    EXT_INCOMPAT_DIRDATA,
    EXT_INCOMPAT_FILETYPE,
    EXT_INCOMPAT_JOURNAL_DEV,
    EXT_INCOMPAT_LARGEDIR,
    EXT_INCOMPAT_META_BG,
    EXT_INCOMPAT_RECOVER,
    EXT_RO_COMPAT_BIGALLOC,
    EXT_RO_COMPAT_GDT_CSUM,
    EXT_RO_COMPAT_METADATA_CSUM,
    EXT_RO_COMPAT_ORPHAN_PRESENT,
    EXT_RO_COMPAT_SPARSE_SUPER,
    EXT_STATE_ERROR,
    EXT_STATE_VALID,
    EXT_SUPERBLOCK_CHECKSUM_OFFSET,
    EXT_SUPERBLOCK_OFFSET,
    EXT_SUPERBLOCK_SIZE,
    ExtSuperblock,
    parse_ext_superblock,
)
from .base import MAX_DIRECTORY_ENTRIES, DirEntry, FileType, GuestFileSystem, NotSparsifiable, Stat, join_adjacent

ROOT_INODE = 2

# i_flags
FLAG_EXTENTS = 0x80000
FLAG_INLINE_DATA = 0x10000000
#: i_flags bits reported in Stat.flags
FLAG_NAMES = {
    0x4: "compressed", 0x8: "sync", 0x10: "immutable", 0x20: "append", 0x40: "nodump", 0x80: "noatime",
    0x800: "encrypted", 0x100000: "verity", 0x40000000: "casefold",
}

# i_mode file types
S_IFMT = 0xF000
MODE_TYPES = {0x8000: FileType.FILE, 0x4000: FileType.DIRECTORY, 0xA000: FileType.SYMLINK,
              0x1000: FileType.OTHER, 0x2000: FileType.OTHER, 0x6000: FileType.OTHER, 0xC000: FileType.OTHER}
# directory record file types (with the filetype feature)
DIRENT_TYPES = {1: FileType.FILE, 2: FileType.DIRECTORY, 3: FileType.OTHER, 4: FileType.OTHER,
                5: FileType.OTHER, 6: FileType.OTHER, 7: FileType.SYMLINK}

EXTENT_MAGIC = 0xF30A
#: the kernel refuses extent trees deeper than this
MAX_EXTENT_DEPTH = 5
#: an uninitialized extent stores its length plus this (it reads as zeros)
UNINIT_EXTENT = 32768
#: i_block: 12 direct block numbers, then the single, double and triple indirect blocks
DIRECT_BLOCKS = 12
I_BLOCK_SIZE = 60

#: bg_flags: the group's block bitmap was never written (free but for the group's own metadata)
BG_BLOCK_UNINIT = 0x2
#: where bg_checksum lies in a group descriptor (its checksums leave it out)
DESCRIPTOR_CHECKSUM_OFFSET = 0x1E
#: descriptors this long have their fields' high halves (from byte 0x20)
DESC_64BIT_SIZE = 64
#: descriptors this long hold the high half of the block bitmap's checksum (bytes 0x38-0x39)
BLOCK_BITMAP_CSUM_HI_END = 0x3A
#: the journal superblock (jbd2, big-endian): its magic, and where s_start (0: nothing to replay) lies
JOURNAL_MAGIC = 0xC03B3998
JOURNAL_START_OFFSET = 28
#: group bitmaps kept while free space is checked (with flex_bg, the groups holding the tables)
CACHED_BITMAPS = 64

XATTR_MAGIC = 0xEA020000
XATTR_INDEX_SYSTEM = 7

#: caps: a directory's bytes, the metadata blocks and directory name maps kept in memory
MAX_DIRECTORY_BYTES = 256 << 20
CACHE_BYTES = 4 << 20
MAX_CACHED_NAMES = 1 << 18
CACHED_INODES = 4096


def _corrupt(message: str, offset: int | None, structure: str) -> CorruptImage:
    return CorruptImage(message, offset=offset, structure=structure)


def check_superblock(sb: ExtSuperblock, where: int = EXT_SUPERBLOCK_OFFSET) -> int:
    """The block size of the superblock (found at ``where`` on the disk), its values checked against
    each other: CorruptImage where they do not add up."""
    block_size = sb.block_size
    if block_size is None:
        raise _corrupt(f"block size 2^{10 + sb.log_block_size} out of range", where, "ext superblock")
    inode_size, desc_size = sb.inode_size, sb.desc_size
    if inode_size < 128 or inode_size > block_size or inode_size & (inode_size - 1):
        raise _corrupt(f"inode size {inode_size} invalid", where, "ext superblock")
    if desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1):
        raise _corrupt(f"group descriptor size {desc_size} invalid", where, "ext superblock")
    if not sb.blocks_per_group or not sb.inodes_per_group or sb.inodes_per_group > block_size * 8:
        raise _corrupt("blocks or inodes per group invalid", where, "ext superblock")
    if sb.first_data_block >= sb.blocks_count or sb.first_data_block > 1:
        raise _corrupt(f"first data block {sb.first_data_block} invalid", where, "ext superblock")
    if sb.inodes_count > sb.group_count * sb.inodes_per_group or sb.inodes_count < ROOT_INODE:
        raise _corrupt(f"inode count {sb.inodes_count} does not fit the groups", where, "ext superblock")
    return block_size


@dataclass(frozen=True)
class Inode:
    """One inode's fields; ``xattrs`` is the in-inode extended attribute area (after i_extra_isize)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    links: int
    flags: int
    i_block: bytes
    xattrs: bytes
    #: where the inode lies on the disk (for error messages)
    position: int

    @property
    def type(self) -> FileType | None:
        return MODE_TYPES.get(self.mode & S_IFMT)


def parse_inode(raw: bytes, large_dir: bool, where: int) -> Inode:
    """An inode record (``s_inode_size`` bytes). Sizes above 4 GiB use i_size_high for files (and
    for directories with large_dir); uid and gid have 16-bit high halves in osd2."""
    mode, uid_lo, size_lo, _, _, mtime, _, gid_lo, links, _, flags = struct.unpack_from("<HHIIIIIHHII", raw, 0)
    size_high = int.from_bytes(raw[0x6C:0x70], "little")
    uid_hi, gid_hi = struct.unpack_from("<HH", raw, 0x78)
    size = size_lo
    if mode & S_IFMT == 0x8000 or large_dir:
        size |= size_high << 32
    seconds = float(mtime - (1 << 32) if mtime & 0x80000000 else mtime)
    xattrs = b""
    if len(raw) > 128:
        extra_isize = int.from_bytes(raw[0x80:0x82], "little")
        if extra_isize % 4 or 128 + extra_isize > len(raw):
            raise _corrupt(f"i_extra_isize {extra_isize} invalid", where, "ext inode")
        if extra_isize >= 12:  # i_mtime_extra: 2 epoch bits, then nanoseconds
            extra = int.from_bytes(raw[0x88:0x8C], "little")
            seconds += ((extra & 3) << 32) + (extra >> 2) / 1e9
        xattrs = raw[128 + extra_isize :]
    return Inode(mode=mode, uid=uid_lo | uid_hi << 16, gid=gid_lo | gid_hi << 16, size=size, mtime=seconds,
                 links=links, flags=flags, i_block=raw[0x28:0x64], xattrs=xattrs, position=where)


def inline_data_attribute(area: bytes, where: int) -> bytes:
    """The value of "system.data" in an in-inode xattr area (magic, then entries of name length,
    name index, value offset from the first entry, value inode, value size, hash, name; the list
    ends at four zero bytes), or b"" when there is none."""
    if len(area) < 4 or int.from_bytes(area[:4], "little") != XATTR_MAGIC:
        return b""
    entries = area[4:]
    position = 0
    while position + 4 <= len(entries) and entries[position : position + 4] != b"\0\0\0\0":
        if position + 16 > len(entries):
            raise _corrupt("extended attribute entry runs past the inode", where, "ext xattr")
        name_len, name_index, value_offset, value_inode, value_size = struct.unpack_from("<BBHII", entries, position)
        name = entries[position + 16 : position + 16 + name_len]
        if len(name) != name_len:
            raise _corrupt("extended attribute name runs past the inode", where, "ext xattr")
        if name_index == XATTR_INDEX_SYSTEM and name == b"data":
            if value_inode:
                raise _corrupt("inline data stored in an xattr inode", where, "ext xattr")
            if value_offset + value_size > len(entries):
                raise _corrupt("inline data runs past the inode", where, "ext xattr")
            return entries[value_offset : value_offset + value_size]
        position += (16 + name_len + 3) & ~3
    return b""


def parse_extent_node(node: bytes, where: int) -> tuple[int, list[tuple[int, int, int]]]:
    """An extent tree node: (depth, entries). The 12-byte header (magic, entries, max, depth,
    generation) is followed by 12-byte entries: in a leaf (depth 0) first logical block, length and
    48-bit start as (logical, length, start), a length above 32768 marking an uninitialized extent
    (returned negative); in an index, first logical block and the 48-bit child block as (logical, 0,
    child)."""
    magic, count, maximum, depth = struct.unpack_from("<4H", node, 0)
    if magic != EXTENT_MAGIC:
        raise _corrupt(f"extent header magic 0x{magic:04x}", where, "ext extent tree")
    if depth > MAX_EXTENT_DEPTH:
        raise _corrupt(f"extent tree depth {depth}", where, "ext extent tree")
    if count > maximum or 12 + 12 * maximum > len(node):
        raise _corrupt(f"extent node claims {count} of {maximum} entries", where, "ext extent tree")
    entries = []
    previous = -1
    for position in range(12, 12 + 12 * count, 12):
        if depth:
            logical, child_lo, child_hi = struct.unpack_from("<IIH", node, position)
            entry = (logical, 0, child_hi << 32 | child_lo)
            end = logical
        else:
            logical, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, position)
            if length > UNINIT_EXTENT:
                length = -(length - UNINIT_EXTENT)
            entry = (logical, length, start_hi << 32 | start_lo)
            end = logical + abs(length) - 1
        if logical <= previous or (not depth and not length):
            raise _corrupt("extents out of order or empty", where + position, "ext extent tree")
        previous = end
        entries.append(entry)
    return depth, entries


def parse_dirents(block: bytes, filetype: bool, where: int) -> Iterator[tuple[int, bytes, int]]:
    """The records of one directory block (or inline area): (inode, name, file type); inode 0 marks
    an unused record (a deleted name, an htree index block, the checksum tail), skipped here."""
    position = 0
    size = len(block)
    while position < size:
        if position + 8 > size:
            raise _corrupt("directory record header runs past the block", where + position, "ext directory")
        inode, rec_len, name_len, file_type = struct.unpack_from("<IHBB", block, position)
        if rec_len in (0, 65535) and size == 65536:  # how 64 KiB blocks store a rec_len of 65536
            rec_len = 65536
        if not filetype:
            name_len |= file_type << 8
            file_type = 0
        if rec_len < 8 or rec_len % 4 or position + rec_len > size or 8 + name_len > rec_len:
            raise _corrupt(f"directory record of rec_len {rec_len}, name_len {name_len} invalid",
                           where + position, "ext directory")
        if inode:
            yield inode, block[position + 8 : position + 8 + name_len], file_type
        position += rec_len


def _has_superblock_backup(sb: ExtSuperblock, group: int) -> bool:
    """Whether ``group`` starts with a superblock copy: every group, or with sparse_super groups 0, 1
    and the powers of 3, 5 and 7, or with sparse_super2 the two groups the superblock names."""
    if group == 0:
        return True
    if sb.feature_compat & EXT_COMPAT_SPARSE_SUPER2:
        return group in sb.backup_bgs
    if group == 1 or not sb.feature_ro_compat & EXT_RO_COMPAT_SPARSE_SUPER:
        return True
    if not group & 1:
        return False
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


@dataclass(frozen=True)
class GroupDescriptor:
    """The fields of a block group descriptor that free space needs (block numbers with their high
    halves where the descriptor has them)."""

    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks: int
    flags: int
    #: the block bitmap's checksum (its low 16 bits only in descriptors shorter than BLOCK_BITMAP_CSUM_HI_END)
    block_bitmap_csum: int
    checksum: int


def parse_group_descriptor(raw: bytes) -> GroupDescriptor:
    """A group descriptor of ``s_desc_size`` bytes: 32 (the fields' low halves) or 64 and more with
    the 64bit feature (their high halves from byte 0x20)."""
    (block_bitmap, inode_bitmap, inode_table, free_blocks, _free_inodes, _dirs, flags, _exclude, csum_lo, _,
     _unused, checksum) = struct.unpack_from("<3I4HI4H", raw, 0)
    csum = csum_lo
    if len(raw) >= DESC_64BIT_SIZE:
        bitmap_hi, inode_bitmap_hi, table_hi, free_hi = struct.unpack_from("<3IH", raw, 0x20)
        block_bitmap |= bitmap_hi << 32
        inode_bitmap |= inode_bitmap_hi << 32
        inode_table |= table_hi << 32
        free_blocks |= free_hi << 16
    if len(raw) >= BLOCK_BITMAP_CSUM_HI_END:
        csum |= int.from_bytes(raw[0x38:0x3A], "little") << 16
    return GroupDescriptor(block_bitmap=block_bitmap, inode_bitmap=inode_bitmap, inode_table=inode_table,
                           free_blocks=free_blocks, flags=flags, block_bitmap_csum=csum, checksum=checksum)


def ext4_crc32c(seed: int, data: bytes) -> int:
    """The kernel's ext4_chksum: CRC32C from ``seed`` with neither the initial nor the final
    inversion (fastcrc's ``initial`` is a previous, inverted result)."""
    return ~crc32.iscsi(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


def descriptor_checksum(sb: ExtSuperblock, csum_seed: int, group: int, raw: bytes) -> int:
    """What ``bg_checksum`` of ``group`` must hold: with metadata_csum the low half of the CRC32C
    of the group number and the descriptor (its checksum zeroed), else (uninit_bg) the CRC16 of
    the UUID, the group number and the descriptor without its checksum field."""
    number = group.to_bytes(4, "little")
    end = DESCRIPTOR_CHECKSUM_OFFSET
    if sb.feature_ro_compat & EXT_RO_COMPAT_METADATA_CSUM:
        return ext4_crc32c(csum_seed, number + raw[:end] + b"\0\0" + raw[end + 2 :]) & 0xFFFF
    crc = crc16.modbus(number, crc16.modbus(sb.uuid))
    crc = crc16.modbus(raw[:end], crc)
    if sb.is_64bit and len(raw) > end + 2:
        crc = crc16.modbus(raw[end + 2 :], crc)
    return crc


#: for each byte of a bitmap, the runs of clear bits in it as (first bit, end bit)
_CLEAR_RUNS = tuple(
    tuple((start, end) for start, end in
          ((m.start(), m.end()) for m in re.finditer("0+", format(value, "08b")[::-1])))
    for value in range(256)
)
#: a bitmap as tokens: runs of all-clear bytes, and single bytes with some bits clear (all-set bytes skipped)
_BITMAP_TOKENS = re.compile(rb"\x00+|[\x01-\xfe]")


def clear_runs(bitmap: bytes, count: int) -> Iterator[tuple[int, int]]:
    """The runs of clear bits among the first ``count`` bits of ``bitmap`` (bit i is bit i % 8 of
    byte i // 8, as ext2/3/4 bitmaps store them) as (first bit, number of bits), in order."""
    start = end = -1
    for match in _BITMAP_TOKENS.finditer(bitmap, 0, -(-count // 8)):
        base = match.start() * 8
        value = match.group()[0]
        runs = ((0, (match.end() - match.start()) * 8),) if value == 0 else _CLEAR_RUNS[value]
        for first, last in runs:
            if base + first == end:
                end = base + last
                continue
            if min(end, count) > start >= 0:
                yield start, min(end, count) - start
            start, end = base + first, base + last
    if min(end, count) > start >= 0:
        yield start, min(end, count) - start


def set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set bits [first, first + count) of ``bitmap``."""
    end = first + count
    while first < end and first % 8:
        bitmap[first // 8] |= 1 << first % 8
        first += 1
    whole = (end - first) // 8
    bitmap[first // 8 : first // 8 + whole] = b"\xff" * whole
    first += whole * 8
    while first < end:
        bitmap[first // 8] |= 1 << first % 8
        first += 1


def bits_set(bitmap: bytes, first: int, count: int) -> bool:
    """Whether bits [first, first + count) of ``bitmap`` are all set."""
    low, high = first // 8, -(-(first + count) // 8)
    value = int.from_bytes(bitmap[low:high], "little") >> (first - low * 8)
    mask = (1 << count) - 1
    return value & mask == mask


def clear_bit_count(bitmap: bytes, count: int) -> int:
    """How many of the first ``count`` bits of ``bitmap`` are clear."""
    value = int.from_bytes(bitmap[: -(-count // 8)], "little") & ((1 << count) - 1)
    return count - value.bit_count()


def group_base_metadata(sb: ExtSuperblock, block_size: int, group: int) -> int:
    """How many blocks at the start of ``group`` hold the superblock copy and the group descriptors,
    as the kernel's ext4_num_base_meta_blocks counts them (an uninitialised block bitmap has these
    set): a superblock backup, then the descriptor table and its reserved blocks for growth; with
    meta_bg, past ``s_first_meta_bg``, a descriptor block in the first, second and last group of
    each run of descriptors-per-block groups."""
    per_block = block_size // sb.desc_size
    has_super = _has_superblock_backup(sb, group)
    meta_bg = bool(sb.feature_incompat & EXT_INCOMPAT_META_BG)
    if not meta_bg or group < sb.first_meta_bg * per_block:
        if not has_super:
            return 0
        table = sb.first_meta_bg if meta_bg else -(-sb.group_count // per_block)
        return 1 + table + sb.reserved_gdt_blocks
    return has_super + (group % per_block in (0, 1, per_block - 1))


class ExtFileSystem(GuestFileSystem[int]):
    """An ext2/3/4 file system occupying ``length`` bytes at ``offset`` of ``disk``; nodes are inode numbers."""

    root = ROOT_INODE

    def __init__(self, disk: Disk, offset: int, length: int) -> None:
        self._disk = disk
        self._offset = offset
        where = offset + EXT_SUPERBLOCK_OFFSET
        raw = disk.read_at(where, EXT_SUPERBLOCK_SIZE)
        sb = parse_ext_superblock(raw)
        if sb is None or len(raw) < EXT_SUPERBLOCK_SIZE:
            raise _corrupt("no ext superblock", where, "ext superblock")
        block_size = check_superblock(sb, where)
        unsupported = sb.feature_incompat & (EXT_INCOMPAT_COMPRESSION | EXT_INCOMPAT_JOURNAL_DEV | EXT_INCOMPAT_DIRDATA)
        if unsupported:
            raise UnsupportedFormat(f"ext incompatible features 0x{unsupported:x} are not read", format="ext")
        if sb.blocks_count * block_size > length:
            raise _corrupt(f"file system of {sb.blocks_count} blocks larger than its {length}-byte volume",
                           where, "ext superblock")
        self.type = sb.kind
        self.sb = sb
        self._block_size = block_size
        self._filetype = bool(sb.feature_incompat & EXT_INCOMPAT_FILETYPE)
        self._large_dir = bool(sb.feature_incompat & EXT_INCOMPAT_LARGEDIR)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._blocks_limit = max(16, CACHE_BYTES // block_size)
        self._inodes: OrderedDict[int, Inode] = OrderedDict()
        self._names: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._names_count = 0
        self._metadata_csum = bool(sb.feature_ro_compat & EXT_RO_COMPAT_METADATA_CSUM)
        #: whether descriptors carry checksums, and so may flag a group BLOCK_UNINIT
        self._group_csum = self._metadata_csum or bool(sb.feature_ro_compat & EXT_RO_COMPAT_GDT_CSUM)
        #: what metadata_csum's checksums start from
        self._csum_seed = sb.checksum_seed if sb.feature_incompat & EXT_INCOMPAT_CSUM_SEED else \
            ext4_crc32c(0xFFFFFFFF, sb.uuid)
        #: group -> (descriptor, block bitmap), while free space is read
        self._bitmaps: OrderedDict[int, tuple[GroupDescriptor, bytes]] = OrderedDict()
        if not self._stat(ROOT_INODE).is_dir:
            raise _corrupt("the root inode is not a directory", self._inode(ROOT_INODE).position, "ext inode")

    # -- blocks ----------------------------------------------------------------------------------

    def _read_blocks(self, block: int, count: int, structure: str) -> bytes:
        """``count`` blocks from ``block``, refused when they run past the file system."""
        if block < 0 or count < 0 or block + count > self.sb.blocks_count or (count and block == 0):
            raise _corrupt(f"blocks {block}+{count} outside the file system of {self.sb.blocks_count}",
                           self._offset + block * self._block_size, structure)
        where = self._offset + block * self._block_size
        data = self._disk.read_at(where, count * self._block_size)
        if len(data) != count * self._block_size:
            raise _corrupt("file system truncated", where, structure)
        return data

    def _metadata_block(self, block: int, structure: str) -> bytes:
        """One block of metadata (descriptors, inode table, extent and indirect blocks), cached."""
        data = self._blocks.get(block)
        if data is None:
            data = self._read_blocks(block, 1, structure)
            self._blocks[block] = data
            if len(self._blocks) > self._blocks_limit:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        return data

    # -- free space ----------------------------------------------------------------------------------

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The blocks the block bitmaps mark free (an uninitialised bitmap computed as the kernel
        does), once the file system is known clean and its maps agree: the superblock's,
        descriptors' and bitmaps' checksums (metadata_csum, uninit_bg), each group's free count
        against its descriptor, and each group's superblock copy, descriptors, bitmaps and inode
        table marked used in the bitmap of the group where they lie. Every group is checked before
        this returns; the ranges are then read group by group."""
        self._check_clean()
        self._check_geometry()
        for group in range(self.sb.group_count):
            self._check_group(group)
        return join_adjacent(self._free_blocks())

    def _check_clean(self) -> None:
        """NotSparsifiable unless the file system was cleanly unmounted and has nothing to replay or release."""
        sb = self.sb
        if sb.feature_incompat & EXT_INCOMPAT_RECOVER:
            raise NotSparsifiable("the journal needs recovery (needs_recovery is set): the bitmaps lack its changes")
        if sb.state & EXT_STATE_ERROR:
            raise NotSparsifiable("the file system is marked as having errors (run e2fsck)")
        if not sb.state & EXT_STATE_VALID:
            raise NotSparsifiable("the file system was not cleanly unmounted (its state is not clean)")
        if sb.last_orphan:
            raise NotSparsifiable(f"inode {sb.last_orphan} heads the orphan list: inodes await release")
        if sb.feature_ro_compat & EXT_RO_COMPAT_ORPHAN_PRESENT:
            raise NotSparsifiable("the orphan file lists inodes that await release")
        if sb.feature_ro_compat & EXT_RO_COMPAT_BIGALLOC:
            raise NotSparsifiable("bigalloc file systems (bitmaps of clusters) are not read")
        if sb.feature_compat & EXT_COMPAT_HAS_JOURNAL and sb.journal_inum and self._journal_start():
            raise NotSparsifiable("the journal holds transactions not yet written in place")

    def _journal_start(self) -> int:
        """s_start of the journal's superblock (the first block of the journal inode): 0 when the
        journal holds nothing to replay."""
        inode = self._inode(self.sb.journal_inum)
        first = next(self._runs(inode, 0, 1), None)
        if inode.type is not FileType.FILE or inode.flags & FLAG_INLINE_DATA or first is None or first[2] is None:
            raise _corrupt(f"journal inode {self.sb.journal_inum} has no first block", inode.position, "ext journal")
        block = self._read_blocks(first[2], 1, "ext journal")
        magic, start = struct.unpack_from(">I", block)[0], struct.unpack_from(">I", block, JOURNAL_START_OFFSET)[0]
        if magic != JOURNAL_MAGIC:
            raise _corrupt(f"journal superblock magic 0x{magic:08x}", self._offset + first[2] * self._block_size,
                           "ext journal")
        return int(start)

    def _check_geometry(self) -> None:
        """Refuse values the bitmaps' layout depends on that the kernel would refuse, and a
        superblock whose checksum (metadata_csum) is wrong."""
        sb, bs = self.sb, self._block_size
        where = self._offset + EXT_SUPERBLOCK_OFFSET
        raw = self._disk.read_at(where, EXT_SUPERBLOCK_SIZE)
        if self._metadata_csum:
            if sb.checksum_type != EXT_CHECKSUM_CRC32C:
                raise _corrupt(f"checksum type {sb.checksum_type}", where, "ext superblock")
            stored = int.from_bytes(raw[EXT_SUPERBLOCK_CHECKSUM_OFFSET:][:4], "little")
            computed = ext4_crc32c(0xFFFFFFFF, raw[:EXT_SUPERBLOCK_CHECKSUM_OFFSET])
            if len(raw) != EXT_SUPERBLOCK_SIZE or stored != computed:
                raise _corrupt("superblock checksum does not match", where, "ext superblock")
        if sb.blocks_per_group > bs * 8:
            raise _corrupt(f"{sb.blocks_per_group} blocks per group do not fit a bitmap block", where, "ext superblock")
        if sb.first_data_block != (bs == 1024):
            raise _corrupt(f"first data block {sb.first_data_block} with {bs}-byte blocks", where, "ext superblock")
        if sb.reserved_gdt_blocks > bs // 4:
            raise _corrupt(f"{sb.reserved_gdt_blocks} reserved descriptor blocks", where, "ext superblock")
        if sb.feature_incompat & EXT_INCOMPAT_META_BG and \
                sb.first_meta_bg > -(-sb.group_count // (bs // sb.desc_size)):
            raise _corrupt(f"first meta block group {sb.first_meta_bg} past the descriptors", where, "ext superblock")

    def _group_span(self, group: int) -> tuple[int, int]:
        """The first block of ``group`` and how many blocks it has (the last group may have fewer)."""
        sb = self.sb
        first = sb.first_data_block + group * sb.blocks_per_group
        return first, min(sb.blocks_per_group, sb.blocks_count - first)

    def _uninitialised(self, descriptor: GroupDescriptor) -> bool:
        return self._group_csum and bool(descriptor.flags & BG_BLOCK_UNINIT)

    def _group_metadata(self, descriptor: GroupDescriptor) -> tuple[tuple[int, int, str], ...]:
        """A group's block bitmap, inode bitmap and inode table as (first block, blocks, name)."""
        table_blocks = -(-self.sb.inodes_per_group * self.sb.inode_size // self._block_size)
        return ((descriptor.block_bitmap, 1, "block bitmap"), (descriptor.inode_bitmap, 1, "inode bitmap"),
                (descriptor.inode_table, table_blocks, "inode table"))

    def _group_bitmap(self, group: int) -> tuple[GroupDescriptor, bytes]:
        """``group``'s descriptor (its checksum checked) and block bitmap: read and its checksum
        checked, or for an uninitialised one computed as the kernel does (the superblock copy and
        descriptors, and those of the group's bitmaps and inode table that lie in it, in use)."""
        cached = self._bitmaps.get(group)
        if cached is not None:
            self._bitmaps.move_to_end(group)
            return cached
        sb, bs = self.sb, self._block_size
        raw = self._descriptor(group)
        descriptor = parse_group_descriptor(raw)
        block, within = self._descriptor_position(group)
        where = self._offset + block * bs + within
        if self._group_csum and descriptor.checksum != descriptor_checksum(sb, self._csum_seed, group, raw):
            raise _corrupt(f"group {group}'s descriptor checksum does not match", where, "ext group descriptor")
        first, count = self._group_span(group)
        if self._uninitialised(descriptor):
            base = group_base_metadata(sb, bs, group)
            if base > count:
                raise _corrupt(f"group {group} of {count} blocks cannot hold its {base} descriptor blocks", where,
                               "ext group descriptor")
            computed = bytearray(bs)
            set_bits(computed, 0, base)
            for start, length, _ in self._group_metadata(descriptor):
                low, high = max(start, first), min(start + length, first + count)
                if low < high:
                    set_bits(computed, low - first, high - low)
            bitmap = bytes(computed)
        else:
            if not max(1, sb.first_data_block) <= descriptor.block_bitmap < sb.blocks_count:
                raise _corrupt(f"group {group}'s block bitmap at block {descriptor.block_bitmap}", where,
                               "ext group descriptor")
            bitmap = self._read_blocks(descriptor.block_bitmap, 1, "ext block bitmap")
            if self._metadata_csum:
                expected = ext4_crc32c(self._csum_seed, bitmap[: sb.blocks_per_group // 8])
                if sb.desc_size < BLOCK_BITMAP_CSUM_HI_END:
                    expected &= 0xFFFF
                if descriptor.block_bitmap_csum != expected:
                    raise _corrupt(f"group {group}'s block bitmap checksum does not match",
                                   self._offset + descriptor.block_bitmap * bs, "ext block bitmap")
        self._bitmaps[group] = descriptor, bitmap
        if len(self._bitmaps) > CACHED_BITMAPS:
            self._bitmaps.popitem(last=False)
        return descriptor, bitmap

    def _check_group(self, group: int) -> None:
        """NotSparsifiable unless ``group``'s bitmap counts the free blocks its descriptor does and
        marks its superblock copy and descriptors used, and its bitmaps and inode table are marked
        used in the bitmap of each group they lie in (with flex_bg, often another group, which must
        then have a bitmap of its own)."""
        sb = self.sb
        descriptor, bitmap = self._group_bitmap(group)
        count = self._group_span(group)[1]
        free = clear_bit_count(bitmap, count)
        if free != descriptor.free_blocks:
            raise NotSparsifiable(f"group {group}'s bitmap has {free} free blocks, its descriptor counts "
                                  f"{descriptor.free_blocks}")
        base = group_base_metadata(sb, self._block_size, group)
        if base > count or not bits_set(bitmap, 0, base):
            raise NotSparsifiable(f"group {group}'s bitmap does not mark its superblock copy and descriptors used")
        for start, length, name in self._group_metadata(descriptor):
            if start < max(1, sb.first_data_block) or start + length > sb.blocks_count:
                raise _corrupt(f"group {group}'s {name} at blocks {start}+{length} outside the file system", None,
                               "ext group descriptor")
            position = start
            while position < start + length:
                host = (position - sb.first_data_block) // sb.blocks_per_group
                host_first, host_count = self._group_span(host)
                take = min(start + length, host_first + host_count) - position
                host_descriptor, host_bitmap = self._group_bitmap(host)
                if host != group and self._uninitialised(host_descriptor):
                    raise NotSparsifiable(f"group {group}'s {name} lies in group {host}, whose bitmap is uninitialised")
                if not bits_set(host_bitmap, position - host_first, take):
                    raise NotSparsifiable(f"group {group}'s {name} (blocks {start}+{length}) is not marked used in "
                                          f"group {host}'s bitmap")
                position += take

    def _free_blocks(self) -> Iterator[tuple[int, int]]:
        """The free blocks of each group in turn, as byte ranges of the volume."""
        bs = self._block_size
        for group in range(self.sb.group_count):
            first, count = self._group_span(group)
            for bit, length in clear_runs(self._group_bitmap(group)[1], count):
                yield (first + bit) * bs, length * bs

    # -- inodes ----------------------------------------------------------------------------------

    def _descriptor_position(self, group: int) -> tuple[int, int]:
        """The block holding ``group``'s descriptor and the descriptor's byte offset in it: in the
        table after the superblock, or with meta_bg (from group ``s_first_meta_bg *
        descriptors-per-block`` on) in the first group of its run of groups."""
        sb = self.sb
        per_block = self._block_size // sb.desc_size
        table_block, slot = divmod(group, per_block)
        if sb.feature_incompat & EXT_INCOMPAT_META_BG and table_block >= sb.first_meta_bg:
            first_group = table_block * per_block
            block = sb.first_data_block + first_group * sb.blocks_per_group
            block += _has_superblock_backup(sb, first_group)
            if self._block_size == 1024 and table_block == 0 and sb.first_data_block == 0:
                block += 1
        else:
            block = EXT_SUPERBLOCK_OFFSET // self._block_size + 1 + table_block
        return block, slot * sb.desc_size

    def _descriptor(self, group: int) -> bytes:
        """The raw group descriptor of ``group``."""
        block, within = self._descriptor_position(group)
        return self._metadata_block(block, "ext group descriptor")[within : within + self.sb.desc_size]

    def _inode_table(self, group: int) -> int:
        """The first block of ``group``'s inode table, from its group descriptor."""
        return parse_group_descriptor(self._descriptor(group)).inode_table

    def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is not None:
            self._inodes.move_to_end(ino)
            return inode
        sb = self.sb
        if not 1 <= ino <= sb.inodes_count:
            raise _corrupt(f"inode number {ino} out of range", None, "ext inode")
        group, index = divmod(ino - 1, sb.inodes_per_group)
        position = self._inode_table(group) * self._block_size + index * sb.inode_size
        block, within = divmod(position, self._block_size)
        raw = self._metadata_block(block, "ext inode table")[within : within + sb.inode_size]
        inode = parse_inode(raw, self._large_dir, self._offset + position)
        self._inodes[ino] = inode
        if len(self._inodes) > CACHED_INODES:
            self._inodes.popitem(last=False)
        return inode

    def _stat(self, node: int) -> Stat:
        inode = self._inode(node)
        kind = inode.type
        if kind is None:
            raise _corrupt(f"inode {node} has no file type (mode 0o{inode.mode:o})", inode.position, "ext inode")
        flags = frozenset(name for bit, name in FLAG_NAMES.items() if inode.flags & bit)
        return Stat(type=kind, size=inode.size, node=node, mode=inode.mode & 0o7777, uid=inode.uid, gid=inode.gid,
                    mtime=inode.mtime, nlink=inode.links, flags=flags)

    # -- block mapping ---------------------------------------------------------------------------

    def _runs(self, inode: Inode, first: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """The mapped pieces of logical blocks [first, end) as (logical, count, physical), in order;
        physical None for an uninitialized extent. Blocks not covered are holes."""
        if inode.flags & FLAG_EXTENTS:
            yield from self._extent_runs(inode.i_block, None, first, end, inode.position)
        else:
            yield from self._block_map_runs(inode, first, end)

    def _extent_runs(self, node: bytes, expected_depth: int | None, first: int, end: int,
                     offset: int) -> Iterator[tuple[int, int, int | None]]:
        depth, entries = parse_extent_node(node, offset)
        if expected_depth is not None and depth != expected_depth:
            raise _corrupt(f"extent node of depth {depth} where {expected_depth} belongs", offset, "ext extent tree")
        if depth == 0:
            for logical, length, start in entries:
                count = abs(length)
                if logical + count <= first:
                    continue
                if logical >= end:
                    break
                if start + count > self.sb.blocks_count or start == 0:
                    raise _corrupt(f"extent of blocks {start}+{count} outside the file system", offset,
                                   "ext extent tree")
                skip = max(0, first - logical)
                take = min(count, end - logical) - skip
                yield logical + skip, take, (start + skip if length > 0 else None)
            return
        for index, (logical, _, child) in enumerate(entries):
            child_end = entries[index + 1][0] if index + 1 < len(entries) else 1 << 32
            if child_end <= first:
                continue
            if logical >= end:
                break
            data = self._metadata_block(child, "ext extent tree")
            yield from self._extent_runs(data, depth - 1, max(first, logical), min(end, child_end),
                                         self._offset + child * self._block_size)

    def _block_map_runs(self, inode: Inode, first: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        per_block = self._block_size // 4
        limit = DIRECT_BLOCKS + per_block + per_block**2 + per_block**3
        if end > limit:
            raise _corrupt(f"block {end - 1} beyond what a block map addresses", inode.position, "ext block map")
        run_start = run_physical = run_count = 0
        logical = first
        while logical < end:
            pointers, table_end = self._pointer_table(inode.i_block, per_block, logical)
            stop = min(end, table_end)
            if pointers is None:  # a hole through a whole indirect block
                pointers = (0,)
            for index, physical in enumerate(pointers[: stop - logical]):
                if run_count and physical == run_physical + run_count:
                    run_count += 1
                    continue
                if run_count:
                    yield run_start, run_count, run_physical
                    run_count = 0
                if physical:
                    run_start, run_physical, run_count = logical + index, physical, 1
            logical = stop
        if run_count:
            yield run_start, run_count, run_physical

    def _pointer_table(self, i_block: bytes, per_block: int, logical: int) -> tuple[tuple[int, ...] | None, int]:
        """The block numbers of a classic block map from ``logical`` to the end of the table holding
        it (i_block's direct blocks, or one indirect block), and the logical block where that table
        ends; None for the pointers where an indirect block on the way is a hole."""
        if logical < DIRECT_BLOCKS:
            return struct.unpack_from(f"<{DIRECT_BLOCKS - logical}I", i_block, logical * 4), DIRECT_BLOCKS
        base = DIRECT_BLOCKS
        for level in range(1, 4):
            span = per_block**level
            if logical < base + span:
                block = int.from_bytes(i_block[(DIRECT_BLOCKS + level - 1) * 4 :][:4], "little")
                offset = logical - base
                for shift in range(level - 1, 0, -1):
                    if block == 0:
                        subtree = per_block**shift
                        return None, logical - offset % subtree + subtree
                    table = self._metadata_block(block, "ext indirect block")
                    slot = offset // per_block**shift % per_block
                    block = int.from_bytes(table[slot * 4 : slot * 4 + 4], "little")
                slot = offset % per_block
                if block == 0:
                    return None, logical - slot + per_block
                table = self._metadata_block(block, "ext indirect block")
                return struct.unpack_from(f"<{per_block - slot}I", table, slot * 4), logical - slot + per_block
            base += span
        raise AssertionError("logical block checked against the block map's reach")

    # -- data ------------------------------------------------------------------------------------

    @staticmethod
    def _inline_data(inode: Inode) -> bytes:
        return inode.i_block + inline_data_attribute(inode.xattrs, inode.position)

    def _data(self, node: int, inode: Inode, offset: int, length: int) -> bytes:
        """``length`` bytes of the inode's data from ``offset`` (holes and uninitialized extents as zeros)."""
        length = max(0, min(length, READ_CHUNK, inode.size - offset))
        if not length:
            return b""
        if inode.flags & FLAG_INLINE_DATA:
            data = self._inline_data(inode)
            if len(data) < inode.size:
                raise _corrupt(f"inline data of inode {node} shorter than its size", inode.position, "ext inode")
            return data[offset : offset + length]
        bs = self._block_size
        first, end = offset // bs, -(-(offset + length) // bs)
        out = bytearray((end - first) * bs)
        for logical, count, physical in self._runs(inode, first, end):
            if physical is not None:
                at = (logical - first) * bs
                out[at : at + count * bs] = self._read_blocks(physical, count, "ext file data")
        skip = offset - first * bs
        return bytes(out[skip : skip + length])

    def _read(self, node: int, offset: int, length: int) -> bytes:
        return self._data(node, self._inode(node), offset, length)

    def _readlink(self, node: int) -> str:
        inode = self._inode(node)
        if inode.size > self._block_size:
            raise _corrupt(f"symbolic link of {inode.size} bytes", inode.position, "ext inode")
        if inode.size < I_BLOCK_SIZE and not inode.flags & FLAG_INLINE_DATA:
            target = inode.i_block[: inode.size]  # a fast symbolic link: the target in i_block
        else:
            target = self._data(node, inode, 0, inode.size)
        return target.decode("utf-8", errors="surrogateescape")

    # -- directories -----------------------------------------------------------------------------

    def _entries(self, node: int) -> Iterator[DirEntry[int]]:
        for name, ino, file_type in self._children(node):
            yield DirEntry(name, ino, DIRENT_TYPES.get(file_type))

    def _children(self, node: int) -> Iterator[tuple[str, int, int]]:
        """(name, inode, file type) of each name in directory ``node``, '.' and '..' left out."""
        inode = self._inode(node)
        if inode.type is not FileType.DIRECTORY:
            raise _corrupt(f"inode {node} is not a directory", inode.position, "ext directory")
        if inode.size > MAX_DIRECTORY_BYTES:
            raise _corrupt(f"directory of {inode.size} bytes", inode.position, "ext directory")
        for ino, name, file_type in self._records(inode):
            if name in (b".", b".."):
                continue
            if not 1 <= ino <= self.sb.inodes_count:
                raise _corrupt(f"directory entry for inode {ino}", inode.position, "ext directory")
            yield name.decode("utf-8", errors="surrogateescape"), ino, file_type

    def _records(self, inode: Inode) -> Iterator[tuple[int, bytes, int]]:
        if inode.flags & FLAG_INLINE_DATA:
            # i_block: the parent's inode number, then records; "system.data" holds more records
            data = self._inline_data(inode)
            yield from parse_dirents(data[4:I_BLOCK_SIZE], self._filetype, inode.position)
            if len(data) > I_BLOCK_SIZE:
                yield from parse_dirents(data[I_BLOCK_SIZE:], self._filetype, inode.position)
            return
        bs = self._block_size
        blocks = -(-inode.size // bs)
        for logical in range(0, blocks, READ_CHUNK // bs):
            for _, count, physical in self._runs(inode, logical, min(blocks, logical + READ_CHUNK // bs)):
                if physical is None:
                    continue
                data = self._read_blocks(physical, count, "ext directory")
                for index in range(count):
                    yield from parse_dirents(data[index * bs : (index + 1) * bs], self._filetype,
                                             self._offset + (physical + index) * bs)

    def _lookup(self, directory: int, name: str) -> int | None:
        """Names of recently searched directories are kept in a bounded map (large directories are
        looked up many times in a walk); a directory too large for it is scanned."""
        names = self._names.get(directory)
        if names is None:
            names = {}
            for count, (child, ino, _) in enumerate(self._children(directory)):
                if count >= MAX_DIRECTORY_ENTRIES:
                    raise _corrupt(f"directory inode {directory} has too many entries", None, "ext directory")
                names.setdefault(child, ino)
            if len(names) > MAX_CACHED_NAMES:
                return names.get(name)
            self._names[directory] = names
            self._names_count += len(names)
            while self._names_count > MAX_CACHED_NAMES:
                _, dropped = self._names.popitem(last=False)
                self._names_count -= len(dropped)
        else:
            self._names.move_to_end(directory)
        return names.get(name)
