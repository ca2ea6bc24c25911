"""Linux guest inspection: read the root file system (and the /boot and /usr it mounts) and collect
what a cloud import depends on.

The root is the volume holding ``/etc/os-release`` (or a legacy release file), wherever it lives: a
partition, a logical volume, an md array, a btrfs subvolume. On btrfs it is the default subvolume, else
the first plain subvolume holding a release file, and then the subvolume the kernel command line
(``rootflags=subvol=``/``subvolid=``) or fstab's ``/`` line mounts, when that is another one; snapshots
are never roots. Its ``/etc/fstab`` says where ``/boot``, ``/boot/efi`` and ``/usr`` live, and those
volumes are read through the same :class:`GuestTree`, which resolves symbolic links across them as the
guest would. Each fact comes from the file the distribution itself reads (the sources are in the
reference's sections 1.2, 1.4 and 6); a file that exists but cannot be read becomes a "could not read"
note, never an exception.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from ...errors import DiskImageError
from ..fs import GuestFileSystem, GuestPathError, Stat
from ..fs.base import GuestFile
from . import GuestDisk, GuestFacts, GuestVolume, spec_key
from .config import (
    MAX_CONFIG,
    BootEntry,
    FstabEntry,
    Interface,
    choose_default,
    cloud_init_datasources,
    cloud_init_network_config,
    cloud_init_version,
    config_lines,
    expand_grub_vars,
    grub_legacy_default,
    kernel_arg,
    network_file_generator,
    parse_bls_entry,
    parse_fstab,
    parse_grub_cfg,
    parse_grubenv,
    parse_ifcfg,
    parse_interfaces,
    parse_netplan,
    parse_networkd,
    parse_nm_keyfile,
    parse_persistent_net_rules,
    parse_shell_vars,
    sort_bls_entries,
    version_sort_key,
)
from .initramfs import InitramfsListing, list_initramfs, module_name

#: an initramfs larger than this is not read (its driver list is then reported as unknown); it is read
#: a chunk at a time, so this bounds the time spent, not memory
MAX_INITRAMFS = 256 << 20
#: files of one directory looked at (network configs, BLS entries, cloud.cfg.d)
MAX_DIR_FILES = 256
#: symbolic links followed across mounts in one lookup
MAX_SYMLINKS = 40

RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")
LEGACY_RELEASE_FILES = ("/etc/centos-release", "/etc/redhat-release", "/etc/SuSE-release", "/etc/alinux-release",
                        "/etc/system-release", "/etc/lsb-release", "/etc/debian_version")

#: ELF e_machine -> architecture name (ImportImage takes i386, x86_64, arm64)
ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "arm64", 40: "arm", 243: "riscv64", 8: "mips", 20: "ppc",
                21: "ppc64", 22: "s390x", 258: "loongarch64"}
ELF_PROGRAMS = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init", "/usr/sbin/init", "/bin/sh")

#: driver -> (kernel config option, module path under /lib/modules/<ver>/kernel without suffix)
DRIVERS = {
    "virtio_blk": ("CONFIG_VIRTIO_BLK", ("drivers/block/virtio_blk",)),
    "virtio_pci": ("CONFIG_VIRTIO_PCI", ("drivers/virtio/virtio_pci",)),
    "virtio_net": ("CONFIG_VIRTIO_NET", ("drivers/net/virtio_net",)),
    "virtio_scsi": ("CONFIG_SCSI_VIRTIO", ("drivers/scsi/virtio_scsi",)),
    "nvme": ("CONFIG_BLK_DEV_NVME", ("drivers/nvme/host/nvme", "drivers/block/nvme")),
}
#: what the initramfs needs to mount a root on LVM or btrfs: driver -> (kernel config option, module path)
STACK_DRIVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dm_mod": ("CONFIG_BLK_DEV_DM", ("drivers/md/dm-mod",)),
    "btrfs": ("CONFIG_BTRFS_FS", ("fs/btrfs/btrfs",)),
}
#: what the initramfs carries to assemble LVM: the lvm tool, or the files of dracut's lvm module (its
#: lvm_scan script and parse-lvm.sh hook)
LVM_TOOLING = re.compile(r"(^|/)(s?bin/lvm|s?bin/lvm_scan|[0-9]*-?parse-lvm\.sh)$")
#: drivers the kernel needs before the root file system is mounted (built in, or in the initramfs)
BOOT_DRIVERS = ("virtio_blk", "virtio_pci")
#: drivers that may load from /lib/modules after the root is mounted
LATE_DRIVERS = ("virtio_net",)
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

#: os-release ID -> ImportImage Platform
PLATFORMS = {
    "centos": "CentOS", "rhel": "RedHat", "ubuntu": "Ubuntu", "debian": "Debian", "sles": "SUSE", "sled": "SUSE",
    "suse": "SUSE", "opensuse": "OpenSUSE", "opensuse-leap": "OpenSUSE", "opensuse-tumbleweed": "OpenSUSE",
    "alinux": "Aliyun", "aliyun": "Aliyun", "anolis": "Anolis", "fedora": "Fedora", "almalinux": "AlmaLinux",
    "rocky": "Rocky Linux", "gentoo": "Gentoo", "coreos": "CoreOS", "kylin": "Kylin", "uos": "UOS",
    "uniontech": "UOS", "freebsd": "FreeBSD",
}
OTHER_LINUX = "Others Linux"


# -- the guest's tree of mounted file systems -------------------------------------------------------------


class GuestTree:
    """Paths of the guest across its mounts (root, /boot, /usr...), symbolic links resolved inside it."""

    def __init__(self, root: GuestFileSystem[Any]) -> None:
        self.mounts: dict[str, GuestFileSystem[Any]] = {"/": root}

    def mount(self, mountpoint: str, fs: GuestFileSystem[Any]) -> None:
        self.mounts[posixpath.normpath("/" + mountpoint.lstrip("/"))] = fs

    def _locate(self, path: str) -> tuple[GuestFileSystem[Any], str]:
        best = "/"
        for point in self.mounts:
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best = point
        rel = path[len(best):] if best != "/" else path
        return self.mounts[best], rel or "/"

    def resolve(self, path: str, follow: bool = True) -> str:
        """The path with every symbolic link replaced by its target (absolute, '..' applied)."""
        pending = [p for p in path.split("/") if p not in ("", ".")]
        pending.reverse()
        current = ""
        links = 0
        while pending:
            part = pending.pop()
            if part == "..":
                current = current.rpartition("/")[0]  # "" is the root
                continue
            candidate = f"{current}/{part}"
            if not pending and not follow:
                current = candidate
                break
            fs, rel = self._locate(candidate)
            info = fs.stat(rel, follow_symlinks=False)
            if info.is_symlink:
                links += 1
                if links > MAX_SYMLINKS:
                    raise GuestPathError(f"{path}: too many levels of symbolic links")
                target = fs.readlink(rel)
                if target.startswith("/"):
                    current = ""
                pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            current = candidate
        return current or "/"

    def _at(self, path: str, follow: bool = True) -> tuple[GuestFileSystem[Any], str]:
        if len(self.mounts) == 1:  # the file system resolves its own links
            return self.mounts["/"], path
        return self._locate(self.resolve(path, follow))

    def stat(self, path: str, follow: bool = True) -> Stat:
        fs, rel = self._at(path, follow)
        return fs.stat(rel, follow_symlinks=follow)

    def exists(self, path: str, follow: bool = True) -> bool:
        try:
            self.stat(path, follow)
        except GuestPathError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        fs, rel = self._at(path)
        return fs.listdir(rel)

    def readlink(self, path: str) -> str:
        fs, rel = self._at(path, follow=False)
        return fs.readlink(rel)

    def read(self, path: str, max_size: int) -> bytes:
        fs, rel = self._at(path)
        return fs.read_file(rel, max_size)

    def open(self, path: str) -> GuestFile:
        fs, rel = self._at(path)
        return fs.open(rel)

    def head(self, path: str, size: int) -> bytes:
        fs, rel = self._at(path)
        return next(iter(fs.iter_file(rel, size)), b"")


# -- what the inspection finds ----------------------------------------------------------------------------


@dataclass
class Kernel:
    """One installed kernel and what it can drive."""

    version: str
    image: str | None = None  # /boot/vmlinuz-<ver>
    initramfs: str | None = None
    config: str | None = None  # /boot/config-<ver>
    modules_dir: bool = False
    #: driver -> "builtin", "module" (file present), "module-missing" (=m but no file), "absent", "unknown"
    drivers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "image": self.image, "initramfs": self.initramfs, "config": self.config,
                "modules": self.modules_dir, "drivers": dict(self.drivers)}


@dataclass
class BootConfig:
    """The boot loader's configuration and the entry it boots by default."""

    loader: str | None = None  # "grub2", "grub2+bls", "bls", "grub-legacy"
    config: str | None = None
    entries: list[BootEntry] = field(default_factory=list)
    default: BootEntry | None = None
    #: how the default was chosen ("set default=0", "saved_entry=...")
    default_from: str | None = None
    kernel_path: str | None = None  # where the default entry's kernel was found in the tree
    kernel_missing: str | None = None  # the path the entry names when it is not there
    initrd_paths: list[str] = field(default_factory=list)
    initrd_missing: list[str] = field(default_factory=list)
    cmdline: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "loader": self.loader, "config": self.config, "entries": len(self.entries),
            "default": self.default.to_dict() if self.default else None, "default_from": self.default_from,
            "kernel": self.kernel_path, "kernel_missing": self.kernel_missing, "initrd": self.initrd_paths,
            "initrd_missing": self.initrd_missing, "cmdline": self.cmdline,
        }


