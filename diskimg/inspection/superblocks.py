"""The superblocks of the file systems diskimg both recognises and reads: ext2/3/4, XFS, NTFS and FAT.

One parser per structure, pure (bytes in, values out), used by the signature probes
(``signatures.py``, which must accept anything and only describe it) and by the file system drivers
(``fs/``, which check the values they need and refuse a broken volume). Each structure is a frozen
dataclass whose fields name the specification's fields with their byte offset and ``struct`` format,
so that the layout reads beside the specification and an offset has one home
(:func:`field_offset` gives it to error messages). The derived values (a block size from its
logarithm, a 64-bit count from its halves, the FAT type) are properties, computed by one rule.

A parser returns None when the bytes are not that structure (no magic, or shorter than its fields);
it never raises and never judges the values: what a value may be is the reader's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Structure = TypeVar("Structure", bound="DataclassInstance")


def _at(offset: int, fmt: str) -> Any:
    """A field of an on-disk structure: its byte offset and its ``struct`` format (one value, or a
    tuple of values for a repeated format such as ``2I``)."""
    return field(metadata={"offset": offset, "format": fmt})


def field_offset(structure: type[DataclassInstance], name: str) -> int:
    """The byte offset of field ``name`` in ``structure`` (for the messages of a reader that refuses it)."""
    return int(next(f.metadata["offset"] for f in fields(structure) if f.name == name))


def _span(structure: type[DataclassInstance]) -> int:
    """The bytes the fields of ``structure`` span from its start."""
    return max(int(f.metadata["offset"]) + struct.calcsize("<" + f.metadata["format"]) for f in fields(structure))


def _decode(structure: type[Structure], raw: bytes, byte_order: str) -> Structure | None:
    """``structure`` with its fields read from ``raw`` ("<" little-endian, ">" big-endian), or None
    when ``raw`` is shorter than the fields."""
    if len(raw) < _span(structure):
        return None
    values: dict[str, Any] = {}
    for item in fields(structure):
        value = struct.unpack_from(byte_order + item.metadata["format"], raw, item.metadata["offset"])
        values[item.name] = value[0] if len(value) == 1 else value
    return structure(**values)


def flag_names(value: int, names: dict[int, str]) -> list[str]:
    """The names of the bits set in ``value``; bits without a name as one hex number."""
    found = [name for bit, name in names.items() if value & bit]
    unknown = value & ~sum(names)
    if unknown:
        found.append(f"0x{unknown:x}")
    return found


# -- ext2/3/4 (the kernel's struct ext4_super_block, little-endian) ------------------------------------

#: where the superblock lies in the volume, and its size
EXT_SUPERBLOCK_OFFSET = 1024
EXT_SUPERBLOCK_SIZE = 1024
EXT_MAGIC = 0xEF53
#: s_log_block_size: the block is 1024 << value bytes, 64 KiB at most
EXT_MAX_LOG_BLOCK_SIZE = 6
#: the inode size of revision 0 file systems (later ones record it in s_inode_size)
EXT_GOOD_OLD_INODE_SIZE = 128
#: the group descriptor size without the 64bit feature (with it, s_desc_size says)
EXT_MIN_DESC_SIZE = 32

# s_state
EXT_STATE_VALID = 0x1  # cleanly unmounted
EXT_STATE_ERROR = 0x2  # errors detected

# s_feature_compat, s_feature_incompat, s_feature_ro_compat bits used by diskimg
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_COMPAT_SPARSE_SUPER2 = 0x200
EXT_INCOMPAT_COMPRESSION = 0x1
EXT_INCOMPAT_FILETYPE = 0x2
EXT_INCOMPAT_RECOVER = 0x4  # the journal needs replaying
EXT_INCOMPAT_JOURNAL_DEV = 0x8
EXT_INCOMPAT_META_BG = 0x10
EXT_INCOMPAT_64BIT = 0x80
EXT_INCOMPAT_DIRDATA = 0x1000
EXT_INCOMPAT_LARGEDIR = 0x4000
EXT_RO_COMPAT_SPARSE_SUPER = 0x1
EXT_RO_COMPAT_GDT_CSUM = 0x10  # uninit_bg: descriptors carry a CRC16, groups may be left uninitialised
EXT_RO_COMPAT_BIGALLOC = 0x200  # the bitmaps count clusters, not blocks
EXT_RO_COMPAT_METADATA_CSUM = 0x400  # CRC32C on the superblock, descriptors and bitmaps
EXT_RO_COMPAT_ORPHAN_PRESENT = 0x10000  # the orphan file holds inodes to release
EXT_INCOMPAT_CSUM_SEED = 0x2000  # the checksum seed is s_checksum_seed, not the UUID's CRC
#: s_checksum_type of metadata_csum: CRC32C
EXT_CHECKSUM_CRC32C = 1
#: where s_checksum lies: the superblock's CRC32C covers the bytes before it
EXT_SUPERBLOCK_CHECKSUM_OFFSET = 0x3FC
#: the features ext3 knows: any other incompatible or read-only one makes an ext4
EXT3_INCOMPAT = EXT_INCOMPAT_FILETYPE | EXT_INCOMPAT_RECOVER | EXT_INCOMPAT_META_BG
EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir

#: every feature bit's name, as mke2fs and dumpe2fs spell it
EXT_COMPAT = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr", 0x10: "resize_inode",
    0x20: "dir_index", 0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes", 0x1000: "orphan_file",
}
EXT_INCOMPAT = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev", 0x10: "meta_bg",
    0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg", 0x400: "ea_inode", 0x1000: "dirdata",
    0x2000: "metadata_csum_seed", 0x4000: "large_dir", 0x8000: "inline_data", 0x10000: "encrypt",
    0x20000: "casefold",
}
EXT_RO_COMPAT = {
    0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file", 0x10: "uninit_bg",
    0x20: "dir_nlink", 0x40: "extra_isize", 0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum",
    0x800: "replica", 0x1000: "read-only", 0x2000: "project", 0x8000: "verity", 0x10000: "orphan_present",
}


@dataclass(frozen=True)
class ExtSuperblock:
    """The fields of the ext2/3/4 superblock diskimg uses (``s_`` prefixes left out)."""

    inodes_count: int = _at(0x00, "I")
    blocks_count_lo: int = _at(0x04, "I")
    free_blocks_count_lo: int = _at(0x0C, "I")
    free_inodes_count: int = _at(0x10, "I")
    first_data_block: int = _at(0x14, "I")
    log_block_size: int = _at(0x18, "I")
    blocks_per_group: int = _at(0x20, "I")
    inodes_per_group: int = _at(0x28, "I")
    magic: int = _at(0x38, "H")
    state: int = _at(0x3A, "H")
    minor_rev_level: int = _at(0x3E, "H")
    rev_level: int = _at(0x4C, "I")
    inode_size_field: int = _at(0x58, "H")  # s_inode_size: meaningful from revision 1 on
    feature_compat: int = _at(0x5C, "I")
    feature_incompat: int = _at(0x60, "I")
    feature_ro_compat: int = _at(0x64, "I")
    uuid: bytes = _at(0x68, "16s")
    volume_name: bytes = _at(0x78, "16s")
    last_mounted: bytes = _at(0x88, "64s")
    reserved_gdt_blocks: int = _at(0xCE, "H")  # descriptor blocks kept for online growth
    journal_inum: int = _at(0xE0, "I")
    last_orphan: int = _at(0xE8, "I")  # the head of the list of inodes to release at mount
    desc_size_field: int = _at(0xFE, "H")  # s_desc_size: meaningful with the 64bit feature
    first_meta_bg: int = _at(0x104, "I")
    blocks_count_hi: int = _at(0x150, "I")
    free_blocks_count_hi: int = _at(0x158, "I")
    checksum_type: int = _at(0x175, "B")
    backup_bgs: tuple[int, int] = _at(0x24C, "2I")  # the groups holding a backup, with sparse_super2
    checksum_seed: int = _at(0x270, "I")  # with metadata_csum_seed

    @property
    def is_64bit(self) -> bool:
        return bool(self.feature_incompat & EXT_INCOMPAT_64BIT)

    @property
    def blocks_count(self) -> int:
        """The block count: its high half counts with the 64bit feature (as the kernel reads it)."""
        return self.blocks_count_lo | (self.blocks_count_hi << 32 if self.is_64bit else 0)

    @property
    def free_blocks_count(self) -> int:
        return self.free_blocks_count_lo | (self.free_blocks_count_hi << 32 if self.is_64bit else 0)

    @property
    def block_size(self) -> int | None:
        """Bytes per block, None when s_log_block_size is beyond 64 KiB."""
        if self.log_block_size > EXT_MAX_LOG_BLOCK_SIZE:
            return None
        return 1024 << self.log_block_size

    @property
    def inode_size(self) -> int:
        return self.inode_size_field if self.rev_level else EXT_GOOD_OLD_INODE_SIZE

    @property
    def desc_size(self) -> int:
        """Bytes per group descriptor."""
        return self.desc_size_field if self.is_64bit else EXT_MIN_DESC_SIZE

    @property
    def group_count(self) -> int:
        """Block groups (blocks_per_group must be checked non-zero first)."""
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def kind(self) -> str:
        """``ext-journal`` (an external journal device), ``ext4`` (a feature ext3 lacks), ``ext3``
        (a journal) or ``ext2``."""
        if self.feature_incompat & EXT_INCOMPAT_JOURNAL_DEV:
            return "ext-journal"
        if self.feature_incompat & ~EXT3_INCOMPAT or self.feature_ro_compat & ~EXT3_RO_COMPAT:
            return "ext4"
        if self.feature_compat & EXT_COMPAT_HAS_JOURNAL:
            return "ext3"
        return "ext2"

    @property
    def features(self) -> list[str]:
        return (flag_names(self.feature_compat, EXT_COMPAT) + flag_names(self.feature_incompat, EXT_INCOMPAT)
                + flag_names(self.feature_ro_compat, EXT_RO_COMPAT))


def parse_ext_superblock(raw: bytes) -> ExtSuperblock | None:
    """The superblock in ``raw`` (the bytes from offset 1024 of the volume), or None without its magic."""
    sb = _decode(ExtSuperblock, raw, "<")
    return sb if sb is not None and sb.magic == EXT_MAGIC else None


# -- XFS (xfs_format.h's struct xfs_dsb, big-endian) ----------------------------------------------------

XFS_MAGIC = b"XFSB"
#: bytes of the version 5 superblock (version 4 uses fewer of them)
XFS_SUPERBLOCK_SIZE = 264
#: sb_versionnum: the version in its low bits, feature bits above
XFS_VERSION_NUMBITS = 0xF
XFS_VERSION_LOGV2 = 0x400  # version 2 log records (always so in version 5)
XFS_VERSION_DIRV2 = 0x2000
XFS_VERSION_BORG = 0x4000  # ASCII case-insensitive names ("-n version=ci")
XFS_VERSION_MOREBITS = 0x8000  # sb_features2 is valid
XFS_FEATURES2_FTYPE = 0x200
XFS_INCOMPAT_FTYPE = 0x1
XFS_INCOMPAT_META_UUID = 0x4
XFS_INCOMPAT_NEEDSREPAIR = 0x10
XFS_INCOMPAT_NREXT64 = 0x20
#: sb_features_incompat bits' names (version 5)
XFS_INCOMPAT = {0x1: "ftype", 0x2: "sparse_inodes", 0x4: "meta_uuid", 0x8: "bigtime", 0x10: "needsrepair",
                0x20: "nrext64", 0x40: "exchange", 0x80: "parent"}


@dataclass(frozen=True)
class XfsSuperblock:
    """The fields of the XFS primary superblock diskimg uses (sector 0 of allocation group 0)."""

    magic: bytes = _at(0, "4s")
    block_size: int = _at(4, "I")
    dblocks: int = _at(8, "Q")  # blocks of the data device
    uuid: bytes = _at(32, "16s")
    log_start: int = _at(48, "Q")  # the internal log's first block (0: the log is on another device)
    root_inode: int = _at(56, "Q")
    ag_blocks: int = _at(84, "I")
    ag_count: int = _at(88, "I")
    log_blocks: int = _at(96, "I")
    versionnum: int = _at(100, "H")
    sector_size: int = _at(102, "H")
    inode_size: int = _at(104, "H")
    inodes_per_block: int = _at(106, "H")
    fname: bytes = _at(108, "12s")  # the label
    block_log: int = _at(120, "B")
    inode_log: int = _at(122, "B")
    inodes_per_block_log: int = _at(123, "B")
    ag_block_log: int = _at(124, "B")
    in_progress: int = _at(126, "B")  # mkfs has not finished
    icount: int = _at(128, "Q")  # inodes allocated
    ifree: int = _at(136, "Q")
    fdblocks: int = _at(144, "Q")  # free data blocks
    dir_block_log: int = _at(192, "B")
    features2: int = _at(200, "I")
    features_incompat: int = _at(216, "I")
    meta_uuid: bytes = _at(248, "16s")  # what metadata records as the file system's UUID, with meta_uuid

    @property
    def version(self) -> int:
        return self.versionnum & XFS_VERSION_NUMBITS

    @property
    def incompat(self) -> int:
        """The incompatible features (a version 5 field; none before)."""
        return self.features_incompat if self.version >= 5 else 0

    @property
    def has_ftype(self) -> bool:
        """Whether directory entries record the file type."""
        if self.version >= 5:
            return bool(self.incompat & XFS_INCOMPAT_FTYPE)
        return bool(self.versionnum & XFS_VERSION_MOREBITS and self.features2 & XFS_FEATURES2_FTYPE)

    @property
    def nrext64(self) -> bool:
        """Whether inodes may count their extents in 64 bits."""
        return bool(self.incompat & XFS_INCOMPAT_NREXT64)

    @property
    def metadata_uuid(self) -> bytes:
        """The UUID that version 5 metadata blocks carry (sb_meta_uuid once the UUID was changed)."""
        return self.meta_uuid if self.incompat & XFS_INCOMPAT_META_UUID else self.uuid

    @property
    def log_v2(self) -> bool:
        """Whether the log writes version 2 records (larger records, extended headers)."""
        return self.version >= 5 or bool(self.versionnum & XFS_VERSION_LOGV2)

    @property
    def ascii_ci(self) -> bool:
        return bool(self.versionnum & XFS_VERSION_BORG)

    @property
    def dir_block_size(self) -> int:
        return self.block_size << self.dir_block_log

    @property
    def size(self) -> int:
        """Bytes of the data device."""
        return self.dblocks * self.block_size


def parse_xfs_superblock(raw: bytes) -> XfsSuperblock | None:
    """The superblock in ``raw`` (the volume's first bytes), or None without its magic."""
    sb = _decode(XfsSuperblock, raw, ">")
    return sb if sb is not None and sb.magic == XFS_MAGIC else None


# -- NTFS boot sector (little-endian) -------------------------------------------------------------------

NTFS_OEM_ID = b"NTFS    "
#: the sector sizes NTFS is formatted with
NTFS_SECTOR_SIZES = (512, 1024, 2048, 4096)


@dataclass(frozen=True)
class NtfsBootSector:
    """The fields of an NTFS boot sector diskimg uses."""

    oem_id: bytes = _at(0x03, "8s")
    bytes_per_sector: int = _at(0x0B, "H")
    sectors_per_cluster: int = _at(0x0D, "B")  # above 0x80: the cluster is 1 << (256 - value) sectors
    total_sectors: int = _at(0x28, "Q")
    mft_lcn: int = _at(0x30, "Q")  # the cluster of $MFT
    #: the size of an MFT record and of an index record: n > 0 counts clusters, -n means 1 << n bytes
    clusters_per_mft_record: int = _at(0x40, "b")
    clusters_per_index_record: int = _at(0x44, "b")
    serial: int = _at(0x48, "Q")

    @property
    def cluster_size(self) -> int | None:
        """Bytes per cluster, None where the sector size or the cluster count is not valid."""
        per_cluster = self.sectors_per_cluster
        if self.bytes_per_sector not in NTFS_SECTOR_SIZES or not per_cluster:
            return None
        return self.bytes_per_sector * (per_cluster if per_cluster <= 0x80 else 1 << (256 - per_cluster))

    @property
    def volume_size(self) -> int | None:
        """Bytes of the volume: its counted sectors and the backup boot sector that follows them."""
        if self.cluster_size is None:
            return None
        return (self.total_sectors + 1) * self.bytes_per_sector


def parse_ntfs_boot_sector(raw: bytes) -> NtfsBootSector | None:
    """The boot sector in ``raw``, or None without the "NTFS" OEM id."""
    boot = _decode(NtfsBootSector, raw, "<")
    return boot if boot is not None and boot.oem_id == NTFS_OEM_ID else None


# -- FAT12/16/32 boot sector (Microsoft's FAT specification, little-endian) ------------------------------

FAT_SECTOR_SIZES = (512, 1024, 2048, 4096)
FAT_MAX_FATS = 4
#: bytes of a directory entry (the fixed root directory of FAT12/16 counts them)
FAT_DIR_ENTRY_SIZE = 32
#: the cluster counts below which a volume is FAT12, then FAT16 (the specification's rule)
FAT12_MAX_CLUSTERS = 4085
FAT16_MAX_CLUSTERS = 65525
#: BS_BootSig values: 0x29 has volume id and label, 0x28 (older) the volume id only
FAT_EXTENDED_BOOT_SIGNATURES = (0x28, 0x29)
FAT_BOOT_SIGNATURE_WITH_LABEL = 0x29
#: the boot sector's state byte (offset 37, or 65 on FAT32): set while the volume is mounted, as Linux
#: and Windows NT write it and fsck.fat reports it ("Dirty bit is set")
FAT_STATE_DIRTY = 0x01
#: BPB_ExtFlags (FAT32): mirroring off (one FAT active), and the active FAT's number
FAT32_MIRRORING_OFF = 0x80
FAT32_ACTIVE_FAT = 0x0F


@dataclass(frozen=True)
class FatBpb:
    """The BIOS parameter block of a FAT boot sector and its extended boot record (at 36 for FAT12/16,
    at 64 for FAT32: both positions are read, ``fat_type`` chooses), with the layout derived from it."""

    bytes_per_sector: int = _at(11, "H")
    sectors_per_cluster: int = _at(13, "B")
    reserved_sectors: int = _at(14, "H")
    num_fats: int = _at(16, "B")
    root_entries: int = _at(17, "H")
    total_sectors_16: int = _at(19, "H")
    fat_sectors_16: int = _at(22, "H")
    total_sectors_32: int = _at(32, "I")
    fat_sectors_32: int = _at(36, "I")  # FAT32 only, like the next three
    ext_flags_32: int = _at(40, "H")
    root_cluster_32: int = _at(44, "I")
    state_16: int = _at(37, "B")  # BS_Reserved1: Windows NT and Linux keep the volume's state flags there
    boot_signature_16: int = _at(38, "B")
    volume_id_16: int = _at(39, "I")
    volume_label_16: bytes = _at(43, "11s")
    fs_type_16: bytes = _at(54, "8s")
    state_32: int = _at(65, "B")
    boot_signature_32: int = _at(66, "B")
    volume_id_32: int = _at(67, "I")
    volume_label_32: bytes = _at(71, "11s")
    fs_type_32: bytes = _at(82, "8s")

    @property
    def total_sectors(self) -> int:
        return self.total_sectors_16 or self.total_sectors_32

    @property
    def fat_sectors(self) -> int:
        return self.fat_sectors_16 or self.fat_sectors_32

    @property
    def root_dir_sectors(self) -> int:
        return (self.root_entries * FAT_DIR_ENTRY_SIZE + self.bytes_per_sector - 1) // self.bytes_per_sector

    @property
    def data_sectors(self) -> int:
        return self.total_sectors - self.reserved_sectors - self.num_fats * self.fat_sectors - self.root_dir_sectors

    @property
    def clusters(self) -> int:
        return self.data_sectors // self.sectors_per_cluster

    @property
    def fat_type(self) -> str:
        """By the label mkfs.fat and Windows write, else by the cluster count, as the specification says."""
        if self.fs_type_32 == b"FAT32   ":
            return "fat32"
        if self.fs_type_16 == b"FAT12   ":
            return "fat12"
        if self.fs_type_16 == b"FAT16   ":
            return "fat16"
        clusters = self.clusters
        return "fat12" if clusters < FAT12_MAX_CLUSTERS else "fat16" if clusters < FAT16_MAX_CLUSTERS else "fat32"

    @property
    def root_cluster(self) -> int:
        """The first cluster of the root directory (FAT32; 0 where the root is the fixed area)."""
        return self.root_cluster_32 if self.fat_type == "fat32" else 0

    @property
    def ext_flags(self) -> int:
        return self.ext_flags_32 if self.fat_type == "fat32" else 0

    @property
    def state(self) -> int:
        """The state flags of the boot sector's reserved byte (FAT_STATE_DIRTY: mounted, not cleanly unmounted)."""
        return self.state_32 if self.fat_type == "fat32" else self.state_16

    @property
    def boot_signature(self) -> int:
        return self.boot_signature_32 if self.fat_type == "fat32" else self.boot_signature_16

    @property
    def volume_id(self) -> int | None:
        """The volume serial number, None without an extended boot record."""
        if self.boot_signature not in FAT_EXTENDED_BOOT_SIGNATURES:
            return None
        return self.volume_id_32 if self.fat_type == "fat32" else self.volume_id_16

    @property
    def volume_label(self) -> bytes | None:
        if self.boot_signature != FAT_BOOT_SIGNATURE_WITH_LABEL:
            return None
        return self.volume_label_32 if self.fat_type == "fat32" else self.volume_label_16

    @property
    def cluster_size(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def fat_offset(self) -> int:
        return self.reserved_sectors * self.bytes_per_sector

    @property
    def root_dir_offset(self) -> int:
        return (self.reserved_sectors + self.num_fats * self.fat_sectors) * self.bytes_per_sector

    @property
    def root_dir_size(self) -> int:
        return self.root_entries * FAT_DIR_ENTRY_SIZE

    @property
    def data_offset(self) -> int:
        return self.root_dir_offset + self.root_dir_sectors * self.bytes_per_sector


def parse_fat_bpb(head: bytes) -> FatBpb | None:
    """The BPB of a FAT12/16/32 boot sector, or None if these bytes are not one: a sector size,
    cluster size, reserved area and FAT count out of range, no "FAT" label (at 54, or at 82 for
    FAT32), or no room left for data."""
    bpb = _decode(FatBpb, head, "<")
    if bpb is None:
        return None
    per_cluster = bpb.sectors_per_cluster
    if (bpb.bytes_per_sector not in FAT_SECTOR_SIZES or per_cluster == 0 or per_cluster & (per_cluster - 1)
            or not bpb.reserved_sectors or not 1 <= bpb.num_fats <= FAT_MAX_FATS):
        return None
    if (bpb.fs_type_32 != b"FAT32   " and bpb.fs_type_16 not in (b"FAT12   ", b"FAT16   ", b"FAT     ")
            and bpb.fs_type_32[:5] != b"FAT  "):
        return None
    if not bpb.total_sectors or not bpb.fat_sectors or bpb.data_sectors <= 0:
        return None
    return bpb


def label_text(raw: bytes, encoding: str = "utf-8") -> str | None:
    """A label or name field as text: up to its first NUL, undecodable bytes replaced, blanks trimmed."""
    text = bytes(raw).split(b"\0", 1)[0].decode(encoding, errors="replace").strip()
    return text or None


# -- btrfs ---------------------------------------------------------------------------------------------

#: the primary superblock and its copies lie at these offsets of the device (where it is large enough)
BTRFS_SUPERBLOCK_OFFSETS = (0x10000, 0x4000000, 0x4000000000)
BTRFS_SUPERBLOCK_SIZE = 0x1000
BTRFS_MAGIC = b"_BHRfS_M"
#: the superblock up to its label's end and the fields after it: checksum, fsid, bytenr, flags, magic,
#: generation, root, chunk_root, log_root, (unused) log_root_transid, total_bytes, bytes_used,
#: root_dir_objectid, num_devices, sectorsize, nodesize, (unused) leafsize, stripesize,
#: sys_chunk_array_size, chunk_root_generation, compat, compat_ro and incompat flags, csum_type,
#: root_level, chunk_root_level, log_root_level; then the device item: devid, total_bytes,
#: bytes_used, io_align, io_width, sector_size, type, generation, start_offset, dev_group,
#: seek_speed, bandwidth, uuid, fsid; then label, cache_generation, uuid_tree_generation, metadata_uuid
BTRFS_SUPERBLOCK = struct.Struct("<32s16sQQ8sQQQQQQQQQIIIIIQQQQHBBBQQQIIIQQQIBB16s16s256sQQ16s")
#: where the system chunk array (the chunks that hold the chunk tree) lies, and its capacity
BTRFS_SYS_CHUNK_ARRAY = 0x32B
BTRFS_SYS_CHUNK_ARRAY_MAX = 2048
BTRFS_INCOMPAT_METADATA_UUID = 0x400
BTRFS_INCOMPAT = {
    0x1: "mixed_backref", 0x2: "default_subvol", 0x4: "mixed_groups", 0x8: "compress_lzo", 0x10: "compress_zstd",
    0x20: "big_metadata", 0x40: "extended_iref", 0x80: "raid56", 0x100: "skinny_metadata", 0x200: "no_holes",
    0x400: "metadata_uuid", 0x800: "raid1c34", 0x1000: "zoned", 0x2000: "extent_tree_v2",
    0x4000: "raid_stripe_tree", 0x10000: "simple_quota",
}


@dataclass(frozen=True)
class BtrfsSuperblock:
    """The fields of a btrfs superblock (one of its copies), as stored: nothing is checked here."""

    checksum: bytes
    fsid: bytes
    bytenr: int  # where this copy says it lies
    flags: int
    generation: int
    root: int  # the root tree's logical address
    chunk_root: int
    log_root: int
    total_bytes: int
    bytes_used: int
    root_dir_objectid: int
    num_devices: int
    sector_size: int
    node_size: int
    stripe_size: int
    sys_chunk_array_size: int
    chunk_root_generation: int
    compat: int
    compat_ro: int
    incompat: int
    csum_type: int
    root_level: int
    chunk_root_level: int
    log_root_level: int
    devid: int  # this device's id, and its size
    device_total_bytes: int
    device_uuid: bytes
    device_fsid: bytes
    label: str | None
    metadata_uuid: bytes
    sys_chunk_array: bytes

    @property
    def metadata_fsid(self) -> bytes:
        """What tree blocks carry as their fsid (the metadata_uuid when that feature is on)."""
        return self.metadata_uuid if self.incompat & BTRFS_INCOMPAT_METADATA_UUID else self.fsid


def parse_btrfs_superblock(raw: bytes) -> BtrfsSuperblock | None:
    """The superblock in ``raw`` (its 4 KiB, from the copy's start), or None without the magic."""
    if len(raw) < BTRFS_SUPERBLOCK_SIZE or raw[0x40:0x48] != BTRFS_MAGIC:
        return None
    (checksum, fsid, bytenr, flags, _magic, generation, root, chunk_root, log_root, _log_transid, total_bytes,
     bytes_used, root_dir, num_devices, sector_size, node_size, _leaf_size, stripe_size, sys_array_size,
     chunk_root_generation, compat, compat_ro, incompat, csum_type, root_level, chunk_root_level, log_root_level,
     devid, device_total, _device_used, _io_align, _io_width, _device_sector, _device_type, _device_generation,
     _start_offset, _dev_group, _seek_speed, _bandwidth, device_uuid, device_fsid, label, _cache_generation,
     _uuid_tree_generation, metadata_uuid) = BTRFS_SUPERBLOCK.unpack_from(raw)
    return BtrfsSuperblock(
        checksum=checksum, fsid=fsid, bytenr=bytenr, flags=flags, generation=generation, root=root,
        chunk_root=chunk_root, log_root=log_root, total_bytes=total_bytes, bytes_used=bytes_used,
        root_dir_objectid=root_dir, num_devices=num_devices, sector_size=sector_size, node_size=node_size,
        stripe_size=stripe_size, sys_chunk_array_size=sys_array_size, chunk_root_generation=chunk_root_generation,
        compat=compat, compat_ro=compat_ro, incompat=incompat, csum_type=csum_type, root_level=root_level,
        chunk_root_level=chunk_root_level, log_root_level=log_root_level, devid=devid, device_total_bytes=device_total,
        device_uuid=device_uuid, device_fsid=device_fsid, label=label_text(label), metadata_uuid=metadata_uuid,
        sys_chunk_array=raw[BTRFS_SYS_CHUNK_ARRAY : BTRFS_SYS_CHUNK_ARRAY + BTRFS_SYS_CHUNK_ARRAY_MAX],
    )
