"""What a RAW disk starts with: a partition table, a bare file system, or nothing recognisable.

``identify_start(head)`` is pure: it looks only at the bytes it is given (the prober passes the
first 128 KiB; the btrfs superblock magic at 0x10040 is the farthest thing looked at). It never
raises, whatever the bytes.

Order, chosen so that structures that share a signature do not mislead:

1. all zeros -> ``"empty"`` (nothing written yet, or the head is zero-filled)
2. ``EFI PART`` at 512 or 4096 -> ``"gpt"`` (before MBR: a GPT disk carries a protective MBR)
3. file systems whose signature sits at offset 0 or in the boot sector (XFS, squashfs, NTFS,
   exFAT, FAT12/16/32): these boot sectors end in 55 AA too, so they are ruled out before MBR
4. an MBR (55 AA at 510, sane partition entries) with at least one partition entry in use
5. file systems whose superblock lies after sector 0 (ext2/3/4 at 1024, btrfs at 64 KiB, LVM2
   label in sectors 0-3, swap at the end of the first page): a boot loader may have left 55 AA in
   sector 0 of such a whole-disk file system, so an MBR with an empty table loses to them
6. an MBR with an empty partition table (a boot sector such as GRUB's, nothing partitioned)
7. ``"unknown"``
"""

from __future__ import annotations

import struct

#: how much of the disk start identify_start can use (btrfs magic ends at 0x10048)
HEAD_NEEDED = 0x10048

_EXT_MAGIC_OFFSET = 1024 + 0x38
# ext feature flags (fs/ext4/ext4.h); ext3 knows only these, anything else makes it ext4
_EXT_COMPAT_HAS_JOURNAL = 0x0004
_EXT3_INCOMPAT_SUPPORTED = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg
_EXT3_RO_COMPAT_SUPPORTED = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008

_SWAP_PAGE_SIZES = (4096, 8192, 16384, 65536)

#: human names of the values identify_start returns
DESCRIPTIONS = {
    "gpt": "a GPT partition table",
    "mbr": "an MBR",
    "empty": "nothing but zeros",
    "unknown": "nothing recognisable (no partition table or file system signature)",
    "ext2": "an ext2 file system",
    "ext3": "an ext3 file system",
    "ext4": "an ext4 file system",
    "xfs": "an XFS file system",
    "btrfs": "a Btrfs file system",
    "ntfs": "an NTFS file system",
    "exfat": "an exFAT file system",
    "fat12": "a FAT12 file system",
    "fat16": "a FAT16 file system",
    "fat32": "a FAT32 file system",
    "swap": "a Linux swap area",
    "lvm2": "an LVM2 physical volume",
    "squashfs": "a squashfs file system",
    "ext-journal": "an ext3/ext4 external journal device",
}


def describe_start(starts_with: str) -> str:
    """``"gpt"`` -> ``"a GPT partition table"`` (for descriptions such as "RAW disk with ...")."""
    return DESCRIPTIONS.get(starts_with, starts_with)


def identify_start(head: bytes) -> str:
    """What a disk whose first bytes are ``head`` starts with (see the module docstring)."""
    if not head.strip(b"\0"):
        return "empty"
    if _at(head, 512, b"EFI PART") or _at(head, 4096, b"EFI PART"):
        return "gpt"
    for probe in (_xfs, _squashfs, _ntfs, _exfat, _fat):
        found = probe(head)
        if found:
            return found
    mbr = _mbr(head)
    if mbr == "partitioned":
        return "mbr"
    for probe in (_ext, _btrfs, _lvm2, _swap):
        found = probe(head)
        if found:
            return found
    if mbr == "empty-table":
        return "mbr"
    return "unknown"


def _at(head: bytes, offset: int, magic: bytes) -> bool:
    return head[offset : offset + len(magic)] == magic


def _u16(head: bytes, offset: int) -> int | None:
    return struct.unpack_from("<H", head, offset)[0] if len(head) >= offset + 2 else None


