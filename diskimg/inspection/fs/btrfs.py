"""btrfs, read-only: one device, single and DUP profiles, every subvolume.

On-disk layout (all integers little-endian):

* The *superblock* lies at 64 KiB of the device, with copies at 64 MiB and 256 GiB where the
  device reaches them; each is 4 KiB, checksummed over its bytes from 32 on. The primary is used
  when it is sound, else the sound copy of the highest generation.
* Everything else is addressed by *logical* addresses, mapped to the device by *chunks*: a chunk
  maps ``length`` bytes from a logical start to one stripe (single) or two identical stripes on
  the same device (DUP). The chunks holding the chunk tree are listed in the superblock's *system
  chunk array*; the chunk tree lists them all. RAID profiles and file systems of several devices
  are refused (:class:`~diskimg.errors.UnsupportedFormat`): one device does not hold their data.
* Metadata is a set of B-trees of *nodes* (``nodesize`` bytes, checksummed like the superblock):
  a 101-byte header (checksum, fsid, own logical address, flags, chunk tree uuid, generation,
  owner tree, item count, level), then for a *leaf* (level 0) items of a 17-byte key
  (objectid, type, offset), data offset and size, their data packed from the node's end; for an
  *internal node*, key pointers: key, child address, child generation. A child must carry the
  level below its parent's, the generation its parent records and, as its first key, the key
  its parent gives it; keys only grow along a walk, so a cycle cannot be walked.
* The *root tree* holds a ROOT_ITEM per tree (its root node, level, generation): the file trees
  are tree 5 (the top-level subvolume) and the subvolumes and snapshots (ids from 256);
  ROOT_REF/ROOT_BACKREF items link a subvolume to the directory of its parent that holds it.
  The directory item "default" of the root tree's directory (objectid 6) names the subvolume
  mounted when none is asked for (tree 5 when it is missing).
* A file tree holds, per inode number: INODE_ITEM (mode, size, links, times, flags), INODE_REF
  (name and parent directory), DIR_ITEM (entries by a CRC-32C hash of their name: lookups) and
  DIR_INDEX (entries in creation order: listings), EXTENT_DATA (file data by file offset:
  *inline* bytes in the leaf, or *regular*/*prealloc* extents pointing at a logical range of a
  data chunk, possibly compressed with zlib, LZO or zstd; a pointer to address 0 is a hole, as are
  the gaps between extents with the no-holes feature; prealloc extents read as zeros). A directory
  entry whose key is a ROOT_ITEM is a subvolume: it leads into that subvolume's tree, when the
  root tree links it there (a snapshot keeps entries of subvolumes nested in its source without
  that link: they show as empty directories, as the kernel shows them).

Free space (``unused_ranges``, for ``--sparsify``): the device ranges no chunk stripe covers (the
*device tree*'s DEV_EXTENT items must list exactly the chunks' stripes), and inside each data chunk
the logical ranges no EXTENT_ITEM of the *extent tree* covers, at each of the chunk's copies;
metadata and system chunks are kept whole, and so are the device's first MiB and the superblock
copies. A pending log tree refuses it.

Not read: the log tree (fsynced changes of a file system that was not cleanly unmounted: read as
the last commit left it), extended attributes, data checksums. Every node's checksum, header and
place in its tree are checked, every address is mapped through the chunks and checked against the
volume, and a broken structure raises :class:`~diskimg.errors.CorruptImage`.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import zstandard
from fastcrc import crc32

from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk
from ..superblocks import (
    BTRFS_INCOMPAT,
    BTRFS_SUPERBLOCK_OFFSETS,
    BTRFS_SUPERBLOCK_SIZE,
    BtrfsSuperblock,
    parse_btrfs_superblock,
)
from . import lzo
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

#: (objectid, type, offset): items sort by it
Key = tuple[int, int, int]
#: a file of this driver: (the id of the file tree holding it, its inode number)
BtrfsNode = tuple[int, int]

U64_MAX = (1 << 64) - 1

# tree and object ids
ROOT_TREE = 1
EXTENT_TREE = 2
CHUNK_TREE = 3
DEV_TREE = 4
FS_TREE = 5  # the top-level subvolume
ROOT_TREE_DIR = 6  # the root tree's directory, holding "default"
FIRST_FREE_OBJECTID = 256  # the first subvolume id, and a file tree's root directory inode
LAST_FREE_OBJECTID = (1 << 64) - 256
TREE_RELOC = (1 << 64) - 8  # relocation trees own file tree blocks during a balance
FIRST_CHUNK_TREE_OBJECTID = 256
#: the inode number the kernel gives the empty directory standing for a subvolume not linked here
EMPTY_SUBVOL_DIR = 2

# item types
INODE_ITEM = 1
INODE_REF = 12
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
ROOT_ITEM = 132
ROOT_BACKREF = 144
ROOT_REF = 156
EXTENT_ITEM = 168  # key (logical start, 168, length): an allocated extent of data or tree blocks
METADATA_ITEM = 169  # key (logical start, 169, level): a tree block (skinny metadata), one node long
DEV_EXTENT = 204  # key (device id, 204, device offset): a chunk stripe's place on the device
CHUNK_ITEM = 228

#: a B-tree is at most this many levels deep (levels 0 to 7)
MAX_LEVEL = 8
#: incompat features this reader cannot honour
UNSUPPORTED_INCOMPAT = {0x80: "RAID5/6", 0x800: "RAID1C3/RAID1C4", 0x1000: "zoned", 0x2000: "extent tree v2",
                        0x4000: "RAID stripe tree"}
KNOWN_INCOMPAT = sum(BTRFS_INCOMPAT)

# block group (chunk) types
BLOCK_GROUP_DATA, BLOCK_GROUP_SYSTEM, BLOCK_GROUP_METADATA = 0x1, 0x2, 0x4
BLOCK_GROUP_DUP = 0x20
#: the profiles that spread a chunk over devices (or parity): not read here
RAID_PROFILES = {0x8: "RAID0", 0x10: "RAID1", 0x40: "RAID10", 0x80: "RAID5", 0x100: "RAID6", 0x200: "RAID1C3",
                 0x400: "RAID1C4"}
#: a device's first MiB is never allocated to chunks (boot loaders, the superblock at 64 KiB)
DEVICE_RESERVED = 1 << 20
#: superblock flags: WRITTEN is always set, SEEDING marks a read-only seed device; the others say the
#: file system is in error or half way through a change, or is a metadata dump without data
SUPER_FLAG_WRITTEN = 1 << 0
SUPER_FLAG_SEEDING = 1 << 32
SUPER_FLAGS = {1 << 2: "error", 1 << 33: "metadump", 1 << 34: "metadump_v2", 1 << 35: "changing_fsid",
               1 << 36: "changing_fsid_v2"}
#: chunks kept in the map (a chunk holds at least 1 MiB in practice; this covers 256 TiB of 1 GiB chunks)
MAX_CHUNKS = 1 << 18

# checksum types
CSUM_CRC32C, CSUM_XXHASH, CSUM_SHA256, CSUM_BLAKE2 = 0, 1, 2, 3
CSUM_NAMES = {CSUM_CRC32C: "crc32c", CSUM_XXHASH: "xxhash64", CSUM_SHA256: "sha256", CSUM_BLAKE2: "blake2b"}
#: the checksum field's size (a checksum of a smaller type fills its start)
CSUM_FIELD = 32

# on-disk structures
#: tree node header: checksum, fsid, bytenr, flags, chunk tree uuid, generation, owner, nritems, level
NODE_HEADER = struct.Struct("<32s16sQQ16sQQIB")
#: a leaf's item: key (objectid, type, offset), data offset (from the header's end), data size
LEAF_ITEM = struct.Struct("<QBQII")
#: an internal node's pointer: key, child's logical address, child's generation
KEY_POINTER = struct.Struct("<QBQQQ")
#: chunk item: length, owner, stripe length, type, io_align, io_width, sector size, stripes, sub-stripes
CHUNK = struct.Struct("<QQQQIIIHH")
#: a chunk's stripe: device id, offset on the device, device uuid
STRIPE = struct.Struct("<QQ16s")
#: device extent: chunk tree, chunk objectid, chunk offset (its logical start), length, chunk tree uuid
DEV_EXTENT_ITEM = struct.Struct("<QQQQ16s")
#: the key heading each chunk of the system chunk array
DISK_KEY = struct.Struct("<QBQ")
#: inode item: generation, transid, size, nbytes, block group, nlink, uid, gid, mode, rdev, flags,
#: sequence, reserved, atime, ctime, mtime (seconds, nanoseconds), otime
INODE = struct.Struct("<QQQQQIIIIQQQ32s12s12sqI12s")
#: directory item: location key, transid, data length, name length, type; then the name and data
DIR_ITEM_HEADER = struct.Struct("<QBQQHHB")
#: file extent item: generation, ram_bytes, compression, encryption, other encoding, type
FILE_EXTENT = struct.Struct("<QQBBHB")
#: a regular or prealloc extent's pointer: disk_bytenr, disk_num_bytes, offset, num_bytes
FILE_EXTENT_DISK = struct.Struct("<QQQQ")
#: root item fields read here: inode (160 bytes), generation, root_dirid, bytenr, byte_limit,
#: bytes_used, last_snapshot, flags, refs, drop_progress key, drop_level, level
ROOT_ITEM_FIELDS = struct.Struct("<160sQQQQQQQI17sBB")
#: the root item's fields after ``generation_v2`` (valid when it equals ``generation``): uuid,
#: parent_uuid, received_uuid, ctransid, otransid, stransid, rtransid, ctime, otime
ROOT_ITEM_V2 = struct.Struct("<Q16s16s16sQQQQ12sqI")
ROOT_REF_HEADER = struct.Struct("<QQH")  # dirid, sequence, name length
INODE_REF_HEADER = struct.Struct("<QH")  # index, name length

ROOT_SUBVOL_RDONLY = 0x1

EXTENT_INLINE, EXTENT_REGULAR, EXTENT_PREALLOC = 0, 1, 2
COMPRESS_NONE, COMPRESS_ZLIB, COMPRESS_LZO, COMPRESS_ZSTD = 0, 1, 2, 3
COMPRESSION_NAMES = {COMPRESS_ZLIB: "zlib", COMPRESS_LZO: "lzo", COMPRESS_ZSTD: "zstd"}
#: a compressed extent holds at most this much data (BTRFS_MAX_UNCOMPRESSED), in as many bytes
MAX_COMPRESSED_EXTENT = 128 << 10
#: zstd frames of btrfs use windows of at most 2^17 bytes
ZSTD_MAX_WINDOW = 1 << 17
#: btrfs's LZO: a 4-byte total length, then per segment a 4-byte length and an lzo1x stream
#: of at most one sector's data; a segment's length never straddles a sector boundary
LZO_LENGTH = 4

S_IFMT = 0o170000
FILE_TYPES = {0o100000: FileType.FILE, 0o040000: FileType.DIRECTORY, 0o120000: FileType.SYMLINK}
OTHER_TYPES = (0o010000, 0o020000, 0o060000, 0o140000)  # fifo, char, block, socket
#: a directory item's type: 1 file, 2 directory, 3-6 devices, fifo, socket, 7 symlink (8: xattr)
DIR_ITEM_TYPES = {1: FileType.FILE, 2: FileType.DIRECTORY, 3: FileType.OTHER, 4: FileType.OTHER,
                  5: FileType.OTHER, 6: FileType.OTHER, 7: FileType.SYMLINK}
#: inode flags named in Stat.flags
INODE_FLAGS = {0x4: "readonly", 0x20: "sync", 0x40: "immutable", 0x80: "append", 0x100: "nodump",
               0x200: "noatime", 0x800: "compressed"}
#: a symbolic link's target is at most this long (PATH_MAX less its NUL)
MAX_SYMLINK = 4095
MAX_NAME = 255

#: metadata nodes kept in memory (bytes), parsed inodes, decompressed extents, root items
CACHE_BYTES = 8 << 20
CACHED_INODES = 1024
CACHED_EXTENTS = 16
CACHED_ROOTS = 256
#: subvolumes listed before the volume is taken as corrupt
MAX_SUBVOLUMES = 1 << 16
#: directories between a subvolume and its file tree's root
MAX_PATH_DEPTH = 2048


def _corrupt(message: str, offset: int | None, structure: str) -> CorruptImage:
    return CorruptImage(message, offset=offset, structure=structure)


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# -- checksums -----------------------------------------------------------------------------------------

XXH_PRIME1 = 0x9E3779B185EBCA87
XXH_PRIME2 = 0xC2B2AE3D27D4EB4F
XXH_PRIME3 = 0x165667B19E3779F9
XXH_PRIME4 = 0x85EBCA77C2B2AE63
XXH_PRIME5 = 0x27D4EB2F165667C5


def _rotl64(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & U64_MAX


def _xxh64_round(accumulator: int, lane: int) -> int:
    return _rotl64((accumulator + lane * XXH_PRIME2) & U64_MAX, 31) * XXH_PRIME1 & U64_MAX


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the algorithm of the xxHash specification; btrfs seeds it with 0)."""
    length = len(data)
    position = 0
    if length >= 32:
        lanes = [(seed + XXH_PRIME1 + XXH_PRIME2) & U64_MAX, (seed + XXH_PRIME2) & U64_MAX, seed,
                 (seed - XXH_PRIME1) & U64_MAX]
        stripes = length // 32
        for a, b, c, d in struct.iter_unpack("<4Q", data[: stripes * 32]):
            lanes = [_xxh64_round(lanes[0], a), _xxh64_round(lanes[1], b), _xxh64_round(lanes[2], c),
                     _xxh64_round(lanes[3], d)]
        position = stripes * 32
        accumulator = (_rotl64(lanes[0], 1) + _rotl64(lanes[1], 7) + _rotl64(lanes[2], 12)
                       + _rotl64(lanes[3], 18)) & U64_MAX
        for lane in lanes:
            accumulator = ((accumulator ^ _xxh64_round(0, lane)) * XXH_PRIME1 + XXH_PRIME4) & U64_MAX
    else:
        accumulator = (seed + XXH_PRIME5) & U64_MAX
    accumulator = (accumulator + length) & U64_MAX
    while position + 8 <= length:
        lane = int.from_bytes(data[position : position + 8], "little")
        accumulator = (_rotl64(accumulator ^ _xxh64_round(0, lane), 27) * XXH_PRIME1 + XXH_PRIME4) & U64_MAX
        position += 8
    if position + 4 <= length:
        lane = int.from_bytes(data[position : position + 4], "little")
        accumulator = (_rotl64(accumulator ^ (lane * XXH_PRIME1 & U64_MAX), 23) * XXH_PRIME2 + XXH_PRIME3) & U64_MAX
        position += 4
    for byte in data[position:]:
        accumulator = _rotl64(accumulator ^ (byte * XXH_PRIME5 & U64_MAX), 11) * XXH_PRIME1 & U64_MAX
    accumulator ^= accumulator >> 33
    accumulator = accumulator * XXH_PRIME2 & U64_MAX
    accumulator ^= accumulator >> 29
    accumulator = accumulator * XXH_PRIME3 & U64_MAX
    return accumulator ^ (accumulator >> 32)


