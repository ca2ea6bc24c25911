"""Windows guest facts: what the registry hives and the files of a Windows system volume say about
importing it into a cloud.

Sources (all read through a :class:`~diskimg.inspection.fs.base.GuestFileSystem`, never on the host):

- ``Windows/System32/config/SOFTWARE``: ``Microsoft\\Windows NT\\CurrentVersion`` (ProductName,
  EditionID, InstallationType, CurrentBuild(Number), UBR, CSDVersion); installed packages under
  ``Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages`` (hotfixes); the device
  installation policies.
- ``Windows/System32/config/SYSTEM``: ``Select\\Current`` names the control set, whose
  ``Control\\ProductOptions`` ProductType tells server from client on every release, ``Services\\*``
  (Start: 0 boot, 1 system, 2 automatic, 3 on demand, 4 disabled; ImagePath; StartOverride), the
  disk-class ``UpperFilters`` and the PnP device installation switches.
- ``Windows/System32/ntoskrnl.exe``: the PE header's machine field is the architecture.
- ``Windows/System32/drivers/*.sys``: present or not, read-only or not ($STANDARD_INFORMATION).
- the boot files on the volume the firmware starts from: ``bootmgr`` and ``Boot/BCD`` on the active
  partition (BIOS; ``ntldr`` and ``boot.ini`` before Vista), ``EFI/Microsoft/Boot/bootmgfw.efi``
  and ``EFI/Microsoft/Boot/BCD`` on an EFI system partition (UEFI).

A hive copied while Windows was writing it (dirty) is read with its transaction logs
(``SYSTEM.LOG1``, ``SYSTEM.LOG2`` beside it) replayed in memory, as Windows does when it loads it;
the files in the image are never written. What cannot be read (a missing or broken hive) is recorded
in ``problems`` rather than raised, so the facts that could be read are still reported.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import DiskImageError
from ..fs.base import GuestFileSystem
from ..partitions import read_partition_table
from . import GuestDisk, GuestFacts
from .regf import Hive, Key, replay_logs

WINDOWS_DIRS = ("Windows", "WINNT")
#: a hive larger than this is not read (SOFTWARE hives of long-serving servers reach a few hundred MiB);
#: replaying its logs holds it twice in memory, the logs once more
MAX_HIVE_BYTES = 512 << 20
#: a transaction log larger than this is not read (Windows empties them as it writes the hive: a few MiB)
MAX_LOG_BYTES = 64 << 20
#: the transaction logs beside a hive, in the dual-logging scheme of Windows Vista and later
LOG_SUFFIXES = (".LOG1", ".LOG2")
#: the bytes of ntoskrnl.exe read for its PE header
PE_HEAD = 4096
#: a BCD store is a small hive
MAX_BCD_BYTES = 64 << 20
#: the BCD object of the Windows Boot Manager ({bootmgr}), which every BCD store holds
BOOT_MANAGER_OBJECT = "{9dea862c-5cdd-4e70-acc1-f32b344d4795}"

#: PE machine field -> ImportImage Architecture
PE_MACHINES = {0x014C: "i386", 0x8664: "x86_64", 0xAA64: "arm64"}
#: PROCESSOR_ARCHITECTURE (Session Manager\\Environment) -> ImportImage Architecture, when there is no kernel
PROCESSOR_ARCHITECTURES = {"x86": "i386", "amd64": "x86_64", "arm64": "arm64"}

#: storage drivers an instance can boot from: virtio-blk, virtio-scsi, NVMe
BOOT_STORAGE_DRIVERS = ("viostor", "vioscsi", "stornvme")
#: the community (Fedora / Red Hat) virtio drivers whose files must not be read-only (§1.5 W2)
COMMUNITY_VIRTIO_DRIVERS = ("netkvm", "balloon", "vioser", "viostor", "pvpanic")
#: every driver reported in the facts
REPORTED_DRIVERS = ("viostor", "vioscsi", "stornvme", "netkvm", "vioser", "balloon", "pvpanic")
#: the first build (Windows Server 2012) whose boot loader no longer needs the CriticalDeviceDatabase
NO_CRITICAL_DEVICE_DATABASE = 9200
#: the disk drive device class
DISK_CLASS = "{4d36e967-e325-11ce-bfc1-08002be10318}"
#: Xen paravirtual drivers (XenPCI of GPLPV, xen* of the Citrix / XenServer drivers)
XEN_SERVICES = ("XenPCI", "xenvbd", "xenfilt", "xenbus", "xeniface", "xennet", "xenvif")
#: updates ECS's image check asks to uninstall (§1.5 W7)
BAD_HOTFIXES = ("KB5009624", "KB5009595", "KB5009546", "KB5009557", "KB5009555", "KB5014738", "KB5014702",
                "KB5014692", "KB5014678")
#: Windows Server 2008 R2 needs SHA-2 code signing support for current drivers (§1.5 W7)
REQUIRED_HOTFIXES_2008R2 = ("KB3033929",)
#: Component Based Servicing CurrentState of an installed package
CBS_INSTALLED = 0x70
QEMU_GA_SERVICES = ("QEMU-GA", "QEMU Guest Agent VSS Provider")
QEMU_GA_FILES = ("Program Files/Qemu-ga/qemu-ga.exe", "Program Files/QEMU Guest Agent/qemu-ga.exe",
                 "Program Files (x86)/Qemu-ga/qemu-ga.exe", "Program Files (x86)/QEMU Guest Agent/qemu-ga.exe")

SERVICE_BOOT_START = 0

#: NT build -> (release, ImportImage Platform); ECS imports Windows Server 2003 SP1 to 2022 (§1.5 W1)
SERVER_RELEASES = {
    3790: ("Windows Server 2003", "Windows Server 2003"),
    6001: ("Windows Server 2008", "Windows Server 2008"),
    6002: ("Windows Server 2008", "Windows Server 2008"),
    6003: ("Windows Server 2008", "Windows Server 2008"),
    7600: ("Windows Server 2008 R2", "Windows Server 2008"),
    7601: ("Windows Server 2008 R2", "Windows Server 2008"),
    9200: ("Windows Server 2012", "Windows Server 2012"),
    9600: ("Windows Server 2012 R2", "Windows Server 2012"),
    14393: ("Windows Server 2016", "Windows Server 2016"),
    17763: ("Windows Server 2019", "Windows Server 2019"),
    20348: ("Windows Server 2022", "Windows Server 2022"),
}
OTHER_WINDOWS = "Other Windows"


@dataclass(frozen=True)
class Driver:
    """A kernel driver as the current control set declares it and the volume holds it."""

    name: str
    service: bool
    start: int | None = None
    #: a StartOverride value replaces the boot start with a later one (Windows 8 and later)
    start_overridden: bool = False
    image_path: str | None = None
    #: the guest path the service loads, None when it lies on another drive
    file: str | None = None
    present: bool = False
    readonly: bool = False

    @property
    def boot_start(self) -> bool:
        """Loaded by the boot loader, so the system disk is reachable through it."""
        return self.service and self.start == SERVICE_BOOT_START and not self.start_overridden and self.present


@dataclass(frozen=True)
class BootFiles:
    """The boot manager files one boot mode needs, looked for on one volume."""

    mode: str  # "BIOS" or "UEFI"
    volume: str
    files: dict[str, bool]
    #: files present but unusable (a BCD that is no hive, or lacks the boot manager's object) -> why
    damaged: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(self.files.values()) and not self.damaged

    @property
    def missing(self) -> list[str]:
        return [path for path, present in self.files.items() if not present]


@dataclass
class WindowsFacts:
    """What one Windows installation is, as the validator and the report use it."""

    windows_dir: str
    product_name: str | None = None
    edition: str | None = None
    installation_type: str | None = None
    product_type: str | None = None
    build: int | None = None
    ubr: int | None = None
    service_pack: str | None = None
    display_version: str | None = None
    #: the Windows Server release of the build, None for clients and unknown builds
    release: str | None = None
    #: "supported", "unsupported" (older than 2003 SP1, or a client) or "unlisted" (newer than ECS's list)
    support: str = "unlisted"
    server: bool | None = None
    architecture: str | None = None
    kernel_machine: int | None = None
    control_set: str | None = None
    drivers: dict[str, Driver] = field(default_factory=dict)
    #: disk-class upper filters, each with its driver state
    upper_filters: list[Driver] = field(default_factory=list)
    #: storage driver -> the CriticalDeviceDatabase keys binding a device to it (needed before Windows
    #: Server 2012 for the boot disk: e.g. pci#ven_1af4&dev_1001 for virtio-blk)
    critical_devices: dict[str, list[str]] = field(default_factory=dict)
    xen_hide_devices: str | None = None
    xen_services: list[str] = field(default_factory=list)
    #: where device installation is switched off (registry paths)
    device_install_disabled: list[str] = field(default_factory=list)
    bad_hotfixes: list[str] = field(default_factory=list)
    missing_hotfixes: list[str] = field(default_factory=list)
    qemu_ga: list[str] = field(default_factory=list)
    boot_files: list[BootFiles] = field(default_factory=list)
    #: hive name -> state ("ok"; "replayed": Windows was writing it and its transaction logs were applied;
    #: "dirty": the same, but its logs are missing or unusable, so it is read as it is)
    hives: dict[str, str] = field(default_factory=dict)
    #: hive name -> what its logs did, or why they could not be used (dirty hives only)
    hive_logs: dict[str, str] = field(default_factory=dict)
    #: what could not be read -> why
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        """ImportImage ``Platform``."""
        if self.build in SERVER_RELEASES and self.server:
            return SERVER_RELEASES[self.build][1]
        return OTHER_WINDOWS

    @property
    def version(self) -> str | None:
        """A short version string: release and build (with UBR), e.g. "Windows Server 2019 (17763.1234)"."""
        if self.build is None:
            return None
        build = f"{self.build}.{self.ubr}" if self.ubr is not None else str(self.build)
        name = self.release or self.product_name
        return f"{name} ({build})" if name else build

    def boots_from(self, name: str) -> bool:
        """Whether the storage driver ``name`` can drive the system disk from the start of the boot."""
        driver = self.drivers.get(name)
        if driver is None or not driver.boot_start:
            return False
        return self.build is None or self.build >= NO_CRITICAL_DEVICE_DATABASE or bool(self.critical_devices.get(name))

    @property
    def nvme_support(self) -> str | None:
        """ImportImage ``Features.NvmeSupport``: stornvme loads at boot; None when SYSTEM was not read."""
        if "stornvme" not in self.drivers:
            return None
        return "supported" if self.boots_from("stornvme") else "unsupported"

    def to_dict(self) -> dict[str, Any]:
        facts = asdict(self)
        facts["drivers"] = {name: {**asdict(d), "boot_start": d.boot_start} for name, d in self.drivers.items()}
        facts["upper_filters"] = [{**asdict(d), "boot_start": d.boot_start} for d in self.upper_filters]
        facts["boot_files"] = [{**asdict(b), "complete": b.complete} for b in self.boot_files]
        facts.update(platform=self.platform, version=self.version, nvme_support=self.nvme_support)
        return facts


# -- pure helpers -----------------------------------------------------------------------------------


def pe_machine(head: bytes) -> int | None:
    """The machine field of a PE image: 'MZ', the PE header's offset at 0x3C, 'PE\\0\\0', machine."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return None
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    if pe + 6 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return None
    return int(struct.unpack_from("<H", head, pe + 4)[0])


