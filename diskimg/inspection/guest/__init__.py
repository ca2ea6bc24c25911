"""Guest inspection: what the operating system inside a disk is and what it needs to boot in a cloud.

``inspect_guest(disk)`` asks each OS inspector in turn (Linux, then Windows) whether the disk holds
its system, and returns the first answer as :class:`GuestFacts`: the facts every OS has (type,
distribution, version, architecture, the ImportImage ``Platform``) plus an OS-specific ``details``
dict for the report and the inspector's typed result (``inspection``) for the validator's checks.

An inspector is a module with ``inspect(disk: GuestDisk) -> GuestFacts | None``; it reads files
through :class:`GuestDisk`, which opens each volume's file system once, on first use, and records
the volumes it could not open (no driver, damaged) so that "no OS found" can say what was not read.

A volume is not always a partition: it may be a logical volume of LVM2, an md RAID1 array (both
assembled by ``stack.assemble`` across the disks of a machine) or a btrfs subvolume. Each
:class:`GuestVolume` carries the byte source its file system is read from and the volumes it is
assembled from, so the report can show its stack and the guest's names for it (``/dev/mapper/VG-LV``,
``/dev/VG/LV``, ``/dev/md/NAME``) resolve to it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import DiskImageError
from ..fs import GuestFileSystem, open_filesystem
from ..fs.base import GuestPathError
from ..signatures import Disk, FileSystem, SizedDisk

#: inspector modules, tried in order
INSPECTORS = ("linux", "windows")


#: file system types that are containers of other volumes, not file systems
CONTAINERS = frozenset({"lvm2", "luks", "bitlocker", "md"})


@dataclass(frozen=True)
class Layer:
    """One step of a stack, in words and facts: what a container volume holds (an LVM2 physical volume, a
    LUKS or BitLocker header, an md member) or what an assembled volume is (a logical volume, an md array, a
    btrfs subvolume)."""

    kind: str  # "lvm-pv", "lvm-lv", "luks", "bitlocker", "md-member", "md-array", "btrfs-subvolume"
    name: str  # as the report shows it: "LVM2 PV 3Xz...", "LV centos/root (linear, 17 GiB)"
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, **self.facts}


@dataclass(eq=False)
class GuestVolume:
    """A volume as the guest's configuration names it: a partition (or the whole disk), or a volume assembled
    from others (``below``): a logical volume, an md array, a btrfs subvolume (``layer`` says which). Its file
    system lies at ``offset`` of ``source`` (the disk itself when None)."""

    name: str  # "partition 2", "the whole disk", "LV centos/root"
    number: int | None
    offset: int
    length: int
    fs: FileSystem | None
    #: PARTUUID as Linux spells it: the GPT partition GUID, or "<MBR signature>-<NN>"
    partuuid: str | None = None
    partlabel: str | None = None
    #: what the file system is read from when it is not the disk (an LVM logical volume, an md array)
    source: Disk | None = None
    #: the volumes this one is assembled from (an LV's physical volumes, an array's members, a subvolume's volume)
    below: tuple[GuestVolume, ...] = ()
    #: what this volume is, for an assembled one; None for a partition or the whole disk
    layer: Layer | None = None
    #: what a container volume (fs type in CONTAINERS) holds: its PV, LUKS, BitLocker or md facts
    holds: Layer | None = None
    #: why the volume is there but cannot be read (a thin LV, an LV on a missing PV, an md RAID5 array)
    unreadable: str | None = None
    #: the names the guest's device mapper or md give it: /dev/mapper/VG-LV, /dev/VG/LV, /dev/md/NAME
    device_names: tuple[str, ...] = ()
    #: the disk image it lies on, when the machine has several disks
    disk_label: str | None = None
    #: a btrfs subvolume's path from the top level ("" for the top level itself) and id
    subvolume: str | None = None
    subvolume_id: int | None = None

    @property
    def fs_type(self) -> str | None:
        return self.fs.type if self.fs else None

    @property
    def base(self) -> GuestVolume:
        """The volume a btrfs subvolume view is a view of (itself for other volumes)."""
        return self.below[0] if self.subvolume_id is not None else self

    def matches(self, spec: str) -> bool:
        """Whether a device spec (``UUID=``, ``LABEL=``, ``PARTUUID=``, ``PARTLABEL=``, ``/dev/disk/by-*``,
        the instance's name of a partition such as ``/dev/vda2``, or the device-mapper or md name of an
        assembled volume) names this volume."""
        key, value = spec_key(spec)
        fs = self.fs
        if key == "UUID":
            return fs is not None and fs.uuid is not None and fs.uuid.lower() == value.lower()
        if key == "LABEL":
            return fs is not None and fs.label == value
        if key == "PARTUUID":
            return self.partuuid is not None and self.partuuid.lower() == value.lower()
        if key == "PARTLABEL":
            return self.partlabel == value
        if key == "DEVICE":
            if self.layer is not None:
                return value in self.device_names
            return device_partition(value) == (self.number or 0)
        return False

    def layers(self) -> list[str]:
        """The stack below the file system, from the disk up, in words: ["partition 2", "LVM2 PV ...",
        "LV centos/root (linear, 17 GiB)"]; the legs of a volume on several are joined by '+'."""
        if self.layer is None:
            where = f"{self.name} of {self.disk_label}" if self.disk_label else self.name
            return [where] + ([self.holds.name] if self.holds else [])
        if len(self.below) == 1:
            below = self.below[0].layers()
        else:
            below = [" + ".join("(" + " -> ".join(volume.layers()) + ")" for volume in self.below)]
        return [*below, self.layer.name]

    @property
    def stack(self) -> str:
        """The volume from the disk up to its file system: "partition 2 -> LVM2 PV ... -> LV centos/root
        (linear, 17 GiB) -> xfs"."""
        top = self.fs.type if self.fs is not None and self.fs.type not in CONTAINERS else None
        if self.unreadable:
            top = f"not read: {self.unreadable}"
        return " -> ".join(self.layers() + ([top] if top else []))

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.number, "file_system": self.fs_type, "uuid": self.fs.uuid if self.fs else None,
                "label": self.fs.label if self.fs else None, "volume": self.name,
                "layer": self.layer.kind if self.layer else None, "stack": self.stack}

    def describe(self) -> dict[str, Any]:
        """The volume for the report's volume list: its stack in words and in facts."""
        return {"volume": self.name, "partition": self.number, "stack": self.stack,
                "layer": self.layer.to_dict() if self.layer else None,
                "holds": self.holds.to_dict() if self.holds else None,
                "on": [volume.name for volume in self.below],
                "file_system": self.fs.to_dict() if self.fs and self.fs.type not in CONTAINERS else None,
                "unreadable": self.unreadable}


