"""Windows guest inspection on Windows-shaped system disks.

Each disk is built the way a Windows disk is laid out, with real tools: mkntfs makes the NTFS
volume, ntfs-3g (mounted through FUSE, as tests/test_fs_ntfs.py does) writes the Windows directory
tree into it and sets file attributes (``system.ntfs_attrib_be``), the SYSTEM and SOFTWARE hives
(and the BCD) are written by hivexsh, sfdisk or sgdisk partition the disk, mtools fills the EFI
system partition. Every fact and every finding is asserted against what the test put there: a good
machine, then one machine per rule.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg import validate
from diskimg.inspection.fs.ntfs import NtfsFileSystem
from diskimg.inspection.guest import regf, windows
from diskimg.inspection.guest.regf import REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_SZ

from .support.disks import WINDOWS_BOOT_CODE, FileDisk, copy_in, make_esp, sfdisk, sgdisk, write_boot_code
from .support.files import blank
from .support.filesystems import mkntfs, need_ntfs_tools, ntfs3g
from .support.guests import guest_findings
from .support.hives import (
    CellBuilder,
    Spec,
    bins_size_of,
    build_hive,
    changed_blocks,
    dword,
    log_entry,
    mid_write,
    modify_hive,
    multi_sz,
    new_format_log,
    sequences_of,
    sz,
    with_base_block,
)
from .support.hostfs import HostDirFileSystem
from .support.tools import diskimg_cli, run
from .support.units import MiB

pytestmark = pytest.mark.skipif(shutil.which("hivexsh") is None, reason="hivexsh (libhivex-bin) is not installed")

FILE_ATTRIBUTE_READONLY = 0x1
VOLUME = 48 * MiB
#: where an NTFS boot sector's code starts (after its BPB), and a stand-in for the code Windows puts there
NTFS_BOOT_CODE_OFFSET = 0x54
WINDOWS_NTFS_BOOT_CODE = (b"\xfa\x33\xc0\x8e\xd0\xbc\x00\x7c" + bytes(16) + b"A disk read error occurred\r\n\0"
                          b"BOOTMGR is missing\r\n\0BOOTMGR is compressed\r\n\0Press Ctrl+Alt+Del to restart\r\n\0")
START = 1 * MiB

CURRENT_VERSION = "Microsoft\\Windows NT\\CurrentVersion"
PACKAGES = "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages"
DISK_CLASS = f"ControlSet002\\Control\\Class\\{windows.DISK_CLASS}"
SERVICES = "ControlSet002\\Services"


def pe_image(machine: int) -> bytes:
    """A minimal PE file: the DOS header pointing at 'PE\\0\\0' and a COFF header with ``machine``."""
    head = bytearray(512)
    head[:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, 0x80)
    head[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HH", head, 0x84, machine, 1)
    return bytes(head)


def service(start: int, image_path: str | None = None, kind: int = 1) -> list[tuple[str, int, bytes]]:
    values = [("Start", REG_DWORD, dword(start)), ("Type", REG_DWORD, dword(kind))]
    if image_path is not None:
        values.append(("ImagePath", REG_EXPAND_SZ, sz(image_path)))
    return values


def good_machine() -> dict[str, Any]:
    """Windows Server 2019 Datacenter, x64, virtio-blk at boot, booting BIOS from its one partition.
    ControlSet001 (not the current one) holds the opposite of every fact, so reading the wrong
    control set shows."""
    software: Spec = {
        CURRENT_VERSION: [
            ("ProductName", REG_SZ, sz("Windows Server 2019 Datacenter")),
            ("EditionID", REG_SZ, sz("ServerDatacenter")),
            ("InstallationType", REG_SZ, sz("Server")),
            ("CurrentBuild", REG_SZ, sz("17763")),
            ("CurrentBuildNumber", REG_SZ, sz("17763")),
            ("UBR", REG_DWORD, dword(5458)),
            ("ReleaseId", REG_SZ, sz("1809")),
        ],
        f"{PACKAGES}\\Package_for_KB5005112~31bf3856ad364e35~amd64~~17763.2090.1.3": [
            ("CurrentState", REG_DWORD, dword(0x70))],
        # staged, not installed: not a finding
        f"{PACKAGES}\\Package_for_KB5009557~31bf3856ad364e35~amd64~~17763.2452.1.5": [
            ("CurrentState", REG_DWORD, dword(0x20))],
    }
    system: Spec = {
        "Select": [("Current", REG_DWORD, dword(2)), ("Default", REG_DWORD, dword(2)),
                   ("LastKnownGood", REG_DWORD, dword(1))],
        "ControlSet002\\Control\\ProductOptions": [("ProductType", REG_SZ, sz("ServerNT"))],
        "ControlSet002\\Control\\Session Manager\\Environment": [("PROCESSOR_ARCHITECTURE", REG_SZ, sz("AMD64"))],
        DISK_CLASS: [("UpperFilters", REG_MULTI_SZ, multi_sz("partmgr")), ("Class", REG_SZ, sz("DiskDrive"))],
        f"{SERVICES}\\partmgr": service(0, "System32\\drivers\\partmgr.sys"),
        f"{SERVICES}\\viostor": service(0, "System32\\drivers\\viostor.sys"),
        f"{SERVICES}\\stornvme": service(3, "\\SystemRoot\\System32\\drivers\\stornvme.sys"),
        f"{SERVICES}\\netkvm": service(3, "system32\\DRIVERS\\netkvm.sys"),
        f"{SERVICES}\\Tcpip": service(1, "System32\\drivers\\tcpip.sys"),
        "ControlSet001\\Control\\ProductOptions": [("ProductType", REG_SZ, sz("WinNT"))],
        "ControlSet001\\Services\\viostor": service(3, "System32\\drivers\\viostor.sys"),
        "ControlSet001\\Services\\XenPCI\\Parameters": [("hide_devices", REG_SZ, sz("ide0,ide1"))],
    }
    drivers = "Windows/System32/drivers"
    files = {
        "Windows/System32/ntoskrnl.exe": pe_image(0x8664),
        f"{drivers}/viostor.sys": pe_image(0x8664),
        f"{drivers}/stornvme.sys": pe_image(0x8664),
        f"{drivers}/netkvm.sys": pe_image(0x8664),
        f"{drivers}/partmgr.sys": pe_image(0x8664),
        f"{drivers}/tcpip.sys": pe_image(0x8664),
        "bootmgr": b"bootmgr " * 64,
        "Boot/BCD": "BCD",  # replaced by a BCD store made by hivexsh
        "Users/Public/desktop.ini": b"[.ShellClassInfo]\r\n",
    }
    return {"software": software, "system": system, "files": files, "readonly": set(), "boot": "bios",
            "esp": {"EFI/Microsoft/Boot/bootmgfw.efi": pe_image(0x8664), "EFI/Microsoft/Boot/BCD": "BCD",
                    "EFI/Boot/bootx64.efi": pe_image(0x8664)}}


def bcd_store(path: Path) -> bytes:
    """A BCD store (a hive) holding the Windows Boot Manager's object, as bcdboot makes it."""
    return build_hive(path, {f"Objects\\{windows.BOOT_MANAGER_OBJECT}\\Description": [
        ("Type", REG_DWORD, dword(0x10100002))]}).read_bytes()


