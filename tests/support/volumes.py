"""Builders shared by the tests (moved from test_volumes_crypt_md.py)."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

from .files import blank, write_at
from .tools import run
from .units import MiB

FAST_KDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def luks_format(path: Path, size: int, *options: str) -> Path:
    """A LUKS volume made by cryptsetup on an image file (batch mode, a key file, a fast KDF)."""
    blank(path, size)
    key = path.with_suffix(".key")
    key.write_bytes(b"not a secret")
    run("cryptsetup", "luksFormat", "--batch-mode", "--key-file", key, *options, path)
    return path


def luks_json(path: Path) -> dict:
    return json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", path).stdout)


MD_MAGIC = 0xA92B4EFC  # MD_SB_MAGIC


ARRAY_UUID = uuid.UUID("0123abcd-4567-89ab-cdef-0123456789ab").bytes


def md_sb1_checksum(sb: bytes) -> int:
    """calc_sb_1_csum as md_p.h's comments and the kernel define it: the sum of the little-endian
    32-bit words of the first 256 + 2 * max_dev bytes (sb_csum counted as zero), a trailing 16-bit
    word added, the 64-bit sum folded into 32 bits."""
    sb = bytearray(sb)
    sb[216:220] = bytes(4)
    length = 256 + 2 * struct.unpack_from("<I", sb, 220)[0]
    total = sum(struct.unpack_from(f"<{length // 4}I", sb, 0))
    if length % 4:
        total += struct.unpack_from("<H", sb, length - 2)[0]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def md_superblock_1(*, level: int, raid_disks: int, size: int, data_offset: int, data_size: int, super_offset: int,
                    dev_number: int, roles: list[int], name: str = "host:root", layout: int = 0, chunk: int = 0,
                    feature_map: int = 0) -> bytes:
    """struct mdp_superblock_1 (md_p.h), all sizes in 512-byte sectors."""
    sb = bytearray(256 + 2 * len(roles))
    struct.pack_into("<IIII", sb, 0, MD_MAGIC, 1, feature_map, 0)  # magic, major_version, feature_map, pad0
    sb[16:32] = ARRAY_UUID  # set_uuid
    sb[32 : 32 + len(name)] = name.encode()  # set_name[32]
    # ctime, level, layout, size, chunksize, raid_disks
    struct.pack_into("<QiIQII", sb, 64, 1_700_000_000, level, layout, size, chunk, raid_disks)
    # data_offset, data_size, super_offset, recovery_offset, dev_number, cnt_corrected_read
    struct.pack_into("<QQQQII", sb, 128, data_offset, data_size, super_offset, 0, dev_number, 0)
    sb[168:184] = uuid.UUID(int=dev_number + 1).bytes  # device_uuid
    # utime, events, resync_offset (MaxSector: in sync), sb_csum, max_dev
    struct.pack_into("<QQQII", sb, 192, 1_700_000_100, 7, (1 << 64) - 1, 0, len(roles))
    struct.pack_into(f"<{len(roles)}H", sb, 256, *roles)  # dev_roles
    struct.pack_into("<I", sb, 216, md_sb1_checksum(sb))
    return bytes(sb)


def mdadm_examine(path: Path) -> dict[str, str]:
    """``mdadm --examine``'s "Name : value" lines."""
    fields = {}
    for line in run("mdadm", "--examine", path).stdout.decode().splitlines():
        name, sep, value = line.partition(" : ")
        if sep:
            fields[name.strip()] = value.strip()
        elif line.startswith("this "):  # 0.90: this device's row of the device table
            fields["this"] = line
    return fields


#: the BitLocker identifier GUID (libbde, "Overview")
BITLOCKER_GUID = uuid.UUID("4967d63b-2e29-4ad8-8399-f6a339e3d001")


VOLUME_GUID = uuid.UUID("e5c5d1f0-8d3b-4c71-9a2e-5b7f3c2a1d94")


BLOCKS = (0x0210_0000, 0x0610_0000, 0x0A10_0000)  # where the three FVE metadata blocks are put (bytes)


VOLUME = 0x0C00_0000  # volume size for these tests (192 MiB, sparse)


def fve_entry(entry_type: int, value_type: int, data: bytes) -> bytes:
    """An "FVE metadata entry": size, entry type, value type, version 1, data."""
    return struct.pack("<HHHH", 8 + len(data), entry_type, value_type, 1) + data


def vmk_entry(protection: int) -> bytes:
    """A VMK entry (entry type 0x0002, value type 0x0008; "FVE Volume Master Key (VMK)"): key GUID,
    FILETIME, unknown, protection type, then properties (one 32-byte clear key property here)."""
    value = uuid.uuid4().bytes_le + struct.pack("<QHH", 133_000_000_000_000_000, 0, protection)
    return fve_entry(0x0002, 0x0008, value + fve_entry(0x0000, 0x0001, struct.pack("<I", 0x2000) + bytes(32)))