@dataclass
class MountCheck:
    """One fstab line and what it resolves to on this disk."""

    entry: FstabEntry
    #: "ok", "unresolved", "device-name", "lvm" (inside LVM, LUKS or md: not resolvable offline), "skipped"
    #: (pseudo/network fs)
    status: str
    volume: GuestVolume | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.to_dict(), "status": self.status, "partition": self.volume.number if self.volume else None,
                "volume": self.volume.name if self.volume else None}


@dataclass
class LinuxInspection:
    """Everything the Linux checks read (see linux_checks.py)."""

    root: GuestVolume
    release: dict[str, str] = field(default_factory=dict)
    release_source: str | None = None
    architecture: str | None = None
    architecture_source: str | None = None
    mounts: dict[str, GuestVolume] = field(default_factory=dict)
    fstab: list[MountCheck] | None = None
    kernels: list[Kernel] = field(default_factory=list)
    boot: BootConfig = field(default_factory=BootConfig)
    default_kernel: Kernel | None = None
    initramfs: InitramfsListing | None = None
    initramfs_error: str | None = None
    #: driver -> where the default kernel gets it: "builtin", "initramfs", "module", "missing", "unknown"
    boot_drivers: dict[str, str] = field(default_factory=dict)
    #: what the root's stack needs before it is mounted ("dm_mod" and "lvm" for LVM, "btrfs" for btrfs) ->
    #: where the default kernel gets it, as in ``boot_drivers``; empty for a root on a partition
    root_needs: dict[str, str] = field(default_factory=dict)
    #: the subvolumes of a btrfs root (the root, the default one, the plain ones and the snapshots, by path)
    btrfs: dict[str, Any] | None = None
    cloud_init: dict[str, Any] = field(default_factory=dict)
    #: the SSH server's program, its host keys (/etc/ssh/ssh_host_*_key) and what generates missing ones at boot
    sshd: str | None = None
    ssh_host_keys: list[str] = field(default_factory=list)
    ssh_keygen: str | None = None
    interfaces: list[Interface] = field(default_factory=list)
    #: where cloud-init's network configuration is turned off, None when cloud-init rewrites the files it
    #: generates on a new instance's first boot
    cloud_init_network_disabled: str | None = None
    persistent_net: tuple[str, list[str]] | None = None
    qemu_guest_agent: str | None = None
    selinux: str | None = None
    selinux_source: str | None = None
    #: what makes the kernel load SELinux at all: its policy (/etc/selinux/<SELINUXTYPE>/policy) or a kernel
    #: argument (security=selinux); None when neither, as on Debian, where the mode set in the config is moot
    selinux_loaded_by: str | None = None
    shadow_flags: frozenset[str] | None = None
    root_account: bool | None = None
    passwd_command: str | None = None
    absolute_lib_links: dict[str, str] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    @property
    def primary_interface(self) -> Interface | None:
        enabled = [i for i in self.interfaces if i.enabled and i.name not in ("lo",)]
        if not enabled:
            return None
        return sorted(enabled, key=lambda i: (i.name != "eth0", i.ipv4 != "dhcp", i.name or ""))[0]

    @property
    def nvme_support(self) -> str | None:
        """Features.NvmeSupport: the default kernel drives NVMe before the root is mounted."""
        state = self.boot_drivers.get("nvme")
        if state in (None, "unknown"):
            return None
        return "supported" if state in ("builtin", "initramfs") else "unsupported"


# -- reading files, every failure a note ---------------------------------------------------------------------