def set_readonly(path: Path) -> None:
    """FILE_ATTRIBUTE_READONLY set through ntfs-3g's attribute xattr (big-endian 32 bits)."""
    attributes = struct.unpack(">I", os.getxattr(path, "system.ntfs_attrib_be"))[0]
    os.setxattr(path, "system.ntfs_attrib_be", struct.pack(">I", attributes | FILE_ATTRIBUTE_READONLY))


def ntfs_volume(work: Path, machine: dict[str, Any]) -> Path:
    """The Windows volume of ``machine``: its tree, hives and attributes written by ntfs-3g."""
    hives = {
        "Windows/System32/config/SOFTWARE": build_hive(work / "SOFTWARE", machine["software"]).read_bytes(),
        "Windows/System32/config/SYSTEM": build_hive(work / "SYSTEM", machine["system"]).read_bytes(),
    }
    bcd = bcd_store(work / "BCD")
    files = {path: bcd if content == "BCD" else content for path, content in machine["files"].items()}
    image = mkntfs(work / "windows.ntfs", VOLUME, 4096)
    with ntfs3g(image, work / "mnt") as mounted:
        for path, content in {**hives, **files}.items():
            target = mounted / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        for path in machine["readonly"]:
            set_readonly(mounted / path)
    # mkntfs writes boot code that only prints "This is not a bootable disk"; Windows Setup writes one
    # that loads bootmgr: stand-in code with its messages, so that the BIOS boot chain reaches a loader
    with open(image, "r+b") as volume:
        volume.seek(NTFS_BOOT_CODE_OFFSET)
        volume.write(WINDOWS_NTFS_BOOT_CODE.ljust(510 - NTFS_BOOT_CODE_OFFSET, b"\0"))
    return image


def windows_disk(work: Path, machine: dict[str, Any]) -> Path:
    """A system disk: MBR with one active NTFS partition and Windows boot code (BIOS), or GPT with an
    EFI system partition before the NTFS partition (UEFI)."""
    need_ntfs_tools()
    work.mkdir(parents=True, exist_ok=True)
    volume = ntfs_volume(work, machine)
    disk = work / "disk.raw"
    if machine["boot"] == "bios":
        blank(disk, START + VOLUME + MiB)
        sfdisk(disk, f"label: dos\nstart=2048, size={VOLUME // 512}, type=7, bootable\n")
        write_boot_code(disk, WINDOWS_BOOT_CODE)
        copy_in(disk, volume, START)
        return disk
    esp_size = 33 * MiB
    bcd = bcd_store(work / "esp-BCD")
    esp = make_esp(work / "esp.img", esp_size, {path: bcd if content == "BCD" else content
                                                for path, content in machine["esp"].items()}, fat=16)
    blank(disk, START + esp_size + VOLUME + 2 * MiB)
    sgdisk(disk, "-n", f"1:2048:+{esp_size // 1024}K", "-t", "1:EF00",
           "-n", f"2:{(START + esp_size) // 512}:+{VOLUME // 1024}K", "-t", "2:0700")
    copy_in(disk, esp, START)
    copy_in(disk, volume, START + esp_size)
    return disk


