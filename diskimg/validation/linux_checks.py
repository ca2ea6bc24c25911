"""The guest checks: what the operating system inside the system disk needs to boot on ECS.

``guest_found`` runs for any guest (it names the OS, or says none was found); the others read the
Linux inspection (``diskimg.inspection.guest.linux.LinuxInspection``) and return at once for other systems.
Facts that could not be established (a file system without a reader, an unreadable initramfs) are
reported as "not checked" through ``NotAvailable``, never guessed.
"""

from __future__ import annotations

from typing import Any

from ..inspection.guest import GuestFacts, assembled_name, is_device_name, spec_key
from ..inspection.guest.config import kernel_arg, recovery_arguments, version_tuple
from ..inspection.guest.linux import BOOT_DRIVERS, LATE_DRIVERS, LinuxInspection
from .checks import disk_check
from .context import DiskContext, NotAvailable
from .rules import SYSTEM

#: where the default kernel gets a driver at boot (LinuxInspection.boot_drivers), in words
_WHERE = {"builtin": "built into", "initramfs": "in the initramfs of", "module": "a module outside the initramfs of",
          "missing": "missing from"}
#: the oldest cloud-init ECS takes (reference §1.4 L7)
MIN_CLOUD_INIT = (0, 7, 9)
_DRACUT_HINT = ("rebuild the initramfs with the drivers, inside the guest: dracut -f --add-drivers "
                "\"virtio_blk virtio_pci virtio_net virtio_scsi\" /boot/initramfs-{v}.img {v} (RHEL, SUSE), or add "
                "them to /etc/initramfs-tools/modules and run update-initramfs -u -k {v} (Debian, Ubuntu)")


def _linux(ctx: DiskContext) -> LinuxInspection | None:
    inspection: LinuxInspection | None = ctx.guest_inspection("linux")
    return inspection


@disk_check("guest")
def guest_found(ctx: DiskContext) -> None:
    if ctx.role != SYSTEM:
        return
    guest = ctx.guest
    if guest is None:
        hidden = [volume for volume in ctx.guest_disk.volumes if volume.unreadable]
        if hidden:
            ctx.emit("guest-root-unreadable", "no readable volume holds an operating system, and the root may lie "
                     "where diskimg cannot read: " + "; ".join(volume.stack for volume in hidden)
                     + "; nothing inside can be checked",
                     {"value": [volume.name for volume in hidden],
                      "volumes": [{"volume": volume.name, "stack": volume.stack, "reason": volume.unreadable}
                                  for volume in hidden]}, _UNREADABLE_HINT)
        if ctx.guest_disk.unreadable:
            ctx.require_guest()  # raises NotAvailable with the volumes that could not be read
        ctx.emit("guest-not-found", "no operating system found on any volume (no /etc/os-release or release "
                 "file, no Windows directory)", {"volumes": [v.to_dict() for v in ctx.guest_disk.volumes]},
                 "check that this is the system disk of the machine (not a data disk or a partition image)")
        return
    where = guest.root.name if guest.root else "?"
    ctx.emit("guest-os", f"{guest.product or guest.distribution or guest.os_type} on {where}: Platform="
             f"{guest.platform}, OSType={guest.os_type}, Architecture={guest.architecture or '?'}",
             _guest_evidence(guest))
    if guest.unreadable:
        ctx.not_checked.append({"disk": ctx.path, "check": "guest_files", "category": "guest",
                                "reason": "; ".join(guest.unreadable)})


def _guest_evidence(guest: GuestFacts) -> dict[str, Any]:
    return {"partition": guest.root.number if guest.root else None, "distribution": guest.distribution,
            "version": guest.version, "platform": guest.platform, "architecture": guest.architecture,
            "volume": guest.root.name if guest.root else None, "stack": guest.root.stack if guest.root else None}


_UNREADABLE_HINT = ("put the root on a volume that can be read offline: a partition, or a linear or striped logical "
                    "volume whose physical volumes are all given (validate --system DISK --data DISK...); thin and "
                    "snapshot volumes, damaged volume groups and md levels other than RAID1 cannot be inspected")


