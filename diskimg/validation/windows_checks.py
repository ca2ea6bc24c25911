"""The Windows guest checks: what a Windows Server system disk needs to be imported into ECS and boot.

Each reads the Windows inspection (``diskimg.inspection.guest.windows.WindowsFacts``) and returns at once for
other systems; ``guest_found`` (in ``linux_checks.py``) names the OS for every guest. What could not
be read (a damaged hive) is a finding of its own, and the checks that needed it report "not
checked" through ``NotAvailable``.
"""

from __future__ import annotations

from ..inspection.guest.windows import (
    BOOT_STORAGE_DRIVERS,
    COMMUNITY_VIRTIO_DRIVERS,
    DISK_CLASS,
    REQUIRED_HOTFIXES_2008R2,
    WindowsFacts,
)
from .checks import disk_check
from .context import DiskContext, NotAvailable

_HKLM_SYSTEM = "HKLM\\SYSTEM\\CurrentControlSet"


def _windows(ctx: DiskContext) -> WindowsFacts | None:
    inspection: WindowsFacts | None = ctx.guest_inspection("windows")
    return inspection


def _hive_read(windows: WindowsFacts, name: str) -> None:
    """NotAvailable when the facts of hive ``name`` (SYSTEM or SOFTWARE) could not be read."""
    if name in windows.problems or (name == "SYSTEM" and windows.control_set is None):
        raise NotAvailable(f"the {name} hive could not be read: {windows.problems.get(name, 'not found')}")


