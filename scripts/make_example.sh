#!/usr/bin/env bash
# Rebuilds fixtures/example.qcow2: a 64 MiB disk with an MBR partition table and one ext4
# partition holding a few files, as qemu-img writes it (compressed qcow2 v3).
# Needs sfdisk (fdisk), mkfs.ext4 (e2fsprogs) and qemu-img (qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc"
printf 'NAME="Example Linux"\nID=example\nVERSION_ID="1"\n' > "$work/root/etc/os-release"
printf 'UUID=placeholder / ext4 defaults 0 1\n' > "$work/root/etc/fstab"
truncate -s 64M "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
truncate -s 63M "$work/part.ext4"
mkfs.ext4 -q -F -L example -d "$work/root" "$work/part.ext4"
dd if="$work/part.ext4" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
qemu-img convert -c -f raw -O qcow2 "$work/disk.raw" fixtures/example.qcow2