def replace_volume(disk: Path, volume: Path) -> None:
    """Write a changed volume over the Windows partition of an MBR disk, zeros included."""
    with open(disk, "r+b") as target:
        target.seek(START)
        target.write(volume.read_bytes())


def volume_of(disk: Path, offset: int = START) -> NtfsFileSystem:
    return NtfsFileSystem(FileDisk(disk), offset, VOLUME)


@pytest.fixture(scope="module")
def good_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return windows_disk(tmp_path_factory.mktemp("windows") / "good", good_machine())


# -- pure helpers ------------------------------------------------------------------------------------


def test_pe_machine_and_driver_paths() -> None:
    assert windows.pe_machine(pe_image(0x8664)) == 0x8664
    assert windows.pe_machine(pe_image(0x14C)) == 0x14C
    assert windows.pe_machine(b"MZ" + bytes(100)) is None
    assert windows.pe_machine(b"ELF") is None
    head = bytearray(pe_image(0xAA64))
    struct.pack_into("<I", head, 0x3C, 10_000)  # the PE header beyond what was read
    assert windows.pe_machine(bytes(head)) is None
    path = windows.driver_path
    assert path(None, "viostor", "Windows") == "/Windows/System32/drivers/viostor.sys"
    assert path("System32\\drivers\\a.sys", "a", "Windows") == "/Windows/System32/drivers/a.sys"
    assert path("\\SystemRoot\\System32\\drivers\\a.sys", "a", "WINDOWS") == "/WINDOWS/System32/drivers/a.sys"
    assert path("%SystemRoot%\\system32\\a.sys", "a", "Windows") == "/Windows/system32/a.sys"
    assert path("\\??\\C:\\Program Files\\x\\a.sys", "a", "Windows") == "/Program Files/x/a.sys"
    assert path('"C:\\Windows\\a.sys"', "a", "Windows") == "/Windows/a.sys"
    assert path("\\??\\D:\\drivers\\a.sys", "a", "Windows") is None


def test_server_release_table() -> None:
    release = windows.server_release
    assert release(17763, None) == ("Windows Server 2019", "supported")
    assert release(20348, None) == ("Windows Server 2022", "supported")
    assert release(7601, "Service Pack 1") == ("Windows Server 2008 R2", "supported")
    assert release(3790, "Service Pack 2") == ("Windows Server 2003", "supported")
    assert release(3790, None) == ("Windows Server 2003", "unsupported")
    assert release(2195, None) == (None, "unsupported")
    assert release(26100, None) == (None, "unlisted")
    assert release(None, None) == (None, "unlisted")


# -- facts from a volume ------------------------------------------------------------------------------


def test_facts_of_a_good_machine(good_disk: Path) -> None:
    fs = volume_of(good_disk)
    facts = windows.inspect_windows(fs, [("partition 1", "active", fs)])
    assert facts is not None
    assert not facts.problems, facts.problems
    assert facts.windows_dir == "Windows"
    assert (facts.product_name, facts.edition, facts.installation_type) == (
        "Windows Server 2019 Datacenter", "ServerDatacenter", "Server")
    assert (facts.build, facts.ubr, facts.display_version) == (17763, 5458, "1809")
    assert facts.server is True and facts.product_type == "ServerNT"
    assert (facts.release, facts.support, facts.platform) == ("Windows Server 2019", "supported",
                                                              "Windows Server 2019")
    assert facts.version == "Windows Server 2019 (17763.5458)"
    assert facts.architecture == "x86_64" and facts.kernel_machine == 0x8664
    assert facts.control_set == "ControlSet002"
    assert facts.hives == {"SOFTWARE": "ok", "SYSTEM": "ok"}
    viostor = facts.drivers["viostor"]
    assert viostor.service and viostor.start == 0 and viostor.present and not viostor.readonly
    assert viostor.boot_start and viostor.file == "/Windows/System32/drivers/viostor.sys"
    assert facts.drivers["stornvme"].start == 3 and not facts.drivers["stornvme"].boot_start
    assert facts.nvme_support == "unsupported"
    assert facts.drivers["netkvm"].present and facts.drivers["netkvm"].file == "/Windows/system32/DRIVERS/netkvm.sys"
    assert not facts.drivers["vioscsi"].service and not facts.drivers["vioscsi"].present
    assert [(d.name, d.present) for d in facts.upper_filters] == [("partmgr", True)]
    assert facts.xen_hide_devices is None and facts.xen_services == []  # those are in ControlSet001
    assert facts.device_install_disabled == [] and facts.bad_hotfixes == [] and facts.qemu_ga == []
    assert [(b.mode, b.volume, b.files) for b in facts.boot_files] == [
        ("BIOS", "partition 1", {"/bootmgr": True, "/Boot/BCD": True})]
    described = facts.to_dict()
    assert described["platform"] == "Windows Server 2019" and described["drivers"]["viostor"]["boot_start"]