def server_release(build: int | None, service_pack: str | None) -> tuple[str | None, str]:
    """(release, support) of a server build: ECS takes Windows Server 2003 SP1 to 2022."""
    if build is None:
        return None, "unlisted"
    if build < 3790:
        return None, "unsupported"  # Windows 2000 and older
    if build == 3790 and not re.search(r"service pack [1-9]", service_pack or "", re.IGNORECASE):
        return "Windows Server 2003", "unsupported"  # before SP1
    if build in SERVER_RELEASES:
        return SERVER_RELEASES[build][0], "supported"
    return None, "unlisted"  # semi-annual channel builds, Windows Server 2025 and later


def driver_path(image_path: str | None, name: str, windows_dir: str) -> str | None:
    """The guest path (from the volume's root, '/'-separated) of a driver's ImagePath; relative paths
    and ``\\SystemRoot\\`` start at the Windows directory, ``\\??\\C:\\`` and ``C:\\`` at the root.
    None for another drive."""
    if not image_path:
        return f"/{windows_dir}/System32/drivers/{name}.sys"
    path = image_path.strip().strip('"').replace("/", "\\")
    lowered = path.lower()
    for prefix in ("\\systemroot\\", "%systemroot%\\"):
        if lowered.startswith(prefix):
            return f"/{windows_dir}/" + path[len(prefix):].replace("\\", "/")
    if lowered.startswith("\\??\\"):
        path, lowered = path[4:], lowered[4:]
    if re.match(r"[a-z]:\\", lowered):
        if lowered[0] != "c":
            return None
        return "/" + path[3:].replace("\\", "/")
    if path.startswith("\\"):
        return path.replace("\\", "/")
    return f"/{windows_dir}/" + path.replace("\\", "/")


