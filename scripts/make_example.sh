#!/usr/bin/env bash
# Rebuilds fixtures/example.qcow2: a 20 GiB disk (sparse) with an MBR partition table and one
# 63 MiB ext4 partition holding a few files, as qemu-img writes it (qcow2 v3). The MBR's bootstrap
# area holds a 4-byte stand-in for boot code (cli; hlt; jmp $-1) so that the disk is BIOS-bootable
# as far as an offline check can tell; it is not a real boot loader.
# Needs sfdisk (fdisk), mkfs.ext4 (e2fsprogs) and qemu-img (qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc"
printf 'NAME="Example Linux"\nID=example\nVERSION_ID="1"\n' > "$work/root/etc/os-release"
printf 'UUID=placeholder / ext4 defaults 0 1\n' > "$work/root/etc/fstab"
truncate -s 20G "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
truncate -s 63M "$work/part.ext4"
mkfs.ext4 -q -F -L example -d "$work/root" "$work/part.ext4"
dd if="$work/part.ext4" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
printf '\xfa\xf4\xeb\xfd' | dd of="$work/disk.raw" conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$work/disk.raw" fixtures/example.qcow2