def checksum(data: bytes, csum_type: int) -> bytes:
    """The checksum of a superblock's or node's bytes after their checksum field, as stored (its
    first bytes; the rest of the 32-byte field is zero)."""
    if csum_type == CSUM_CRC32C:
        return crc32.iscsi(data).to_bytes(4, "little")
    if csum_type == CSUM_XXHASH:
        return xxh64(data).to_bytes(8, "little")
    if csum_type == CSUM_SHA256:
        return hashlib.sha256(data).digest()
    if csum_type == CSUM_BLAKE2:
        return hashlib.blake2b(data, digest_size=32).digest()
    raise UnsupportedFormat(f"btrfs checksum type {csum_type} is not known", format="btrfs")


def checksum_ok(block: bytes, csum_type: int) -> bool:
    """Whether ``block`` (a superblock or a tree node) carries the checksum of its contents."""
    expected = checksum(block[CSUM_FIELD:], csum_type)
    return block[: len(expected)] == expected


def name_hash(name: bytes) -> int:
    """The key offset of a DIR_ITEM: CRC-32C of the name seeded with ~1, without the final inversion
    (fastcrc's ``initial`` is a previous, inverted result: ~(~1) = 1)."""
    return ~crc32.iscsi(name, 1) & 0xFFFFFFFF


# -- the superblock ------------------------------------------------------------------------------------


def superblock_problem(raw: bytes, position: int) -> str | None:
    """Why the 4 KiB at ``position`` of the device are not a sound superblock copy (None if they are)."""
    sb = parse_btrfs_superblock(raw)
    if sb is None:
        return "no btrfs magic"
    if sb.csum_type not in CSUM_NAMES:
        return f"checksum type {sb.csum_type}"
    if not checksum_ok(raw[:BTRFS_SUPERBLOCK_SIZE], sb.csum_type):
        return "checksum mismatch"
    if sb.bytenr != position:
        return f"records position {sb.bytenr}"
    return None


