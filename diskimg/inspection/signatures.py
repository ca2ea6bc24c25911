"""File systems and other volume signatures, identified from their superblocks.

Pure functions over bytes (``probe_bytes(head)``, ``probe_boot_sector(head)``) plus a thin reader
over a disk (``probe(disk, offset, length)``): it reads a few KiB at known offsets, never a file
system's data. Nothing but :class:`~diskimg.errors.DiskImageError` escapes, whatever the bytes.

What is recognised (``FileSystem.type``): ``ext2``, ``ext3``, ``ext4``, ``ext-journal``, ``xfs``,
``btrfs``, ``ntfs``, ``bitlocker``, ``fat12``, ``fat16``, ``fat32``, ``exfat``, ``swap``,
``lvm2`` (a PV label), ``luks`` (LUKS1/LUKS2), ``squashfs``, ``md`` (a Linux RAID superblock: 1.1
and 1.2 at the start; 0.90 and 1.0 at the end, found only by ``probe``), ``zfs`` (an uberblock,
found only by ``probe``, which may read a little further; so is a btrfs whose primary superblock is
gone, by its copy at 64 MiB). The structures of LUKS, BitLocker and md are parsed by their modules
in ``volumes/``, loaded when their signature is seen.

Order matters where structures share bytes: those whose signature lies in sector 0 (a boot
sector ending in 55 AA like an MBR, or a header at offset 0) are probed first
(``probe_boot_sector``), then those whose superblock lies further in (ext at 1024, btrfs at
64 KiB, the LVM label in sectors 0-3, the swap signature at the end of the first page, md at 4 KiB).

The superblocks of the file systems diskimg also reads (ext, XFS, NTFS, FAT) are parsed by
``superblocks.py``, whose parsers the drivers in ``fs/`` share; the other signatures are parsed here only.

A swap area has no reader in ``fs/``: what ``--sparsify`` may leave out of it is here
(:func:`swap_unused_ranges`: everything after its header page, unless it holds a hibernation image).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CorruptImage
from .superblocks import (
    BTRFS_INCOMPAT,
    BTRFS_SUPERBLOCK_OFFSETS,
    BTRFS_SUPERBLOCK_SIZE,
    EXT_INCOMPAT_RECOVER,
    EXT_STATE_ERROR,
    EXT_STATE_VALID,
    EXT_SUPERBLOCK_OFFSET,
    EXT_SUPERBLOCK_SIZE,
    XFS_INCOMPAT,
    XFS_INCOMPAT_NEEDSREPAIR,
    BtrfsSuperblock,
    flag_names,
    label_text,
    parse_btrfs_superblock,
    parse_ext_superblock,
    parse_fat_bpb,
    parse_ntfs_boot_sector,
    parse_xfs_superblock,
)

if TYPE_CHECKING:
    from .volumes.md import MdSuperblock

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


class SizedDisk(Disk, Protocol):
    """A disk that knows its size (a DiskReader does): what reading a partition table needs."""

    @property
    def virtual_size(self) -> int: ...


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
        label=label_text(sb.volume_name),
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
            "last_mounted": label_text(sb.last_mounted),
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
        label=label_text(sb.fname),
        version=f"V{sb.version}",
        block_size=block_size if valid_block else None,
        size=sb.size if valid_block else None,
        free=sb.fdblocks * block_size if valid_block else None,
        state=state,
        features=flag_names(sb.incompat, XFS_INCOMPAT),
        details={"inodes": sb.icount, "free_inodes": sb.ifree, "ag_count": sb.ag_count},
    )


# -- btrfs ---------------------------------------------------------------------------------------------

def _btrfs_file_system(sb: BtrfsSuperblock) -> FileSystem:
    return FileSystem(
        type="btrfs",
        uuid=_uuid(sb.fsid),
        label=sb.label,
        block_size=sb.sector_size or None,
        size=sb.total_bytes or None,
        free=max(0, sb.total_bytes - sb.bytes_used) or None,
        state="needs_recovery" if sb.log_root else None,  # a log tree of fsynced changes to replay
        features=flag_names(sb.incompat, BTRFS_INCOMPAT) if sb.incompat else [],
        details={"num_devices": sb.num_devices, "generation": sb.generation},
    )


def probe_btrfs(head: bytes) -> FileSystem | None:
    base = BTRFS_SUPERBLOCK_OFFSETS[0]
    sb = parse_btrfs_superblock(head[base : base + BTRFS_SUPERBLOCK_SIZE].ljust(BTRFS_SUPERBLOCK_SIZE, b"\0"))
    return None if sb is None else _btrfs_file_system(sb)


def probe_btrfs_copy(disk: Disk, offset: int) -> FileSystem | None:
    """A btrfs whose primary superblock is gone, by its first copy (at 64 MiB, recording that place)."""
    position = BTRFS_SUPERBLOCK_OFFSETS[1]
    sb = parse_btrfs_superblock(disk.read_at(offset + position, BTRFS_SUPERBLOCK_SIZE))
    if sb is None or sb.bytenr != position:
        return None
    found = _btrfs_file_system(sb)
    found.state = "needs_repair"
    found.details["superblock_copy"] = position
    return found


# -- boot-sector file systems --------------------------------------------------------------------------


def probe_ntfs(head: bytes) -> FileSystem | None:
    boot = parse_ntfs_boot_sector(head)
    if boot is None:
        return None
    return FileSystem(type="ntfs", uuid=f"{boot.serial:016X}", block_size=boot.cluster_size, size=boot.volume_size)


def probe_bitlocker(head: bytes) -> FileSystem | None:
    """A BitLocker volume header (Vista, or Windows 7 and later): its variant and metadata offsets.
    The volume GUID and cipher lie in the FVE metadata further in (``volumes.bitlocker.read_bitlocker``);
    a To Go volume is a FAT32 until that metadata is found."""
    if not _at(head, 3, b"-FVE-FS-"):
        return None
    from .volumes import bitlocker  # loaded only when the signature is there

    try:
        header = bitlocker.parse_volume_header(head)
    except CorruptImage as exc:
        return FileSystem(type="bitlocker", details={"error": exc.message})
    if header is None:
        return None
    return FileSystem(type="bitlocker", details={"variant": header.variant,
                                                 "metadata_offsets": list(header.metadata_offsets)})


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
        label=label_text(label, "latin-1") if label is not None else None,
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
    """A LUKS1 or LUKS2 header (``volumes.luks``): UUID, label, and the cipher and payload offset
    where the header says them (a LUKS2 JSON area is read when ``head`` holds it). A damaged header
    is still a LUKS volume: what could not be read is named in ``details["error"]``."""
    if not _at(head, 0, b"LUKS\xba\xbe"):
        return None
    from .volumes import luks  # loaded only when the signature is there

    version = luks.luks_version(head)
    found = FileSystem(type="luks", version=str(version))
    try:
        if version == 1:
            header = luks.parse_luks1_phdr(head)
        elif version == 2:
            binary = luks.parse_luks2_binary_header(head)
            found.uuid, found.label = binary.uuid, binary.label
            found.details["header_size"] = binary.header_size
            if len(head) < binary.header_size:
                return found
            header = luks.parse_luks2_header(head)
        else:
            return found
    except CorruptImage as exc:
        found.details["error"] = exc.message
        return found
    found.uuid, found.label = header.uuid, header.label
    found.details.update(cipher=header.cipher, payload_offset=header.payload_offset)
    return found


BOOT_SECTOR_PROBES: tuple[Callable[[bytes], FileSystem | None], ...] = (
    probe_luks, probe_xfs, probe_squashfs, probe_ntfs, probe_bitlocker, probe_exfat, probe_fat,
)


# -- signatures further in -----------------------------------------------------------------------------


def lvm_crc(data: bytes) -> int:
    """LVM2's checksum of labels, metadata area headers and metadata text (lib/misc/crc.c): CRC-32 over the
    reflected polynomial 0xEDB88320 (zlib's), seeded with INITIAL_CRC 0xf597a6cf, no final inversion."""
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


#: LVM2 prints its 32-character UUIDs in groups of these lengths, joined by dashes (lib/id/id.c)
LVM_UUID_GROUPS = (6, 4, 4, 4, 4, 4, 6)


def lvm_uuid(raw: bytes) -> str:
    """An LVM2 UUID as stored on disk (32 ASCII characters) written as LVM prints it."""
    text = raw.decode("ascii", errors="replace")
    groups, start = [], 0
    for size in LVM_UUID_GROUPS:
        groups.append(text[start : start + size])
        start += size
    return "-".join(groups)


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
            raw = label[pv : pv + 32]
            if raw.strip(b"\0"):
                pv_uuid = lvm_uuid(raw)
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
                label=label_text(head[1052:1068]),
                version=str(version) if magic != b"SWAP-SPACE" else "0",
                block_size=page,
                size=(last_page + 1) * page if last_page else None,
                state="hibernated" if hibernated else None,
            )
    return None