def test_not_windows(tmp_path: Path) -> None:
    need_ntfs_tools()
    image = mkntfs(tmp_path / "data.ntfs", 16 * MiB, 4096)
    fs = NtfsFileSystem(FileDisk(image), 0, 16 * MiB)
    assert windows.inspect_windows(fs) is None


def test_broken_hive_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    machine = good_machine()
    disk = windows_disk(tmp_path, machine)
    with ntfs3g(tmp_path / "windows.ntfs", tmp_path / "mnt2") as mounted:
        (mounted / "Windows/System32/config/SYSTEM").write_bytes(b"regf" + bytes(9000))
    replace_volume(disk, tmp_path / "windows.ntfs")
    facts = windows.inspect_windows(volume_of(disk))
    assert facts is not None and "SYSTEM" in facts.problems and facts.hives == {"SOFTWARE": "ok"}
    assert facts.product_name == "Windows Server 2019 Datacenter" and facts.drivers == {}
    with ntfs3g(tmp_path / "windows.ntfs", tmp_path / "mnt3") as mounted:  # a Windows without its SOFTWARE hive
        (mounted / "Windows/System32/config/SOFTWARE").unlink()
    replace_volume(disk, tmp_path / "windows.ntfs")
    facts = windows.inspect_windows(volume_of(disk))
    assert facts is not None and set(facts.problems) == {"SYSTEM", "SOFTWARE"} and facts.hives == {}
    assert facts.product_name is None and facts.architecture == "x86_64"


# -- validation: the good machine, then one machine per rule ------------------------------------------


def problems(report) -> set[str]:
    """Codes of the guest errors and warnings."""
    return {f.code for f in report.findings if f.category == "guest" and f.severity.value != "info"}