def find_windows_dir(fs: GuestFileSystem[Any]) -> str | None:
    """The Windows directory of a system volume (the one with System32/config, where the hives live:
    a missing hive is then a broken Windows, not no Windows), or None."""
    for name in WINDOWS_DIRS:
        if fs.is_dir(f"/{name}/System32/config"):
            return name
    return None


# -- reading a volume ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedHive:
    """A hive as Windows would load it, and how it got there."""

    hive: Hive
    #: "ok", "replayed" (dirty, brought up to date by its logs) or "dirty" (read as it is)
    state: str
    #: what the logs did, or why they could not be used (dirty hives only)
    logs: str | None = None


def load_hive(fs: GuestFileSystem[Any], path: str, max_size: int) -> LoadedHive:
    """The hive at ``path``; when it is dirty, with the transaction logs beside it replayed in memory.
    Logs that are missing, unreadable or unusable leave the hive as it is, "dirty", saying why."""
    data = fs.read_file(path, max_size)
    hive = Hive(data)
    if not hive.dirty:
        return LoadedHive(hive, "ok")
    logs = {}
    unreadable = []
    name = path.rpartition("/")[2]
    for suffix in LOG_SUFFIXES:
        try:
            if fs.is_file(path + suffix):
                logs[name + suffix] = fs.read_file(path + suffix, MAX_LOG_BYTES)
        except DiskImageError as exc:
            unreadable.append(f"{name}{suffix}: {exc.message}")
    try:
        replay = replay_logs(data, logs, max_size)
        replayed = Hive(replay.data)
    except DiskImageError as exc:
        return LoadedHive(hive, "dirty", "; ".join([*unreadable, exc.message]))
    return LoadedHive(replayed, "replayed", f"{', '.join(replay.logs)} replayed up to sequence {replay.sequence} "
                                            f"({replay.pages} pages)")


