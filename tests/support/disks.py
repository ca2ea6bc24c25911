"""Disks made the way users make them: partition tables (sfdisk, sgdisk, fdisk), file systems
copied into partitions, ESPs filled with mtools, GRUB's BIOS boot chain, LVM2 and LUKS headers
written from their specifications; and stand-ins for a DiskReader over bytes or a file."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .files import blank, write_at
from .tools import run
from .units import MiB


class BytesDisk:
    """A disk in memory with the DiskReader read_at(offset, length) contract."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.virtual_size = len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class FileDisk:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.virtual_size = self.path.stat().st_size

    def read_at(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def sfdisk(path: Path, script: str) -> None:
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, input=script.encode())


def sgdisk(path: Path, *args: str) -> None:
    run("sgdisk", *args, path)


@contextlib.contextmanager
def loop_device(backing: Path, offset: int = 0) -> Iterator[Path]:
    """A loop block device over ``backing`` from ``offset`` (losetup), detached on exit; skips the
    test where loop devices are not available."""
    proc = subprocess.run(["losetup", "-f", "--show", *(["-o", str(offset)] if offset else []), backing],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device (losetup -f --show failed: {proc.stderr.strip()})")
    device = proc.stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def copy_in(disk: Path, part_file: Path, offset: int) -> None:
    """dd a partition image into the disk at ``offset``, keeping holes (conv=notrunc,sparse)."""
    run("dd", f"if={part_file}", f"of={disk}", "bs=1M", "oflag=seek_bytes", f"seek={offset}", "conv=notrunc,sparse",
        "status=none")


def mkfs_into(disk: Path, offset: int, size: int, *command: str, tmp: Path | None = None) -> Path:
    """Run ``command`` (mkfs...) on a sparse partition-sized file, then copy it into the disk."""
    part = (tmp or disk.parent) / f"part-{offset}.img"
    blank(part, size)
    run(*command, part)
    copy_in(disk, part, offset)
    return part


def make_esp(path: Path, size: int, files: dict[str, bytes], fat: int = 32) -> Path:
    """An ESP image (FAT32 from 64 MiB up, else FAT16) populated with mtools."""
    blank(path, size)
    run("mkfs.fat", "-F", str(fat if size >= 64 << 20 else 16), "-n", "ESP", path)
    made: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in made:
                run("mmd", "-i", path, f"::/{directory}")
                made.add(directory)
    for name, content in files.items():
        source = path.parent / f"src-{uuid.uuid4().hex}"
        source.write_bytes(content)
        run("mcopy", "-i", path, source, f"::/{name}")
        source.unlink()
    return path


WINDOWS_BOOT_CODE = (b"\x33\xc0\x8e\xd0\xbc\x00\x7c" + bytes(0x100)
                     + b"Invalid partition table\0Missing operating system")
#: GRUB's i386-pc images (Debian package grub-pc-bin)
GRUB_PC = Path("/usr/lib/grub/i386-pc")


@functools.cache
def grub_core_image() -> bytes:
    """A GRUB core image for an MBR disk (diskboot.img first), made by grub-mkimage."""
    if shutil.which("grub-mkimage") is None or not (GRUB_PC / "boot.img").exists():
        pytest.skip("grub-mkimage and GRUB's i386-pc images (package grub-pc-bin) are needed to write a boot chain")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "core.img"
        run("grub-mkimage", "-O", "i386-pc", "-d", GRUB_PC, "-o", out, "-p", "(hd0,msdos1)/boot/grub",
            "biosdisk", "part_msdos", "part_gpt", "ext2")
        return out.read_bytes()


def write_boot_code(disk: Path, code: bytes | None = None, core_lba: int | None = None) -> None:
    """Boot code in sector 0; by default GRUB's whole BIOS chain as grub-install lays it out: boot.img
    with the LBA of the core image at 0x5c, and the core image there (on an MBR disk the gap after the
    MBR, LBA 1; on GPT a BIOS boot partition, given as ``core_lba``, else the gap after the partition
    entries, LBA 34), its diskboot.img blocklist (start LBA, sector count, segment) set to the sectors
    after it."""
    if code is not None:
        assert len(code) <= 440
        write_at(disk, 0, code)
        return
    with open(disk, "rb") as image:
        image.seek(512)
        gpt = image.read(8) == b"EFI PART"
    lba = core_lba or (34 if gpt else 1)
    core = bytearray(grub_core_image())
    sectors = -(-len(core) // 512)
    assert struct.unpack_from("<H", core, 510)[0] == 0x820  # diskboot.img's blocklist segment
    struct.pack_into("<QH", core, 500, lba + 1, sectors - 1)
    boot = bytearray((GRUB_PC / "boot.img").read_bytes()[:440])
    struct.pack_into("<Q", boot, 0x5C, lba)
    write_at(disk, 0, bytes(boot))
    write_at(disk, lba * 512, bytes(core))


def lvm_label_crc(data: bytes) -> int:
    """LVM2's calc_crc (lib/misc/crc.c): reflected CRC-32, seed 0xf597a6cf, no final inversion."""
    crc = 0xF597A6CF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc


def lvm_pv_label(pv_uuid: str = "abcdef0123456789ABCDEF0123456789", device_size: int = 64 * MiB) -> bytes:
    """Sector 1 of an LVM2 PV: label_header then pv_header (lib/format_text/layout.h)."""
    sector = bytearray(512)
    pv = struct.pack("<32sQ", pv_uuid.encode(), device_size)
    pv += struct.pack("<QQQQ", 1 * MiB, 0, 0, 0)  # one data area, terminated
    pv += struct.pack("<QQQQ", 4096, MiB - 4096, 0, 0)  # one metadata area, terminated
    sector[32 : 32 + len(pv)] = pv
    sector[0:8] = b"LABELONE"
    struct.pack_into("<Q", sector, 8, 1)  # sector_xl: this label's sector
    struct.pack_into("<I", sector, 20, 32)  # offset_xl: the pv_header
    sector[24:32] = b"LVM2 001"
    struct.pack_into("<I", sector, 16, lvm_label_crc(bytes(sector[20:512])))
    return bytes(sector)


def luks1_header(uid: str) -> bytes:
    """The LUKS1 phdr (LUKS On-Disk Format Specification 1.2.3, section 2.4)."""
    header = bytearray(592)
    header[0:6] = b"LUKS\xba\xbe"
    struct.pack_into(">H", header, 6, 1)
    header[8:11] = b"aes"
    header[40:51] = b"xts-plain64"
    header[72:78] = b"sha256"
    struct.pack_into(">II", header, 104, 4096, 64)
    header[168 : 168 + len(uid)] = uid.encode()
    return bytes(header)


def luks2_header(uid: str, label: str) -> bytes:
    """The LUKS2 binary header (LUKS2 On-Disk Format Specification, section 3.1)."""
    header = bytearray(4096)
    header[0:6] = b"LUKS\xba\xbe"
    struct.pack_into(">HQQ", header, 6, 2, 16384, 1)
    header[24 : 24 + len(label)] = label.encode()
    header[72:78] = b"sha256"
    header[168 : 168 + len(uid)] = uid.encode()
    return bytes(header)


def gpt_4k(path: Path, size: int) -> None:
    """A GPT for 4096-byte logical sectors, made by fdisk -b 4096."""
    blank(path, size)
    subprocess.run(["fdisk", "-b", "4096", str(path)], input=b"g\nn\n\n\n\nw\n", capture_output=True, check=True)



SECTOR = 512


def sfdisk_partitions(path: Path) -> list[dict[str, Any]]:
    """The partitions as sfdisk reads them (the oracle for where they lie), in bytes."""
    table = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]
    return [{"start": p["start"] * SECTOR, "end": (p["start"] + p["size"]) * SECTOR, "type": p["type"]}
            for p in table["partitions"]]


def prefilled(image: Path, size: int, seed: int) -> Path:
    """A partition image full of random bytes, as a disk's free space is after years of use (mkfs leaves
    what it does not write, and is told not to discard it)."""
    rng = random.Random(seed)
    with open(image, "wb") as f:
        for position in range(0, size, 16 * MiB):
            f.write(rng.randbytes(min(16 * MiB, size - position)))
    return image