def fve_block(method: int, *, version: int = 2, description: str = "DESKTOP-7 C: 14/02/2024",
              protections: tuple[int, ...] = (0x0100, 0x0800), blocks: tuple[int, ...] = BLOCKS) -> bytes:
    """An FVE metadata block: "FVE metadata block header version 2" (or version 1), "FVE metadata
    header (version 1)" and entries: one VMK per protection, the description (entry type 0x0007, a
    UTF-16 string)."""
    entries = b"".join(vmk_entry(p) for p in protections)
    entries += fve_entry(0x0007, 0x0002, (description + "\0").encode("utf-16-le"))
    size = 48 + len(entries)
    # size, version 1, header size 48, size copy, volume GUID, next nonce counter, method, creation FILETIME
    metadata = struct.pack("<IIII16sIIQ", size, 1, 48, size, VOLUME_GUID.bytes_le, 8, method, 133_000_000_000_000_000)
    block = bytearray(64)
    block[0:8] = b"-FVE-FS-"
    struct.pack_into("<HHHH", block, 8, 0x2F, version, 4, 4)  # size (unknown use), version, unknown, unknown
    if version == 2:
        struct.pack_into("<QII", block, 16, VOLUME, 0, 16)  # encrypted volume size, unknown, volume header sectors
        struct.pack_into("<4Q", block, 32, *blocks, 0x0E10_0000)  # three block offsets, volume header offset
    else:
        struct.pack_into("<4Q", block, 32, *blocks, 0)
    return bytes(block) + metadata + entries


def windows7_volume_header(blocks: tuple[int, ...] = BLOCKS) -> bytes:
    """The volume header of "BitLocker Windows 7 and later"."""
    sector = bytearray(512)
    sector[0:11] = b"\xeb\x58\x90-FVE-FS-"  # boot entry point, signature
    struct.pack_into("<HB", sector, 11, 512, 8)  # bytes per sector, sectors per cluster
    struct.pack_into("<BI11s8s", sector, 66, 0x29, 0, b"NO NAME    ", b"FAT32   ")
    sector[160:176] = BITLOCKER_GUID.bytes_le  # BitLocker identifier
    struct.pack_into("<3Q", sector, 176, *blocks)  # FVE metadata block 1, 2, 3 offsets
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def bitlocker_volume(path: Path, method: int) -> Path:
    blank(path, VOLUME)
    write_at(path, 0, windows7_volume_header())
    for place in BLOCKS:
        write_at(path, place, fve_block(method))
    return path



def md_superblock_0_90(*, level: int, raid_disks: int, size_kib: int, this_disk: int, layout: int = 0,
                       chunk: int = 0) -> bytes:
    """mdp_super_t (md_p.h): 1024 32-bit words, little-endian as x86 writes them."""
    words = [0] * 1024
    uuid_words = struct.unpack(">4I", ARRAY_UUID)
    # constant generic words: magic, major, minor, patch, gvalid_words, set_uuid0, ctime, level, size,
    # nr_disks, raid_disks, md_minor, not_persistent, set_uuid1..3
    words[0:16] = [MD_MAGIC, 0, 90, 0, 0, uuid_words[0], 1_700_000_000, level & 0xFFFFFFFF, size_kib, raid_disks,
                   raid_disks, 0, 0, *uuid_words[1:]]
    # generic state words from 32: utime, state (clean), active, working, failed, spare, sb_csum, events_lo, hi
    words[32:41] = [1_700_000_100, 1, raid_disks, raid_disks, 0, 0, 0, 7, 0]
    words[64:66] = [layout, chunk]  # personality: layout, chunk_size (bytes)
    active_sync = (1 << 1) | (1 << 2)  # MD_DISK_ACTIVE, MD_DISK_SYNC
    for number in range(raid_disks):  # disks[27] from word 128, 32 words each: number, major, minor, raid_disk, state
        words[128 + 32 * number : 128 + 32 * number + 5] = [number, 7, number, number, active_sync]
    words[992:997] = [this_disk, 7, this_disk, this_disk, active_sync]  # this_disk
    words[38] = md_sb0_checksum(words)
    return struct.pack("<1024I", *words)


def md_sb0_checksum(words: list[int] | tuple[int, ...]) -> int:
    """sb_csum of a 0.90 superblock: the 64-bit sum of its 1024 words (sb_csum, word 38, counted as
    zero) folded into 32 bits, as mdadm computes it."""
    total = sum(words) - words[38]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


MEMBER_SIZE = 20 * MiB


SECTORS = MEMBER_SIZE // 512


END_1_0 = (SECTORS - 16) & ~7  # 1.0: 8 KiB from the end, rounded down to 4 KiB


END_0_90 = (SECTORS & ~127) - 128  # MD_NEW_SIZE_SECTORS


def md_member(path: Path, version: str, *, level: int = 1, raid_disks: int = 2, dev_number: int = 0,
              role: int | None = None) -> tuple[Path, int]:
    """A member image with a superblock of ``version``; returns it and its data offset in bytes."""
    blank(path, MEMBER_SIZE)
    roles = list(range(raid_disks))
    if role is not None:
        roles[dev_number] = role
    chunk, layout = (1024, 2) if level == 5 else (0, 0)  # RAID5: 512 KiB chunks, left-symmetric
    if version in ("1.1", "1.2"):
        place, data_offset = (0, 2048) if version == "1.1" else (8, 2048)
        usable = SECTORS - data_offset
        sb = md_superblock_1(level=level, raid_disks=raid_disks, size=usable - usable % 8, data_offset=data_offset,
                             data_size=usable, super_offset=place, dev_number=dev_number, roles=roles, chunk=chunk,
                             layout=layout)
        write_at(path, place * 512, sb)
        return path, data_offset * 512
    if version == "1.0":
        sb = md_superblock_1(level=level, raid_disks=raid_disks, size=END_1_0 - 8, data_offset=0, data_size=END_1_0,
                             super_offset=END_1_0, dev_number=dev_number, roles=roles, chunk=chunk, layout=layout)
        write_at(path, END_1_0 * 512, sb)
        return path, 0
    write_at(path, END_0_90 * 512, md_superblock_0_90(level=level, raid_disks=raid_disks, size_kib=END_0_90 // 2,
                                                     this_disk=dev_number, chunk=chunk * 512, layout=layout))
    return path, 0