def check_superblock(sb: BtrfsSuperblock, length: int, position: int) -> None:
    """Refuses a superblock whose geometry does not add up (CorruptImage) or that describes what this
    reader does not read: several devices, RAID, zoned devices (UnsupportedFormat)."""
    where = "btrfs superblock"
    if sb.num_devices != 1:
        raise UnsupportedFormat(f"btrfs file system spanning {sb.num_devices} devices: only single-device "
                                "file systems are read", format="btrfs",
                                hint="its data is spread over devices that are not all in this volume")
    unsupported = [name for bit, name in UNSUPPORTED_INCOMPAT.items() if sb.incompat & bit]
    if sb.incompat & ~KNOWN_INCOMPAT:
        unsupported.append(f"unknown features {sb.incompat & ~KNOWN_INCOMPAT:#x}")
    if unsupported:
        raise UnsupportedFormat(f"btrfs with {', '.join(unsupported)} is not read", format="btrfs")
    sector = sb.sector_size
    if sector & (sector - 1) or not 4096 <= sector <= 65536:
        raise _corrupt(f"sector size {sector}", position + 0x90, where)
    if sb.node_size & (sb.node_size - 1) or not sector <= sb.node_size <= 65536:
        raise _corrupt(f"node size {sb.node_size}", position + 0x94, where)
    if sb.root_level >= MAX_LEVEL or sb.chunk_root_level >= MAX_LEVEL:
        raise _corrupt(f"tree levels {sb.root_level}, {sb.chunk_root_level}", position + 0xC6, where)
    if sb.sys_chunk_array_size > len(sb.sys_chunk_array):
        raise _corrupt(f"system chunk array of {sb.sys_chunk_array_size} bytes", position + 0xA0, where)
    if sb.device_total_bytes > length or sb.device_total_bytes < BTRFS_SUPERBLOCK_OFFSETS[0] + BTRFS_SUPERBLOCK_SIZE:
        raise _corrupt(f"device of {sb.device_total_bytes} bytes in a volume of {length}", position + 0xD1, where)
    for name, address in (("root", sb.root), ("chunk root", sb.chunk_root)):
        if address % sector or address == 0:
            raise _corrupt(f"{name} at {address}, not a multiple of the sector size", position + 0x50, where)
    if sb.generation == 0 or sb.chunk_root_generation > sb.generation:
        raise _corrupt(f"generation {sb.generation}, chunk root generation {sb.chunk_root_generation}",
                       position + 0x48, where)
    if sb.device_fsid != sb.fsid:
        raise _corrupt("the device item belongs to another file system", position + 0x11B, where)


# -- tree nodes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeNode:
    """A parsed tree node: its keys and, for a leaf, where each item's data lies in ``raw``; for an
    internal node, each child's (logical address, generation)."""

    bytenr: int
    level: int
    owner: int
    generation: int
    keys: list[Key]
    refs: list[tuple[int, int]]
    raw: bytes

    def item(self, slot: int) -> bytes:
        start, end = self.refs[slot]
        return self.raw[start:end]


def parse_tree_node(raw: bytes, fsid: bytes, bytenr: int, position: int | None = None) -> TreeNode:
    """A node read from logical address ``bytenr`` (at ``position`` of the disk): its header must name
    that address and the file system ``fsid``; item counts, data ranges and key order are checked.
    The checksum is the caller's (``checksum_ok``)."""
    where = f"btrfs tree node {bytenr}"
    size = len(raw)
    if size < NODE_HEADER.size:
        raise _corrupt("node truncated", position, where)
    (_csum, node_fsid, node_bytenr, _flags, _chunk_uuid, generation, owner, count,
     level) = NODE_HEADER.unpack_from(raw)
    if node_bytenr != bytenr:
        raise _corrupt(f"node records address {node_bytenr}", position, where)
    if node_fsid != fsid:
        raise _corrupt("node belongs to another file system", position, where)
    if level >= MAX_LEVEL:
        raise _corrupt(f"level {level}", position, where)
    header = NODE_HEADER.size
    keys: list[Key] = []
    refs: list[tuple[int, int]] = []
    if level == 0:
        if header + count * LEAF_ITEM.size > size:
            raise _corrupt(f"{count} items do not fit", position, where)
        items_end = count * LEAF_ITEM.size
        for objectid, kind, offset, data_offset, data_size in LEAF_ITEM.iter_unpack(
                raw[header : header + items_end]):
            if data_offset < items_end or data_offset + data_size > size - header:
                raise _corrupt(f"item data at {data_offset}+{data_size} outside the leaf", position, where)
            keys.append((objectid, kind, offset))
            refs.append((header + data_offset, header + data_offset + data_size))
    else:
        if count == 0 or header + count * KEY_POINTER.size > size:
            raise _corrupt(f"internal node of {count} pointers", position, where)
        for objectid, kind, offset, child, child_generation in KEY_POINTER.iter_unpack(
                raw[header : header + count * KEY_POINTER.size]):
            keys.append((objectid, kind, offset))
            refs.append((child, child_generation))
    for i in range(1, len(keys)):
        if keys[i] <= keys[i - 1]:
            raise _corrupt(f"keys out of order at slot {i}", position, where)
    return TreeNode(bytenr=bytenr, level=level, owner=owner, generation=generation, keys=keys, refs=refs, raw=raw)


@dataclass(frozen=True)
class Tree:
    """Where a tree starts: its id (1 the root tree, 3 the chunk tree, 5 or a subvolume id for a
    file tree), root node address, level and generation."""

    id: int
    bytenr: int
    level: int
    generation: int

    def owns(self, owner: int) -> bool:
        """Whether a node of this tree may name ``owner``: file trees share nodes with their
        snapshots (and relocation trees), other trees own theirs."""
        if self.id == FS_TREE or FIRST_FREE_OBJECTID <= self.id <= LAST_FREE_OBJECTID:
            return owner in (FS_TREE, TREE_RELOC) or FIRST_FREE_OBJECTID <= owner <= LAST_FREE_OBJECTID
        return owner == self.id


# -- chunks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """``length`` bytes from ``logical``, stored at each of ``copies`` (device offsets)."""

    logical: int
    length: int
    type: int
    copies: tuple[int, ...]


def parse_chunk(data: bytes, logical: int, sb: BtrfsSuperblock, position: int | None = None) -> tuple[Chunk, int]:
    """The chunk item at the start of ``data`` mapping ``logical``, and its size in bytes. Profiles
    other than single and DUP are refused."""
    where = f"btrfs chunk {logical}"
    if len(data) < CHUNK.size:
        raise _corrupt("chunk item truncated", position, where)
    length, _owner, _stripe_length, kind, _io_align, _io_width, _sector, stripes, _sub = CHUNK.unpack_from(data)
    raid = [name for bit, name in RAID_PROFILES.items() if kind & bit]
    if raid:
        raise UnsupportedFormat(f"btrfs chunk at {logical} uses the {'/'.join(raid)} profile: only single and DUP "
                                "chunks are read", format="btrfs",
                                hint="its data is spread over devices that are not all in this volume")
    size = CHUNK.size + stripes * STRIPE.size
    if not kind & (BLOCK_GROUP_DATA | BLOCK_GROUP_SYSTEM | BLOCK_GROUP_METADATA):
        raise _corrupt(f"chunk type {kind:#x} holds nothing", position, where)
    if stripes != (2 if kind & BLOCK_GROUP_DUP else 1) or size > len(data):
        raise _corrupt(f"{stripes} stripes for type {kind:#x}", position, where)
    if length == 0 or length % sb.sector_size or logical % sb.sector_size or logical + length > U64_MAX:
        raise _corrupt(f"chunk of {length} bytes", position, where)
    copies = []
    for devid, offset, _uuid in STRIPE.iter_unpack(data[CHUNK.size : size]):
        if devid != sb.devid:
            raise _corrupt(f"stripe on device {devid}, not this device ({sb.devid})", position, where)
        if offset + length > sb.device_total_bytes:
            raise _corrupt(f"stripe at {offset}+{length} past the device's {sb.device_total_bytes} bytes", position,
                           where)
        copies.append(offset)
    return Chunk(logical, length, kind, tuple(copies)), size


def parse_sys_chunk_array(sb: BtrfsSuperblock, position: int | None = None) -> list[Chunk]:
    """The chunks of the superblock's system chunk array."""
    data = sb.sys_chunk_array[: sb.sys_chunk_array_size]
    chunks = []
    at = 0
    while at < len(data):
        if at + DISK_KEY.size > len(data):
            raise _corrupt("system chunk array entry truncated", position, "btrfs system chunk array")
        objectid, kind, logical = DISK_KEY.unpack_from(data, at)
        if kind != CHUNK_ITEM or objectid != FIRST_CHUNK_TREE_OBJECTID:
            raise _corrupt(f"entry of key ({objectid}, {kind})", position, "btrfs system chunk array")
        chunk, size = parse_chunk(data[at + DISK_KEY.size :], logical, sb, position)
        chunks.append(chunk)
        at += DISK_KEY.size + size
    if not chunks:
        raise _corrupt("no system chunk", position, "btrfs system chunk array")
    return chunks