class _Reader:
    def __init__(self, tree: GuestTree, notes: list[str]) -> None:
        self.tree = tree
        self.notes = notes

    def note(self, path: str, exc: DiskImageError) -> None:
        self.notes.append(f"could not read {path}: {exc.message}")

    def text(self, path: str, max_size: int = MAX_CONFIG) -> str | None:
        """The file's text, None when it is not there (or unreadable: then noted)."""
        try:
            if not self.tree.exists(path) or not self.tree.stat(path).is_file:
                return None
            return self.tree.read(path, max_size).decode("utf-8", errors="replace")
        except DiskImageError as exc:
            self.note(path, exc)
            return None

    def exists(self, path: str, follow: bool = True) -> bool:
        try:
            return self.tree.exists(path, follow)
        except DiskImageError as exc:
            self.note(path, exc)
            return False

    def listdir(self, path: str) -> list[str]:
        try:
            if not self.tree.exists(path) or not self.tree.stat(path).is_dir:
                return []
            return sorted(self.tree.listdir(path))
        except DiskImageError as exc:
            self.note(path, exc)
            return []

    def first(self, paths: tuple[str, ...] | list[str]) -> str | None:
        for path in paths:
            if self.exists(path):
                return path
        return None


# -- the inspection ------------------------------------------------------------------------------------------


def inspect(disk: GuestDisk) -> GuestFacts | None:
    """The Linux system on ``disk``, None when no volume holds one."""
    found = _find_root(disk)
    if found is None:
        return None
    facts = _inspect_root(disk, *found)
    mounted = _mounted_root(disk, facts.inspection)
    if mounted is not None:  # the boot mounts another subvolume of the root's btrfs: that one is the root
        fs = disk.open(mounted)
        if fs is not None:
            facts = _inspect_root(disk, mounted, fs)
    return facts


def _inspect_root(disk: GuestDisk, volume: GuestVolume, fs: GuestFileSystem[Any]) -> GuestFacts:
    tree = GuestTree(fs)
    notes: list[str] = []
    read = _Reader(tree, notes)
    result = LinuxInspection(root=volume, unreadable=notes)
    result.mounts["/"] = volume
    fstab_text = read.text("/etc/fstab")
    if fstab_text is not None:
        result.fstab = _check_fstab(parse_fstab(fstab_text), disk, tree, result)
    steps = ((_subvolumes, "the btrfs subvolumes"), (_release, "the release files"),
             (_architecture, "the architecture"), (_kernels, "the kernels"),
             (_boot_config, "the boot configuration"), (_default_kernel_drivers, "the default kernel's drivers"),
             (_cloud_init, "cloud-init"), (_ssh_server, "the SSH server"), (_network, "the network configuration"),
             (_accounts_and_security, "accounts and security settings"))
    for step, what in steps:
        try:
            step(read, result, disk)
        except DiskImageError as exc:  # a damaged directory on the way: the other facts still count
            notes.append(f"could not read {what}: {exc.message}")
    release = result.release
    distribution = release.get("ID") or None
    return GuestFacts(
        os_type="linux",
        distribution=distribution,
        version=release.get("VERSION_ID") or None,
        product=release.get("PRETTY_NAME") or release.get("NAME") or None,
        architecture=result.architecture,
        platform=platform_of(release),
        root=volume,
        details=_details(result),
        unreadable=notes,
        inspection=result,
    )


#: containers whose file systems are not read when nothing was assembled from them (a root inside is not found)
_NOT_ASSEMBLED = {"lvm2": "an LVM physical volume whose volume group could not be assembled",
                  "luks": "an encrypted LUKS volume", "bitlocker": "an encrypted BitLocker volume",
                  "md": "an md RAID member whose array could not be assembled"}
#: plain subvolumes of one btrfs tried as roots when its default subvolume holds no system
MAX_ROOT_SUBVOLUMES = 64
#: subvolumes and snapshots of a btrfs root named in the report (each kind; the counts are complete)
MAX_LISTED_SUBVOLUMES = 64


def _find_root(disk: GuestDisk) -> tuple[GuestVolume, GuestFileSystem[Any]] | None:
    """The first volume with a release file (else with /etc/fstab); a symlinked os-release counts,
    as its target may be on a separate /usr. A btrfs is looked at from its default subvolume, then
    from its plain subvolumes (snapshots and read-only subvolumes are not roots)."""
    fallback = None
    unassembled = {id(volume) for volume in disk.unassembled()}
    for volume in disk.volumes:
        if volume.fs is not None and volume.fs.type in _NOT_ASSEMBLED:
            if id(volume) in unassembled:
                disk.unreadable[volume.name] = _NOT_ASSEMBLED[volume.fs.type]
            continue
        if volume.unreadable is not None:
            disk.unreadable[volume.name] = volume.unreadable
            continue
        if volume.fs is None or volume.fs.type == "swap":
            continue
        for candidate in _root_candidates(disk, volume):
            fs = disk.open(candidate)
            if fs is None:
                continue
            try:
                if not fs.is_dir("/etc"):
                    continue
                if any(fs.exists(p, follow_symlinks=False) for p in ("/etc/os-release", *LEGACY_RELEASE_FILES)):
                    return candidate, fs
                if fallback is None and fs.exists("/etc/fstab"):
                    fallback = candidate, fs
            except DiskImageError as exc:
                disk.unreadable[candidate.name] = f"its {volume.fs.type} file system cannot be read: {exc.message}"
    return fallback


def _root_candidates(disk: GuestDisk, volume: GuestVolume) -> Iterator[GuestVolume]:
    """``volume``, or for a btrfs its default subvolume, then its plain subvolumes by id."""
    if volume.fs_type != "btrfs":
        yield volume
        return
    default = disk.subvolume(volume)
    if default is None:
        return
    yield default
    from ..fs.btrfs import BtrfsFileSystem  # loaded already: the volume was opened by it

    fs = disk.open(volume)
    try:
        subvolumes = fs.list_subvolumes() if isinstance(fs, BtrfsFileSystem) else []
    except DiskImageError as exc:
        disk.unreadable[volume.name] = f"its btrfs subvolumes cannot be listed: {exc.message}"
        return
    plain = [s for s in subvolumes if s.parent_uuid is None and not s.readonly and s.id != default.subvolume_id]
    for subvolume in plain[:MAX_ROOT_SUBVOLUMES]:
        view = disk.subvolume(volume, subvolid=subvolume.id)
        if view is not None:
            yield view