@disk_check("guest")
def linux_drivers(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    kernel = linux.default_kernel
    if kernel is None:
        if linux.boot.kernel_missing or linux.boot.entries:
            raise NotAvailable("the default boot entry's kernel is not in the image")
        raise NotAvailable("no kernel found in /boot or /lib/modules")
    if linux.initramfs_error:
        ctx.emit("guest-initramfs-unreadable", f"the initramfs of kernel {kernel.version} could not be read in "
                 f"full: {linux.initramfs_error}", {"kernel": kernel.version, "value": linux.initramfs_error},
                 "check the file inside the guest (lsinitrd / lsinitramfs); rebuild it if it is damaged")
    drivers = linux.boot_drivers
    missing = [d for d in BOOT_DRIVERS if drivers.get(d) in ("module", "missing")]
    missing += [d for d in LATE_DRIVERS if drivers.get(d) == "missing"]
    unknown = [d for d in BOOT_DRIVERS + LATE_DRIVERS if drivers.get(d) == "unknown"]
    if missing:
        where = {d: _WHERE[drivers[d]] + " the kernel" for d in missing}
        ctx.emit("guest-virtio-missing", f"the default kernel {kernel.version} lacks {', '.join(missing)} at boot "
                 "(neither built in nor in its initramfs)",
                 {"kernel": kernel.version, "initramfs": linux.boot.initrd_paths[0] if linux.boot.initrd_paths
                  else kernel.initramfs, "drivers": where, "value": missing},
                 _DRACUT_HINT.format(v=kernel.version))
    if unknown:
        raise NotAvailable(f"whether kernel {kernel.version} has {', '.join(unknown)} is not known: "
                           + (linux.initramfs_error or "no modules.builtin, kernel config or module files"))


#: what each need of a root's stack is, in words, and the fix
_STACK_NEEDS = {"dm_mod": "device-mapper (dm-mod)", "lvm": "the lvm tool", "btrfs": "the btrfs module"}
#: the stacks a root may need support for, by what each needs
_STACK_KINDS = {"LVM": ("dm_mod", "lvm"), "btrfs": ("btrfs",)}
_STACK_HINT = {
    "LVM": "rebuild the initramfs with LVM inside the guest: dracut -f --add lvm --add-drivers dm-mod "
           "/boot/initramfs-{v}.img {v} (RHEL, SUSE), or install lvm2 and run update-initramfs -u -k {v} (Debian, "
           "Ubuntu)",
    "btrfs": "rebuild the initramfs with btrfs inside the guest: dracut -f --add btrfs --add-drivers btrfs "
             "/boot/initramfs-{v}.img {v} (RHEL, SUSE), or add btrfs to /etc/initramfs-tools/modules and run "
             "update-initramfs -u -k {v} (Debian, Ubuntu)",
}


@disk_check("guest")
def linux_root_stack(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None or not linux.root_needs or linux.default_kernel is None:
        return
    kernel = linux.default_kernel
    missing = [need for need, where in linux.root_needs.items() if where in ("module", "missing")]
    unknown = [need for need, where in linux.root_needs.items() if where == "unknown"]
    if missing:
        kinds = [kind for kind, needs in _STACK_KINDS.items() if set(needs) & set(missing)]
        ctx.emit("guest-initramfs-cannot-mount-root", f"the root is on {' and '.join(kinds)} ({linux.root.stack}) "
                 f"but the default kernel {kernel.version} lacks {' and '.join(_STACK_NEEDS[n] for n in missing)} "
                 "before the root is mounted (neither built in nor in its initramfs): it will not mount the root",
                 {"kernel": kernel.version, "initramfs": linux.boot.initrd_paths[0] if linux.boot.initrd_paths
                  else kernel.initramfs, "root": linux.root.stack, "needs": dict(linux.root_needs), "value": missing},
                 "; ".join(_STACK_HINT[kind].format(v=kernel.version) for kind in kinds))
    if unknown:
        raise NotAvailable(f"whether kernel {kernel.version} has {', '.join(_STACK_NEEDS[n] for n in unknown)} "
                           "before the root is mounted is not known: " + (linux.initramfs_error or
                                                                           "no modules.builtin, kernel config or "
                                                                           "module files"))


@disk_check("guest")
def linux_nvme(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None or linux.default_kernel is None:
        return
    support = linux.nvme_support
    if support is None:
        raise NotAvailable("whether the default kernel drives NVMe at boot is not known")
    timeout = kernel_arg(linux.boot.cmdline, "nvme_core.io_timeout")
    where = _WHERE.get(linux.boot_drivers.get("nvme") or "", "missing from")
    ctx.emit("guest-nvme", f"Features.NvmeSupport={support}: nvme is {where} kernel {linux.default_kernel.version}",
             {"value": support, "nvme_core.io_timeout": timeout},
             None if support == "supported" else
             "only needed for NVMe-only instance families: add nvme to the initramfs (dracut --add-drivers nvme)")


@disk_check("guest")
def linux_fstab(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    if linux.fstab is None:
        raise NotAvailable("the root file system has no /etc/fstab")
    for check in linux.fstab:
        entry = check.entry
        evidence = {"line": entry.line, "spec": entry.spec, "mountpoint": entry.mountpoint, "value": entry.spec}
        key, value = spec_key(entry.spec)
        if check.status == "unresolved" and (key != "DEVICE" or assembled_name(value)) \
                and ctx.find_on_other_disk(entry.spec):
            continue  # on a data disk of the machine
        if check.status == "unresolved" and not entry.nofail:
            where = "any disk of the machine" if len(ctx.machine) > 1 else "this disk"
            ctx.emit("guest-fstab-unresolved", f"/etc/fstab line {entry.line} mounts {entry.mountpoint} from "
                     f"{entry.spec}, which is on no volume of {where}", evidence,
                     "fix the UUID/LABEL (blkid shows the right ones), add 'nofail' for a data disk imported "
                     "separately, or remove the line")
        elif check.status in ("device-name", "unresolved") and spec_key(entry.spec)[0] == "DEVICE":
            ctx.emit("guest-device-name", f"/etc/fstab line {entry.line} mounts {entry.mountpoint} by the device "
                     f"name {entry.spec}", evidence, "use UUID=... (blkid) instead of the device name")


@disk_check("guest")
def linux_boot_entry(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    boot = linux.boot
    if boot.default is None:
        ctx.emit("guest-boot-config-missing", "no boot loader configuration found (grub.cfg, BLS entries, "
                 "menu.lst)", {"mounts": sorted(linux.mounts)},
                 "install and configure GRUB inside the guest (grub2-mkconfig -o /boot/grub2/grub.cfg, or "
                 "update-grub)")
        return
    entry = boot.default
    evidence = {"config": boot.config, "entry": entry.title, "default_from": boot.default_from}
    if boot.kernel_missing or not entry.linux:
        ctx.emit("guest-boot-entry-broken", f"the default boot entry '{entry.title}' loads the kernel "
                 f"{boot.kernel_missing or '(none)'}, which is not in the image", {**evidence,
                                                                                   "value": boot.kernel_missing},
                 "regenerate the boot configuration inside the guest (grub2-mkconfig / update-grub) or set the "
                 "default to an installed kernel (grubby --set-default)")
    for path in boot.initrd_missing:
        ctx.emit("guest-boot-entry-broken", f"the default boot entry '{entry.title}' loads the initrd {path}, "
                 "which is not in the image", {**evidence, "value": path},
                 "rebuild it inside the guest (dracut -f / update-initramfs -u) or fix the entry")
    root = kernel_arg(boot.cmdline, "root")
    if root is None:
        return
    resolved = ctx.guest_disk.resolve(root)
    if resolved.volume is not None and resolved.volume.unreadable is not None:
        ctx.emit("guest-root-unreadable", f"the default boot entry mounts root={root}, {resolved.volume.stack}: "
                 f"the facts here come from {linux.root.name}, which is not the root the instance boots",
                 {**evidence, "value": root, "volume": resolved.volume.name, "reason": resolved.volume.unreadable},
                 _UNREADABLE_HINT)
    if resolved.status == "missing":
        ctx.emit("guest-boot-entry-broken", f"the default boot entry's root={root} {resolved.reason}: the initramfs "
                 "will not find the root file system", {**evidence, "value": root},
                 "set root=UUID=<the root file system's UUID> (blkid) in the boot configuration and regenerate it "
                 "(GRUB_DISABLE_LINUX_UUID must not be true; in a chroot, /dev and /sys must be mounted for "
                 "update-grub / grub2-mkconfig)")
    key, value = spec_key(root)
    if key == "DEVICE" and is_device_name(value):
        ctx.emit("guest-device-name", f"the default boot entry boots root={root}, a kernel device name",
                 {**evidence, "value": root}, "use root=UUID=... (GRUB_DISABLE_LINUX_UUID must not be true)")


@disk_check("guest")
def linux_recovery_entry(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None or linux.boot.default is None:
        return
    found = recovery_arguments(linux.boot.cmdline)
    if found:
        entry = linux.boot.default
        ctx.emit("guest-boot-recovery-mode", f"the default boot entry '{entry.title}' boots into rescue or "
                 f"emergency mode ({' '.join(found)}): a console waiting for the root password",
                 {"config": linux.boot.config, "entry": entry.title, "value": found},
                 "make a normal entry the default (GRUB_DEFAULT / grub-set-default / grubby --set-default) or "
                 "remove the argument, then regenerate the boot configuration")


@disk_check("guest")
def linux_network(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    primary = linux.primary_interface
    if primary is not None and primary.ipv4 == "static":
        evidence = {"interface": primary.name, "file": primary.source, "value": "static"}
        if (primary.generator == "cloud-init" and linux.cloud_init.get("installed")
                and not linux.cloud_init_network_disabled):
            ctx.emit("guest-static-ip-cloud-init", f"the primary interface {primary.name} has a static IPv4 "
                     f"address in {primary.source}, which cloud-init rewrites on the first boot",
                     {**evidence, "generator": "cloud-init"},
                     "nothing is needed; to be sure, remove the file (cloud-init writes it again from the "
                     "instance's metadata)")
        else:
            disabled = linux.cloud_init_network_disabled
            ctx.emit("guest-static-ip", f"the primary interface {primary.name} has a static IPv4 address "
                     f"({primary.source}" + (f"; cloud-init's network configuration is disabled in {disabled})"
                                             if disabled else ")"),
                     {**evidence, "cloud_init_network_disabled": disabled},
                     "configure DHCP (BOOTPROTO=dhcp, method=auto, dhcp4: true, iface ... inet dhcp, DHCP=yes)")
    for interface in linux.interfaces:
        if interface.mac:
            ctx.emit("guest-mac-address", f"{interface.source} binds {interface.name or 'an interface'} to the MAC "
                     f"address {interface.mac}", {"file": interface.source, "value": interface.mac},
                     "remove HWADDR/MACADDR/mac-address/macaddress from the configuration")
    if linux.persistent_net:
        path, macs = linux.persistent_net
        ctx.emit("guest-persistent-net-rules", f"{path} pins interface names to {len(macs)} MAC address(es)",
                 {"file": path, "value": macs}, f"empty or delete {path}")


@disk_check("guest")
def linux_agents(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    cloud_init = linux.cloud_init
    if not cloud_init.get("installed"):
        ctx.emit("guest-cloud-init-missing", "cloud-init is not installed", {"value": None},
                 "install cloud-init (Alibaba's build for the AliYun datasource), or import as Customized Linux")
    else:
        version = cloud_init.get("version")
        if version and version_tuple(version) < MIN_CLOUD_INIT:
            ctx.emit("guest-cloud-init-old", f"cloud-init {version} is older than 0.7.9",
                     {"value": version, "datasources": cloud_init.get("datasources")},
                     "upgrade cloud-init (Alibaba Cloud publishes 19.1.x builds with the AliYun datasource)")
        disabled_by = cloud_init.get("disabled_by")
        if disabled_by:
            ctx.emit("guest-cloud-init-disabled", "cloud-init is installed but will not configure the instance: "
                     + "; ".join(disabled_by), {"value": disabled_by, "datasources": cloud_init.get("datasources")},
                     "inside the guest: rm /etc/cloud/cloud-init.disabled, systemctl unmask and enable "
                     "cloud-init-local cloud-init cloud-config cloud-final, drop cloud-init=disabled from the kernel "
                     "command line, and let datasource_list name AliYun (or remove it)")
    running = cloud_init.get("installed") and not cloud_init.get("disabled_by")
    if linux.sshd and not linux.ssh_host_keys and not linux.ssh_keygen and not running:
        ctx.emit("guest-ssh-host-keys-missing", f"{linux.sshd} is installed but /etc/ssh has no host keys "
                 "(ssh_host_*_key), nothing generates them at boot and cloud-init will not: sshd fails to start",
                 {"file": linux.sshd, "value": None},
                 "generate them inside the guest before imaging (ssh-keygen -A), or let cloud-init run")
    if linux.qemu_guest_agent:
        ctx.emit("guest-qemu-guest-agent", f"qemu-guest-agent is installed ({linux.qemu_guest_agent})",
                 {"file": linux.qemu_guest_agent}, "remove it (yum remove qemu-guest-agent / apt purge "
                 "qemu-guest-agent)")


@disk_check("guest")
def linux_security(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    if linux.selinux == "enforcing" and linux.selinux_loaded_by:
        ctx.emit("guest-selinux-enforcing", f"SELinux is enforcing ({linux.selinux_source}; loaded by "
                 f"{linux.selinux_loaded_by})",
                 {"file": linux.selinux_source, "loaded_by": linux.selinux_loaded_by, "value": "enforcing"},
                 "set SELINUX=disabled (or permissive) in /etc/selinux/config")
    flags = linux.shadow_flags
    if flags is not None and flags & {"immutable", "append"}:
        ctx.emit("guest-shadow-immutable", f"/etc/shadow is {' and '.join(sorted(flags & {'immutable', 'append'}))}",
                 {"file": "/etc/shadow", "value": sorted(flags)}, "chattr -i -a /etc/shadow inside the guest")
    if linux.root_account is False:
        ctx.emit("guest-root-account", "/etc/passwd has no root account (uid 0)", {"file": "/etc/passwd"},
                 "restore the root line in /etc/passwd")
    if linux.passwd_command is None:
        ctx.emit("guest-root-account", "the passwd command is missing (/usr/bin/passwd)",
                 {"file": "/usr/bin/passwd"}, "install the passwd package")
    for name, target in linux.absolute_lib_links.items():
        ctx.emit("guest-lib-absolute-symlink", f"{name} is a symbolic link to the absolute path {target}",
                 {"file": name, "value": target}, f"make it relative: ln -sfn {target.lstrip('/')} {name}")


@disk_check("guest")
def linux_layout(ctx: DiskContext) -> None:
    linux = _linux(ctx)
    if linux is None:
        return
    root = linux.root
    if root.number is not None:
        later = [v.number for v in ctx.guest_disk.volumes if v.number is not None and v.offset > root.offset]
        if later:
            ctx.emit("guest-root-not-last", f"the root file system ({root.name}) is followed by partition(s) "
                     f"{', '.join(map(str, later))}", {"partition": root.number, "value": later},
                     "put the root partition last (move or drop the partitions after it) so growpart can extend "
                     "it")
    if ctx.guest is not None and ctx.guest.architecture == "arm64":
        try:
            uefi = ctx.boot.uefi
        except NotAvailable:
            uefi = False
        if not uefi or ctx.boot_mode == "BIOS":
            ctx.emit("guest-arm64-not-uefi", "the guest is arm64 but the disk "
                     + ("is declared BootMode=BIOS" if uefi else "does not boot with UEFI"),
                     {"architecture": "arm64", "value": ctx.boot_mode or ("UEFI" if uefi else None)},
                     "arm64 images boot with UEFI only: add an ESP with EFI/BOOT/BOOTAA64.EFI "
                     "(grub-install --target=arm64-efi --removable) and import with BootMode=UEFI")