def test_good_machine_validates(good_disk: Path, tmp_path: Path) -> None:
    report = validate(good_disk)
    assert problems(report) == set(), [f.message for f in report.findings]
    assert report.importable
    found = guest_findings(report)
    assert set(found) == {"guest-os", "windows-nvme"}
    assert found["windows-nvme"][0].evidence["value"] == "unsupported"
    assert report.import_image["Platform"] == "Windows Server 2019"
    assert report.import_image["OSType"] == "windows"
    assert report.import_image["Architecture"] == "x86_64"
    assert report.import_image["BootMode"] == "BIOS"
    assert report.import_image["Features.NvmeSupport"] == "unsupported"
    assert not [item for item in report.not_checked if item["category"] == "guest"]
    # the same disk as qcow2, through the command line
    qcow2 = tmp_path / "good.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", good_disk, qcow2)
    proc = diskimg_cli("validate", "--json", qcow2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    guest = described["disks"][0]["guest"]
    assert (guest["os_type"], guest["product"], guest["version"], guest["platform"]) == (
        "windows", "Windows Server 2019 Datacenter", "17763.5458", "Windows Server 2019")
    assert guest["root"]["partition"] == 1
    assert guest["details"]["drivers"]["viostor"]["boot_start"] is True
    assert guest["details"]["boot_files"] == [{"mode": "BIOS", "volume": "partition 1", "complete": True,
                                               "files": {"/bootmgr": True, "/Boot/BCD": True}, "damaged": {}}]
    assert described["import_image"]["Platform"] == "Windows Server 2019"


def _client(machine: dict[str, Any]) -> None:
    machine["software"][CURRENT_VERSION] = [
        ("ProductName", REG_SZ, sz("Windows 10 Pro")), ("EditionID", REG_SZ, sz("Professional")),
        ("InstallationType", REG_SZ, sz("Client")), ("CurrentBuildNumber", REG_SZ, sz("19045"))]
    machine["system"]["ControlSet002\\Control\\ProductOptions"] = [("ProductType", REG_SZ, sz("WinNT"))]


def _server_2003_rtm(machine: dict[str, Any]) -> None:
    machine["software"][CURRENT_VERSION] = [
        ("ProductName", REG_SZ, sz("Microsoft Windows Server 2003")), ("CurrentBuildNumber", REG_SZ, sz("3790"))]
    _critical_device(machine)
    machine["files"]["Windows/System32/ntoskrnl.exe"] = pe_image(0x14C)
    for name in ("bootmgr", "Boot/BCD"):
        del machine["files"][name]
    machine["files"].update({"ntldr": b"ntldr", "ntdetect.com": b"ntdetect", "boot.ini": b"[boot loader]\r\n"})


def _server_2025(machine: dict[str, Any]) -> None:
    machine["software"][CURRENT_VERSION] = [
        ("ProductName", REG_SZ, sz("Windows Server 2025 Datacenter")), ("InstallationType", REG_SZ, sz("Server")),
        ("CurrentBuildNumber", REG_SZ, sz("26100"))]


def _no_boot_driver(machine: dict[str, Any]) -> None:
    machine["system"][f"{SERVICES}\\viostor"] = service(3, "System32\\drivers\\viostor.sys")
    machine["system"][f"{SERVICES}\\stornvme"] = service(0, "\\SystemRoot\\System32\\drivers\\stornvme.sys")
    del machine["files"]["Windows/System32/drivers/stornvme.sys"]


def _nvme_uefi(machine: dict[str, Any]) -> None:
    """Boots UEFI from an ESP with the Windows boot manager, and from NVMe only (no virtio)."""
    del machine["system"][f"{SERVICES}\\viostor"]
    del machine["files"]["Windows/System32/drivers/viostor.sys"]
    machine["system"][f"{SERVICES}\\stornvme"] = service(0, "\\SystemRoot\\System32\\drivers\\stornvme.sys")
    machine["boot"] = "uefi"


def _readonly_virtio(machine: dict[str, Any]) -> None:
    machine["readonly"] = {"Windows/System32/drivers/netkvm.sys", "Windows/System32/drivers/viostor.sys"}


def _no_bcd(machine: dict[str, Any]) -> None:
    del machine["files"]["Boot/BCD"]


def _bcd_without_boot_manager(machine: dict[str, Any]) -> None:
    cells = CellBuilder()  # a valid hive with nothing in it
    machine["files"]["Boot/BCD"] = cells.hive(cells.key("ROOT", cells.security()))


def _uefi_no_bcd(machine: dict[str, Any]) -> None:
    machine["boot"] = "uefi"
    del machine["esp"]["EFI/Microsoft/Boot/BCD"]


def _upper_filter(machine: dict[str, Any]) -> None:
    machine["system"][DISK_CLASS][0] = ("UpperFilters", REG_MULTI_SZ, multi_sz("partmgr", "oldbackup"))
    machine["system"][f"{SERVICES}\\oldbackup"] = service(0, "System32\\drivers\\oldbackup.sys")


def _xen(machine: dict[str, Any]) -> None:
    machine["system"][f"{SERVICES}\\XenPCI\\Parameters"] = [("hide_devices", REG_SZ, sz("ide0,ide1"))]
    machine["system"][f"{SERVICES}\\xenvbd"] = service(0, "System32\\drivers\\xenvbd.sys")


def _install_disabled(machine: dict[str, Any]) -> None:
    machine["system"][f"{SERVICES}\\DeviceInstall\\Parameters"] = [("DeviceInstallDisabled", REG_DWORD, dword(1))]
    machine["software"]["Policies\\Microsoft\\Windows\\DeviceInstall\\Restrictions"] = [
        ("DenyUnspecified", REG_DWORD, dword(1))]


def _critical_device(machine: dict[str, Any]) -> None:
    """What the virtio installer writes before Windows Server 2012 so that the boot loader binds viostor."""
    machine["system"]["ControlSet002\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1001&subsys_00021af4"] = [
        ("Service", REG_SZ, sz("viostor")), ("ClassGUID", REG_SZ, sz("{4D36E97B-E325-11CE-BFC1-08002BE10318}"))]


def _server_2008r2(machine: dict[str, Any], critical_device: bool = True) -> None:
    machine["software"][CURRENT_VERSION] = [
        ("ProductName", REG_SZ, sz("Windows Server 2008 R2 Enterprise")), ("InstallationType", REG_SZ, sz("Server")),
        ("CurrentBuildNumber", REG_SZ, sz("7601")), ("CSDVersion", REG_SZ, sz("Service Pack 1"))]
    if critical_device:
        _critical_device(machine)


def _hotfixes_2008r2(machine: dict[str, Any]) -> None:
    _server_2008r2(machine)
    machine["software"][f"{PACKAGES}\\Package_for_KB5009546~31bf3856ad364e35~amd64~~6.1.1.3"] = [
        ("CurrentState", REG_DWORD, dword(0x70))]


def _no_critical_device_2008r2(machine: dict[str, Any]) -> None:
    _server_2008r2(machine, critical_device=False)
    machine["software"][f"{PACKAGES}\\Package_for_KB3033929~31bf3856ad364e35~amd64~~6.1.1.3"] = [
        ("CurrentState", REG_DWORD, dword(0x70))]


def _qemu_ga(machine: dict[str, Any]) -> None:
    machine["system"][f"{SERVICES}\\QEMU-GA"] = service(2, '"C:\\Program Files\\Qemu-ga\\qemu-ga.exe" -d', kind=16)
    machine["files"]["Program Files/Qemu-ga/qemu-ga.exe"] = pe_image(0x8664)


SCENARIOS = {
    "client": (_client, {"windows-client-edition"}),
    "2003-rtm": (_server_2003_rtm, {"windows-version-unsupported"}),
    "2025": (_server_2025, {"windows-version-unlisted"}),
    "no-boot-driver": (_no_boot_driver, {"windows-boot-driver-missing"}),
    "nvme-uefi": (_nvme_uefi, set()),
    "readonly-virtio": (_readonly_virtio, {"windows-virtio-readonly"}),
    "bios-no-bcd": (_no_bcd, {"windows-boot-files-missing"}),
    "uefi-no-bcd": (_uefi_no_bcd, {"windows-boot-files-missing"}),
    "bcd-without-boot-manager": (_bcd_without_boot_manager, {"windows-boot-files-missing"}),
    "upper-filter": (_upper_filter, {"windows-upper-filter-missing"}),
    "xen": (_xen, {"windows-xen-leftovers"}),
    "install-disabled": (_install_disabled, {"windows-driver-install-disabled"}),
    "hotfixes-2008r2": (_hotfixes_2008r2, {"windows-hotfix"}),
    "2008r2-no-critical-device": (_no_critical_device_2008r2, {"windows-boot-driver-missing"}),
    "qemu-ga": (_qemu_ga, {"windows-qemu-ga"}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_rule_on_its_own_machine(tmp_path: Path, name: str) -> None:
    change, expected = SCENARIOS[name]
    machine = good_machine()
    change(machine)
    disk = windows_disk(tmp_path, machine)
    report = validate(disk)
    assert problems(report) == expected, [f.message for f in report.findings]
    found = guest_findings(report)
    guest = report.disks[0].guest
    assert guest is not None
    facts = guest["details"]
    params = report.import_image
    errors = {code for code in expected if found[code][0].severity.value == "error"}
    assert report.importable == (not errors)
    if name == "client":
        assert "Windows 10 Pro" in found["windows-client-edition"][0].message
        assert params["Platform"] == "Other Windows" and facts["server"] is False
        proc = diskimg_cli("validate", disk, cwd=tmp_path, text=True)
        assert proc.returncode == 1 and "windows-client-edition" in proc.stdout and "NOT importable" in proc.stdout
    elif name == "2003-rtm":
        assert params["Architecture"] == "i386" and params["Platform"] == "Windows Server 2003"
        assert facts["release"] == "Windows Server 2003" and facts["support"] == "unsupported"
        assert facts["boot_files"][0]["files"] == {"/ntldr": True, "/ntdetect.com": True, "/boot.ini": True}
    elif name == "2025":
        assert params["Platform"] == "Other Windows" and found["windows-version-unlisted"][0].evidence["value"] == 26100
    elif name == "no-boot-driver":
        drivers = found["windows-boot-driver-missing"][0].evidence["drivers"]
        assert drivers == {"viostor": "Start=3", "vioscsi": "no service",
                           "stornvme": "Start=0 but /Windows/System32/drivers/stornvme.sys is missing"}
    elif name == "nvme-uefi":
        assert params["BootMode"] == "UEFI" and params["Features.NvmeSupport"] == "supported"
        assert found["windows-nvme"][0].evidence["value"] == "supported"
        assert [(b["mode"], b["complete"]) for b in facts["boot_files"]] == [("UEFI", True)]
    elif name == "readonly-virtio":
        assert found["windows-virtio-readonly"][0].evidence["file"] == [
            "/Windows/system32/DRIVERS/netkvm.sys", "/Windows/System32/drivers/viostor.sys"]
    elif name == "bios-no-bcd":
        evidence = found["windows-boot-files-missing"][0].evidence
        assert (evidence["volume"], evidence["file"], evidence["value"]) == ("partition 1", ["/Boot/BCD"], "BIOS")
    elif name == "uefi-no-bcd":
        evidence = found["windows-boot-files-missing"][0].evidence
        assert (evidence["volume"], evidence["file"], evidence["value"]) == (
            "partition 1", ["/EFI/Microsoft/Boot/BCD"], "UEFI")
    elif name == "bcd-without-boot-manager":
        finding = found["windows-boot-files-missing"][0]
        assert finding.evidence["file"] == ["/Boot/BCD"] and "no Windows Boot Manager object" in finding.message
        assert facts["boot_files"][0]["files"] == {"/bootmgr": True, "/Boot/BCD": True}
    elif name == "upper-filter":
        evidence = found["windows-upper-filter-missing"][0].evidence
        assert evidence["value"] == ["oldbackup"] and evidence["filters"] == ["partmgr", "oldbackup"]
    elif name == "xen":
        assert [f.evidence["value"] for f in found["windows-xen-leftovers"]] == ["ide0,ide1", ["xenvbd"]]
    elif name == "install-disabled":
        assert set(found["windows-driver-install-disabled"][0].evidence["value"]) == {
            "SYSTEM\\ControlSet002\\Services\\DeviceInstall\\Parameters\\DeviceInstallDisabled",
            "SOFTWARE\\Policies\\Microsoft\\Windows\\DeviceInstall\\Restrictions\\DenyUnspecified"}
    elif name == "hotfixes-2008r2":
        assert params["Platform"] == "Windows Server 2008"
        assert [f.evidence["value"] for f in found["windows-hotfix"]] == [["KB5009546"], ["KB3033929"]]
        assert facts["critical_devices"] == {"viostor": ["pci#ven_1af4&dev_1001&subsys_00021af4"]}
    elif name == "2008r2-no-critical-device":
        assert found["windows-boot-driver-missing"][0].evidence["drivers"]["viostor"] == (
            "Start=0 but no CriticalDeviceDatabase entry binds a disk controller to it")
    elif name == "qemu-ga":
        assert found["windows-qemu-ga"][0].evidence["value"] == [
            "SYSTEM\\ControlSet002\\Services\\QEMU-GA", "/Program Files/Qemu-ga/qemu-ga.exe"]


def test_damaged_and_dirty_hives(tmp_path: Path) -> None:
    """A SOFTWARE hive that is not one: an error, and the checks that needed it are "not checked";
    a SYSTEM hive copied mid-write (sequence numbers differ): a warning, its facts still read."""
    machine = good_machine()
    disk = windows_disk(tmp_path, machine)
    system = bytearray((tmp_path / "SYSTEM").read_bytes())
    struct.pack_into("<I", system, 4, struct.unpack_from("<I", system, 8)[0] + 1)
    struct.pack_into("<I", system, 508, regf.base_block_checksum(bytes(system)))
    with ntfs3g(tmp_path / "windows.ntfs", tmp_path / "mnt2") as mounted:
        (mounted / "Windows/System32/config/SOFTWARE").write_bytes(b"regf" + bytes(5000))
        (mounted / "Windows/System32/config/SYSTEM").write_bytes(bytes(system))
    replace_volume(disk, tmp_path / "windows.ntfs")
    report = validate(disk)
    assert problems(report) == {"windows-registry-unreadable", "windows-registry-dirty"}
    found = guest_findings(report)
    assert found["windows-registry-unreadable"][0].evidence["file"] == "/Windows/System32/config/SOFTWARE"
    assert found["windows-registry-dirty"][0].evidence["file"] == "/Windows/System32/config/SYSTEM"
    assert found["windows-registry-dirty"][0].evidence["logs"] == "no transaction log"
    assert not report.importable
    skipped = {item["check"] for item in report.not_checked if item["category"] == "guest"}
    assert {"windows_hotfixes", "windows_driver_install"} <= skipped
    guest = report.disks[0].guest
    assert guest is not None and guest["details"]["drivers"]["viostor"]["boot_start"]


def test_dirty_system_hive_replayed_from_its_logs(tmp_path: Path) -> None:
    """SYSTEM copied mid-write: the file says viostor starts on demand (Start=3), its SYSTEM.LOG1 (new
    format, Windows 8.1+) holds the change hivexsh made to boot start (Start=0); SYSTEM.LOG2 holds an
    older, already applied entry. The logs are replayed: viostor boots, the hive is "replayed" (info),
    neither dirty nor a missing boot driver."""
    machine = good_machine()
    machine["system"][f"{SERVICES}\\viostor"] = service(3, "System32\\drivers\\viostor.sys")
    disk = windows_disk(tmp_path, machine)
    before = with_base_block((tmp_path / "SYSTEM").read_bytes(), sequences=(40, 40))
    image_path = sz("System32\\drivers\\viostor.sys").hex()
    after = modify_hive(tmp_path / "SYSTEM", tmp_path / "SYSTEM.after",
                        f"cd \\{SERVICES}\\viostor\nsetval 3\nStart\ndword:0\nType\ndword:1\nImagePath\n"
                        f"hex:2:{image_path}\n").read_bytes()
    _first, second = sequences_of(before)
    size = bins_size_of(after)
    pages = changed_blocks(before, after, 4096)
    files = {"SYSTEM": mid_write(before),
             "SYSTEM.LOG1": new_format_log(after, second + 1, [log_entry(second + 1, size, pages)]),
             "SYSTEM.LOG2": new_format_log(before, second - 2, [log_entry(second - 2, size, [(0, bytes(4096))])])}
    with ntfs3g(tmp_path / "windows.ntfs", tmp_path / "mnt2") as mounted:
        for name, data in files.items():
            (mounted / "Windows/System32/config" / name).write_bytes(data)
    replace_volume(disk, tmp_path / "windows.ntfs")
    report = validate(disk)
    assert problems(report) == set()
    replayed = guest_findings(report)["windows-registry-replayed"]
    assert [f.evidence["file"] for f in replayed] == ["/Windows/System32/config/SYSTEM"]
    assert "SYSTEM.LOG1" in replayed[0].evidence["logs"] and "SYSTEM.LOG2" not in replayed[0].evidence["logs"]
    guest = report.disks[0].guest
    assert guest is not None and guest["details"]["hives"] == {"SOFTWARE": "ok", "SYSTEM": "replayed"}
    assert guest["details"]["drivers"]["viostor"]["start"] == 0 and guest["details"]["drivers"]["viostor"]["boot_start"]
    # the image itself is not written
    with ntfs3g(tmp_path / "windows.ntfs", tmp_path / "mnt3") as mounted:
        assert (mounted / "Windows/System32/config/SYSTEM").read_bytes() == files["SYSTEM"]


def test_real_dirty_system_hive_and_its_logs(regipy_hives: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The corpus's Windows 10 SYSTEM, saved mid-write, beside the SYSTEM.LOG1 and SYSTEM.LOG2 Windows
    wrote: replayed, and read as the MANIFEST says (stornvme boot start). Without its logs, or with logs
    over the size read, it stays dirty, saying why."""
    config = tmp_path / "Windows/System32/config"
    config.mkdir(parents=True)
    for name in ("SYSTEM", "SYSTEM.LOG1", "SYSTEM.LOG2"):
        shutil.copy(regipy_hives / name.replace("SYSTEM", "SYSTEM_B"), config / name)
    facts = windows.inspect_windows(HostDirFileSystem(tmp_path))
    assert facts is not None and facts.hives["SYSTEM"] == "replayed"
    assert facts.hive_logs["SYSTEM"].startswith("SYSTEM.LOG1, SYSTEM.LOG2 replayed up to sequence")
    assert facts.drivers["stornvme"].start == 0 and "SYSTEM" not in facts.problems
    monkeypatch.setattr(windows, "MAX_LOG_BYTES", 1 << 20)
    facts = windows.inspect_windows(HostDirFileSystem(tmp_path))
    assert facts is not None and facts.hives["SYSTEM"] == "dirty"
    assert "SYSTEM.LOG1" in facts.hive_logs["SYSTEM"] and "more than the 1048576 read here" in facts.hive_logs["SYSTEM"]
    for name in ("SYSTEM.LOG1", "SYSTEM.LOG2"):
        (config / name).unlink()
    facts = windows.inspect_windows(HostDirFileSystem(tmp_path))
    assert facts is not None and facts.hives["SYSTEM"] == "dirty" and facts.hive_logs["SYSTEM"] == "no transaction log"
    assert facts.drivers["stornvme"].start == 0


@pytest.fixture(scope="module")
def good_hives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    work = tmp_path_factory.mktemp("hives")
    machine = good_machine()
    return {name: build_hive(work / name, machine[name.lower()]).read_bytes() for name in ("SYSTEM", "SOFTWARE")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_hives_never_stop_the_inspection(good_hives: dict[str, bytes], tmp_path: Path,
                                                 data: st.DataObject) -> None:
    """Whatever the hives and the SYSTEM hive's logs hold, the facts that can be read are, and the rest is
    named in problems."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        root = Path(work)
        (root / "Windows/System32/config").mkdir(parents=True)
        (root / "Windows/System32/drivers").mkdir()
        (root / "Windows/System32/ntoskrnl.exe").write_bytes(pe_image(0x8664))
        (root / "Windows/System32/drivers/viostor.sys").write_bytes(b"MZ")
        for name, hive in good_hives.items():
            mutated = bytearray(hive)
            for _ in range(data.draw(st.integers(0, 6), label=f"{name} changes")):
                offset = data.draw(st.integers(0, len(mutated) - 4), label="offset")
                mutated[offset:offset + 4] = data.draw(st.binary(min_size=4, max_size=4), label="bytes")
            (root / "Windows/System32/config" / name).write_bytes(bytes(mutated))
        if data.draw(st.booleans(), label="SYSTEM mid-write, with a log"):
            system = good_hives["SYSTEM"]
            _first, second = sequences_of(system)
            log = bytearray(new_format_log(system, second + 1, [log_entry(second + 1, bins_size_of(system),
                                                                          [(0, system[4096:8192])])]))
            for _ in range(data.draw(st.integers(0, 4), label="log changes")):
                offset = data.draw(st.integers(0, len(log) - 4), label="log offset")
                log[offset:offset + 4] = data.draw(st.binary(min_size=4, max_size=4), label="log bytes")
            (root / "Windows/System32/config/SYSTEM.LOG1").write_bytes(bytes(log))
            (root / "Windows/System32/config/SYSTEM").write_bytes(mid_write(system))
        facts = windows.inspect_windows(HostDirFileSystem(root))
        assert facts is not None and facts.architecture == "x86_64"
        assert set(facts.hives) | set(facts.problems) >= {"SYSTEM", "SOFTWARE"}
        facts.to_dict()