class ChunkMap:
    """Logical addresses to device offsets, through non-overlapping chunks."""

    def __init__(self, chunks: list[Chunk]) -> None:
        by_start: dict[int, Chunk] = {}
        for chunk in chunks:
            known = by_start.setdefault(chunk.logical, chunk)
            if known != chunk:
                raise _corrupt("two different chunks at one address", None, f"btrfs chunk {chunk.logical}")
        self.chunks = sorted(by_start.values(), key=lambda c: c.logical)
        for before, after in pairwise(self.chunks):
            if before.logical + before.length > after.logical:
                raise _corrupt(f"chunks at {before.logical} and {after.logical} overlap", None, "btrfs chunk tree")
        self.starts = [chunk.logical for chunk in self.chunks]

    def locate(self, logical: int, length: int, structure: str) -> tuple[Chunk, tuple[int, ...]]:
        """The chunk holding ``[logical, logical + length)`` and the device offsets of each copy."""
        i = bisect_right(self.starts, logical) - 1
        if i < 0 or logical + length > self.chunks[i].logical + self.chunks[i].length or length < 0:
            raise _corrupt(f"logical range {logical}+{length} is in no chunk", None, structure)
        chunk = self.chunks[i]
        return chunk, tuple(copy + logical - chunk.logical for copy in chunk.copies)


# -- items ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootItem:
    """A tree's ROOT_ITEM: where its root node is, and, for a subvolume, its facts."""

    tree: Tree
    root_dirid: int
    flags: int
    refs: int
    uuid: bytes | None
    parent_uuid: bytes | None
    otime: float | None


def parse_root_item(data: bytes, tree_id: int, structure: str, position: int | None = None) -> RootItem:
    if len(data) < ROOT_ITEM_FIELDS.size:
        raise _corrupt(f"root item of {len(data)} bytes", position, structure)
    (_inode, generation, root_dirid, bytenr, _limit, _used, _last_snapshot, flags, refs, _drop_key, _drop_level,
     level) = ROOT_ITEM_FIELDS.unpack_from(data)
    if level >= MAX_LEVEL or bytenr == 0:
        raise _corrupt(f"root at {bytenr}, level {level}", position, structure)
    uuid = parent_uuid = None
    otime = None
    if len(data) >= ROOT_ITEM_FIELDS.size + ROOT_ITEM_V2.size:
        (generation_v2, uuid_raw, parent_raw, _received, _ctransid, _otransid, _stransid, _rtransid, _ctime,
         otime_seconds, otime_nanoseconds) = ROOT_ITEM_V2.unpack_from(data, ROOT_ITEM_FIELDS.size)
        if generation_v2 == generation:  # else an old kernel wrote the item and left these fields stale
            uuid = uuid_raw if any(uuid_raw) else None
            parent_uuid = parent_raw if any(parent_raw) else None
            otime = otime_seconds + otime_nanoseconds / 1e9
    return RootItem(tree=Tree(tree_id, bytenr, level, generation), root_dirid=root_dirid, flags=flags, refs=refs,
                    uuid=uuid, parent_uuid=parent_uuid, otime=otime)


@dataclass(frozen=True)
class Inode:
    """The fields of an INODE_ITEM this reader uses."""

    size: int
    nlink: int
    uid: int
    gid: int
    mode: int
    flags: int
    mtime: float

    @property
    def file_type(self) -> FileType:
        return FILE_TYPES.get(self.mode & S_IFMT, FileType.OTHER)


def parse_inode(data: bytes, structure: str, position: int | None = None) -> Inode:
    if len(data) != INODE.size:
        raise _corrupt(f"inode item of {len(data)} bytes", position, structure)
    (_generation, _transid, size, _nbytes, _group, nlink, uid, gid, mode, _rdev, flags, _sequence, _reserved,
     _atime, _ctime, mtime_seconds, mtime_nanoseconds, _otime) = INODE.unpack_from(data)
    kind = mode & S_IFMT
    if kind not in FILE_TYPES and kind not in OTHER_TYPES:
        raise _corrupt(f"mode {mode:#o}", position, structure)
    if size >= 1 << 63 or mtime_nanoseconds >= 10**9:
        raise _corrupt(f"size {size}, mtime nanoseconds {mtime_nanoseconds}", position, structure)
    return Inode(size=size, nlink=nlink, uid=uid, gid=gid, mode=mode, flags=flags,
                 mtime=mtime_seconds + mtime_nanoseconds / 1e9)


@dataclass(frozen=True)
class DirItem:
    """One entry of a DIR_ITEM or DIR_INDEX: the key of what it names, its type and name."""

    location: Key
    type: int
    name: bytes


def parse_dir_items(data: bytes, structure: str, position: int | None = None) -> list[DirItem]:
    """The entries packed in one DIR_ITEM (names sharing a hash) or DIR_INDEX (one entry) item."""
    entries = []
    at = 0
    while at < len(data):
        if at + DIR_ITEM_HEADER.size > len(data):
            raise _corrupt("directory item truncated", position, structure)
        objectid, kind, offset, _transid, data_length, name_length, entry_type = DIR_ITEM_HEADER.unpack_from(data, at)
        start = at + DIR_ITEM_HEADER.size
        end = start + name_length + data_length
        if not 0 < name_length <= MAX_NAME or data_length or end > len(data):
            raise _corrupt(f"directory item of name length {name_length}, data length {data_length}", position,
                           structure)
        name = data[start : start + name_length]
        if b"/" in name or b"\0" in name or name in (b".", b".."):
            raise _corrupt(f"directory entry named {name!r}", position, structure)
        entries.append(DirItem((objectid, kind, offset), entry_type, name))
        at = end
    return entries


@dataclass(frozen=True)
class FileExtent:
    """An EXTENT_DATA item: file bytes from its key's offset. ``inline`` holds inline data (perhaps
    compressed); regular and prealloc extents point at ``disk_bytenr`` (0: a hole)."""

    type: int
    compression: int
    ram_bytes: int
    inline: bytes
    disk_bytenr: int = 0
    disk_num_bytes: int = 0
    offset: int = 0
    num_bytes: int = 0

    @property
    def length(self) -> int:
        """The file bytes it covers."""
        return self.ram_bytes if self.type == EXTENT_INLINE else self.num_bytes


def parse_file_extent(data: bytes, sector_size: int, structure: str, position: int | None = None) -> FileExtent:
    if len(data) < FILE_EXTENT.size:
        raise _corrupt("file extent truncated", position, structure)
    _generation, ram_bytes, compression, encryption, other_encoding, kind = FILE_EXTENT.unpack_from(data)
    if encryption or other_encoding:
        raise UnsupportedFormat(f"btrfs extent with encryption {encryption}, encoding {other_encoding} is not read",
                                format="btrfs")
    if compression not in (COMPRESS_NONE, *COMPRESSION_NAMES):
        raise _corrupt(f"compression type {compression}", position, structure)
    if kind == EXTENT_INLINE:
        inline = data[FILE_EXTENT.size :]
        if compression == COMPRESS_NONE and ram_bytes != len(inline):
            raise _corrupt(f"inline extent of {len(inline)} bytes claims {ram_bytes}", position, structure)
        if compression != COMPRESS_NONE and ram_bytes > sector_size:
            raise _corrupt(f"compressed inline extent of {ram_bytes} bytes", position, structure)
        return FileExtent(kind, compression, ram_bytes, inline)
    if kind not in (EXTENT_REGULAR, EXTENT_PREALLOC):
        raise _corrupt(f"file extent type {kind}", position, structure)
    if len(data) != FILE_EXTENT.size + FILE_EXTENT_DISK.size:
        raise _corrupt(f"file extent item of {len(data)} bytes", position, structure)
    disk_bytenr, disk_num_bytes, offset, num_bytes = FILE_EXTENT_DISK.unpack_from(data, FILE_EXTENT.size)
    if num_bytes == 0 or num_bytes >= 1 << 63:
        raise _corrupt(f"file extent of {num_bytes} bytes", position, structure)
    if disk_bytenr:
        if compression != COMPRESS_NONE:
            if kind == EXTENT_PREALLOC or not 0 < disk_num_bytes <= MAX_COMPRESSED_EXTENT or \
                    ram_bytes > MAX_COMPRESSED_EXTENT or offset + num_bytes > ram_bytes:
                raise _corrupt(f"compressed extent of {disk_num_bytes} bytes holding {offset}+{num_bytes} of "
                               f"{ram_bytes}", position, structure)
        elif offset + num_bytes > disk_num_bytes:
            raise _corrupt(f"extent reads {offset}+{num_bytes} of {disk_num_bytes} bytes", position, structure)
    return FileExtent(kind, compression, ram_bytes, b"", disk_bytenr, disk_num_bytes, offset, num_bytes)