def swap_unused_ranges(head: bytes, length: int) -> list[tuple[int, int]]:
    """What ``--sparsify`` leaves out of a swap area of ``length`` bytes whose first bytes are ``head``
    (``HEAD_SIZE`` of them): every page after the header page, up to its last page (linux/swap.h's
    ``last_page``). The page size is where the signature ends (4096 unless the area was made for
    larger pages). The kernel keeps nothing in a swap area across a boot; a hibernation image, which
    it does keep, makes the area NotSparsifiable, as do the old version 0 format and a header that is
    not swap's."""
    from .fs.base import NotSparsifiable  # fs/ imports this module

    found = probe_swap(head)
    if found is None:
        raise NotSparsifiable("no swap signature")
    if found.state == "hibernated":
        raise NotSparsifiable("the swap area holds a hibernation image, which the next boot resumes")
    if found.version != "1":
        raise NotSparsifiable(f"swap header version {found.version}, not 1")
    page = found.block_size or 0
    if found.size is None:
        raise NotSparsifiable("the swap header records no last page")
    end = min(found.size, length)
    return [(page, end - page)] if end > page else []


_MD_MAGIC = 0xA92B4EFC


def probe_md(head: bytes) -> FileSystem | None:
    """An md superblock at the start of a member (metadata 1.1 at 0, 1.2 at 4 KiB). Those of 0.90 and
    1.0 lie at the end, where ``probe`` looks for them when the start holds nothing it knows: their
    data begins at the member's start, so a RAID1 member shows the array's own file system there."""
    for location in (0, 4096):
        if _le(head, location, 4) == _MD_MAGIC and _le(head, location + 4, 4) == 1:
            from .volumes import md  # loaded only when the signature is there

            try:
                return md_file_system(md.parse_superblock_1(head[location : location + md.SB1_BYTES], location))
            except CorruptImage as exc:
                return FileSystem(type="md", version="1.1" if location == 0 else "1.2", details={"error": exc.message})
    return None


