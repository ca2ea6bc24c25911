"""Linux software RAID (md) members: the superblocks of metadata 0.90, 1.0, 1.1 and 1.2, and a RAID1
member read as its array.

The layouts are the kernel's ``include/uapi/linux/raid/md_p.h``: a 0.90 superblock is 4 KiB of
32-bit words in the host's byte order (little-endian is read here, as x86 and arm64 write it) at the
last 64 KiB-aligned 64 KiB of the device; a 1.x superblock is little-endian, 256 bytes plus two per
device slot, and lies 8-12 KiB from the end (1.0), at the start (1.1) or 4 KiB in (1.2). The minor
version of 1.x is not stored: it is where the superblock was found, which ``super_offset`` must name.

``parse_superblock_0_90`` and ``parse_superblock_1`` are pure (bytes and the place they were read
from, in; a :class:`MdSuperblock` out) and raise only :class:`~diskimg.errors.CorruptImage`, as the
kernel refuses the same things: a wrong checksum, a superblock claiming another place, a device
slot table past 4 KiB. ``find_superblock`` looks at the four places of a member; ``open_raid1``
gives a RAID1 member's data area as a volume with ``size`` and ``read_at``, since every RAID1 leg
holds the whole array. Other levels are named (``level_name``), not read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk

MD_MAGIC = 0xA92B4EFC
SECTOR = 512

#: 0.90: MD_SB_BYTES, and the MD_RESERVED_BYTES at the end of the device the superblock lives in
SB0_BYTES = 4096
SB0_RESERVED = 64 << 10
#: 0.90 word offsets (md_p.h counts the superblock in 32-bit words)
SB0_DISKS = 27  # MD_SB_DISKS: descriptors in the table
SB0_THIS_DISK = 992  # MD_SB_DESCRIPTOR_OFFSET: this device's descriptor
SB0_CHECKSUM_WORD = 38  # sb_csum: word 6 of the generic state words (32-63)
#: 0.90 descriptor state bits (MD_DISK_FAULTY, MD_DISK_ACTIVE, MD_DISK_SYNC)
SB0_DISK_FAULTY, SB0_DISK_ACTIVE, SB0_DISK_SYNC = 1 << 0, 1 << 1, 1 << 2
SB0_STATE_CLEAN = 1 << 0  # MD_SB_CLEAN

#: 1.x: the fixed part, and the most a superblock may span (the kernel's max_dev limit, (4096-256)/2)
SB1_FIXED = 256
SB1_BYTES = 4096
SB1_MAX_DEV = (SB1_BYTES - SB1_FIXED) // 2
SB1_CHECKSUM = 216  # sb_csum
#: 1.1 and 1.2 sit at a fixed place; 1.0 at 8 KiB from the end, rounded down to 4 KiB
SB1_1_OFFSET = 0
SB1_2_OFFSET = 4096
#: the kernel refuses data_size below this many sectors
SB1_MIN_DATA_SECTORS = 10
#: dev_roles values that are not a role (MD_DISK_ROLE_SPARE, _FAULTY, _JOURNAL)
ROLE_SPARE, ROLE_FAULTY, ROLE_JOURNAL = 0xFFFF, 0xFFFE, 0xFFFD
#: ctime and utime: seconds in the low 40 bits (microseconds above)
SB1_TIME_SECONDS = (1 << 40) - 1
#: resync_offset of an array known to be in sync (MaxSector)
SB1_IN_SYNC = (1 << 64) - 1

#: feature_map bits (md_p.h)
FEATURES = {
    0x1: "bitmap", 0x2: "recovery-offset", 0x4: "reshape-active", 0x8: "bad-blocks", 0x10: "replacement",
    0x20: "reshape-backwards", 0x40: "new-offset", 0x80: "recovery-bitmap", 0x100: "clustered", 0x200: "journal",
    0x400: "ppl", 0x800: "multiple-ppls", 0x1000: "raid0-layout",
}
#: features of a member whose data area does not yet hold the whole array (being rebuilt)
PARTIAL_MEMBER = 0x2 | 0x10

#: the level field, as mdadm names it
LEVELS = {-5: "faulty", -4: "multipath", -1: "linear", 0: "raid0", 1: "raid1", 4: "raid4", 5: "raid5", 6: "raid6",
          10: "raid10"}


@dataclass(frozen=True)
class MdSuperblock:
    """What one member's superblock says. Sizes and offsets are in bytes from the member's start."""

    kind: ClassVar[str] = "md"
    version: str  # "0.90", "1.0", "1.1" or "1.2"
    array_uuid: bytes  # 16 bytes, in the order mdadm prints them
    name: str | None  # 1.x only ("host:name" as mdadm writes it)
    level: int
    layout: int
    chunk_size: int
    raid_disks: int
    array_member_size: int  # what each member gives the array (for RAID1: the array's size)
    data_offset: int
    data_size: int
    super_offset: int
    dev_number: int
    role: int | None  # the slot in the array; None for a spare, faulty or journal device
    state: str  # "active", "spare", "faulty" or "journal"
    created: int  # seconds since the epoch
    events: int
    clean: bool
    feature_map: int
    recovery_offset: int | None  # bytes of the data area rebuilt so far, when the member is being rebuilt

    @property
    def uuid(self) -> str:
        """The array UUID as mdadm prints it and mdadm.conf and ``rd.md.uuid=`` name it."""
        raw = self.array_uuid
        return ":".join(raw[i : i + 4].hex() for i in range(0, 16, 4))

    @property
    def level_name(self) -> str:
        return LEVELS.get(self.level, f"level {self.level}")

    @property
    def features(self) -> list[str]:
        found = [name for bit, name in FEATURES.items() if self.feature_map & bit]
        unknown = self.feature_map & ~sum(FEATURES)
        return found + ([f"0x{unknown:x}"] if unknown else [])


def _sb0_checksum(words: tuple[int, ...]) -> int:
    """mdadm's calc_sb0_csum: the 64-bit sum of all words with sb_csum counted as 0, folded to 32 bits."""
    total = sum(words) - words[SB0_CHECKSUM_WORD]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def _sb1_checksum(raw: bytes) -> int:
    """The kernel's calc_sb_1_csum over the first 256 + 2 * max_dev bytes, sb_csum counted as 0."""
    max_dev = struct.unpack_from("<I", raw, 220)[0]
    size = SB1_FIXED + 2 * max_dev
    total = sum(struct.unpack_from(f"<{size // 4}I", raw, 0)) - struct.unpack_from("<I", raw, SB1_CHECKSUM)[0]
    if size % 4:
        total += struct.unpack_from("<H", raw, size - 2)[0]
    return int((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def parse_superblock_0_90(raw: bytes, location: int) -> MdSuperblock:
    """A 0.90 superblock read at byte ``location`` of its member (the data area is what lies before it)."""
    if len(raw) < SB0_BYTES:
        raise CorruptImage("md 0.90 superblock truncated", offset=location, structure="md superblock")
    words = struct.unpack_from(f"<{SB0_BYTES // 4}I", raw, 0)
    if words[0] != MD_MAGIC or words[1] != 0 or words[2] not in (90, 91):
        raise CorruptImage("not an md 0.90 superblock", offset=location, structure="md superblock")
    if _sb0_checksum(words) != words[SB0_CHECKSUM_WORD]:
        raise CorruptImage("md 0.90 superblock checksum mismatch", offset=location, structure="md superblock")
    level = struct.unpack_from("<i", raw, 7 * 4)[0]
    raid_disks = words[10]
    if raid_disks > SB0_DISKS:
        raise CorruptImage(f"md 0.90 superblock with {raid_disks} devices (at most {SB0_DISKS})", offset=location,
                           structure="md superblock")
    member_size = words[8] * 1024  # KiB
    if member_size > location:
        raise CorruptImage(f"md 0.90 member size {member_size} reaches past its superblock at {location}",
                           offset=location, structure="md superblock")
    number, _major, _minor, raid_disk, disk_state = words[SB0_THIS_DISK : SB0_THIS_DISK + 5]
    if disk_state & SB0_DISK_FAULTY:
        state = "faulty"
    elif disk_state & SB0_DISK_ACTIVE and disk_state & SB0_DISK_SYNC and raid_disk < raid_disks:
        state = "active"
    else:
        state = "spare"
    uuid_words = (words[5], words[13], words[14], words[15])
    return MdSuperblock(
        version=f"0.{words[2]}", array_uuid=struct.pack(">4I", *uuid_words), name=None, level=level,
        layout=words[64], chunk_size=words[65], raid_disks=raid_disks, array_member_size=member_size, data_offset=0,
        data_size=location, super_offset=location, dev_number=number, role=raid_disk if state == "active" else None,
        state=state, created=words[6], events=words[40] << 32 | words[39], clean=bool(words[33] & SB0_STATE_CLEAN),
        feature_map=0, recovery_offset=None,
    )


def parse_superblock_1(raw: bytes, location: int) -> MdSuperblock:
    """A 1.x superblock read at byte ``location`` of its member (0: 1.1, 4096: 1.2, near the end: 1.0)."""

    def broken(message: str) -> CorruptImage:
        return CorruptImage(message, offset=location, structure="md superblock")

    if len(raw) < SB1_FIXED:
        raise broken("md 1.x superblock truncated")
    magic, major, feature_map = struct.unpack_from("<III", raw, 0)
    if magic != MD_MAGIC or major != 1:
        raise broken("not an md 1.x superblock")
    max_dev = struct.unpack_from("<I", raw, 220)[0]
    if max_dev > SB1_MAX_DEV or len(raw) < SB1_FIXED + 2 * max_dev:
        raise broken(f"md superblock with {max_dev} device slots (at most {SB1_MAX_DEV})")
    if _sb1_checksum(raw) != struct.unpack_from("<I", raw, SB1_CHECKSUM)[0]:
        raise broken("md superblock checksum mismatch")
    created, level, layout, size, chunk, raid_disks = struct.unpack_from("<QiIQII", raw, 64)
    data_offset, data_size, super_offset, recovery_offset, dev_number = struct.unpack_from("<QQQQI", raw, 128)
    events, resync_offset = struct.unpack_from("<QQ", raw, 200)
    if super_offset * SECTOR != location:
        raise broken(f"md superblock found at byte {location} says it lies at sector {super_offset}")
    if data_size < SB1_MIN_DATA_SECTORS:
        raise broken(f"md superblock with a data area of {data_size} sectors")
    if raid_disks > SB1_MAX_DEV:
        raise broken(f"md superblock with {raid_disks} devices (at most {SB1_MAX_DEV})")
    if size > data_size:
        raise broken(f"md member gives {size} sectors from a data area of {data_size}")
    version = "1.1" if location == SB1_1_OFFSET else "1.2" if location == SB1_2_OFFSET else "1.0"
    if version == "1.0" and (data_offset + data_size) * SECTOR > location:
        raise broken(f"md data area ({data_size} sectors at {data_offset}) reaches past the superblock at the end")
    role_value = struct.unpack_from("<H", raw, SB1_FIXED + 2 * dev_number)[0] if dev_number < max_dev else ROLE_SPARE
    state = {ROLE_SPARE: "spare", ROLE_FAULTY: "faulty", ROLE_JOURNAL: "journal"}.get(role_value, "active")
    return MdSuperblock(
        version=version, array_uuid=bytes(raw[16:32]), name=_text(raw[32:64]), level=level, layout=layout,
        chunk_size=chunk * SECTOR, raid_disks=raid_disks, array_member_size=size * SECTOR,
        data_offset=data_offset * SECTOR, data_size=data_size * SECTOR, super_offset=location, dev_number=dev_number,
        role=role_value if state == "active" else None, state=state, created=created & SB1_TIME_SECONDS, events=events,
        clean=resync_offset == SB1_IN_SYNC, feature_map=feature_map,
        recovery_offset=recovery_offset * SECTOR if feature_map & PARTIAL_MEMBER else None,
    )


def _text(raw: bytes) -> str | None:
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", errors="replace") or None


def superblock_locations(length: int) -> list[tuple[str, int]]:
    """Where each metadata version's superblock lies on a member of ``length`` bytes."""
    sectors = length // SECTOR
    places = [("1.1", SB1_1_OFFSET), ("1.2", SB1_2_OFFSET)]
    end_1_0 = ((sectors - 16) & ~7) * SECTOR  # 8 KiB from the end, 4 KiB aligned
    if end_1_0 > SB1_2_OFFSET:
        places.append(("1.0", end_1_0))
    reserved = SB0_RESERVED // SECTOR
    end_0_90 = ((sectors & ~(reserved - 1)) - reserved) * SECTOR  # MD_NEW_SIZE_SECTORS
    if end_0_90 > 0:
        places.append(("0.90", end_0_90))
    return places


def find_superblock(disk: Disk, offset: int, length: int) -> MdSuperblock | None:
    """The md superblock of the member spanning ``length`` bytes from ``offset`` of ``disk``, or None.

    Where several places hold one (a device reused without its old superblock wiped), the most
    recently created array wins, as mdadm chooses. A superblock that is there but broken raises
    CorruptImage unless another valid one is found.
    """
    found: list[MdSuperblock] = []
    broken: CorruptImage | None = None
    for version, location in superblock_locations(length):
        size = SB0_BYTES if version == "0.90" else min(SB1_BYTES, length - location)
        raw = disk.read(offset + location, size)  # a disk ending before the member does holds no superblock there
        if raw[:4] != MD_MAGIC.to_bytes(4, "little"):
            continue
        try:
            if version == "0.90":
                found.append(parse_superblock_0_90(raw, location))
            elif struct.unpack_from("<I", raw, 4)[0] == 1:
                found.append(parse_superblock_1(raw, location))
        except CorruptImage as exc:
            broken = broken or exc
    if found:
        return max(found, key=lambda sb: sb.created)
    if broken is not None:
        raise broken
    return None


class MdVolume:
    """A RAID1 array read through one in-sync member: its data area, ``size`` bytes long."""

    def __init__(self, disk: Disk, offset: int, size: int, superblock: MdSuperblock) -> None:
        self._disk = disk
        self._offset = offset
        self.size = size
        self.superblock = superblock

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the array at ``offset``; fewer at its end, none past it."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        return self._disk.read(self._offset + offset, end - offset)

    #: the ``Disk`` spelling, so that partition tables and file systems can be read from the array
    read = read_at


def open_raid1(disk: Disk, offset: int, length: int, superblock: MdSuperblock) -> MdVolume:
    """The array whose member spans ``length`` bytes from ``offset`` of ``disk``, read through it.

    Only RAID1 is read: each in-sync leg holds the whole array. Other levels, spares, faulty
    members and members still being rebuilt raise UnsupportedFormat; a data area past the member's
    end raises CorruptImage.
    """
    if superblock.level != 1:
        raise UnsupportedFormat(f"md {superblock.level_name} arrays are named, not read: only RAID1 members are read")
    if superblock.state != "active":
        raise UnsupportedFormat(f"this md member is a {superblock.state} device: it holds no copy of the array")
    if superblock.feature_map & PARTIAL_MEMBER:
        raise UnsupportedFormat("this md member is being rebuilt: its copy of the array is incomplete")
    unknown = superblock.feature_map & ~sum(FEATURES)
    if unknown:
        raise UnsupportedFormat(f"md features 0x{unknown:x} are not known")
    if superblock.data_offset + superblock.data_size > length:
        raise CorruptImage(f"the md data area ({superblock.data_size} bytes at {superblock.data_offset}) reaches "
                           f"past the member's {length} bytes", offset=offset + superblock.super_offset,
                           structure="md superblock")
    return MdVolume(disk, offset + superblock.data_offset, superblock.array_member_size, superblock)