def _read_hive(fs: GuestFileSystem[Any], path: str, facts: WindowsFacts, name: str) -> Hive | None:
    try:
        loaded = load_hive(fs, path, MAX_HIVE_BYTES)
    except DiskImageError as exc:
        facts.problems[name] = exc.message
        return None
    facts.hives[name] = loaded.state
    if loaded.logs is not None:
        facts.hive_logs[name] = loaded.logs
    return loaded.hive


def _text(key: Key | None, name: str) -> str | None:
    value = key.data(name) if key is not None else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _number(key: Key | None, name: str) -> int | None:
    value = key.data(name) if key is not None else None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _file_state(fs: GuestFileSystem[Any], path: str | None, facts: WindowsFacts) -> tuple[bool, bool]:
    """(present, read-only) of a guest file; a damaged directory on the way is noted in ``problems``."""
    try:
        if path is None or not fs.exists(path):
            return False, False
        info = fs.stat(path)
    except DiskImageError as exc:
        facts.problems[path or ""] = exc.message
        return False, False
    return info.is_file, "readonly" in info.flags


def _driver(fs: GuestFileSystem[Any], services: Key | None, name: str, facts: WindowsFacts) -> Driver:
    service = services.subkey(name) if services is not None else None
    if service is None:
        file = driver_path(None, name, facts.windows_dir)
        present, readonly = _file_state(fs, file, facts)
        return Driver(name, False, file=file, present=present, readonly=readonly)
    override = service.subkey("StartOverride")
    overridden = override is not None and any(isinstance(value.data, int) and value.data != SERVICE_BOOT_START
                                               for value in override.values())
    image_path = _text(service, "ImagePath")
    file = driver_path(image_path, name, facts.windows_dir)
    present, readonly = _file_state(fs, file, facts)
    return Driver(service.name, True, _number(service, "Start"), overridden, image_path, file, present, readonly)


