"""Guest inspection: what the operating system inside a disk is and what it needs to boot in a cloud.

``inspect_guest(disk)`` asks each OS inspector in turn (Linux, then Windows) whether the disk holds
its system, and returns the first answer as :class:`GuestFacts`: the facts every OS has (type,
distribution, version, architecture, the ImportImage ``Platform``) plus an OS-specific ``details``
dict for the report and the inspector's typed result (``inspection``) for the validator's checks.

An inspector is a module with ``inspect(disk: GuestDisk) -> GuestFacts | None``; it reads files
through :class:`GuestDisk`, which opens each volume's file system once, on first use, and records
the volumes it could not open (no driver, damaged) so that "no OS found" can say what was not read.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import DiskImageError
from ..signatures import Disk, FileSystem
from ..fs import GuestFileSystem, open_filesystem

#: inspector modules, tried in order
INSPECTORS = ("linux", "windows")


@dataclass
class GuestVolume:
    """A volume of the disk (a partition, or the whole disk) as the guest's configuration names it."""

    name: str  # "partition 2", "the whole disk"
    number: int | None
    offset: int
    length: int
    fs: FileSystem | None
    #: PARTUUID as Linux spells it: the GPT partition GUID, or "<MBR signature>-<NN>"
    partuuid: str | None = None
    partlabel: str | None = None

    @property
    def fs_type(self) -> str | None:
        return self.fs.type if self.fs else None

    def matches(self, spec: str) -> bool:
        """Whether a device spec (``UUID=``, ``LABEL=``, ``PARTUUID=``, ``PARTLABEL=``, ``/dev/disk/by-*``,
        or the instance's name of a partition such as ``/dev/vda2``) names this volume."""
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
            return device_partition(value) == (self.number or 0)
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.number, "file_system": self.fs_type, "uuid": self.fs.uuid if self.fs else None,
                "label": self.fs.label if self.fs else None}


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
    """The disk's volumes and their file systems, opened lazily and once."""

    def __init__(self, disk: Disk, volumes: list[GuestVolume]) -> None:
        self.disk = disk
        self.volumes = volumes
        self._opened: dict[int, GuestFileSystem | None] = {}
        #: volume name -> why its file system could not be read (no driver, damaged)
        self.unreadable: dict[str, str] = {}

    def open(self, volume: GuestVolume) -> GuestFileSystem | None:
        key = id(volume)
        if key not in self._opened:
            fs = None
            if volume.fs is not None:
                try:
                    fs = open_filesystem(self.disk, volume.offset, volume.length, volume.fs.type)
                    if fs is None:
                        self.unreadable[volume.name] = f"diskimg has no reader for {volume.fs.type} yet"
                except ImportError:
                    self.unreadable[volume.name] = f"diskimg has no reader for {volume.fs.type} yet"
                except DiskImageError as exc:
                    self.unreadable[volume.name] = f"its {volume.fs.type} file system cannot be read: {exc.message}"
            self._opened[key] = fs
        return self._opened[key]

    def find(self, spec: str) -> GuestVolume | None:
        """The volume a device spec names (see :meth:`GuestVolume.matches`)."""
        for volume in self.volumes:
            if volume.matches(spec):
                return volume
        return None

    def resolve(self, spec: str) -> Resolution:
        """What a device spec of the guest (fstab's first field, the kernel's ``root=``) will name on
        the instance, resolved the way its initramfs and udev will: by UUID, LABEL, PARTUUID,
        PARTLABEL, their /dev/disk/by-* links, or the device name the cloud gives the system disk."""
        key, value = spec_key(spec)
        if key == "OTHER" or value.startswith(("/dev/disk/by-id/", "/dev/disk/by-path/")) \
                or re.fullmatch(_NOT_JUDGED, value):
            return Resolution(None, "unknown")  # a network or pseudo file system, a name from the hardware, media
        volume = self.find(spec)
        if volume is not None:
            return Resolution(volume, "found")
        if key != "DEVICE":
            return Resolution(None, "missing", f"names no file system or partition of this disk ({key}={value})")
        containers = {v.fs.type for v in self.volumes if v.fs is not None}
        if re.fullmatch(r"/dev/md(\d+(p\d+)?|/.+)", value):
            if "md" in containers:
                return Resolution(None, "unassembled")
            return Resolution(None, "missing", "is an md RAID array, but the disk holds no md member")
        if value.startswith(("/dev/mapper/", "/dev/dm-")) or value.count("/") == 3:  # /dev/VG/LV
            if containers & {"lvm2", "luks"}:
                return Resolution(None, "unassembled")
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
    #: "unassembled" (a volume inside LVM, LUKS or md, which diskimg does not assemble); "unknown" (not judged)
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