def parse_name_ref(data: bytes, header: struct.Struct, structure: str, position: int | None = None
                   ) -> tuple[tuple[int, ...], bytes]:
    """The fixed fields and the name of a ROOT_REF/ROOT_BACKREF or of the first INODE_REF in ``data``
    (both end in a 16-bit name length followed by the name)."""
    if len(data) < header.size:
        raise _corrupt("reference truncated", position, structure)
    fields = header.unpack_from(data)
    name_length = fields[-1]
    name = data[header.size : header.size + name_length]
    if not 0 < name_length <= MAX_NAME or len(name) != name_length or b"/" in name or b"\0" in name:
        raise _corrupt(f"reference of name length {name_length}", position, structure)
    return fields[:-1], name


# -- compression ---------------------------------------------------------------------------------------


def decompress_lzo(data: bytes, size: int, sector_size: int) -> bytes:
    """btrfs's LZO framing: a total length, then segments (a length and an lzo1x stream of at most
    one sector's data), a segment's length moved to the next sector when fewer than 4 bytes are left
    in this one. Stops once ``size`` bytes are out."""
    where = "btrfs LZO extent"
    if len(data) < LZO_LENGTH:
        raise _corrupt("LZO extent truncated", None, where)
    total = int.from_bytes(data[:LZO_LENGTH], "little")
    if not LZO_LENGTH < total <= len(data):
        raise _corrupt(f"LZO total length {total} of {len(data)} bytes", None, where)
    worst = sector_size + sector_size // 16 + 64 + 3  # lzo1x's worst case for one sector
    pieces = []
    produced = 0
    at = LZO_LENGTH
    while at < total and produced < size:
        if at + LZO_LENGTH > total:
            raise _corrupt(f"segment header at {at} past the total length {total}", None, where)
        segment = int.from_bytes(data[at : at + LZO_LENGTH], "little")
        at += LZO_LENGTH
        if not 0 < segment <= worst or at + segment > total:
            raise _corrupt(f"segment of {segment} bytes at {at}", None, where)
        try:
            piece = lzo.decompress(data[at : at + segment], sector_size)
        except lzo.LzoError as exc:
            raise _corrupt(f"LZO segment at {at}: {exc}", None, where) from None
        pieces.append(piece)
        produced += len(piece)
        at += segment
        left = sector_size - at % sector_size
        if left < LZO_LENGTH:
            at += left
    return b"".join(pieces)[:size]


def decompress_extent(data: bytes, compression: int, size: int, sector_size: int) -> bytes:
    """Up to ``size`` bytes of a compressed extent; a stream that ends early leaves zeros after it
    (as the kernel fills what it did not decompress), a truncated one is corrupt."""
    where = f"btrfs {COMPRESSION_NAMES.get(compression, compression)} extent"
    if compression == COMPRESS_ZLIB:
        decoder = zlib.decompressobj()
        try:
            out = decoder.decompress(data, size)
        except zlib.error as exc:
            raise _corrupt(f"zlib: {exc}", None, where) from None
        if len(out) < size and not decoder.eof:
            raise _corrupt("zlib stream truncated", None, where)
    elif compression == COMPRESS_ZSTD:
        # one frame, whose output one read returns whole (up to ``size``); the sector's padding
        # after it is not another frame, so the reader is not asked for more
        try:
            reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
                io.BytesIO(data), read_across_frames=False)
            out = reader.read(size)
        except zstandard.ZstdError as exc:
            raise _corrupt(f"zstd: {exc}", None, where) from None
    elif compression == COMPRESS_LZO:
        out = decompress_lzo(data, size, sector_size)
    else:
        raise _corrupt(f"compression type {compression}", None, where)
    return out.ljust(size, b"\0")


# -- the volume ----------------------------------------------------------------------------------------