def _read_system(fs: GuestFileSystem[Any], hive: Hive, facts: WindowsFacts) -> None:
    control_set = hive.current_control_set()
    if control_set is None:
        facts.problems["SYSTEM"] = "no control set: Select\\Current names none that exists"
        return
    facts.control_set = control_set.name
    facts.product_type = _text(hive.find(f"{control_set.name}\\Control\\ProductOptions"), "ProductType")
    environment = hive.find(f"{control_set.name}\\Control\\Session Manager\\Environment")
    architecture = (_text(environment, "PROCESSOR_ARCHITECTURE") or "").lower()
    if facts.architecture is None:
        facts.architecture = PROCESSOR_ARCHITECTURES.get(architecture)
    services = control_set.subkey("Services")
    for name in REPORTED_DRIVERS:
        facts.drivers[name] = _driver(fs, services, name, facts)
    devices = control_set.subkey("Control")
    devices = devices.subkey("CriticalDeviceDatabase") if devices is not None else None
    for device in devices.subkeys() if devices is not None else ():
        bound = (_text(device, "Service") or "").lower()
        if bound in BOOT_STORAGE_DRIVERS:
            facts.critical_devices.setdefault(bound, []).append(device.name)
    disk_class = hive.find(f"{control_set.name}\\Control\\Class\\{DISK_CLASS}")
    filters = disk_class.data("UpperFilters") if disk_class is not None else None
    if isinstance(filters, list):
        facts.upper_filters = [_driver(fs, services, name, facts) for name in filters if name.strip()]
    if services is None:
        return
    xen = services.subkey("XenPCI")
    xen_parameters = xen.subkey("Parameters") if xen is not None else None
    hide = xen_parameters.data("hide_devices") if xen_parameters is not None else None
    hidden = " ".join(hide) if isinstance(hide, list) else hide if isinstance(hide, str) else ""
    facts.xen_hide_devices = hidden.strip() or None
    for name in XEN_SERVICES:
        service = services.subkey(name)
        if service is not None and _number(service, "Start") in (0, 1):
            facts.xen_services.append(service.name)
    for name in ("DeviceInstall", "PlugPlay"):
        service = services.subkey(name)
        parameters = service.subkey("Parameters") if service is not None else None
        if _number(parameters, "DeviceInstallDisabled"):
            facts.device_install_disabled.append(
                f"SYSTEM\\{control_set.name}\\Services\\{name}\\Parameters\\DeviceInstallDisabled")
    for name in QEMU_GA_SERVICES:
        service = services.subkey(name)
        if service is not None:
            facts.qemu_ga.append(f"SYSTEM\\{control_set.name}\\Services\\{service.name}")


def _read_software(_fs: GuestFileSystem[Any], hive: Hive, facts: WindowsFacts) -> None:
    current = hive.find("Microsoft\\Windows NT\\CurrentVersion")
    facts.product_name = _text(current, "ProductName")
    facts.edition = _text(current, "EditionID")
    facts.installation_type = _text(current, "InstallationType")
    facts.build = _number(current, "CurrentBuildNumber") or _number(current, "CurrentBuild")
    facts.ubr = _number(current, "UBR")
    facts.service_pack = _text(current, "CSDVersion")
    facts.display_version = _text(current, "DisplayVersion") or _text(current, "ReleaseId")
    restrictions = hive.find("Policies\\Microsoft\\Windows\\DeviceInstall\\Restrictions")
    for name in ("DenyUnspecified", "DenyAll"):
        if _number(restrictions, name):
            facts.device_install_disabled.append(
                f"SOFTWARE\\Policies\\Microsoft\\Windows\\DeviceInstall\\Restrictions\\{name}")
    packages = hive.find("Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages")
    installed: set[str] = set()
    if packages is not None:
        wanted = set(BAD_HOTFIXES) | set(REQUIRED_HOTFIXES_2008R2)
        for package in packages.subkeys():
            found = re.search(r"KB\d{6,7}", package.name, re.IGNORECASE)
            if found is None or found.group(0).upper() not in wanted:
                continue
            state = _number(package, "CurrentState")
            if state is None or state == CBS_INSTALLED:
                installed.add(found.group(0).upper())
    facts.bad_hotfixes = [kb for kb in BAD_HOTFIXES if kb in installed]
    if facts.build in (7600, 7601):
        facts.missing_hotfixes = [kb for kb in REQUIRED_HOTFIXES_2008R2 if kb not in installed]


def _server(facts: WindowsFacts) -> bool | None:
    """Server or client: ProductType (every release), else InstallationType, else the product name."""
    if facts.product_type:
        return facts.product_type.lower() != "winnt"
    if facts.installation_type:
        return facts.installation_type.lower() != "client"
    if facts.product_name:
        return "server" in facts.product_name.lower()
    return None


