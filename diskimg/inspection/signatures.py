"""File systems and other volume signatures, identified from their superblocks.

Pure functions over bytes (``probe_bytes(head)``, ``probe_boot_sector(head)``) plus a thin reader
over a disk (``probe(disk, offset, length)``): it reads a few KiB at known offsets, never a file
system's data. Nothing but :class:`~diskimg.errors.DiskImageError` escapes, whatever the bytes.

What is recognised (``FileSystem.type``): ``ext2``, ``ext3``, ``ext4``, ``ext-journal``, ``xfs``,
``btrfs``, ``ntfs``, ``bitlocker``, ``fat12``, ``fat16``, ``fat32``, ``exfat``, ``swap``,
``lvm2`` (a PV label), ``luks`` (LUKS1/LUKS2), ``squashfs``, ``md`` (Linux RAID v1.1/1.2
superblock), ``zfs`` (an uberblock, found only by ``probe``, which may read a little further).

Order matters where structures share bytes: those whose signature lies in sector 0 (a boot
sector ending in 55 AA like an MBR, or a header at offset 0) are probed first
(``probe_boot_sector``), then those whose superblock lies further in (ext at 1024, btrfs at
64 KiB, the LVM label in sectors 0-3, the swap signature at the end of the first page, md at 4 KiB).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CorruptImage

#: bytes ``probe_bytes`` can use: up to the btrfs superblock's label (64 KiB + 0x22b)
HEAD_SIZE = 0x10000 + 0x1000

#: human names of the types (for messages)
DESCRIPTIONS = {
    "ext2": "an ext2 file system",
    "ext3": "an ext3 file system",
    "ext4": "an ext4 file system",
    "ext-journal": "an ext3/ext4 external journal device",
    "xfs": "an XFS file system",
    "btrfs": "a Btrfs file system",
    "ntfs": "an NTFS file system",
    "bitlocker": "a BitLocker-encrypted volume",
    "fat12": "a FAT12 file system",
    "fat16": "a FAT16 file system",
    "fat32": "a FAT32 file system",
    "exfat": "an exFAT file system",
    "swap": "a Linux swap area",
    "lvm2": "an LVM2 physical volume",
    "luks": "a LUKS-encrypted volume",
    "squashfs": "a squashfs file system",
    "md": "a Linux software RAID (md) member",
    "zfs": "a ZFS pool member",
}

FAT_TYPES = ("fat12", "fat16", "fat32")


class Disk(Protocol):
    """What the parsers need from a disk: positional reads (a DiskReader has this)."""

    def read_at(self, offset: int, length: int, /) -> bytes: ...


@dataclass
class FileSystem:
    """What a superblock says. ``size`` is the bytes the file system claims to span."""

    type: str
    uuid: str | None = None
    label: str | None = None
    version: str | None = None
    block_size: int | None = None
    size: int | None = None
    free: int | None = None
    #: "clean", "needs_recovery" (journal to replay), "not_clean", "errors", "needs_repair",
    #: "hibernated" (swap holding a hibernation image); None where the superblock does not say
    state: str | None = None
    features: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.type, self.type)

    @property
    def is_fat(self) -> bool:
        return self.type in FAT_TYPES

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"type": self.type}
        for key in ("uuid", "label", "version", "block_size", "size", "free", "state"):
            value = getattr(self, key)
            if value is not None:
                result[key] = value
        if self.features:
            result["features"] = list(self.features)
        if self.details:
            result["details"] = dict(self.details)
        return result


# -- little helpers that never raise -------------------------------------------------------------


def _at(data: bytes, offset: int, magic: bytes) -> bool:
    return data[offset : offset + len(magic)] == magic


def _u8(data: bytes, offset: int) -> int:
    return data[offset] if len(data) > offset else 0


def _le(data: bytes, offset: int, size: int) -> int:
    chunk = data[offset : offset + size]
    return int.from_bytes(chunk, "little") if len(chunk) == size else 0


def _be(data: bytes, offset: int, size: int) -> int:
    chunk = data[offset : offset + size]
    return int.from_bytes(chunk, "big") if len(chunk) == size else 0


def _text(raw: bytes, encoding: str = "utf-8") -> str | None:
    text = bytes(raw).split(b"\0", 1)[0].decode(encoding, errors="replace").strip()
    return text or None


def _uuid(raw: bytes) -> str | None:
    raw = bytes(raw)
    if len(raw) != 16 or not any(raw):
        return None
    return str(uuid.UUID(bytes=raw))


# -- ext2/3/4 --------------------------------------------------------------------------------------

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
_EXT3_INCOMPAT = 0x2 | 0x4 | 0x10
_EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4


def _flag_names(value: int, names: dict[int, str]) -> list[str]:
    found = [name for bit, name in names.items() if value & bit]
    unknown = value & ~sum(names)
    if unknown:
        found.append(f"0x{unknown:x}")
    return found


def probe_ext(head: bytes) -> FileSystem | None:
    sb = head[1024:2048]
    if len(sb) < 0x180 or _le(sb, 0x38, 2) != 0xEF53:
        return None
    compat, incompat, ro_compat = _le(sb, 0x5C, 4), _le(sb, 0x60, 4), _le(sb, 0x64, 4)
    if incompat & 0x8:
        kind = "ext-journal"
    elif incompat & ~_EXT3_INCOMPAT or ro_compat & ~_EXT3_RO_COMPAT:
        kind = "ext4"
    elif compat & 0x4:
        kind = "ext3"
    else:
        kind = "ext2"
    log_block = _le(sb, 0x18, 4)
    block_size = 1024 << log_block if log_block <= 6 else None
    blocks = _le(sb, 0x04, 4)
    free_blocks = _le(sb, 0x0C, 4)
    if incompat & 0x80 and _le(sb, 0xFE, 2) >= 64:  # 64bit and s_desc_size big enough for the _hi fields
        blocks |= _le(sb, 0x150, 4) << 32
        free_blocks |= _le(sb, 0x158, 4) << 32
    state_bits = _le(sb, 0x3A, 2)
    if incompat & 0x4:
        state = "needs_recovery"
    elif state_bits & 0x2:
        state = "errors"
    elif not state_bits & 0x1:
        state = "not_clean"
    else:
        state = "clean"
    features = _flag_names(compat, EXT_COMPAT) + _flag_names(incompat, EXT_INCOMPAT) + _flag_names(
        ro_compat, EXT_RO_COMPAT
    )
    return FileSystem(
        type=kind,
        uuid=_uuid(sb[0x68:0x78]),
        label=_text(sb[0x78:0x88]),
        version=f"rev {_le(sb, 0x4C, 4)}.{_le(sb, 0x3E, 2)}",
        block_size=block_size,
        size=blocks * block_size if block_size else None,
        free=free_blocks * block_size if block_size else None,
        state=state,
        features=features,
        details={
            "inodes": _le(sb, 0x00, 4),
            "free_inodes": _le(sb, 0x10, 4),
            "state_flags": state_bits,
            "last_mounted": _text(sb[0x88:0xC8]),
            "feature_compat": compat,
            "feature_incompat": incompat,
            "feature_ro_compat": ro_compat,
        },
    )


# -- XFS -----------------------------------------------------------------------------------------------

XFS_INCOMPAT = {0x1: "ftype", 0x2: "sparse_inodes", 0x4: "meta_uuid", 0x8: "bigtime", 0x10: "needsrepair",
                0x20: "nrext64", 0x40: "exchange", 0x80: "parent"}


def probe_xfs(head: bytes) -> FileSystem | None:
    if not _at(head, 0, b"XFSB") or len(head) < 232:
        return None
    block_size = _be(head, 4, 4)
    dblocks = _be(head, 8, 8)
    version = _be(head, 100, 2) & 0xF
    incompat = _be(head, 216, 4) if version >= 5 else 0
    if _u8(head, 126):
        state = "not_clean"  # mkfs never finished
    elif incompat & 0x10:
        state = "needs_repair"
    else:
        state = None  # the log, not the superblock, knows whether it was cleanly unmounted
    valid_block = 512 <= block_size <= 65536 and block_size & (block_size - 1) == 0
    return FileSystem(
        type="xfs",
        uuid=_uuid(head[32:48]),
        label=_text(head[108:120]),
        version=f"V{version}",
        block_size=block_size if valid_block else None,
        size=dblocks * block_size if valid_block else None,
        free=_be(head, 144, 8) * block_size if valid_block else None,
        state=state,
        features=_flag_names(incompat, XFS_INCOMPAT) if version >= 5 else [],
        details={"inodes": _be(head, 128, 8), "free_inodes": _be(head, 136, 8), "ag_count": _be(head, 88, 4)},
    )


# -- btrfs ---------------------------------------------------------------------------------------------


def probe_btrfs(head: bytes) -> FileSystem | None:
    base = 0x10000
    if not _at(head, base + 0x40, b"_BHRfS_M"):
        return None
    sector = _le(head, base + 0x90, 4)
    return FileSystem(
        type="btrfs",
        uuid=_uuid(head[base + 0x20 : base + 0x30]),
        label=_text(head[base + 0x12B : base + 0x22B]),
        block_size=sector or None,
        size=_le(head, base + 0x70, 8) or None,
        free=max(0, _le(head, base + 0x70, 8) - _le(head, base + 0x78, 8)) or None,
        details={"num_devices": _le(head, base + 0x88, 8), "generation": _le(head, base + 0x48, 8)},
    )


# -- boot-sector file systems --------------------------------------------------------------------------


def probe_ntfs(head: bytes) -> FileSystem | None:
    if not _at(head, 3, b"NTFS    ") or len(head) < 512:
        return None
    bps = _le(head, 11, 2)
    spc = _u8(head, 13)
    sectors = _le(head, 0x28, 8)
    valid = bps in (512, 1024, 2048, 4096) and spc
    cluster = bps * (spc if spc <= 0x80 else 1 << (256 - spc)) if valid else None
    return FileSystem(
        type="ntfs",
        uuid=f"{_le(head, 0x48, 8):016X}",
        block_size=cluster,
        size=(sectors + 1) * bps if valid else None,  # the backup boot sector lies past the counted sectors
    )


def probe_bitlocker(head: bytes) -> FileSystem | None:
    if _at(head, 3, b"-FVE-FS-"):
        return FileSystem(type="bitlocker")
    return None


def probe_exfat(head: bytes) -> FileSystem | None:
    if not _at(head, 3, b"EXFAT   ") or len(head) < 512:
        return None
    sector_shift, cluster_shift = _u8(head, 108), _u8(head, 109)
    valid = 9 <= sector_shift <= 12 and sector_shift + cluster_shift <= 25
    flags = _le(head, 106, 2)
    serial = _le(head, 100, 4)
    return FileSystem(
        type="exfat",
        uuid=f"{serial >> 16:04X}-{serial & 0xFFFF:04X}",
        block_size=1 << (sector_shift + cluster_shift) if valid else None,
        size=_le(head, 72, 8) << sector_shift if valid else None,
        state="not_clean" if flags & 0x2 else "clean",
    )


@dataclass(frozen=True)
class FatBpb:
    """The BIOS parameter block of a FAT boot sector, with the derived layout."""

    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    num_fats: int
    root_entries: int
    total_sectors: int
    fat_sectors: int
    root_cluster: int
    fat_type: str
    clusters: int

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
        return self.root_entries * 32

    @property
    def data_offset(self) -> int:
        root_sectors = (self.root_entries * 32 + self.bytes_per_sector - 1) // self.bytes_per_sector
        return self.root_dir_offset + root_sectors * self.bytes_per_sector


def parse_fat_bpb(head: bytes) -> FatBpb | None:
    """The BPB of a FAT12/16/32 boot sector, or None if these bytes are not one.

    Type by the label mkfs.fat and Windows write ("FAT12   ", "FAT16   " at 54, "FAT32   " at 82),
    else by the cluster count, as the FAT specification says.
    """
    if len(head) < 512:
        return None
    bps = _le(head, 11, 2)
    spc = _u8(head, 13)
    reserved = _le(head, 14, 2)
    fats = _u8(head, 16)
    root_entries = _le(head, 17, 2)
    total = _le(head, 19, 2) or _le(head, 32, 4)
    fat_size = _le(head, 22, 2) or _le(head, 36, 4)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or not reserved or not 1 <= fats <= 4:
        return None
    label16, label32 = head[54:62], head[82:90]
    if label32 != b"FAT32   " and label16 not in (b"FAT12   ", b"FAT16   ", b"FAT     ") and head[82:87] != b"FAT  ":
        return None
    if not total or not fat_size:
        return None
    root_sectors = (root_entries * 32 + bps - 1) // bps
    data = total - reserved - fats * fat_size - root_sectors
    if data <= 0:
        return None
    clusters = data // spc
    if label32 == b"FAT32   ":
        kind = "fat32"
    elif label16 == b"FAT12   ":
        kind = "fat12"
    elif label16 == b"FAT16   ":
        kind = "fat16"
    else:
        kind = "fat12" if clusters < 4085 else "fat16" if clusters < 65525 else "fat32"
    return FatBpb(bps, spc, reserved, fats, root_entries, total, fat_size, _le(head, 44, 4) if kind == "fat32" else 0,
                  kind, clusters)


def probe_fat(head: bytes) -> FileSystem | None:
    bpb = parse_fat_bpb(head)
    if bpb is None:
        return None
    ext = 64 if bpb.fat_type == "fat32" else 36  # extended BPB: drive number, reserved, signature, id, label
    has_ebpb = _u8(head, ext + 2) in (0x28, 0x29)
    serial = _le(head, ext + 3, 4) if has_ebpb else 0
    return FileSystem(
        type=bpb.fat_type,
        uuid=f"{serial >> 16:04X}-{serial & 0xFFFF:04X}" if has_ebpb else None,
        label=_text(head[ext + 7 : ext + 18], "latin-1") if _u8(head, ext + 2) == 0x29 else None,
        block_size=bpb.cluster_size,
        size=bpb.total_sectors * bpb.bytes_per_sector,
        details={"clusters": bpb.clusters},
    )


def probe_squashfs(head: bytes) -> FileSystem | None:
    if not (_at(head, 0, b"hsqs") or _at(head, 0, b"sqsh")):
        return None
    return FileSystem(type="squashfs", version=f"{_le(head, 28, 2)}.{_le(head, 30, 2)}",
                      block_size=_le(head, 12, 4) or None, size=_le(head, 40, 8) or None)


def probe_luks(head: bytes) -> FileSystem | None:
    if not _at(head, 0, b"LUKS\xba\xbe"):
        return None
    version = _be(head, 6, 2)
    if version == 1:
        return FileSystem(
            type="luks",
            version="1",
            uuid=_text(head[168:208], "ascii"),
            details={"cipher": f"{_text(head[8:40], 'ascii')}-{_text(head[40:72], 'ascii')}",
                     "payload_offset": _be(head, 104, 4) * 512},
        )
    if version == 2:
        return FileSystem(
            type="luks",
            version="2",
            uuid=_text(head[168:208], "ascii"),
            label=_text(head[24:72]),
            details={"header_size": _be(head, 8, 8), "checksum_alg": _text(head[72:104], "ascii")},
        )
    return FileSystem(type="luks", version=str(version))


BOOT_SECTOR_PROBES: tuple[Callable[[bytes], FileSystem | None], ...] = (
    probe_luks, probe_xfs, probe_squashfs, probe_ntfs, probe_bitlocker, probe_exfat, probe_fat,
)


# -- signatures further in -----------------------------------------------------------------------------


def lvm_crc(data: bytes) -> int:
    """LVM2's label checksum: CRC-32 (zlib's polynomial) seeded with 0xf597a6cf, no final inversion."""
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def probe_lvm2(head: bytes) -> FileSystem | None:
    """An LVM2 physical volume: the label "LABELONE" in one of sectors 0-3, type "LVM2 001"."""
    for sector in range(4):
        base = sector * 512
        label = head[base : base + 512]
        if not (_at(label, 0, b"LABELONE") and _at(label, 24, b"LVM2 001")) or len(label) < 512:
            continue
        crc_ok = _le(label, 16, 4) == lvm_crc(label[20:512])
        pv = _le(label, 20, 4)
        pv_uuid = None
        size = None
        if 32 <= pv <= 512 - 40:
            raw = label[pv : pv + 32].decode("ascii", errors="replace")
            if raw.strip("\0"):
                pv_uuid = "-".join((raw[0:6], raw[6:10], raw[10:14], raw[14:18], raw[18:22], raw[22:26], raw[26:32]))
            size = _le(label, pv + 32, 8) or None
        return FileSystem(type="lvm2", uuid=pv_uuid, version="LVM2 001", size=size,
                          details={"label_sector": sector, "label_crc_ok": crc_ok})
    return None


_SWAP_PAGES = (4096, 8192, 16384, 65536)
_HIBERNATION = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001")


def probe_swap(head: bytes) -> FileSystem | None:
    for page in _SWAP_PAGES:
        magic = head[page - 10 : page]
        hibernated = any(magic.startswith(sig) for sig in _HIBERNATION)
        if magic in (b"SWAPSPACE2", b"SWAP-SPACE") or hibernated:
            version = _le(head, 1024, 4)
            last_page = _le(head, 1028, 4)
            return FileSystem(
                type="swap",
                uuid=_uuid(head[1036:1052]),
                label=_text(head[1052:1068]),
                version=str(version) if magic != b"SWAP-SPACE" else "0",
                block_size=page,
                size=(last_page + 1) * page if last_page else None,
                state="hibernated" if hibernated else None,
            )
    return None


def probe_md(head: bytes) -> FileSystem | None:
    for offset, version in ((0, "1.1"), (4096, "1.2")):
        if _le(head, offset, 4) == 0xA92B4EFC and _le(head, offset + 4, 4) == 1:
            return FileSystem(type="md", version=version, uuid=_uuid(head[offset + 16 : offset + 32]),
                              label=_text(head[offset + 32 : offset + 64]))
    return None


LATER_PROBES: tuple[Callable[[bytes], FileSystem | None], ...] = (
    probe_ext, probe_btrfs, probe_lvm2, probe_swap, probe_md,
)


def probe_boot_sector(head: bytes) -> FileSystem | None:
    """A file system or volume header whose signature lies at offset 0 or in the boot sector."""
    return _first_found(BOOT_SECTOR_PROBES, head)


def probe_later(head: bytes) -> FileSystem | None:
    """A file system whose superblock lies after sector 0 (ext, btrfs, LVM2, swap, md)."""
    return _first_found(LATER_PROBES, head)


def _first_found(probes: tuple[Callable[[bytes], FileSystem | None], ...], head: bytes) -> FileSystem | None:
    for probe_one in probes:
        found = probe_one(head)
        if found is not None:
            return found
    return None


def probe_bytes(head: bytes) -> FileSystem | None:
    """What the volume whose first bytes are ``head`` holds (pass ``HEAD_SIZE`` bytes for btrfs)."""
    try:
        return probe_boot_sector(head) or probe_later(head)
    except (struct.error, ValueError, IndexError) as exc:  # pragma: no cover - the helpers bound-check
        raise CorruptImage(f"unparseable superblock: {exc}") from None


# -- reading a disk ------------------------------------------------------------------------------------

_ZFS_MAGIC = 0x00BAB10C


def probe(disk: Disk, offset: int = 0, length: int | None = None) -> FileSystem | None:
    """The file system of the volume at ``offset`` (``length`` bytes; a partition or a whole disk)."""
    want = HEAD_SIZE if length is None else max(0, min(HEAD_SIZE, length))
    head = disk.read_at(offset, want)
    found = probe_bytes(head)
    if found is not None or (length is not None and length < 256 << 10):
        return found
    # ZFS: the first label's uberblock ring (128-256 KiB), magic in either byte order.
    ring = disk.read_at(offset + (128 << 10), 128 << 10)
    for slot in range(0, len(ring) - 8, 1024):
        value = ring[slot : slot + 8]
        if int.from_bytes(value, "little") == _ZFS_MAGIC or int.from_bytes(value, "big") == _ZFS_MAGIC:
            return FileSystem(type="zfs")
    return None


# -- the ESP (``fs.fat.find_efi_loaders`` lists its loaders) ---------------------------------------------

#: the removable-media fallback paths UEFI firmware boots when it has no boot entry (UEFI spec 3.5.1)
FALLBACK_LOADERS = {"BOOTX64.EFI": "x86_64", "BOOTAA64.EFI": "arm64", "BOOTIA32.EFI": "i386"}


def fallback_loaders(paths: list[str]) -> list[str]:
    """The paths among ``paths`` that are EFI/BOOT/BOOT<arch>.EFI."""
    return [p for p in paths if p.upper().startswith("EFI/BOOT/") and p.upper().rsplit("/", 1)[-1] in FALLBACK_LOADERS]
