#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite.
# System tools (the test oracle and image producers) come from Debian/Ubuntu packages when missing;
# the Python package and its test extras from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v sgdisk >/dev/null || need+=(gdisk)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.fat >/dev/null || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
command -v bzip2 >/dev/null || need+=(bzip2)
command -v xorriso >/dev/null || need+=(xorriso)
command -v mkswap >/dev/null || need+=(util-linux)
command -v mkntfs >/dev/null || need+=(ntfs-3g)
command -v fusermount >/dev/null || need+=(fuse3)
command -v hivexsh >/dev/null || need+=(libhivex-bin)
command -v bsdtar >/dev/null || need+=(libarchive-tools)
command -v cpio >/dev/null || need+=(cpio)
command -v lz4 >/dev/null || need+=(lz4)
command -v pigz >/dev/null || need+=(pigz)
command -v mount >/dev/null || need+=(mount)
# extended attributes and POSIX ACLs (the oracle of tests/test_sparsify_xattrs.py)
command -v setfattr >/dev/null || need+=(attr)
command -v setfacl >/dev/null || need+=(acl)
# the volume stacks of real installs: LVM2, btrfs, LUKS, md
command -v pvcreate >/dev/null || need+=(lvm2)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
command -v mdadm >/dev/null || need+=(mdadm)
command -v grub-mkimage >/dev/null && [ -e /usr/lib/grub/i386-pc/boot.img ] || need+=(grub-pc-bin)
[ -e /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
command -v syslinux >/dev/null || need+=(syslinux)
# the real Debian systems of tests/test_real_debian.py (built once, cached in ~/.cache/diskimg-tests)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v eatmydata >/dev/null || need+=(eatmydata)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # another apt process (unattended-upgrades on a fresh machine) may hold the dpkg lock: wait for it
    wait_lock=(-o DPkg::Lock::Timeout=600)
    $sudo apt-get "${wait_lock[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get "${wait_lock[@]}" install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing tools (${need[*]}): install them with your package manager; tests needing them are skipped" >&2
  fi
fi

python3 -m pip install -q -e '.[test]'
# the code as the house keeps it: lint and strict types (configured in pyproject.toml)
python3 -m ruff check .
python3 -m mypy
python3 -m pytest -q "$@"