def spec_key(spec: str) -> tuple[str, str]:
    """("UUID" | "LABEL" | "PARTUUID" | "PARTLABEL" | "DEVICE" | "OTHER", value) of a device spec."""
    spec = spec.strip()
    for key in ("UUID", "LABEL", "PARTUUID", "PARTLABEL"):
        if spec.upper().startswith(key + "="):
            return key, spec[len(key) + 1:].strip("\"'")
    by = {"/dev/disk/by-uuid/": "UUID", "/dev/disk/by-label/": "LABEL", "/dev/disk/by-partuuid/": "PARTUUID",
          "/dev/disk/by-partlabel/": "PARTLABEL"}
    for prefix, key in by.items():
        if spec.startswith(prefix):
            return key, spec[len(prefix):]
    if spec.startswith("/dev/"):
        return "DEVICE", spec
    return "OTHER", spec


#: the system disk as the instance names it: virtio-blk (vda), NVMe (nvme0n1), Xen (xvda); then its partitions
_INSTANCE_DISKS = {"/dev/vda": "/dev/vda", "/dev/nvme0n1": "/dev/nvme0n1p", "/dev/xvda": "/dev/xvda"}


#: device names not judged: the kernel's alias of the root device, optical and floppy drives (fstab's noauto media)
_NOT_JUDGED = r"/dev/root|/dev/(sr|scd|fd)\d+|/dev/(cdrom|cdrw|dvd|dvdrw|floppy)\d*"


def assembled_name(device: str) -> str | None:
    """"md" for an md array's name (``/dev/md0``, ``/dev/md/root``), "dm" for a device-mapper name
    (``/dev/mapper/VG-LV``, ``/dev/dm-0``, ``/dev/VG/LV``), None for other names."""
    if re.fullmatch(r"/dev/md(\d+(p\d+)?|/.+)", device):
        return "md"
    if device.startswith(("/dev/mapper/", "/dev/dm-")) or device.count("/") == 3:
        return "dm"
    return None


def device_partition(device: str) -> int | None:
    """The partition number an instance's system disk device name refers to (``/dev/vda2``,
    ``/dev/nvme0n1p2``, ``/dev/xvda2``), 0 for the whole disk, None for names the instance will not
    have for its system disk (sda, hda, mmcblk, loop, nbd...) or that are not partitions (LVM, md)."""
    for disk, prefix in _INSTANCE_DISKS.items():
        if device == disk:
            return 0
        rest = device[len(prefix):]
        if device.startswith(prefix) and rest.isdigit() and not rest.startswith("0"):
            return int(rest)
    return None


def is_device_name(spec: str) -> bool:
    """A kernel device name (``/dev/sda1``, ``/dev/vdb``...) that changes with the disk's bus."""
    return re.fullmatch(r"/dev/(sd|vd|xvd|hd)[a-z]+\d*|/dev/nvme\d+n\d+(p\d+)?|/dev/mmcblk\d+(p\d+)?", spec) is not None


