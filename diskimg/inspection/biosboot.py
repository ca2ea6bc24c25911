"""The BIOS boot chain, followed as the firmware runs it: the MBR's code, then what that code loads.

Boot code in sector 0 alone boots nothing; it loads the next piece, and a missing piece is a machine
that never starts:

- GRUB 2's ``boot.img`` reads the first sector of its core image from the 64-bit LBA stored at 0x5c
  of the MBR. That sector is ``diskboot.img``, which ends with a blocklist of the remaining sectors
  (12 bytes: start LBA u64, sector count u16, load segment u16 = 0x820). A zeroed core image makes
  the machine print "GRUB " and loop.
- A generic MBR (Windows/MS-DOS, syslinux's ``mbr.bin`` and ``gptmbr.bin``) loads the volume boot
  record of the active partition (on GPT, the "legacy BIOS bootable" one) and jumps to it if it ends
  with 55 AA: no signature stops with "Missing operating system"; the boot sector that mkfs.fat and
  mkntfs write without a loader prints "This is not a bootable disk" and waits.

Other boot code (LILO, GRUB legacy, unknown code) is not followed: its chain is not judged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..units import SECTOR_SIZE
from .partitions import Partition, PartitionTable
from .signatures import Disk

#: GRUB 2 boot.img: where the LBA of the core image's first sector is kept
GRUB_KERNEL_SECTOR = 0x5C
#: GRUB legacy stage1 keeps its version (3.2) at 0x3e; its stage2 pointer lies elsewhere
_GRUB_LEGACY_VERSION = (0x3E, b"\x03\x02")
#: diskboot.img's blocklist entry: the last 12 bytes of its sector, segment 0x820 (GRUB_BOOT_MACHINE_KERNEL_SEG + 0x20)
_DISKBOOT_SEGMENT = 0x820
#: MBR code that chain-loads the active partition's boot sector
ACTIVE_PARTITION_LOADERS = ("windows", "syslinux")
#: the message of boot sectors written without a loader (mkfs.fat, mkntfs)
_NOT_BOOTABLE_STUB = b"This is not a bootable disk"


@dataclass
class BiosChain:
    """What the MBR code loads, step by step, and where the chain ends in nothing (``problem``)."""

    loader: str | None
    steps: list[str] = field(default_factory=list)
    #: why the chain ends in nothing, in words; None when it reaches a loader or is not followed
    problem: str | None = None
    #: "no-active-partition" when the MBR code has no partition to load, else "broken"
    kind: str | None = None
    partition: int | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"loader": self.loader, "steps": list(self.steps), "problem": self.problem,
                "partition": self.partition, "offset": self.offset}


def follow_bios_chain(disk: Disk, table: PartitionTable) -> BiosChain:
    """The chain from the MBR's boot code (``table.mbr``) on ``disk``."""
    mbr = table.mbr
    loader = mbr.boot_loader if mbr is not None else None
    chain = BiosChain(loader)
    if mbr is None or not mbr.has_boot_code:
        return chain
    if loader == "grub":
        start, version = _GRUB_LEGACY_VERSION
        if mbr.bootstrap[start:start + len(version)] != version:
            _follow_grub(disk, table, mbr.bootstrap, chain)
    elif loader in ACTIVE_PARTITION_LOADERS:
        _follow_active_partition(disk, table, chain)
    return chain


def _sector(disk: Disk, table: PartitionTable, lba: int) -> bytes | None:
    """Sector ``lba``, None when it lies past the end of the disk."""
    if lba < 0 or (lba + 1) * SECTOR_SIZE > table.disk_size:
        return None
    return disk.read_at(lba * SECTOR_SIZE, SECTOR_SIZE)


def _follow_grub(disk: Disk, table: PartitionTable, bootstrap: bytes, chain: BiosChain) -> None:
    (core,) = struct.unpack_from("<Q", bootstrap, GRUB_KERNEL_SECTOR)
    chain.steps.append(f"GRUB boot.img loads its core image from LBA {core}")
    chain.offset = core * SECTOR_SIZE if core < table.disk_size // SECTOR_SIZE else None
    first = _sector(disk, table, core) if core else None
    if first is None:
        chain.problem = (f"GRUB's boot code points at LBA {core} for its core image, "
                         + ("the MBR itself" if core == 0 else "past the end of the disk"))
        chain.kind = "broken"
        return
    if not any(first):
        chain.problem = f"GRUB's core image at LBA {core} is zeroed: the machine prints 'GRUB' and hangs"
        chain.kind = "broken"
        return
    start, count, segment = struct.unpack_from("<QHH", first, SECTOR_SIZE - 12)
    if segment != _DISKBOOT_SEGMENT:
        chain.problem = f"LBA {core}, where GRUB's boot code looks for its core image, holds no GRUB core image"
        chain.kind = "broken"
        return
    chain.steps.append(f"the core image's blocklist: {count} sector(s) from LBA {start}")
    rest = _sector(disk, table, start) if count else None
    if rest is None or (start + count) * SECTOR_SIZE > table.disk_size:
        chain.problem = f"GRUB's core image at LBA {core} lists sectors past the end of the disk or none at all"
        chain.kind = "broken"
    elif not any(rest):
        chain.problem = f"GRUB's core image continues at LBA {start}, which is zeroed: the machine hangs after 'GRUB'"
        chain.kind, chain.offset = "broken", start * SECTOR_SIZE


def _follow_active_partition(disk: Disk, table: PartitionTable, chain: BiosChain) -> None:
    active: list[Partition] = [p for p in table.partitions if p.bootable and not p.logical]
    if not active:
        chain.problem = f"the MBR boot code ({chain.loader}) loads the active partition's boot sector, but no " \
                        "partition is marked active"
        chain.kind = "no-active-partition"
        return
    part = active[0]
    chain.partition, chain.offset = part.number, part.start
    chain.steps.append(f"{chain.loader} MBR code loads the boot sector of active partition {part.number}")
    sector = _sector(disk, table, part.first_lba)
    if sector is None:
        chain.problem = f"active partition {part.number} starts past the end of the disk"
    elif sector[510:512] != b"\x55\xaa" or not any(sector[:446]):
        chain.problem = f"the boot sector of active partition {part.number} holds no boot code (no 55 AA " \
                        "signature): the MBR code stops with 'Missing operating system'"
    elif _NOT_BOOTABLE_STUB in sector:
        chain.problem = f"the boot sector of active partition {part.number} is the stub mkfs writes without a " \
                        "loader: it prints 'This is not a bootable disk' and waits"
    if chain.problem:
        chain.kind = "broken"