def _u32(head: bytes, offset: int) -> int | None:
    return struct.unpack_from("<I", head, offset)[0] if len(head) >= offset + 4 else None


def _xfs(head: bytes) -> str | None:
    return "xfs" if _at(head, 0, b"XFSB") else None


def _squashfs(head: bytes) -> str | None:
    return "squashfs" if _at(head, 0, b"hsqs") or _at(head, 0, b"sqsh") else None


def _ntfs(head: bytes) -> str | None:
    return "ntfs" if _at(head, 3, b"NTFS    ") else None


def _exfat(head: bytes) -> str | None:
    return "exfat" if _at(head, 3, b"EXFAT   ") else None


def _fat(head: bytes) -> str | None:
    """A FAT boot sector: a plausible BIOS parameter block plus the file-system type label.

    The label ("FAT12   ", "FAT16   " at 54, "FAT32   " at 82) is what mkfs.fat and Windows write;
    a generic "FAT     " label is resolved by the cluster count, as the FAT specification says.
    """
    if len(head) < 512:
        return None
    bytes_per_sector = _u16(head, 11)
    sectors_per_cluster = head[13]
    reserved = _u16(head, 14)
    fats = head[16]
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return None
    if sectors_per_cluster == 0 or sectors_per_cluster & (sectors_per_cluster - 1):
        return None
    if not reserved or fats == 0:
        return None
    if head[82:90] == b"FAT32   ":
        return "fat32"
    label = head[54:62]
    if label == b"FAT12   ":
        return "fat12"
    if label == b"FAT16   ":
        return "fat16"
    if label not in (b"FAT     ", b"FAT32   ") and head[82:87] != b"FAT  ":
        return None
    # Generic label: count the clusters.
    root_entries = _u16(head, 17) or 0
    total = _u16(head, 19) or _u32(head, 32) or 0
    fat_size = _u16(head, 22) or _u32(head, 36) or 0
    root_sectors = (root_entries * 32 + bytes_per_sector - 1) // bytes_per_sector
    data = total - reserved - fats * fat_size - root_sectors
    if data <= 0:
        return None
    clusters = data // sectors_per_cluster
    if clusters < 4085:
        return "fat12"
    if clusters < 65525:
        return "fat16"
    return "fat32"


def _mbr(head: bytes) -> str | None:
    """``"partitioned"``, ``"empty-table"`` (a boot sector with no partition in use) or None."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None
    used = False
    for index in range(4):
        entry = head[446 + 16 * index : 462 + 16 * index]
        if entry[0] not in (0x00, 0x80):
            return None
        if entry[4] != 0:  # partition type
            used = True
    return "partitioned" if used else "empty-table"


def _ext(head: bytes) -> str | None:
    if _u16(head, _EXT_MAGIC_OFFSET) != 0xEF53:
        return None
    base = 1024
    compat = _u32(head, base + 0x5C) or 0
    incompat = _u32(head, base + 0x60) or 0
    ro_compat = _u32(head, base + 0x64) or 0
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return "ext-journal"
    if incompat & ~_EXT3_INCOMPAT_SUPPORTED or ro_compat & ~_EXT3_RO_COMPAT_SUPPORTED:
        return "ext4"
    if compat & _EXT_COMPAT_HAS_JOURNAL:
        return "ext3"
    return "ext2"


def _btrfs(head: bytes) -> str | None:
    return "btrfs" if _at(head, 0x10040, b"_BHRfS_M") else None


def _lvm2(head: bytes) -> str | None:
    for sector in range(4):
        base = sector * 512
        if _at(head, base, b"LABELONE") and _at(head, base + 24, b"LVM2 001"):
            return "lvm2"
    return None


def _swap(head: bytes) -> str | None:
    for page in _SWAP_PAGE_SIZES:
        if _at(head, page - 10, b"SWAPSPACE2") or _at(head, page - 10, b"SWAP-SPACE"):
            return "swap"
    return None
