#!/usr/bin/env bash
# Builds real Debian 12 (bookworm) system disks the way an installer does, as the oracle the validator is
# tested against (issue 13): mmdebstrap from Debian's archive, a partitioned disk on a loop device,
# grub-install onto it, update-initramfs and update-grub in a chroot with the root mounted, fstab by UUID.
#
#   build_real_debian.sh base BASE.tar [MIRROR]      the system both disks share (the slow, networked part)
#   build_real_debian.sh bios|uefi BASE.tar OUT.qcow2 one disk from it, offline
#
# base: minbase, linux-image-amd64, initramfs-tools, cloud-init with ifupdown (bookworm's ENI renderer),
#       openssh-server, and the .debs of both boot loaders (they conflict) left in apt's cache.
# bios: MBR, one active ext4 partition, grub-pc with its core image in the gap after the MBR.
# uefi: GPT, a FAT32 ESP and an ext4 root, shim-signed + grub-efi-amd64-signed, installed with
#       --force-extra-removable so \EFI\BOOT\BOOTX64.EFI exists (a new instance has empty NVRAM).
# Both boot with console=ttyS0 so a boot can be read on the serial console.
# Needs root, loop devices, mmdebstrap, eatmydata, sfdisk, partx, mkfs.ext4, mkfs.fat, mtools, qemu-img.
# The chroot gets its own /dev holding only the nodes it needs and the /dev/disk/by-uuid links udev would
# make, so that update-grub writes root=UUID= (with the host's /dev and no udev it writes root=/dev/loopNp1).
set -euo pipefail
usage="usage: build_real_debian.sh base BASE.tar [MIRROR] | build_real_debian.sh bios|uefi BASE.tar OUT.qcow2"
grub_bios=grub-pc
grub_uefi="grub-efi-amd64 grub-efi-amd64-signed shim-signed dosfstools"

if [ "${1:-}" = base ]; then
  output=${2:?$usage}
  mirror=${3:-http://deb.debian.org/debian}
  mmdebstrap --quiet --format=tar --variant=minbase --components=main \
    --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --include=systemd-sysv,udev,linux-image-amd64,initramfs-tools,e2fsprogs,cloud-init,openssh-server,ifupdown,isc-dhcp-client,netbase \
    --customize-hook="chroot \"\$1\" apt-get install --download-only -y -q $grub_bios" \
    --customize-hook="chroot \"\$1\" apt-get install --download-only -y -q $grub_uefi" \
    --skip=cleanup/apt/lists --skip=cleanup/apt/cache \
    bookworm "$output.part" "$mirror"
  mv "$output.part" "$output"
  exit 0
fi

firmware=${1:?$usage}
base=${2:?$usage}
output=${3:?$usage}
disk_size=2G
esp_mib=100
case "$firmware" in
  bios) boot_packages=$grub_bios ;;
  uefi) boot_packages=$grub_uefi ;;
  *) echo "build_real_debian.sh: $usage" >&2; exit 2 ;;
esac

work=$(mktemp -d "$(dirname "$output")/.build-$firmware.XXXXXX")
root="$work/root"
loop=""
unmount_all() {
  for mountpoint in "$root/boot/efi" "$root/dev" "$root/proc" "$root/sys" "$root"; do
    if mountpoint -q "$mountpoint" 2>/dev/null; then umount "$mountpoint"; fi
  done
  if [ -n "$loop" ]; then losetup -d "$loop"; loop=""; fi
}
trap 'unmount_all; rm -rf "$work"' EXIT

truncate -s "$disk_size" "$work/disk.raw"
if [ "$firmware" = bios ]; then
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
else
  printf 'label: gpt\nstart=2048, size=%dMiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=EFI\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n' \
    "$esp_mib" | sfdisk -q "$work/disk.raw"
fi
loop=$(losetup -P --show -f "$work/disk.raw")
partx -a "$loop" 2>/dev/null || true  # some kernels do not scan a loop device's table on attach
if [ "$firmware" = bios ]; then partitions=("${loop}p1"); else partitions=("${loop}p1" "${loop}p2"); fi
for device in "${partitions[@]}"; do
  sysfs=/sys/class/block/$(basename "$device")/dev
  for _ in $(seq 50); do [ -e "$sysfs" ] && break; sleep 0.1; done
  [ -b "$device" ] || mknod "$device" b "$(cut -d: -f1 "$sysfs")" "$(cut -d: -f2 "$sysfs")"
done
root_dev=${partitions[-1]}

mkfs.ext4 -q "$root_dev"
root_uuid=$(blkid -o value -s UUID "$root_dev")
mkdir "$root"
mount "$root_dev" "$root"
tar -xpf "$base" -C "$root" --numeric-owner --xattrs --xattrs-include='*'
echo "UUID=$root_uuid / ext4 errors=remount-ro 0 1" >"$root/etc/fstab"
if [ "$firmware" = uefi ]; then
  mkfs.fat -F 32 -n EFI "${partitions[0]}" >/dev/null
  mkdir -p "$root/boot/efi"
  # grub-install finds the ESP from the mount's source in /proc/self/mountinfo and probes its FAT itself;
  # the files it writes go to a tmpfs named after the ESP and are copied in with mtools (the kernel may
  # have no vfat driver)
  mount -t tmpfs "${partitions[0]}" "$root/boot/efi"
  echo "UUID=$(blkid -o value -s UUID "${partitions[0]}") /boot/efi vfat umask=0077 0 1" >>"$root/etc/fstab"
fi

mount -t tmpfs -o mode=755 devfs "$root/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0 console:5:1; do
  IFS=: read -r name major minor <<<"$node"
  mknod -m 666 "$root/dev/$name" c "$major" "$minor"
done
mkdir -p "$root/dev/disk/by-uuid"
for device in "$loop" "${partitions[@]}"; do
  mknod -m 660 "$root$device" b "$((16#$(stat -c %t "$device")))" "$((16#$(stat -c %T "$device")))"
  uuid=$(blkid -o value -s UUID "$device" || true)
  if [ -n "$uuid" ]; then ln -s "../../$(basename "$device")" "$root/dev/disk/by-uuid/$uuid"; fi
done
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"

# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install --no-download --no-install-recommends -y -q $boot_packages >/dev/null
sed -i -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=1/' \
  -e 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"/' "$root/etc/default/grub"
if [ "$firmware" = bios ]; then
  chroot "$root" grub-install --target=i386-pc "$loop"
else
  chroot "$root" grub-install --target=x86_64-efi --efi-directory=/boot/efi --no-nvram --force-extra-removable
fi
if [ "$firmware" = uefi ]; then
  mcopy -s -Q -i "${partitions[0]}" "$root/boot/efi/EFI" ::/
  umount "$root/boot/efi"
fi
chroot "$root" update-initramfs -u -k all
chroot "$root" update-grub
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
fstrim "$root" 2>/dev/null || true

unmount_all
qemu-img convert -c -f raw -O qcow2 "$work/disk.raw" "$output.part"
mv "$output.part" "$output"