class GuestDisk:
    """The disk's volumes (partitions, and the volumes assembled on them) and their file systems, opened
    lazily and once."""

    def __init__(self, disk: SizedDisk, volumes: list[GuestVolume]) -> None:
        self.disk = disk
        self.volumes = volumes
        self._opened: dict[int, GuestFileSystem[Any] | None] = {}
        self._views: dict[tuple[int, str | None, int | None], GuestVolume | None] = {}
        #: volume name -> why its file system could not be read (no driver, damaged)
        self.unreadable: dict[str, str] = {}

    def open(self, volume: GuestVolume) -> GuestFileSystem[Any] | None:
        key = id(volume)
        if key not in self._opened:
            fs = None
            if volume.unreadable is not None:
                self.unreadable[volume.name] = volume.unreadable
            elif volume.fs is not None:
                source = volume.source if volume.source is not None else self.disk
                try:
                    fs = open_filesystem(source, volume.offset, volume.length, volume.fs.type)
                    if fs is None:
                        self.unreadable[volume.name] = f"diskimg has no reader for {volume.fs.type} yet"
                except ImportError:
                    self.unreadable[volume.name] = f"diskimg has no reader for {volume.fs.type} yet"
                except DiskImageError as exc:
                    self.unreadable[volume.name] = f"its {volume.fs.type} file system cannot be read: {exc.message}"
            self._opened[key] = fs
        return self._opened[key]

    def subvolume(self, volume: GuestVolume, subvol: str | None = None, subvolid: int | None = None
                  ) -> GuestVolume | None:
        """``volume`` (a btrfs file system) seen from the subvolume a mount's ``subvol=``/``subvolid=`` names,
        or from its default subvolume when neither is given; None when it has no such subvolume (or its file
        system cannot be read). Views are made once and are not among ``volumes``: a snapshot is never taken
        for a volume of its own."""
        volume = volume.base
        key = (id(volume), subvol, subvolid)
        if key in self._views:
            return self._views[key]
        view = None
        fs = self.open(volume) if volume.fs_type == "btrfs" else None
        if fs is not None:
            from ..fs.btrfs import BtrfsFileSystem  # loaded already: the volume was opened by it

            assert isinstance(fs, BtrfsFileSystem)
            opened: BtrfsFileSystem | None = None
            try:
                opened = fs.open_subvolume(subvol, subvolid)
                path = subvol.strip("/") if subvol is not None else next(
                    (found.path for found in fs.list_subvolumes() if found.id == opened.subvolume_id), "")
            except GuestPathError as exc:
                self.unreadable[f"{volume.name} subvolume {subvol or subvolid}"] = exc.message
                opened = None
            except DiskImageError as exc:
                self.unreadable[volume.name] = f"its btrfs subvolumes cannot be read: {exc.message}"
                opened = None
            if opened is not None:
                tree_id = opened.subvolume_id
                default = tree_id == fs.default_subvolume_id
                shown = f"btrfs subvolume {path or '(top level)'}" + (" (default)" if default else "")
                view = GuestVolume(f"{volume.name}, {shown}", volume.number, volume.offset, volume.length, volume.fs,
                                   volume.partuuid, volume.partlabel, volume.source, (volume,),
                                   Layer("btrfs-subvolume", shown, {"id": tree_id, "path": path, "default": default}),
                                   disk_label=volume.disk_label, subvolume=path, subvolume_id=tree_id)
                self._opened[id(view)] = opened
        self._views[key] = view
        return view

    def find(self, spec: str) -> GuestVolume | None:
        """The volume a device spec names (see :meth:`GuestVolume.matches`)."""
        for volume in self.volumes:
            if volume.matches(spec):
                return volume
        return None

    def unassembled(self) -> list[GuestVolume]:
        """The container volumes (LVM, LUKS, BitLocker, md) nothing was assembled from: what they hold is not
        among the volumes."""
        used = {id(below) for volume in self.volumes for below in volume.below}
        return [volume for volume in self.volumes if volume.fs_type in CONTAINERS and id(volume) not in used]

    def resolve(self, spec: str) -> Resolution:
        """What a device spec of the guest (fstab's first field, the kernel's ``root=``) will name on
        the instance, resolved the way its initramfs and udev will: by UUID, LABEL, PARTUUID,
        PARTLABEL, their /dev/disk/by-* links, the device name the cloud gives the system disk, or the
        device-mapper and md names of the volumes assembled on it."""
        key, value = spec_key(spec)
        if key == "OTHER" or value.startswith(("/dev/disk/by-id/", "/dev/disk/by-path/")) \
                or re.fullmatch(_NOT_JUDGED, value):
            return Resolution(None, "unknown")  # a network or pseudo file system, a name from the hardware, media
        volume = self.find(spec)
        if volume is not None:
            return Resolution(volume, "found")
        if key != "DEVICE":
            return Resolution(None, "missing", f"names no file system or partition of this disk ({key}={value})")
        containers = {volume.fs_type for volume in self.unassembled()}
        assembled = assembled_name(value)
        if assembled == "md":
            if "md" in containers:
                return Resolution(None, "unassembled")
            arrays = [v for v in self.volumes if v.layer and v.layer.kind == "md-array"]
            if arrays and re.fullmatch(r"/dev/md\d+(p\d+)?", value):
                return Resolution(None, "unknown")  # numbered at boot, by the guest's mdadm.conf or in turn
            if arrays:
                return Resolution(None, "missing", "names no md array of the disk (" + ", ".join(
                    v.device_names[0] if v.device_names else v.name for v in arrays) + ")")
            return Resolution(None, "missing", "is an md RAID array, but the disk holds no md member")
        if assembled == "dm":
            if containers & {"lvm2", "luks"}:
                return Resolution(None, "unassembled")
            logical = [v.layer.facts["path"] for v in self.volumes if v.layer and v.layer.kind == "lvm-lv"]
            if logical and value.startswith("/dev/dm-"):
                return Resolution(None, "unknown")  # numbered at boot, in the order device-mapper creates them
            if logical:
                return Resolution(None, "missing", f"names no logical volume of the volume groups found "
                                  f"({', '.join(logical)})")
            return Resolution(None, "missing", "is a device-mapper volume, but the disk holds no LVM physical volume "
                              "or LUKS container")
        number = device_partition(value)
        if number == 0:
            return Resolution(None, "missing", "names the whole disk, which holds a partition table, not a file system")
        if number is not None:
            return Resolution(None, "missing", "names a partition this disk does not have")
        if re.fullmatch(r"/dev/x?vd[b-z][a-z]*\d*|/dev/nvme(0n([2-9]|\d\d+)|[1-9]\d*n\d+)(p\d+)?", value):
            return Resolution(None, "missing", "names another disk of the instance (a data disk), not this one")
        return Resolution(None, "missing", "is a device the instance will not have: its system disk is /dev/vda "
                          "(virtio), /dev/nvme0n1 (NVMe) or /dev/xvda")