def without_ranges(ranges: Iterable[tuple[int, int]], holes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) ``ranges`` in increasing order, with the parts inside any of ``holes`` cut out."""
    holes = sorted(holes)
    for start, length in ranges:
        end = start + length
        for hole_start, hole_length in holes:
            hole_end = hole_start + hole_length
            if hole_end <= start or hole_start >= end:
                continue
            if hole_start > start:
                yield start, hole_start - start
            start = max(start, hole_end)
        if end > start:
            yield start, end - start


@dataclass(frozen=True)
class Subvolume:
    """A subvolume or snapshot. ``path`` is where it lies below the top-level subvolume (what
    ``subvol=`` names, e.g. ``@/.snapshots/1/snapshot``); ``parent_id`` the subvolume holding it;
    ``parent_uuid`` the subvolume it is a snapshot of (None for a plain subvolume)."""

    id: int
    parent_id: int
    path: str
    generation: int
    readonly: bool
    uuid: str | None
    parent_uuid: str | None
    otime: float | None


def _uuid_text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class BtrfsVolume:
    """The metadata of one btrfs device: superblock, chunks, trees and subvolumes (shared by every
    :class:`BtrfsFileSystem` view of it)."""

    def __init__(self, disk: Disk, offset: int, length: int) -> None:
        self._disk = disk
        self._offset = offset
        self._length = length
        self.superblock, self.superblock_offset = self._choose_superblock()
        sb = self.superblock
        check_superblock(sb, length, offset + self.superblock_offset)
        self._nodes: OrderedDict[int, TreeNode] = OrderedDict()
        self._cache_nodes = max(16, CACHE_BYTES // sb.node_size)
        self.inodes: OrderedDict[BtrfsNode, tuple[Inode, Stat]] = OrderedDict()
        self.extents: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        self._roots: OrderedDict[int, RootItem | None] = OrderedDict()
        self._chunks = ChunkMap(parse_sys_chunk_array(sb, offset + self.superblock_offset))
        chunk_tree = Tree(CHUNK_TREE, sb.chunk_root, sb.chunk_root_level, sb.chunk_root_generation)
        chunks = list(self._chunks.chunks)
        for key, data, position in self.items(chunk_tree, (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, 0),
                                              (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, U64_MAX)):
            if len(chunks) >= MAX_CHUNKS:
                raise _corrupt(f"more than {MAX_CHUNKS} chunks", position, "btrfs chunk tree")
            chunks.append(parse_chunk(data, key[2], sb, position)[0])
        self._chunks = ChunkMap(chunks)
        self.root_tree = Tree(ROOT_TREE, sb.root, sb.root_level, sb.generation)
        self.default_subvolume_id = self._default_subvolume()

    # -- superblock --------------------------------------------------------------------------------

    def _choose_superblock(self) -> tuple[BtrfsSuperblock, int]:
        """The primary superblock when it is sound, else the sound copy of the highest generation
        among those inside the volume (and the device the copy describes)."""
        problems = []
        best: tuple[BtrfsSuperblock, int] | None = None
        for position in BTRFS_SUPERBLOCK_OFFSETS:
            if position + BTRFS_SUPERBLOCK_SIZE > self._length:
                break
            raw = self.read(position, BTRFS_SUPERBLOCK_SIZE, "btrfs superblock")
            problem = superblock_problem(raw, position)
            sb = parse_btrfs_superblock(raw)
            if problem is None and sb is not None:
                if position == BTRFS_SUPERBLOCK_OFFSETS[0]:
                    return sb, position
                if sb.device_total_bytes >= position + BTRFS_SUPERBLOCK_SIZE and (
                        best is None or sb.generation > best[0].generation):
                    best = sb, position
            else:
                problems.append(f"at {position}: {problem}")
        if best is None:
            raise _corrupt(f"no sound superblock ({'; '.join(problems)})", self._offset + BTRFS_SUPERBLOCK_OFFSETS[0],
                           "btrfs superblock")
        return best

    # -- reads -------------------------------------------------------------------------------------

    def read(self, position: int, length: int, structure: str) -> bytes:
        """``length`` bytes at ``position`` of the device, which must lie inside the volume."""
        return read_volume(self._disk, self._offset, self._length, position, length, structure)

    def read_logical(self, logical: int, length: int, structure: str) -> bytes:
        """``length`` bytes of file data at a logical address (the first copy of a DUP chunk)."""
        _chunk, copies = self._chunks.locate(logical, length, structure)
        return self.read(copies[0], length, structure)

    def node(self, tree: Tree, bytenr: int, level: int, generation: int, first_key: Key | None) -> TreeNode:
        """The node at ``bytenr`` of ``tree``: of the expected level and generation, owned by the
        tree, starting at ``first_key`` (what its parent says of it). Each copy is tried in turn."""
        node = self._nodes.get(bytenr)
        where = f"btrfs tree {tree.id} node {bytenr}"
        if node is None:
            size = self.superblock.node_size
            if bytenr % self.superblock.sector_size:
                raise _corrupt("node address not a multiple of the sector size", None, where)
            chunk, copies = self._chunks.locate(bytenr, size, where)
            if chunk.type & BLOCK_GROUP_DATA and not chunk.type & BLOCK_GROUP_METADATA:
                raise _corrupt("tree node in a data chunk", None, where)
            error: CorruptImage | None = None
            for copy in copies:
                raw = self.read(copy, size, where)
                try:
                    if not checksum_ok(raw, self.superblock.csum_type):
                        raise _corrupt("checksum mismatch", self._offset + copy, where)
                    node = parse_tree_node(raw, self.superblock.metadata_fsid, bytenr, self._offset + copy)
                    self._check_node(node, tree, level, generation, first_key, self._offset + copy)
                except CorruptImage as exc:
                    error = error or exc
                    continue
                break
            if node is None:
                assert error is not None
                raise error
            self._nodes[bytenr] = node
            if len(self._nodes) > self._cache_nodes:
                self._nodes.popitem(last=False)
        else:
            self._nodes.move_to_end(bytenr)
            self._check_node(node, tree, level, generation, first_key, None)
        return node

    @staticmethod
    def _check_node(node: TreeNode, tree: Tree, level: int, generation: int, first_key: Key | None,
                    position: int | None) -> None:
        where = f"btrfs tree {tree.id} node {node.bytenr}"
        if node.level != level:
            raise _corrupt(f"node of level {node.level} where {level} is expected", position, where)
        if node.generation != generation:
            raise _corrupt(f"node of generation {node.generation} where {generation} is expected", position, where)
        if not tree.owns(node.owner):
            raise _corrupt(f"node owned by tree {node.owner}", position, where)
        if first_key is not None and (not node.keys or node.keys[0] != first_key):
            raise _corrupt(f"node does not start at its parent's key {first_key}", position, where)

    def items(self, tree: Tree, first: Key, last: Key, from_previous: bool = False
              ) -> Iterator[tuple[Key, bytes, int]]:
        """(key, data, leaf address) of the items with ``first <= key <= last``, in order; with
        ``from_previous``, starting at the last item at or before ``first`` instead."""
        path: list[tuple[TreeNode, int]] = []
        node = self.node(tree, tree.bytenr, tree.level, tree.generation, None)
        while node.level:
            slot = max(bisect_right(node.keys, first) - 1, 0)
            path.append((node, slot))
            node = self._child(tree, node, slot)
        if from_previous:
            slot = max(bisect_right(node.keys, first) - 1, 0)
        else:
            slot = bisect_left(node.keys, first)
        previous: Key | None = None
        while True:
            for i in range(slot, len(node.keys)):
                key = node.keys[i]
                if key > last:
                    return
                if previous is not None and key <= previous:
                    raise _corrupt(f"key {key} after {previous}", None, f"btrfs tree {tree.id} node {node.bytenr}")
                previous = key
                yield key, node.item(i), node.bytenr
            while path and path[-1][1] + 1 >= len(path[-1][0].keys):
                path.pop()
            if not path:
                return
            parent, parent_slot = path.pop()
            path.append((parent, parent_slot + 1))
            node = self._child(tree, parent, parent_slot + 1)
            while node.level:
                path.append((node, 0))
                node = self._child(tree, node, 0)
            slot = 0

    def _child(self, tree: Tree, parent: TreeNode, slot: int) -> TreeNode:
        bytenr, generation = parent.refs[slot]
        return self.node(tree, bytenr, parent.level - 1, generation, parent.keys[slot])

    def item(self, tree: Tree, key: Key) -> tuple[bytes, int] | None:
        """The data of the item of exactly ``key`` (and its leaf's address), or None."""
        for _found, data, leaf in self.items(tree, key, key):
            return data, leaf
        return None

    # -- roots and subvolumes ----------------------------------------------------------------------

    def root_item(self, tree_id: int) -> RootItem | None:
        """The ROOT_ITEM of tree ``tree_id`` (the last of its keys, as the kernel takes it), or None."""
        if tree_id in self._roots:
            self._roots.move_to_end(tree_id)
            return self._roots[tree_id]
        found = None
        for _key, data, leaf in self.items(self.root_tree, (tree_id, ROOT_ITEM, 0), (tree_id, ROOT_ITEM, U64_MAX)):
            found = data, leaf
        root = None if found is None else parse_root_item(found[0], tree_id, f"btrfs root item {tree_id}")
        self._roots[tree_id] = root
        if len(self._roots) > CACHED_ROOTS:
            self._roots.popitem(last=False)
        return root

    def file_tree(self, tree_id: int) -> RootItem:
        """The root item of a subvolume's file tree (GuestPathError when there is no such subvolume)."""
        if not (tree_id == FS_TREE or FIRST_FREE_OBJECTID <= tree_id <= LAST_FREE_OBJECTID):
            raise GuestPathError(f"btrfs tree {tree_id} is not a subvolume")
        root = self.root_item(tree_id)
        if root is None or root.refs == 0:
            raise GuestPathError(f"btrfs has no subvolume {tree_id}")
        return root

    def root_ref(self, parent: int, child: int) -> tuple[int, bytes] | None:
        """(directory inode, name) where subvolume ``parent`` holds subvolume ``child``, or None."""
        found = self.item(self.root_tree, (parent, ROOT_REF, child))
        if found is None:
            return None
        (dirid, _sequence), name = parse_name_ref(found[0], ROOT_REF_HEADER, f"btrfs root ref {parent}/{child}")
        return dirid, name

    # -- free space --------------------------------------------------------------------------------

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The device's unused byte ranges (see the module docstring). NotSparsifiable while a log tree
        waits to be replayed, when a copy of the superblock had to be read, or when the superblock's
        flags say the file system is in error or half way through a change."""
        problem = self._unclean()
        if problem is not None:
            raise NotSparsifiable(problem)
        stripes = self._stripes()
        extent_root = self.root_item(EXTENT_TREE)
        if extent_root is None:
            raise _corrupt("no extent tree", None, "btrfs root tree")
        sb = self.superblock
        reserved = [(0, DEVICE_RESERVED)] + [(copy, BTRFS_SUPERBLOCK_SIZE) for copy in BTRFS_SUPERBLOCK_OFFSETS
                                              if copy + BTRFS_SUPERBLOCK_SIZE <= sb.device_total_bytes]
        return join_adjacent(without_ranges(self._free(stripes, extent_root.tree), reserved))

    def _unclean(self) -> str | None:
        sb = self.superblock
        if sb.log_root:
            return "a btrfs log tree of fsynced changes waits to be replayed (it was not cleanly unmounted)"
        if self.superblock_offset != BTRFS_SUPERBLOCK_OFFSETS[0]:
            return "the primary btrfs superblock is damaged (a copy was read)"
        flags = sb.flags & ~(SUPER_FLAG_WRITTEN | SUPER_FLAG_SEEDING)
        if flags:
            names = [name for bit, name in SUPER_FLAGS.items() if flags & bit]
            unknown = flags & ~sum(SUPER_FLAGS)
            return f"the btrfs superblock flags say {', '.join(names + ([hex(unknown)] if unknown else []))}"
        return None

    def _stripes(self) -> list[tuple[int, Chunk]]:
        """(device offset, chunk) of every chunk's copies, in device order: disjoint, and exactly what the
        device tree's extents record."""
        stripes = sorted(((copy, chunk) for chunk in self._chunks.chunks for copy in chunk.copies),
                         key=lambda stripe: stripe[0])
        for (start, before), (after_start, after) in pairwise(stripes):
            if start + before.length > after_start:
                raise _corrupt(f"chunks {before.logical} and {after.logical} overlap on the device", None,
                               "btrfs chunk tree")
        dev_root = self.root_item(DEV_TREE)
        if dev_root is None:
            raise _corrupt("no device tree", None, "btrfs root tree")
        devid = self.superblock.devid
        recorded = set()
        for key, data, leaf in self.items(dev_root.tree, (devid, DEV_EXTENT, 0), (devid, DEV_EXTENT, U64_MAX)):
            if len(data) < DEV_EXTENT_ITEM.size:
                raise _corrupt(f"device extent of {len(data)} bytes", None, f"btrfs tree node {leaf}")
            _tree, _objectid, logical, length, _uuid = DEV_EXTENT_ITEM.unpack_from(data)
            recorded.add((key[2], length, logical))
            if len(recorded) > 2 * MAX_CHUNKS:
                raise _corrupt(f"more than {2 * MAX_CHUNKS} device extents", None, "btrfs device tree")
        if recorded != {(start, chunk.length, chunk.logical) for start, chunk in stripes}:
            raise _corrupt("the device tree's extents are not the chunk tree's stripes", None, "btrfs device tree")
        return stripes

    def _free(self, stripes: list[tuple[int, Chunk]], extent_tree: Tree) -> Iterator[tuple[int, int]]:
        """(device offset, length) of the ranges outside every stripe, and of the free ranges inside the
        stripes of data chunks, in device order."""
        position = 0
        for start, chunk in stripes:
            if start > position:
                yield position, start - position
            if chunk.type & BLOCK_GROUP_DATA and not chunk.type & (BLOCK_GROUP_METADATA | BLOCK_GROUP_SYSTEM):
                for logical, length in self._free_in_chunk(chunk, extent_tree):
                    yield start + logical - chunk.logical, length
            position = start + chunk.length
        if self.superblock.device_total_bytes > position:
            yield position, self.superblock.device_total_bytes - position

    def _free_in_chunk(self, chunk: Chunk, extent_tree: Tree) -> Iterator[tuple[int, int]]:
        """(logical address, length) of the ranges of ``chunk`` that no extent item covers."""
        end = chunk.logical + chunk.length
        covered = chunk.logical  # everything before is accounted for
        for key, _data, leaf in self.items(extent_tree, (chunk.logical, 0, 0), (end - 1, 255, U64_MAX),
                                           from_previous=True):
            objectid, kind, offset = key
            if objectid < chunk.logical:  # the item before the chunk: its extent must end before it
                self._check_extent_before(extent_tree, objectid, chunk)
                continue
            if kind == EXTENT_ITEM:
                length = offset
            elif kind == METADATA_ITEM:
                length = self.superblock.node_size
            else:
                continue
            if length == 0 or objectid + length > end:
                raise _corrupt(f"extent {objectid}+{length} does not fit its chunk ending at {end}", None,
                               f"btrfs tree node {leaf}")
            if objectid > covered:
                yield covered, objectid - covered
            covered = max(covered, objectid + length)
        if end > covered:
            yield covered, end - covered

    def _check_extent_before(self, extent_tree: Tree, objectid: int, chunk: Chunk) -> None:
        """CorruptImage when the extent starting at ``objectid`` (before ``chunk``) reaches into it."""
        for key, _data, leaf in self.items(extent_tree, (objectid, EXTENT_ITEM, 0), (objectid, METADATA_ITEM, U64_MAX)):
            length = key[2] if key[1] == EXTENT_ITEM else self.superblock.node_size
            if objectid + length > chunk.logical:
                raise _corrupt(f"extent {objectid}+{length} reaches into chunk {chunk.logical}", None,
                               f"btrfs tree node {leaf}")

    def _default_subvolume(self) -> int:
        """The subvolume the "default" entry of the root tree's directory names, else 5; it must
        exist (the kernel does not mount a file system whose default subvolume is gone)."""
        name = b"default"
        where = "btrfs default subvolume entry"
        found = self.item(self.root_tree, (ROOT_TREE_DIR, DIR_ITEM, name_hash(name)))
        chosen = FS_TREE
        for entry in parse_dir_items(found[0], where) if found is not None else []:
            if entry.name == name:
                chosen = entry.location[0]
                if entry.location[1] != ROOT_ITEM:
                    raise _corrupt(f"the default entry names an item of type {entry.location[1]}", None, where)
        root = self.root_item(chosen)
        if root is None or root.refs == 0:
            raise _corrupt(f"the default subvolume {chosen} is missing", None, where)
        return chosen

    def subvolumes(self) -> list[Subvolume]:
        """Every subvolume and snapshot reachable from the top level (5 itself left out, as
        ``btrfs subvolume list`` leaves it), by id."""
        roots: dict[int, RootItem] = {}
        backrefs: dict[int, tuple[int, int, bytes]] = {}
        for key, data, _leaf in self.items(self.root_tree, (FIRST_FREE_OBJECTID, 0, 0),
                                          (LAST_FREE_OBJECTID, 255, U64_MAX)):
            tree_id, kind, offset = key
            if kind == ROOT_ITEM:
                roots[tree_id] = parse_root_item(data, tree_id, f"btrfs root item {tree_id}")
            elif kind == ROOT_BACKREF:
                (dirid, _sequence), name = parse_name_ref(data, ROOT_REF_HEADER, f"btrfs root backref {tree_id}")
                backrefs[tree_id] = offset, dirid, name
            if len(roots) > MAX_SUBVOLUMES or len(backrefs) > MAX_SUBVOLUMES:
                raise _corrupt(f"more than {MAX_SUBVOLUMES} subvolumes", None, "btrfs root tree")
        paths: dict[int, str | None] = {FS_TREE: ""}

        def path_of(tree_id: int) -> str | None:
            chain: list[int] = []
            while tree_id not in paths:
                if tree_id in chain or tree_id not in backrefs or tree_id not in roots or not roots[tree_id].refs:
                    for pending in chain:
                        paths[pending] = None
                    return None
                chain.append(tree_id)
                tree_id = backrefs[tree_id][0]
            for pending in reversed(chain):
                parent, dirid, name = backrefs[pending]
                base = paths[parent]
                if base is None:
                    paths[pending] = None
                    continue
                inner = self.inode_path(parent, dirid)
                paths[pending] = "/".join(part for part in (base, inner, _name(name)) if part)
            return paths[chain[0]] if chain else paths[tree_id]

        found = []
        for tree_id in sorted(roots):
            root = roots[tree_id]
            path = path_of(tree_id)
            if path is None:
                continue
            found.append(Subvolume(id=tree_id, parent_id=backrefs[tree_id][0], path=path,
                                   generation=root.tree.generation, readonly=bool(root.flags & ROOT_SUBVOL_RDONLY),
                                   uuid=_uuid_text(root.uuid), parent_uuid=_uuid_text(root.parent_uuid),
                                   otime=root.otime))
        return found

    def inode_path(self, tree_id: int, inode: int) -> str:
        """The path of directory ``inode`` below the root directory of file tree ``tree_id``."""
        root = self.file_tree(tree_id)
        tree = root.tree
        parts: list[str] = []
        seen = set()
        while inode != root.root_dirid:
            if inode in seen or len(parts) >= MAX_PATH_DEPTH:
                raise _corrupt(f"directory {inode} does not lead to the root", None, f"btrfs tree {tree_id}")
            seen.add(inode)
            for key, data, _leaf in self.items(tree, (inode, INODE_REF, 0), (inode, INODE_REF, U64_MAX)):
                _index, name = parse_name_ref(data, INODE_REF_HEADER, f"btrfs tree {tree_id} inode {inode} ref")
                parts.append(_name(name))
                inode = key[2]
                break
            else:
                raise _corrupt(f"directory {inode} has no parent", None, f"btrfs tree {tree_id}")
        return "/".join(reversed(parts))


# -- the file system -----------------------------------------------------------------------------------


class BtrfsFileSystem(GuestFileSystem[BtrfsNode]):
    """A btrfs file system at ``[offset, offset + length)`` of ``disk``, seen from one subvolume:
    ``subvol`` (its path from the top level) or ``subvolid``, as the mount options name them, else
    the default subvolume. Nodes are (tree id, inode number)."""

    type = "btrfs"

    def __init__(self, disk: Disk, offset: int, length: int, *, subvol: str | None = None,
                 subvolid: int | None = None) -> None:
        self._open(BtrfsVolume(disk, offset, length), subvol, subvolid)

    def _open(self, volume: BtrfsVolume, subvol: str | None, subvolid: int | None) -> None:
        self.volume = volume
        if subvol is not None and subvol.strip("/"):
            self._show(FS_TREE)
            tree_id, inode = self.resolve(subvol)
            if inode != self.volume.file_tree(tree_id).root_dirid:
                raise GuestPathError(f"subvol={subvol}: not a subvolume")
            if subvolid is not None and subvolid != tree_id:
                raise GuestPathError(f"subvol={subvol} is subvolume {tree_id}, not subvolid={subvolid}")
        elif subvol is not None:
            tree_id = FS_TREE
        else:
            tree_id = subvolid if subvolid is not None else volume.default_subvolume_id
        self._show(tree_id)

    def _show(self, tree_id: int) -> None:
        root = self.volume.file_tree(tree_id)
        self.subvolume_id = tree_id
        self.root = (tree_id, root.root_dirid)
        if not self._stat(self.root).is_dir:
            raise _corrupt("the subvolume's root is not a directory", None, f"btrfs tree {tree_id}")

    def open_subvolume(self, subvol: str | None = None, subvolid: int | None = None) -> BtrfsFileSystem:
        """Another view of the same volume (its caches shared), as ``subvol=``/``subvolid=`` name it."""
        view = object.__new__(type(self))
        view._open(self.volume, subvol, subvolid)
        return view

    @property
    def default_subvolume_id(self) -> int:
        return self.volume.default_subvolume_id

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The unused ranges of the whole device, whichever subvolume this view shows."""
        return self.volume.unused_ranges()

    def list_subvolumes(self) -> list[Subvolume]:
        """Every subvolume and snapshot of the volume (see :meth:`BtrfsVolume.subvolumes`)."""
        return self.volume.subvolumes()

    # -- inodes ------------------------------------------------------------------------------------

    def _tree(self, tree_id: int) -> Tree:
        return self.volume.file_tree(tree_id).tree

    def _cached_inode(self, node: BtrfsNode) -> tuple[Inode, Stat]:
        if not (isinstance(node, tuple) and len(node) == 2 and all(isinstance(part, int) for part in node)):
            raise GuestPathError(f"{node!r} is not a btrfs (tree, inode) pair")
        cache = self.volume.inodes
        cached = cache.get(node)
        if cached is not None:
            cache.move_to_end(node)
            return cached
        tree_id, number = node
        if number == EMPTY_SUBVOL_DIR:
            inode = Inode(size=0, nlink=1, uid=0, gid=0, mode=0o040755, flags=0, mtime=0.0)
        else:
            where = f"btrfs tree {tree_id} inode {number}"
            found = self.volume.item(self._tree(tree_id), (number, INODE_ITEM, 0))
            if found is None:
                raise _corrupt("inode item missing", None, where)
            inode = parse_inode(found[0], where)
        kind = inode.file_type
        flags = frozenset(name for bit, name in INODE_FLAGS.items() if inode.flags & bit)
        cached = inode, Stat(type=kind, size=inode.size if kind is not FileType.OTHER else 0, node=node,
                             mode=inode.mode & 0o7777, uid=inode.uid, gid=inode.gid, mtime=inode.mtime,
                             nlink=inode.nlink, flags=flags)
        cache[node] = cached
        if len(cache) > CACHED_INODES:
            cache.popitem(last=False)
        return cached

    def _stat(self, node: BtrfsNode) -> Stat:
        return self._cached_inode(node)[1]

    # -- directories -------------------------------------------------------------------------------

    def _target(self, tree_id: int, directory: int, entry: DirItem, structure: str) -> BtrfsNode:
        """The node an entry leads to: an inode of this tree, or the root of the subvolume it names
        (an empty directory where the root tree does not link that subvolume here)."""
        objectid, kind, _offset = entry.location
        if kind == INODE_ITEM:
            if objectid < FIRST_FREE_OBJECTID:
                raise _corrupt(f"entry {entry.name!r} names inode {objectid}", None, structure)
            return tree_id, objectid
        if kind != ROOT_ITEM:
            raise _corrupt(f"entry {entry.name!r} names an item of type {kind}", None, structure)
        ref = self.volume.root_ref(tree_id, objectid)
        if ref != (directory, entry.name):
            return tree_id, EMPTY_SUBVOL_DIR
        root = self.volume.root_item(objectid)
        if root is None or root.refs == 0:
            raise _corrupt(f"entry {entry.name!r} names subvolume {objectid}, which is missing", None, structure)
        return objectid, root.root_dirid

    def _directory(self, node: BtrfsNode) -> tuple[int, int]:
        tree_id, number = node
        if not self._stat(node).is_dir:
            raise GuestPathError(f"btrfs tree {tree_id} inode {number} is not a directory")
        return tree_id, number

    def _entries(self, node: BtrfsNode) -> Iterator[DirEntry[BtrfsNode]]:
        tree_id, number = self._directory(node)
        if number == EMPTY_SUBVOL_DIR:
            return
        where = f"btrfs tree {tree_id} directory {number}"
        items = self.volume.items(self._tree(tree_id), (number, DIR_INDEX, 0), (number, DIR_INDEX, U64_MAX))
        for count, (_key, data, _leaf) in enumerate(items, 1):
            entries = parse_dir_items(data, where)
            if len(entries) != 1:
                raise _corrupt(f"directory index item of {len(entries)} entries", None, where)
            entry = entries[0]
            if count > MAX_DIRECTORY_ENTRIES:
                raise _corrupt(f"more than {MAX_DIRECTORY_ENTRIES} entries", None, where)
            yield DirEntry(_name(entry.name), self._target(tree_id, number, entry, where),
                           DIR_ITEM_TYPES.get(entry.type))

    def _lookup(self, directory: BtrfsNode, name: str) -> BtrfsNode | None:
        """Through the DIR_ITEM keyed by the name's hash."""
        tree_id, number = self._directory(directory)
        if number == EMPTY_SUBVOL_DIR:
            return None
        raw = name.encode("utf-8", "surrogateescape")
        where = f"btrfs tree {tree_id} directory {number}"
        found = self.volume.item(self._tree(tree_id), (number, DIR_ITEM, name_hash(raw)))
        if found is None:
            return None
        for entry in parse_dir_items(found[0], where):
            if entry.name == raw:
                return self._target(tree_id, number, entry, where)
        return None

    # -- data --------------------------------------------------------------------------------------

    def _data(self, node: BtrfsNode, inode: Inode, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a file's data (cut at its size); holes and prealloc
        extents read as zeros."""
        tree_id, number = node
        end = min(offset + length, inode.size)
        if offset >= end:
            return b""
        where = f"btrfs tree {tree_id} inode {number} data"
        sector = self.volume.superblock.sector_size
        out = bytearray(end - offset)
        covered = 0  # the end of the extents seen so far: the next must not start before it
        for key, data, _leaf in self.volume.items(self._tree(tree_id), (number, EXTENT_DATA, offset),
                                                  (number, EXTENT_DATA, end - 1), from_previous=True):
            if key[:2] != (number, EXTENT_DATA):
                continue
            extent = parse_file_extent(data, sector, where)
            start = key[2]
            if start < covered or start + extent.length > U64_MAX:
                raise _corrupt(f"extent at {start} overlaps the one before", None, where)
            covered = start + extent.length
            low, high = max(offset, start), min(end, covered)
            if low >= high or extent.type == EXTENT_PREALLOC:
                continue
            if extent.type == EXTENT_INLINE:
                content = extent.inline if extent.compression == COMPRESS_NONE else decompress_extent(
                    extent.inline, extent.compression, extent.ram_bytes, sector)
                out[low - offset : high - offset] = content[low - start : high - start]
            elif extent.disk_bytenr == 0:
                continue
            elif extent.compression == COMPRESS_NONE:
                out[low - offset : high - offset] = self.volume.read_logical(
                    extent.disk_bytenr + extent.offset + low - start, high - low, where)
            else:
                content = self._decompressed(extent, where)
                at = extent.offset + low - start
                out[low - offset : high - offset] = content[at : at + high - low]
        return bytes(out)

    def _decompressed(self, extent: FileExtent, structure: str) -> bytes:
        """A compressed extent's data, through a small cache (files are read in pieces)."""
        key = (extent.disk_bytenr, extent.disk_num_bytes, extent.compression, extent.ram_bytes)
        cache = self.volume.extents
        content = cache.get(key)
        if content is None:
            raw = self.volume.read_logical(extent.disk_bytenr, extent.disk_num_bytes, structure)
            content = decompress_extent(raw, extent.compression, extent.ram_bytes, self.volume.superblock.sector_size)
            cache[key] = content
            if len(cache) > CACHED_EXTENTS:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return content

    def _read(self, node: BtrfsNode, offset: int, length: int) -> bytes:
        inode, info = self._cached_inode(node)
        if not info.is_file:
            raise GuestPathError(f"btrfs {node} is not a regular file")
        return self._data(node, inode, offset, length)

    def _readlink(self, node: BtrfsNode) -> str:
        inode, info = self._cached_inode(node)
        where = f"btrfs tree {node[0]} inode {node[1]} symbolic link"
        if not info.is_symlink:
            raise GuestPathError(f"btrfs {node} is not a symbolic link")
        if not 0 < inode.size <= MAX_SYMLINK:
            raise _corrupt(f"symbolic link of {inode.size} bytes", None, where)
        target = self._data(node, inode, 0, inode.size)
        if b"\0" in target:
            raise _corrupt("symbolic link target holds a NUL", None, where)
        return _name(target)