def _subvolumes(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    """The subvolumes of a btrfs root: snapper's snapshots among them are listed, never taken for roots."""
    root = result.root
    if root.subvolume_id is None:
        return
    from ..fs.btrfs import BtrfsFileSystem  # loaded already: the root was opened by it

    fs = disk.open(root.base)
    if not isinstance(fs, BtrfsFileSystem):
        return
    found = fs.list_subvolumes()
    paths = {subvolume.id: subvolume.path for subvolume in found}
    plain = [subvolume.path for subvolume in found if subvolume.parent_uuid is None]
    snapshots = [subvolume.path for subvolume in found if subvolume.parent_uuid is not None]
    result.btrfs = {"root": root.subvolume, "root_id": root.subvolume_id,
                    "default": paths.get(fs.default_subvolume_id, ""), "default_id": fs.default_subvolume_id,
                    "subvolume_count": len(plain), "snapshot_count": len(snapshots),
                    "subvolumes": plain[:MAX_LISTED_SUBVOLUMES], "snapshots": snapshots[:MAX_LISTED_SUBVOLUMES]}


def _subvolume_options(options: tuple[str, ...] | list[str]) -> tuple[str | None, int | None] | None:
    """(subvol, subvolid) that mount options name, None when they name neither."""
    subvol = subvolid = None
    for option in options:
        key, sep, value = option.partition("=")
        if sep and key == "subvol":
            subvol = value
        elif sep and key == "subvolid" and value.isdigit() and len(value) <= 20:
            subvolid = int(value)
    return None if subvol is None and subvolid is None else (subvol, subvolid)


def _mounted_root(disk: GuestDisk, result: LinuxInspection) -> GuestVolume | None:
    """The btrfs subvolume the boot mounts as the root when it is not the one inspected: the one the default
    entry's ``rootflags=`` names (the initramfs mounts it), else the one fstab's ``/`` line names."""
    root = result.root
    if root.subvolume_id is None:
        return None
    named = None
    rootflags = kernel_arg(result.boot.cmdline, "rootflags")
    spec = kernel_arg(result.boot.cmdline, "root")
    if rootflags is not None and (spec is None or disk.resolve(spec).volume is root.base):
        named = _subvolume_options(rootflags.split(","))
    for check in result.fstab or []:
        if named is None and check.entry.mountpoint == "/" and check.volume is not None \
                and check.volume.base is root.base:
            named = _subvolume_options(check.entry.options)
    if named is None:
        return None
    view = disk.subvolume(root.base, *named)
    return view if view is not None and view.subvolume_id != root.subvolume_id else None


_PSEUDO = {"proc", "sysfs", "devpts", "tmpfs", "devtmpfs", "none", "swap", "nfs", "nfs4", "cifs", "smbfs",
           "fuse", "sshfs", "cgroup", "cgroup2", "securityfs", "debugfs", "efivarfs", "hugetlbfs", "mqueue",
           "binfmt_misc", "configfs", "pstore", "bpf", "tracefs", "autofs", "9p", "virtiofs", "glusterfs", "ceph"}
#: mount points read along with the root, in this order
_MOUNTED = ("/usr", "/boot", "/boot/efi")


def _check_fstab(entries: list[FstabEntry], disk: GuestDisk, tree: GuestTree,
                 result: LinuxInspection) -> list[MountCheck]:
    checks = []
    for entry in entries:
        not_a_disk = entry.fstype in _PSEUDO - {"swap"} or "bind" in entry.options or "_netdev" in entry.options
        resolved = disk.resolve(entry.spec)
        if not_a_disk or resolved.status == "unknown":
            checks.append(MountCheck(entry, "skipped"))
        elif resolved.status == "unassembled":
            checks.append(MountCheck(entry, "lvm"))
        elif resolved.volume is None:
            checks.append(MountCheck(entry, "unresolved"))
        else:
            volume = resolved.volume
            if volume.fs_type == "btrfs":  # the subvolume the options name, else the default one
                volume = disk.subvolume(volume, *(_subvolume_options(entry.options) or (None, None))) or volume
            by_name = spec_key(entry.spec)[0] == "DEVICE" and volume.layer is None
            checks.append(MountCheck(entry, "device-name" if by_name else "ok", volume))
    # mount what the checks read beyond the root
    for point in _MOUNTED:
        for check in checks:
            if check.entry.mountpoint == point and check.volume is not None and check.volume is not result.root:
                fs = disk.open(check.volume)
                if fs is not None:
                    tree.mount(point, fs)
                    result.mounts[point] = check.volume
                elif check.volume.name in disk.unreadable:
                    result.unreadable.append(f"could not read {point} ({check.volume.name}): "
                                             f"{disk.unreadable[check.volume.name]}")
    return checks


def _release(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    for path in RELEASE_FILES:
        text = read.text(path)
        if text:
            result.release = parse_shell_vars(text)
            result.release_source = path
            return
    for path in LEGACY_RELEASE_FILES:
        text = read.text(path)
        if text:
            result.release = parse_legacy_release(path, text)
            result.release_source = path
            return


def parse_legacy_release(path: str, text: str) -> dict[str, str]:
    """os-release style keys (ID, VERSION_ID, NAME, PRETTY_NAME) from a pre-os-release file."""
    lines = [line.strip() for line in config_lines(text) if line.strip()]
    first = lines[0] if lines else ""
    name = path.rsplit("/", 1)[-1]
    if name == "lsb-release":
        values = parse_shell_vars(text)
        ident = values.get("DISTRIB_ID", "").lower()
        return {"ID": ident, "VERSION_ID": values.get("DISTRIB_RELEASE", ""),
                "PRETTY_NAME": values.get("DISTRIB_DESCRIPTION", ""), "NAME": values.get("DISTRIB_ID", "")}
    if name == "debian_version":
        return {"ID": "debian", "VERSION_ID": first.split(".")[0] if first[:1].isdigit() else first,
                "PRETTY_NAME": f"Debian GNU/Linux {first}", "NAME": "Debian GNU/Linux"}
    version = re.search(r"\brelease\s+([\d.]+)|\b(\d+(?:\.\d+)*)\b", first)
    version_id = (version.group(1) or version.group(2)) if version else ""
    lowered = first.lower()
    if name == "SuSE-release":
        values = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines[1:])}
        ident = "opensuse" if "opensuse" in lowered else "sles"
        version_id = values.get("VERSION", version_id) + (
            f".{values['PATCHLEVEL']}" if values.get("PATCHLEVEL", "0") not in ("", "0") else "")
    elif "centos" in lowered:
        ident = "centos"
    elif "red hat" in lowered:
        ident = "rhel"
    elif "alibaba" in lowered or "aliyun" in lowered:
        ident = "alinux"
    elif "fedora" in lowered:
        ident = "fedora"
    else:
        ident = lowered.split()[0] if lowered else ""
    return {"ID": ident, "VERSION_ID": version_id, "PRETTY_NAME": first, "NAME": first.split(" release")[0]}