def inspect_windows(fs: GuestFileSystem[Any], boot_volumes: Sequence[tuple[str, str, GuestFileSystem[Any]]] = ()
                    ) -> WindowsFacts | None:
    """The facts of the Windows installation on ``fs``, or None when the volume holds none.

    ``boot_volumes``: (name, kind, file system) of the volumes the firmware may start from, kind
    "active" (the MBR's active partition, for BIOS) or "esp" (for UEFI).
    """
    windows_dir = find_windows_dir(fs)
    if windows_dir is None:
        return None
    facts = WindowsFacts(windows_dir)
    try:
        head = next(fs.iter_file(f"/{windows_dir}/System32/ntoskrnl.exe", PE_HEAD), b"")
        facts.kernel_machine = pe_machine(head)
        facts.architecture = PE_MACHINES.get(facts.kernel_machine or -1)
    except DiskImageError as exc:
        facts.problems["ntoskrnl.exe"] = exc.message
    software = _read_hive(fs, f"/{windows_dir}/System32/config/SOFTWARE", facts, "SOFTWARE")
    system = _read_hive(fs, f"/{windows_dir}/System32/config/SYSTEM", facts, "SYSTEM")
    for name, hive, read in (("SOFTWARE", software, _read_software), ("SYSTEM", system, _read_system)):
        if hive is None:
            continue
        try:
            read(fs, hive, facts)
        except DiskImageError as exc:
            facts.problems[name] = exc.message
    facts.server = _server(facts)
    facts.release, facts.support = server_release(facts.build, facts.service_pack)
    if facts.server is False:
        facts.release, facts.support = None, "unsupported"
    for path in QEMU_GA_FILES:
        present, _readonly = _file_state(fs, f"/{path}", facts)
        if present:
            facts.qemu_ga.append(f"/{path}")
    facts.boot_files = find_boot_files(boot_volumes, legacy=facts.build is not None and facts.build < 6000)
    return facts


def find_boot_files(volumes: Sequence[tuple[str, str, GuestFileSystem[Any]]], legacy: bool = False) -> list[BootFiles]:
    """The boot manager files on each volume: for "active" volumes bootmgr and Boot/BCD (ntldr,
    ntdetect.com and boot.ini when ``legacy``: Windows Server 2003), for "esp" volumes the Windows
    boot manager for UEFI and its BCD; a BCD store must be a hive holding the boot manager's object."""
    found = []
    for name, kind, fs in volumes:
        paths: tuple[str, ...]
        if kind == "esp":
            paths = ("/EFI/Microsoft/Boot/bootmgfw.efi", "/EFI/Microsoft/Boot/BCD")
            mode = "UEFI"
        else:
            paths = ("/ntldr", "/ntdetect.com", "/boot.ini") if legacy else ("/bootmgr", "/Boot/BCD")
            mode = "BIOS"
        files = {}
        damaged = {}
        for path in paths:
            try:
                files[path] = fs.is_file(path)
                if files[path] and path.endswith("/BCD"):
                    bcd = load_hive(fs, path, MAX_BCD_BYTES).hive
                    if bcd.find(f"Objects\\{BOOT_MANAGER_OBJECT}") is None:
                        damaged[path] = f"no Windows Boot Manager object ({BOOT_MANAGER_OBJECT})"
            except DiskImageError as exc:
                files.setdefault(path, False)
                if files[path]:
                    damaged[path] = exc.message
        found.append(BootFiles(mode, name, files, damaged))
    return found


# -- the inspector -------------------------------------------------------------------------------------


def inspect(disk: GuestDisk) -> GuestFacts | None:
    """The Windows system on ``disk`` (the first NTFS volume with a Windows directory), None when none."""
    for volume in disk.volumes:
        if volume.fs_type != "ntfs":
            continue
        fs = disk.open(volume)
        if fs is None or find_windows_dir(fs) is None:
            continue
        facts = inspect_windows(fs, _boot_volumes(disk))
        if facts is None:
            continue
        build = f"{facts.build}.{facts.ubr}" if facts.build is not None and facts.ubr is not None else facts.build
        return GuestFacts(
            os_type="windows",
            distribution="windows",
            version=str(build) if build is not None else None,
            product=facts.product_name,
            architecture=facts.architecture,
            platform=facts.platform,
            root=volume,
            details=facts.to_dict(),
            unreadable=[f"could not read {name}: {why}" for name, why in facts.problems.items()],
            inspection=facts,
        )
    return None


def _boot_volumes(disk: GuestDisk) -> list[tuple[str, str, GuestFileSystem[Any]]]:
    """The volumes firmware starts Windows from: EFI system partitions, and the MBR's active partition."""
    table = read_partition_table(disk.disk)
    kinds = {part.number: "esp" if part.kind == "esp" else "active"
             for part in table.partitions if part.kind == "esp" or (part.bootable and table.scheme == "mbr")}
    found = []
    for volume in disk.volumes:
        kind = kinds.get(volume.number) if volume.number is not None else None
        fs = disk.open(volume) if kind else None
        if kind and fs is not None:
            found.append((volume.name, kind, fs))
    return found