def md_file_system(sb: MdSuperblock) -> FileSystem:
    """What ``probe`` reports of an md member."""
    return FileSystem(type="md", version=sb.version, uuid=sb.uuid, label=sb.name, size=sb.array_member_size,
                      details={"level": sb.level_name, "raid_disks": sb.raid_disks, "state": sb.state,
                               "role": sb.role, "data_offset": sb.data_offset})


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
    except struct.error as exc:  # pragma: no cover - the parsers check lengths before they unpack
        raise CorruptImage(f"unparseable superblock: {exc}") from None


# -- reading a disk ------------------------------------------------------------------------------------

_ZFS_MAGIC = 0x00BAB10C


def probe(disk: Disk, offset: int = 0, length: int | None = None) -> FileSystem | None:
    """The file system of the volume at ``offset`` (``length`` bytes; a partition or a whole disk)."""
    want = HEAD_SIZE if length is None else max(0, min(HEAD_SIZE, length))
    head = disk.read_at(offset, want)
    found = probe_bytes(head)
    if found is not None:
        return found
    if length is not None:  # md 0.90 and 1.0 keep their superblock at the end of the member
        from .volumes import md

        try:
            superblock = md.find_superblock(disk, offset, length)
        except CorruptImage as exc:
            return FileSystem(type="md", details={"error": exc.message})
        if superblock is not None:
            return md_file_system(superblock)
        if length < 256 << 10:
            return None
    if length is None or length >= BTRFS_SUPERBLOCK_OFFSETS[1] + BTRFS_SUPERBLOCK_SIZE:
        found = probe_btrfs_copy(disk, offset)
        if found is not None:
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