@dataclass(frozen=True)
class Resolution:
    """What a device spec names on the instance (``GuestDisk.resolve``)."""

    volume: GuestVolume | None
    #: "found"; "missing" (names nothing the instance will have: it will not boot or mount);
    #: "unassembled" (a volume inside an LVM, LUKS or md container that was not assembled); "unknown" (not judged)
    status: str
    #: why it names nothing, for "missing"
    reason: str | None = None


@dataclass
class GuestFacts:
    """What was found about the guest operating system."""

    os_type: str  # "linux" | "windows"
    distribution: str | None = None  # os-release ID ("centos", "ubuntu") or "windows"
    version: str | None = None
    #: a human name ("CentOS Linux 7 (Core)", "Windows Server 2019 Datacenter")
    product: str | None = None
    #: the machine the system is built for: i386, x86_64, arm64, or another ELF/PE machine name
    architecture: str | None = None
    #: ImportImage Platform (one of rules.PLATFORMS)
    platform: str | None = None
    #: where the system lives: the root (or Windows) volume, and other mounted volumes
    root: GuestVolume | None = None
    #: OS-specific facts for the report (kernels, boot entry, network, ...)
    details: dict[str, Any] = field(default_factory=dict)
    #: files that could not be read, as sentences ("could not read /etc/fstab: ...")
    unreadable: list[str] = field(default_factory=list)
    #: the inspector's typed result, which the validator's checks read
    inspection: Any = field(default=None, repr=False, compare=False)

    @property
    def import_architecture(self) -> str | None:
        """The ImportImage Architecture value, None for machines ImportImage does not take."""
        return self.architecture if self.architecture in ("i386", "x86_64", "arm64") else None

    @property
    def nvme_support(self) -> str | None:
        """ImportImage ``Features.NvmeSupport`` ("supported" / "unsupported"), as each inspector's
        result defines it; None when not known."""
        return getattr(self.inspection, "nvme_support", None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "os_type": self.os_type,
            "distribution": self.distribution,
            "version": self.version,
            "product": self.product,
            "architecture": self.architecture,
            "platform": self.platform,
            "root": self.root.to_dict() if self.root else None,
            "details": self.details,
            "unreadable": list(self.unreadable),
        }


def inspect_guest(disk: GuestDisk) -> GuestFacts | None:
    """The guest system on ``disk`` (Linux tried first, then Windows), None when none is found."""
    for name in INSPECTORS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # an inspector not written yet
            raise
        inspect: Callable[[GuestDisk], GuestFacts | None] = module.inspect
        found = inspect(disk)
        if found is not None:
            return found
    return None