def platform_of(release: dict[str, str]) -> str:
    """The ImportImage Platform for an os-release."""
    ident = release.get("ID", "").lower()
    name = release.get("NAME", "").lower()
    variant = release.get("VARIANT_ID", "").lower()
    if ident == "centos" and "stream" in name:
        return "CentOS Stream"
    if ident == "fedora" and variant == "coreos":
        return "Fedora CoreOS"
    if ident in PLATFORMS:
        return PLATFORMS[ident]
    if ident.startswith("opensuse"):
        return "OpenSUSE"
    return OTHER_LINUX


def elf_machine(head: bytes) -> str | None:
    """The architecture an ELF header is built for (e_machine at 18, in the header's byte order)."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def _architecture(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    for path in ELF_PROGRAMS:
        try:
            if not read.tree.exists(path):
                continue
            machine = elf_machine(read.tree.head(path, 64))
        except DiskImageError as exc:
            read.note(path, exc)
            continue
        if machine is not None:
            result.architecture, result.architecture_source = machine, path
            return


def _modules_root(read: _Reader) -> str:
    return "/lib/modules" if read.exists("/lib/modules") else "/usr/lib/modules"


def _kernels(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    versions: dict[str, Kernel] = {}
    modules_root = _modules_root(read)
    for version in read.listdir(modules_root):
        if read.tree.exists(f"{modules_root}/{version}/kernel") or read.exists(
                f"{modules_root}/{version}/modules.builtin"):
            versions[version] = Kernel(version, modules_dir=True)
    boot_files = read.listdir("/boot")
    for name in boot_files:
        for prefix in ("vmlinuz-", "vmlinux-", "Image-", "kernel-"):
            if name.startswith(prefix) and not name.endswith((".hmac", ".sig")):
                version = name[len(prefix):]
                versions.setdefault(version, Kernel(version)).image = f"/boot/{name}"
    for version, kernel in versions.items():
        for name in (f"initramfs-{version}.img", f"initrd.img-{version}", f"initrd-{version}",
                     f"initrd-{version}.img", f"initramfs-{version}"):
            if name in boot_files:
                kernel.initramfs = f"/boot/{name}"
                break
        if f"config-{version}" in boot_files:
            kernel.config = f"/boot/config-{version}"
        elif read.exists(f"{modules_root}/{version}/config"):
            kernel.config = f"{modules_root}/{version}/config"
        kernel.drivers = _kernel_drivers(read, kernel, f"{modules_root}/{version}")
    result.kernels = sorted(versions.values(), key=lambda k: version_sort_key(k.version), reverse=True)


def _kernel_drivers(read: _Reader, kernel: Kernel, moddir: str,
                    table: dict[str, tuple[str, tuple[str, ...]]] = DRIVERS) -> dict[str, str]:
    """driver -> "builtin", "module", "module-missing", "absent" or "unknown" for the drivers of ``table``."""
    builtin: set[str] | None = None
    text = read.text(f"{moddir}/modules.builtin") if kernel.modules_dir else None
    if text is not None:
        builtin = {module_name(line.strip()) for line in text.splitlines() if line.strip()}
    config: dict[str, str] = {}
    if kernel.config:
        config_text = read.text(kernel.config)
        if config_text:
            for line in config_text.splitlines():
                key, sep, value = line.partition("=")
                if sep and key.startswith("CONFIG_"):
                    config[key] = value.strip()
    dep_paths: dict[str, str] = {}
    dep = read.text(f"{moddir}/modules.dep", 32 << 20) if kernel.modules_dir else None
    if dep is not None:
        for line in dep.splitlines():
            path = line.split(":", 1)[0].strip()
            if path:
                dep_paths.setdefault(module_name(path), path)
    drivers = {}
    for driver, (option, paths) in table.items():
        if (builtin is not None and driver in builtin) or config.get(option) == "y":
            drivers[driver] = "builtin"
            continue
        present = False
        if kernel.modules_dir:
            candidates = [dep_paths[driver]] if driver in dep_paths else [
                f"kernel/{p}{suffix}" for p in paths for suffix in _MODULE_SUFFIXES]
            present = any(read.exists(f"{moddir}/{c}") for c in candidates)
        if present:
            drivers[driver] = "module"
        elif config.get(option) == "m":
            drivers[driver] = "module-missing"
        elif builtin is not None or config:
            drivers[driver] = "absent"
        else:
            drivers[driver] = "unknown"
    return drivers


_GRUB_CONFIGS = ("/boot/grub2/grub.cfg", "/boot/grub/grub.cfg")
_GRUBENVS = ("/boot/grub2/grubenv", "/boot/grub/grubenv")
_LEGACY_GRUB = ("/boot/grub/menu.lst", "/boot/grub/grub.conf")


def _boot_config(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    boot = result.boot
    env: dict[str, str] = {}
    env_path = read.first(_GRUBENVS)
    if env_path:
        env = parse_grubenv(read.text(env_path) or "")
    efi_configs = [f"/boot/efi/EFI/{d}/grub.cfg" for d in read.listdir("/boot/efi/EFI")]
    grub = None
    for path in (*_GRUB_CONFIGS, *efi_configs):
        text = read.text(path)
        if text is None:
            continue
        parsed = parse_grub_cfg(text, path)
        if parsed.entries or parsed.uses_blscfg:
            grub, boot.config = parsed, path
            break
    bls = []
    for name in read.listdir("/boot/loader/entries")[:MAX_DIR_FILES]:
        if name.endswith(".conf"):
            text = read.text(f"/boot/loader/entries/{name}")
            if text is not None:
                bls.append(parse_bls_entry(text, f"/boot/loader/entries/{name}"))
    bls = sort_bls_entries(bls)
    default: str | None = None
    if grub is not None:
        boot.loader = "grub2+bls" if grub.uses_blscfg and bls else "grub2"
        boot.entries = (bls if grub.uses_blscfg else []) + grub.entries
        if grub.default is not None:
            default = expand_grub_vars(grub.default, env)
            boot.default_from = f"set default={grub.default}" + (f" ({default})" if default != grub.default else "")
    elif bls:
        boot.loader, boot.config, boot.entries = "bls", "/boot/loader/entries", bls
    else:
        for path in _LEGACY_GRUB:
            text = read.text(path)
            if text is not None:
                boot.loader, boot.config = "grub-legacy", path
                boot.entries = _legacy_grub_entries(text, path)
                default = grub_legacy_default(text)
                break
    if default is None and boot.entries:
        grub_default = parse_shell_vars(read.text("/etc/default/grub") or "").get("GRUB_DEFAULT")
        if grub_default == "saved" or (grub_default is None and env.get("saved_entry")):
            default = env.get("saved_entry") or "0"
            boot.default_from = f"saved_entry={default}"
        elif grub_default:
            default, boot.default_from = grub_default, f"GRUB_DEFAULT={grub_default}"
    boot.default = choose_default(boot.entries, default) if boot.entries else None
    if boot.default is None and boot.entries:
        boot.default = boot.entries[0]
        boot.default_from = f"{boot.default_from or 'default'} names no entry; the first is booted"
    entry = boot.default
    if entry is None:
        return
    boot.cmdline = expand_grub_vars(entry.options, env)
    if entry.linux:
        linux = expand_grub_vars(entry.linux, env)
        found = _boot_path(read, linux, entry.search_root, disk, result)
        if found:
            boot.kernel_path = found
        else:
            boot.kernel_missing = linux
    for path in expand_grub_vars(" ".join(entry.initrd), env).split():  # "$tuned_initrd" may be empty
        found = _boot_path(read, path, entry.search_root, disk, result)
        if found:
            boot.initrd_paths.append(found)
        else:
            boot.initrd_missing.append(path)


def _legacy_grub_entries(text: str, source: str) -> list[BootEntry]:
    entries: list[BootEntry] = []
    for line in config_lines(text):
        words = line.strip().split(None, 1)
        if not words:
            continue
        if words[0] == "title":
            entries.append(BootEntry(title=words[1] if len(words) > 1 else "", source=source))
        elif entries and words[0] == "kernel" and len(words) > 1:
            parts = words[1].split()
            entries[-1].linux, entries[-1].options = parts[0], " ".join(parts[1:])
        elif entries and words[0] == "initrd" and len(words) > 1:
            entries[-1].initrd.append(words[1].split()[0])
    return entries


def _boot_path(read: _Reader, path: str, search_root: str | None, disk: GuestDisk,
               result: LinuxInspection) -> str | None:
    """Where a boot loader path lies in the tree: GRUB paths are relative to the volume it searched
    for (or the one it was installed on): /boot when that is separate, else the root."""
    path = re.sub(r"^\([^)]*\)", "", path)  # (hd0,msdos1)/vmlinuz
    if not path.startswith("/"):
        return None
    candidates = [path, "/boot" + path]
    if search_root:
        volume = disk.find(search_root)
        for point, mounted in result.mounts.items():
            if mounted is volume:
                candidates.insert(0, posixpath.normpath(point.rstrip("/") + path))
    for candidate in candidates:
        if read.exists(candidate):
            return candidate
    return None


def _default_kernel_drivers(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    boot = result.boot
    kernel = None
    if boot.kernel_path:
        name = boot.kernel_path.rsplit("/", 1)[-1]
        kernel = next((k for k in result.kernels if k.image and k.image.rsplit("/", 1)[-1] == name), None)
        if kernel is None:
            version = re.sub(r"^(vmlinuz|vmlinux|Image|kernel)-", "", name)
            kernel = next((k for k in result.kernels if k.version == version), None)
        if kernel is None:
            try:  # /boot/vmlinuz -> vmlinuz-<ver> (SUSE)
                target = read.tree.resolve(boot.kernel_path).rsplit("/", 1)[-1]
                kernel = next((k for k in result.kernels if k.image and k.image.endswith("/" + target)), None)
            except DiskImageError:
                pass
    elif not boot.entries and result.kernels:
        kernel = result.kernels[0]  # no boot configuration read: the newest kernel
    result.default_kernel = kernel
    if kernel is None:
        return
    initrd = boot.initrd_paths[0] if boot.initrd_paths else (None if boot.entries else kernel.initramfs)
    if initrd:
        try:
            size = read.tree.stat(initrd).size
            if size > MAX_INITRAMFS:
                result.initramfs_error = f"{initrd} is {size} bytes, more than the {MAX_INITRAMFS} read"
            else:
                with read.tree.open(initrd) as image:
                    result.initramfs = list_initramfs(image)
                if not result.initramfs.complete:
                    result.initramfs_error = f"{initrd}: {result.initramfs.problem}"
        except DiskImageError as exc:
            result.initramfs_error = f"could not read {initrd}: {exc.message}"
    # what the kernel has before the root is mounted is known when the initramfs was read in full,
    # or when there is none (then only built-in drivers are there)
    known = not initrd or (result.initramfs is not None and result.initramfs_error is None)
    carried = result.initramfs.modules if result.initramfs is not None else {}
    for driver in DRIVERS:
        result.boot_drivers[driver] = _boot_state(kernel.drivers.get(driver, "unknown"), driver in carried, known,
                                                  driver in LATE_DRIVERS)
    needs = root_stack(result.root)
    if needs:
        moddir = f"{_modules_root(read)}/{kernel.version}"
        drivers: dict[str, tuple[str, tuple[str, ...]]] = {name: STACK_DRIVERS[name] for name in STACK_DRIVERS
                                                           if name in needs}
        states = _kernel_drivers(read, kernel, moddir, drivers)
        for driver in drivers:
            result.root_needs[driver] = _boot_state(states[driver], driver in carried, known, False)
    if "lvm" in needs:
        names = result.initramfs.names if result.initramfs is not None else []
        tool = any(LVM_TOOLING.search(name) for name in names)
        result.root_needs["lvm"] = "initramfs" if tool else "missing" if known else "unknown"


def _boot_state(state: str, carried: bool, known: bool, late: bool) -> str:
    """Where the default kernel gets a driver at boot, from its state in the kernel (``Kernel.drivers``) and
    whether the initramfs carries it (``known``: the initramfs was read in full, or there is none; ``late``:
    a module loaded from the root file system will do)."""
    if state == "builtin":
        return "builtin"
    if carried:
        return "initramfs"
    if state == "unknown":
        return "unknown"
    if state == "module" and (known or late):
        return "module"
    return "missing" if known else "unknown"


def root_stack(root: GuestVolume) -> list[str]:
    """What mounting ``root`` takes beyond a partition's file system: "dm_mod" and "lvm" when it lies on an
    LVM logical volume, "btrfs" when it is a btrfs."""
    needs = []
    pending = [root]
    while pending:
        volume = pending.pop()
        if volume.layer is not None and volume.layer.kind == "lvm-lv" and "lvm" not in needs:
            needs += ["dm_mod", "lvm"]
        pending.extend(volume.below)
    if root.fs_type == "btrfs":
        needs.append("btrfs")
    return needs


def _python_dirs(read: _Reader) -> list[str]:
    found = []
    for base in ("/usr/lib", "/usr/lib64", "/usr/local/lib"):
        for name in read.listdir(base):
            if name.startswith("python"):
                for sub in ("site-packages", "dist-packages"):
                    found.append(f"{base}/{name}/{sub}")
    found.append("/usr/lib/python3/dist-packages")
    return list(dict.fromkeys(found))


def _cloud_cfg_paths(read: _Reader) -> list[str]:
    """cloud-init's configuration files in the order it merges them (a later one wins)."""
    return ["/etc/cloud/cloud.cfg"] + [f"/etc/cloud/cloud.cfg.d/{name}" for name in
                                       read.listdir("/etc/cloud/cloud.cfg.d")[:MAX_DIR_FILES] if name.endswith(".cfg")]


