"""What a RAW disk starts with: a partition table, a bare file system, or nothing recognisable.

``identify_start(head)`` is pure: it looks only at the bytes it is given (the prober passes the
first 128 KiB; :data:`diskimg.inspection.signatures.HEAD_SIZE` bytes are enough). It never raises, whatever
the bytes. File systems are recognised by :mod:`diskimg.inspection.signatures` and the MBR is parsed by
:mod:`diskimg.inspection.partitions`, so ``detect`` and the validator name things the same way; this module
only decides the order.

Order, chosen so that structures that share a signature do not mislead:

1. all zeros -> ``"empty"`` (nothing written yet, or the head is zero-filled)
2. ``EFI PART`` at 512 or 4096 -> ``"gpt"`` (before MBR: a GPT disk carries a protective MBR)
3. file systems whose signature sits at offset 0 or in the boot sector
   (:func:`~diskimg.inspection.signatures.probe_boot_sector`: LUKS, XFS, squashfs, NTFS, BitLocker, exFAT,
   FAT12/16/32): these boot sectors end in 55 AA too, so they are ruled out before MBR
4. an MBR (55 AA at 510, sane partition entries) with at least one partition entry in use
5. file systems whose superblock lies after sector 0 (:func:`~diskimg.inspection.signatures.probe_later`:
   ext2/3/4 at 1024, btrfs at 64 KiB, LVM2 label in sectors 0-3, swap at the end of the first
   page, md): a boot loader may have left 55 AA in sector 0 of such a whole-disk file system, so an
   MBR with an empty table loses to them
6. an MBR with an empty partition table (a boot sector such as GRUB's, nothing partitioned)
7. ``"unknown"``

Steps 3 and 5 return :attr:`diskimg.inspection.signatures.FileSystem.type`.
"""

from __future__ import annotations

from ..units import SECTOR_SIZE
from . import signatures
from .partitions import GPT_SIGNATURE, parse_mbr

#: human names of the values identify_start returns
DESCRIPTIONS = {
    "gpt": "a GPT partition table",
    "mbr": "an MBR",
    "empty": "nothing but zeros",
    "unknown": "nothing recognisable (no partition table or file system signature)",
    **signatures.DESCRIPTIONS,
}


def describe_start(starts_with: str) -> str:
    """``"gpt"`` -> ``"a GPT partition table"`` (for descriptions such as "RAW disk with ...")."""
    return DESCRIPTIONS.get(starts_with, starts_with)


def identify_start(head: bytes) -> str:
    """What a disk whose first bytes are ``head`` starts with (see the module docstring)."""
    if not head.strip(b"\0"):
        return "empty"
    if head[512:520] == GPT_SIGNATURE or head[4096:4104] == GPT_SIGNATURE:
        return "gpt"
    found = signatures.probe_boot_sector(head)
    if found is not None:
        return found.type
    mbr = _mbr_state(head)
    if mbr == "partitioned":
        return "mbr"
    found = signatures.probe_later(head)
    if found is not None:
        return found.type
    if mbr == "empty-table":
        return "mbr"
    return "unknown"


def _mbr_state(head: bytes) -> str | None:
    """``"partitioned"``, ``"empty-table"`` (a boot sector with no partition in use) or None."""
    if len(head) < SECTOR_SIZE:
        return None
    mbr = parse_mbr(head[:SECTOR_SIZE])
    if not mbr.signature_ok or not mbr.entries_sane:
        return None
    return "partitioned" if any(entry.used for entry in mbr.entries) else "empty-table"