@disk_check("guest")
def windows_edition(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    evidence = {"product": windows.product_name, "edition": windows.edition, "installation_type":
                windows.installation_type, "product_type": windows.product_type, "build": windows.build,
                "service_pack": windows.service_pack}
    name = windows.product_name or f"Windows build {windows.build}"
    if windows.server is False:
        ctx.emit("windows-client-edition", f"{name} is a client edition (ProductType "
                 f"{windows.product_type or '?'}, InstallationType {windows.installation_type or '?'})",
                 {**evidence, "value": windows.installation_type or windows.product_type},
                 "import a Windows Server machine (2008 to 2022); client editions cannot be imported")
    elif windows.support == "unsupported":
        ctx.emit("windows-version-unsupported", f"{name} (build {windows.build}"
                 f"{', ' + windows.service_pack if windows.service_pack else ''}) is older than Windows Server 2003 "
                 "SP1", {**evidence, "value": windows.build},
                 "upgrade the guest (at least Windows Server 2003 SP1; better 2012 R2 or later) before import")
    elif windows.support == "unlisted" and windows.build is not None:
        ctx.emit("windows-version-unlisted", f"{name} (build {windows.build}) is not among the releases ECS "
                 "lists (2003 SP1 to 2022): Platform=Other Windows", {**evidence, "value": windows.build},
                 "import with Platform=Other Windows, and install the virtio drivers yourself before import")


@disk_check("guest")
def windows_registry(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    for name in ("SYSTEM", "SOFTWARE"):
        path = f"/{windows.windows_dir}/System32/config/{name}"
        if name in windows.problems:
            ctx.emit("windows-registry-unreadable", f"the {name} hive cannot be read: {windows.problems[name]}",
                     {"file": path, "value": windows.problems[name]},
                     f"restore {path} from a backup (Windows\\System32\\config\\RegBack) or repair the guest "
                     "before taking the image")
        elif windows.hives.get(name) == "dirty":
            ctx.emit("windows-registry-dirty", f"the {name} hive was being written when the image was taken, and "
                     f"its transaction logs cannot bring it up to date ({windows.hive_logs.get(name)}): what is "
                     "read may be stale", {"file": path, "value": "dirty", "logs": windows.hive_logs.get(name)},
                     "shut Windows down cleanly before taking the image (not a crash-consistent snapshot)")
        elif windows.hives.get(name) == "replayed":
            ctx.emit("windows-registry-replayed", f"the {name} hive was being written when the image was taken; "
                     f"its transaction logs were replayed in memory, as Windows does at boot "
                     f"({windows.hive_logs.get(name)})", {"file": path, "value": "replayed",
                                                          "logs": windows.hive_logs.get(name)})


@disk_check("guest")
def windows_boot_driver(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SYSTEM")
    if any(windows.boots_from(name) for name in BOOT_STORAGE_DRIVERS):
        return
    states = {}
    for name in BOOT_STORAGE_DRIVERS:
        driver = windows.drivers[name]
        if not driver.service:
            states[name] = "no service"
        elif driver.start != 0:
            states[name] = f"Start={driver.start}"
        elif driver.start_overridden:
            states[name] = "Start=0 but a StartOverride value delays it"
        elif not driver.present:
            states[name] = f"Start=0 but {driver.file or driver.image_path} is missing"
        else:
            states[name] = "Start=0 but no CriticalDeviceDatabase entry binds a disk controller to it"
    ctx.emit("windows-boot-driver-missing", "no virtio or NVMe storage driver loads at boot ("
             + "; ".join(f"{name}: {state}" for name, state in states.items()) + "): the instance would stop with "
             "INACCESSIBLE_BOOT_DEVICE", {"control_set": windows.control_set, "drivers": states, "value": None},
             "install the virtio drivers (Alibaba's virtio package or virtio-win) and make viostor boot-start: reg add "
             f"{_HKLM_SYSTEM}\\Services\\viostor /v Start /t REG_DWORD /d 0 /f (for NVMe families: the same for "
             "stornvme, and delete its StartOverride key)")


@disk_check("guest")
def windows_nvme(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SYSTEM")
    support = windows.nvme_support
    stornvme = windows.drivers["stornvme"]
    ctx.emit("windows-nvme", f"Features.NvmeSupport={support}: stornvme "
             + ("is a boot-start driver" if support == "supported" else
                f"is {'not installed' if not stornvme.service else f'Start={stornvme.start}'}"),
             {"value": support, "start": stornvme.start, "file": stornvme.file},
             None if support == "supported" else
             f"only needed for NVMe-only instance families: reg add {_HKLM_SYSTEM}\\Services\\stornvme /v Start "
             "/t REG_DWORD /d 0 /f")


@disk_check("guest")
def windows_virtio_readonly(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SYSTEM")
    readonly = [windows.drivers[name] for name in COMMUNITY_VIRTIO_DRIVERS if windows.drivers[name].readonly]
    if readonly:
        files = [driver.file for driver in readonly if driver.file]  # read-only files are present ones
        commands = ["attrib -r C:" + file.replace("/", "\\") for file in files]
        ctx.emit("windows-virtio-readonly", f"virtio driver file(s) {', '.join(files)} are read-only: ECS cannot "
                 "replace the community drivers with its own", {"file": files, "value": "readonly"},
                 "clear the attribute inside the guest: " + " & ".join(commands))


@disk_check("guest")
def windows_boot_files(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    try:
        mode = ctx.boot_mode or ctx.boot.recommended
    except NotAvailable:
        mode = ctx.boot_mode
    if mode is None:
        raise NotAvailable("the boot mode is not known: no partition table or no boot code")
    candidates = [found for found in windows.boot_files if found.mode == mode]
    if not candidates:
        raise NotAvailable("no " + ("active partition" if mode == "BIOS" else "EFI system partition")
                           + " to look for the Windows boot manager on")
    if any(found.complete for found in candidates):
        return
    for found in candidates:
        wrong = [f"lacks {', '.join(found.missing)}"] if found.missing else []
        wrong += [f"{path} is damaged ({why})" for path, why in found.damaged.items()]
        ctx.emit("windows-boot-files-missing", f"{found.volume} {'; '.join(wrong)}: Windows cannot boot in {mode} "
                 "mode", {"volume": found.volume, "file": found.missing + list(found.damaged), "value": mode},
                 f"recreate the boot files inside the guest: bcdboot C:\\{windows.windows_dir} /s S: /f {mode} "
                 "(S: being that partition)")


@disk_check("guest")
def windows_upper_filters(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SYSTEM")
    missing = [driver for driver in windows.upper_filters if not driver.present]
    if missing:
        names = [driver.name for driver in missing]
        ctx.emit("windows-upper-filter-missing", f"the disk class's UpperFilters list {', '.join(names)}, whose "
                 f"driver file is missing ({', '.join(str(d.file) for d in missing)})",
                 {"filters": [d.name for d in windows.upper_filters], "file": [d.file for d in missing],
                  "value": names},
                 f"remove {', '.join(names)} from {_HKLM_SYSTEM}\\Control\\Class\\{DISK_CLASS}\\UpperFilters "
                 "(keep the others), or reinstall the software that put it there")


@disk_check("guest")
def windows_xen(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SYSTEM")
    if windows.xen_hide_devices:
        ctx.emit("windows-xen-leftovers", f"XenPCI hides the emulated devices (hide_devices = "
                 f"{windows.xen_hide_devices!r})", {"value": windows.xen_hide_devices},
                 f"uninstall the Xen PV drivers and clear {_HKLM_SYSTEM}\\Services\\XenPCI\\Parameters\\hide_devices")
    if windows.xen_services:
        ctx.emit("windows-xen-leftovers", f"Xen PV driver(s) {', '.join(windows.xen_services)} still start at boot",
                 {"value": windows.xen_services}, "uninstall the Xen PV drivers (or set their Start to 4) before "
                 "import")


@disk_check("guest")
def windows_driver_install(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    if not windows.device_install_disabled:
        _hive_read(windows, "SYSTEM")
        _hive_read(windows, "SOFTWARE")
        return
    ctx.emit("windows-driver-install-disabled", "device installation is disabled ("
             + ", ".join(windows.device_install_disabled) + ")", {"value": windows.device_install_disabled},
             "set DeviceInstallDisabled to 0 and remove the Device Installation Restrictions policy "
             "(gpedit.msc: System > Device Installation)")


@disk_check("guest")
def windows_hotfixes(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    _hive_read(windows, "SOFTWARE")
    if windows.bad_hotfixes:
        ctx.emit("windows-hotfix", f"update(s) {', '.join(windows.bad_hotfixes)} are installed",
                 {"value": windows.bad_hotfixes},
                 " & ".join(f"wusa /uninstall /kb:{kb[2:]}" for kb in windows.bad_hotfixes))
    if windows.missing_hotfixes:
        ctx.emit("windows-hotfix", f"Windows Server 2008 R2 without {', '.join(windows.missing_hotfixes)}",
                 {"value": windows.missing_hotfixes, "required": list(REQUIRED_HOTFIXES_2008R2)},
                 f"install {', '.join(windows.missing_hotfixes)} (SHA-2 code signing support) before import")


@disk_check("guest")
def windows_agents(ctx: DiskContext) -> None:
    windows = _windows(ctx)
    if windows is None:
        return
    if windows.qemu_ga:
        ctx.emit("windows-qemu-ga", f"the QEMU guest agent is installed ({', '.join(windows.qemu_ga)})",
                 {"value": windows.qemu_ga}, "uninstall the QEMU guest agent (Programs and Features) before import")