def _cloud_init(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    info: dict[str, Any] = {"installed": False, "version": None, "datasources": None, "enabled": None}
    program = read.first(("/usr/bin/cloud-init", "/usr/local/bin/cloud-init", "/bin/cloud-init"))
    package_dir = None
    version = None
    for directory in _python_dirs(read):
        names = read.listdir(directory)
        if "cloudinit" in names:
            package_dir = f"{directory}/cloudinit"
            version = cloud_init_version(read.text(f"{package_dir}/version.py") or "")
        for name in names:
            if name.startswith(("cloud_init-", "cloud-init-")) and name.endswith((".dist-info", ".egg-info")):
                meta = f"{directory}/{name}"
                meta_file = next((f"{meta}/{n}" for n in ("METADATA", "PKG-INFO") if read.exists(f"{meta}/{n}")), meta)
                version = version or cloud_init_version(read.text(meta_file) or "")
        if package_dir:
            break
    if program or package_dir:
        info["installed"] = True
        info["program"] = program
        info["version"] = version
        datasources = None
        for path in _cloud_cfg_paths(read):
            text = read.text(path)
            if text is not None:
                found = cloud_init_datasources(text)
                if found is not None:
                    datasources = found
        info["datasources"] = datasources
        info["enabled"] = _cloud_init_enabled(read)
        info["disabled_by"] = _cloud_init_disabled_by(read, result, info)
    result.cloud_init = info


#: the units that run cloud-init's stages up to fetching the metadata (cloud-init-network and -main from 24.3)
_CLOUD_INIT_UNITS = ("cloud-init-local.service", "cloud-init.service", "cloud-init-network.service",
                     "cloud-init-main.service")
_UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
_PRESET_DIRS = ("/etc/systemd/system-preset", "/usr/lib/systemd/system-preset", "/lib/systemd/system-preset")


def _cloud_init_enabled(read: _Reader) -> bool | None:
    """Whether systemd starts cloud-init: a ``*.wants`` link to one of its units, or the distribution's
    preset enabling it (applied on first boot); None on a system without systemd."""
    if not read.first(("/usr/lib/systemd/systemd", "/lib/systemd/systemd")):
        return None
    for directory in _UNIT_DIRS:
        for wants in [name for name in read.listdir(directory) if name.endswith(".wants")][:MAX_DIR_FILES]:
            if any(read.exists(f"{directory}/{wants}/{unit}", follow=False) for unit in _CLOUD_INIT_UNITS):
                return True
    presets: dict[str, str] = {}  # file name -> path: /etc overrides a file of the same name
    for directory in reversed(_PRESET_DIRS):
        for name in read.listdir(directory)[:MAX_DIR_FILES]:
            if name.endswith(".preset"):
                presets[name] = f"{directory}/{name}"
    for name in sorted(presets):
        for line in (read.text(presets[name]) or "").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("enable", "disable") and fnmatch.fnmatchcase("cloud-init.service",
                                                                                             words[1]):
                return words[0] == "enable"  # the first matching line decides
    return False


def _cloud_init_disabled_by(read: _Reader, result: LinuxInspection, info: dict[str, Any]) -> list[str]:
    """Why an installed cloud-init will not configure the instance from ECS's metadata, in words."""
    reasons = []
    if read.exists("/etc/cloud/cloud-init.disabled", follow=False):
        reasons.append("/etc/cloud/cloud-init.disabled exists")
    if kernel_arg(result.boot.cmdline, "cloud-init") == "disabled":
        reasons.append("the kernel command line says cloud-init=disabled")
    for unit in _CLOUD_INIT_UNITS:
        path = f"/etc/systemd/system/{unit}"
        try:
            if read.exists(path, follow=False) and read.tree.stat(path, follow=False).is_symlink \
                    and read.tree.readlink(path) == "/dev/null":
                reasons.append(f"{unit} is masked ({path} -> /dev/null)")
        except DiskImageError as exc:
            read.note(path, exc)
    if info.get("enabled") is False:
        reasons.append("its services are not enabled (no *.wants link to " + ", ".join(_CLOUD_INIT_UNITS[:2])
                       + ", no preset enabling them)")
    datasources = info.get("datasources")
    if datasources is not None and not any(name.lower() == "aliyun" for name in datasources):
        reasons.append(f"datasource_list {datasources} does not name AliYun")
    return reasons


def _ssh_server(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    """sshd, its host keys, and whether something generates missing keys at boot (RHEL's
    sshd-keygen, SUSE's sshd-gen-keys-start); Debian's ssh.service does not."""
    result.sshd = read.first(("/usr/sbin/sshd", "/sbin/sshd"))
    if result.sshd is None:
        return
    result.ssh_host_keys = [name for name in read.listdir("/etc/ssh")
                            if name.startswith("ssh_host_") and name.endswith("_key")]
    result.ssh_keygen = read.first([f"{directory}/{unit}" for directory in _UNIT_DIRS
                                    for unit in ("sshd-keygen@.service", "sshd-keygen.service")]
                                   + ["/usr/sbin/sshd-gen-keys-start", "/usr/libexec/openssh/sshd-keygen"])


_NETWORK_DIRS = (
    ("/etc/sysconfig/network-scripts", "ifcfg-", parse_ifcfg),
    ("/etc/sysconfig/network", "ifcfg-", parse_ifcfg),
    ("/etc/NetworkManager/system-connections", "", parse_nm_keyfile),
    ("/etc/systemd/network", "", parse_networkd),
)


def _network(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    interfaces: list[Interface] = []

    def add(found: list[Interface], path: str, text: str) -> None:
        generator = network_file_generator(path, text)
        for interface in found:
            interface.generator = generator
        interfaces.extend(found)

    for directory, prefix, parse in _NETWORK_DIRS:
        for name in read.listdir(directory)[:MAX_DIR_FILES]:
            if not name.startswith(prefix) or name.endswith((".bak", ".orig", "~")):
                continue
            if parse is parse_networkd and not name.endswith(".network"):
                continue
            text = read.text(f"{directory}/{name}")
            if text is not None:
                found = parse(text, f"{directory}/{name}")
                add([found] if found is not None else [], f"{directory}/{name}", text)
    for name in read.listdir("/etc/netplan")[:MAX_DIR_FILES]:
        if name.endswith((".yaml", ".yml")):
            text = read.text(f"/etc/netplan/{name}")
            if text is not None:
                add(parse_netplan(text, f"/etc/netplan/{name}"), f"/etc/netplan/{name}", text)
    pending = ["/etc/network/interfaces"]
    seen: set[str] = set()
    while pending and len(seen) < MAX_DIR_FILES:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = read.text(path)
        if text is None:
            continue
        declared, includes = parse_interfaces(text, path)
        add(declared, path, text)
        for pattern in includes:
            directory, _, glob = posixpath.join(posixpath.dirname(path), pattern).rpartition("/")
            # fnmatch's patterns cannot backtrack exponentially, whatever the number of '*'
            pending += [f"{directory}/{n}" for n in read.listdir(directory) if fnmatchcase(n, glob)]
    result.interfaces = interfaces
    result.cloud_init_network_disabled = _cloud_init_network_disabled(read, result.boot.cmdline)
    rules = "/etc/udev/rules.d/70-persistent-net.rules"
    text = read.text(rules)
    if text:
        macs = parse_persistent_net_rules(text)
        if macs:
            result.persistent_net = (rules, macs)


def _cloud_init_network_disabled(read: _Reader, cmdline: str) -> str | None:
    """Where cloud-init's network configuration is turned off (``network-config=disabled`` on the kernel
    command line, or the last cloud.cfg file to set ``network: {config: ...}`` says disabled), None when
    cloud-init writes the network configuration at boot."""
    if kernel_arg(cmdline, "network-config") == "disabled":
        return "kernel command line network-config=disabled"
    where = None
    for path in _cloud_cfg_paths(read):
        value = cloud_init_network_config(read.text(path) or "")
        if value is not None:
            where = path if value == "disabled" else None
    return where


def _accounts_and_security(read: _Reader, result: LinuxInspection, disk: GuestDisk) -> None:
    result.qemu_guest_agent = read.first(("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga",
                                          "/usr/lib/systemd/system/qemu-guest-agent.service",
                                          "/lib/systemd/system/qemu-guest-agent.service"))
    selinux = read.text("/etc/selinux/config")
    cmdline = result.boot.cmdline
    if selinux is not None:
        values = parse_shell_vars(selinux)
        result.selinux = values.get("SELINUX", "").lower() or None
        result.selinux_source = "/etc/selinux/config"
        policy = f"/etc/selinux/{values.get('SELINUXTYPE') or 'targeted'}/policy"
        result.selinux_loaded_by = policy if read.exists(policy) else _selinux_kernel_argument(cmdline)
    if kernel_arg(cmdline, "selinux") == "0":
        result.selinux, result.selinux_source = "disabled", "kernel command line selinux=0"
    elif kernel_arg(cmdline, "enforcing") == "0" and result.selinux == "enforcing":
        result.selinux, result.selinux_source = "permissive", "kernel command line enforcing=0"
    try:
        if read.tree.exists("/etc/shadow"):
            result.shadow_flags = read.tree.stat("/etc/shadow").flags
    except DiskImageError as exc:
        read.note("/etc/shadow", exc)
    passwd = read.text("/etc/passwd")
    if passwd is not None:
        result.root_account = any(line.split(":")[0] == "root" and line.split(":")[2:3] == ["0"]
                                  for line in config_lines(passwd))
    result.passwd_command = read.first(("/usr/bin/passwd", "/bin/passwd"))
    for name in ("/lib", "/lib64"):
        try:
            if read.tree.exists(name, follow=False) and read.tree.stat(name, follow=False).is_symlink:
                target = read.tree.readlink(name)
                if target.startswith("/"):
                    result.absolute_lib_links[name] = target
        except DiskImageError as exc:
            read.note(name, exc)


def _selinux_kernel_argument(cmdline: str) -> str | None:
    """The kernel argument that enables SELinux (security=selinux, selinux=1, lsm=...,selinux), if any."""
    if kernel_arg(cmdline, "security") == "selinux":
        return "security=selinux"
    if kernel_arg(cmdline, "selinux") == "1":
        return "selinux=1"
    lsm = kernel_arg(cmdline, "lsm")
    return f"lsm={lsm}" if lsm and "selinux" in lsm.split(",") else None


def _details(result: LinuxInspection) -> dict[str, Any]:
    """The Linux facts for the report's ``guest.details``."""
    listing = result.initramfs
    return {
        "release_file": result.release_source,
        "architecture_from": result.architecture_source,
        "mounts": {point: volume.number for point, volume in result.mounts.items()},
        "fstab": [check.to_dict() for check in result.fstab] if result.fstab is not None else None,
        "kernels": [kernel.to_dict() for kernel in result.kernels],
        "boot": result.boot.to_dict(),
        "default_kernel": result.default_kernel.version if result.default_kernel else None,
        "initramfs": None if listing is None else {
            "parts": [part.to_dict() for part in listing.parts],
            "entries": len(listing.names),
            "modules": sorted(m for m in listing.modules if m in DRIVERS or m.startswith(("virtio", "nvme", "xen")))
            or None,
            "module_count": len(listing.modules),
            "firmware_count": len(listing.firmware),
            "problem": listing.problem,
        },
        "initramfs_error": result.initramfs_error,
        "boot_drivers": dict(result.boot_drivers),
        "root_stack": result.root.stack,
        "root_needs": dict(result.root_needs),
        "btrfs": result.btrfs,
        "nvme_support": result.nvme_support,
        "cloud_init": dict(result.cloud_init),
        "sshd": None if result.sshd is None else {"program": result.sshd, "host_keys": result.ssh_host_keys,
                                                  "keygen": result.ssh_keygen},
        "network": [interface.to_dict() for interface in result.interfaces],
        "cloud_init_network_disabled": result.cloud_init_network_disabled,
        "persistent_net_rules": result.persistent_net[0] if result.persistent_net else None,
        "qemu_guest_agent": result.qemu_guest_agent,
        "selinux": result.selinux,
        "selinux_loaded_by": result.selinux_loaded_by,
        "root_account": result.root_account,
        "passwd_command": result.passwd_command,
    }
