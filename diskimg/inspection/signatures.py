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

The superblocks of the file systems diskimg also reads (ext, XFS, NTFS, FAT) are parsed by
``superblocks.py``, whose parsers the drivers in ``fs/`` share; the other signatures are parsed here only.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CorruptImage
from .superblocks import (
    EXT_INCOMPAT_RECOVER,
    EXT_STATE_ERROR,
    EXT_STATE_VALID,
    EXT_SUPERBLOCK_OFFSET,
    EXT_SUPERBLOCK_SIZE,
    XFS_INCOMPAT,
    XFS_INCOMPAT_NEEDSREPAIR,
    flag_names,
    parse_ext_superblock,
    parse_fat_bpb,
    parse_ntfs_boot_sector,
    parse_xfs_superblock,
)

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

    def read(self, offset: int, length: int, /) -> bytes: ...


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


# -- ext2/3/4 and XFS (their superblocks: superblocks.py) ------------------------------------------------


def probe_ext(head: bytes) -> FileSystem | None:
    sb = parse_ext_superblock(head[EXT_SUPERBLOCK_OFFSET : EXT_SUPERBLOCK_OFFSET + EXT_SUPERBLOCK_SIZE])
    if sb is None:
        return None
    block_size = sb.block_size
    if sb.feature_incompat & EXT_INCOMPAT_RECOVER:
        state = "needs_recovery"
    elif sb.state & EXT_STATE_ERROR:
        state = "errors"
    elif not sb.state & EXT_STATE_VALID:
        state = "not_clean"
    else:
        state = "clean"
    return FileSystem(
        type=sb.kind,
        uuid=_uuid(sb.uuid),
        label=_text(sb.volume_name),
        version=f"rev {sb.rev_level}.{sb.minor_rev_level}",
        block_size=block_size,
        size=sb.blocks_count * block_size if block_size else None,
        free=sb.free_blocks_count * block_size if block_size else None,
        state=state,
        features=sb.features,
        details={
            "inodes": sb.inodes_count,
            "free_inodes": sb.free_inodes_count,
            "state_flags": sb.state,
            "last_mounted": _text(sb.last_mounted),
            "feature_compat": sb.feature_compat,
            "feature_incompat": sb.feature_incompat,
            "feature_ro_compat": sb.feature_ro_compat,
        },
    )


def probe_xfs(head: bytes) -> FileSystem | None:
    sb = parse_xfs_superblock(head)
    if sb is None:
        return None
    if sb.in_progress:
        state = "not_clean"  # mkfs never finished
    elif sb.incompat & XFS_INCOMPAT_NEEDSREPAIR:
        state = "needs_repair"
    else:
        state = None  # the log, not the superblock, knows whether it was cleanly unmounted
    block_size = sb.block_size
    valid_block = 512 <= block_size <= 65536 and block_size & (block_size - 1) == 0
    return FileSystem(
        type="xfs",
        uuid=_uuid(sb.uuid),
        label=_text(sb.fname),
        version=f"V{sb.version}",
        block_size=block_size if valid_block else None,
        size=sb.size if valid_block else None,
        free=sb.fdblocks * block_size if valid_block else None,
        state=state,
        features=flag_names(sb.incompat, XFS_INCOMPAT),
        details={"inodes": sb.icount, "free_inodes": sb.ifree, "ag_count": sb.ag_count},
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
    boot = parse_ntfs_boot_sector(head)
    if boot is None:
        return None
    return FileSystem(type="ntfs", uuid=f"{boot.serial:016X}", block_size=boot.cluster_size, size=boot.volume_size)


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


def probe_fat(head: bytes) -> FileSystem | None:
    bpb = parse_fat_bpb(head)
    if bpb is None:
        return None
    serial = bpb.volume_id
    label = bpb.volume_label
    return FileSystem(
        type=bpb.fat_type,
        uuid=f"{serial >> 16:04X}-{serial & 0xFFFF:04X}" if serial is not None else None,
        label=_text(label, "latin-1") if label is not None else None,
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
    head = disk.read(offset, want)
    found = probe_bytes(head)
    if found is not None or (length is not None and length < 256 << 10):
        return found
    # ZFS: the first label's uberblock ring (128-256 KiB), magic in either byte order.
    ring = disk.read(offset + (128 << 10), 128 << 10)
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
