#!/usr/bin/env python3
"""Rebuilds fixtures/example.qcow2, the disk the README's quick start validates and converts.

A 20 GiB disk (sparse) with an MBR and one 63 MiB ext4 partition holding an Ubuntu-shaped system
(os-release, fstab by label, grub.cfg, a kernel with virtio built in, an initramfs made by cpio and
zstd, netplan with DHCP, cloud-init), laid out by the test suite's builders (tests/support/guests.py)
so that it is importable into ECS as a BIOS system disk. The MBR's bootstrap area holds a 4-byte
stand-in for boot code (cli; hlt; jmp $-1); the kernel and boot code are stand-ins, not bootable.
Needs sfdisk, mkfs.ext4, cpio, zstd and qemu-img. Run from the repository root:

    python scripts/make_example.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.guests import ext4_image, mbr_disk, ubuntu_tree, write_tree  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
#: fixed, so that rebuilding gives the same disk
ROOT_UUID = "4a343efa-0717-446d-aa2c-54f25957e216"
BOOT_STUB = b"\xfa\xf4\xeb\xfd"


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        tree = write_tree(work / "root", ubuntu_tree(work, ROOT_UUID))
        part = ext4_image(work / "part.ext4", 63 * MiB, tree, ROOT_UUID, label="cloudimg-rootfs")
        disk = mbr_disk(work / "disk.raw", 20 * GiB, [(MiB, 63 * MiB, "83")])
        with open(disk, "r+b") as out, open(part, "rb") as data:
            out.write(BOOT_STUB)
            out.seek(MiB)
            while chunk := data.read(4 * MiB):
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), 1)
                else:
                    out.write(chunk)
        target = ROOT / "fixtures" / "example.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(target)], check=True)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
