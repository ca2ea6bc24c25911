"""diskimg.validate: verdicts and findings on disks made the way users make them.

Every test asserts the verdict and that the right finding (by code) is reported with its evidence.
Base disks are built once per module (sfdisk/sgdisk, mkfs.* on sparse partition files copied in
with dd, ESPs populated with mtools) and copied for each damaged variant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import ImageNotFound, UsageError
from diskimg.formats.vhd import structures as vhdmod
from diskimg.host.files import HostFile
from diskimg.validation import RULES, Report, Severity, list_rules, validate
from diskimg.validation.rules import RULES_BY_CODE

from .support.corpus import NO_CORPUS, corpus_entries, corpus_file
from .support.disks import (
    WINDOWS_BOOT_CODE,
    copy_in,
    gpt_4k,
    loop_device,
    luks2_header,
    lvm_pv_label,
    make_esp,
    mkfs_into,
    sfdisk,
    sgdisk,
    write_boot_code,
)
from .support.files import blank, read_at, read_u64, sparse_copy, write_at
from .support.images import first_l2_table, first_refcount_block, qcow2_header
from .support.tools import ROOT, diskimg_cli, qemu_img, qemu_io, run
from .support.units import GiB, MiB

TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "mkfs.xfs", "mkfs.fat", "mcopy", "mkswap", "qemu-img")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs " + ", ".join(TOOLS))

FALLBACK = {"EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(64), "EFI/debian/grubx64.efi": b"MZ"}


def assert_finding(report: Report, code: str, severity: str | None = None, **evidence) -> diskimg.Finding:
    """The one finding with ``code``; its severity and evidence values as given."""
    found = report.find(code)
    assert found, f"no {code} finding; got {[(f.code, f.message) for f in report.findings]}"
    finding = found[0]
    if severity is not None:
        assert finding.severity.value == severity
    assert finding.severity is RULES_BY_CODE[code].severity
    for key, value in evidence.items():
        assert finding.evidence.get(key) == value, (key, finding.evidence)
    assert finding.message
    return finding


def errors(report: Report) -> set[str]:
    return report.codes(Severity.ERROR)


# -- base disks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("base")


@pytest.fixture(scope="module")
def bios_mbr(base) -> Path:
    """64 MiB: MBR, one active Linux partition with ext4, GRUB boot code in sector 0."""
    disk = blank(base / "bios.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,,83,*\n")
    mkfs_into(disk, MiB, 63 * MiB, "mkfs.ext4", "-q", "-F", "-L", "root")
    write_boot_code(disk)
    return disk


@pytest.fixture(scope="module")
def uefi_gpt(base) -> Path:
    """400 MiB (sparse): GPT, a 64 MiB ESP (FAT32 with EFI/BOOT/BOOTX64.EFI) and XFS on the rest."""
    disk = blank(base / "uefi.raw", 400 * MiB)
    sgdisk(disk, "-n1:2048:+64M", "-t1:ef00", "-n2:0:0", "-t2:8300")
    esp = make_esp(base / "esp.img", 64 * MiB, FALLBACK)
    copy_in(disk, esp, MiB)
    size = (400 * MiB - 65 * MiB - 34 * 512) // MiB * MiB
    mkfs_into(disk, 65 * MiB, size, "mkfs.xfs", "-q", "-f", "-L", "root")
    return disk


@pytest.fixture(scope="module")
def hybrid_gpt(base) -> Path:
    """GPT with a BIOS boot partition, an ESP (FAT16) and ext4, plus GRUB boot code: boots both ways."""
    disk = blank(base / "both.raw", 96 * MiB)
    sgdisk(disk, "-n1:2048:+1M", "-t1:ef02", "-n2:0:+32M", "-t2:ef00", "-n3:0:0", "-t3:8300")
    copy_in(disk, make_esp(base / "esp2.img", 32 * MiB, FALLBACK), 2 * MiB)
    mkfs_into(disk, 34 * MiB, 60 * MiB, "mkfs.ext4", "-q", "-F")
    write_boot_code(disk, core_lba=2048)  # GRUB's core image in the BIOS boot partition
    return disk


@pytest.fixture()
def here(tmp_path, monkeypatch) -> Path:
    """Work in tmp_path, so that hints name files as the user typed them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- good disks ----------------------------------------------------------------------------------------


def test_bios_mbr_disk_is_importable(bios_mbr):
    report = validate(bios_mbr)
    assert report.importable and not errors(report)
    facts = report.facts
    assert facts.format == "raw" and facts.api_format == "RAW" and facts.virtual_size == 64 * MiB
    assert facts.partition_table["scheme"] == "mbr"
    part = facts.partition_table["partitions"][0]
    assert part["bootable"] and part["file_system"]["type"] == "ext4" and part["file_system"]["label"] == "root"
    assert facts.boot_modes == ["BIOS"]
    assert_finding(report, "boot-mode", "info", value="BIOS")
    assert_finding(report, "size-system-small", "warning", virtual_size=64 * MiB)
    assert_finding(report, "disk-image-size", "info", value=1)
    assert report.import_image == {"DiskDeviceMapping": [{"Format": "RAW", "DiskImageSize": 1}], "BootMode": "BIOS",
                                   "Platform": None, "OSType": None, "Architecture": None}
    assert not report.not_checked
    # strict: the warnings count
    assert not validate(bios_mbr, strict=True).importable
    data = json.loads(json.dumps(report.to_dict()))
    assert data["importable"] is True and data["summary"]["errors"] == 0
    assert {"code", "severity", "category", "message", "evidence", "hint", "disk", "role"} <= set(data["findings"][0])
    text = report.render_text()
    assert "verdict: importable" in text and "BootMode=BIOS" in text


@pytest.mark.parametrize("fmt,api,options", [("qcow2", "QCOW2", []), ("vpc", "VHD", ["-o", "subformat=dynamic"]),
                                             ("vpc", "VHD", ["-o", "subformat=fixed"])])
def test_same_disk_as_qcow2_and_vhd(bios_mbr, tmp_path, fmt, api, options):
    image = tmp_path / f"disk.{fmt}"
    qemu_img("convert", "-O", fmt, *options, bios_mbr, image)
    report = validate(image)
    assert report.importable, report.render_text()
    assert report.import_image["DiskDeviceMapping"] == [{"Format": api, "DiskImageSize": 1}]
    assert report.facts.partition_table["partitions"][0]["file_system"]["type"] == "ext4"
    assert report.facts.integrity["clean"] is True


def test_uefi_gpt_disk(uefi_gpt):
    report = validate(uefi_gpt)
    assert report.importable and not errors(report)
    assert report.facts.boot_modes == ["UEFI"]
    assert report.import_image["BootMode"] == "UEFI"
    assert_finding(report, "boot-mode", value="UEFI")
    assert "EFI/BOOT/BOOTX64.EFI" in report.facts.efi_loaders
    root = report.facts.partition_table["partitions"][1]["file_system"]
    assert root["type"] == "xfs" and root["version"] == "V5"
    assert validate(uefi_gpt, boot_mode="UEFI").importable
    wrong = validate(uefi_gpt, boot_mode="BIOS")
    assert not wrong.importable
    finding = assert_finding(wrong, "boot-mode-unsupported", "error", value="BIOS", supported=["UEFI"])
    assert finding.hint == "import with BootMode=UEFI"


def test_disk_that_boots_both_ways(hybrid_gpt):
    report = validate(hybrid_gpt)
    assert report.importable
    assert report.facts.boot_modes == ["BIOS", "UEFI"] and report.import_image["BootMode"] == "UEFI"
    finding = assert_finding(report, "boot-mode", value="UEFI")
    assert "UEFI-Preferred" in finding.message
    bios = validate(hybrid_gpt, boot_mode="BIOS")
    assert bios.importable and bios.import_image["BootMode"] == "BIOS"


def test_bios_boot_partition_without_mbr_code(hybrid_gpt, tmp_path):
    disk = sparse_copy(hybrid_gpt, tmp_path / "nocode.raw")
    write_at(disk, 0, bytes(440))
    report = validate(disk, boot_mode="BIOS")
    assert report.importable  # the BIOS boot partition is there: a warning
    assert_finding(report, "bios-boot-code-missing", "warning", partition=1, offset=0)


# -- boot problems ---------------------------------------------------------------------------------------


def test_esp_without_the_fallback_loader(uefi_gpt, tmp_path):
    """A new instance has empty NVRAM: its firmware boots only EFI/BOOT/BOOTX64.EFI (UEFI spec 3.5.1)."""
    disk = sparse_copy(uefi_gpt, tmp_path / "d.raw")
    copy_in(disk, make_esp(tmp_path / "esp.img", 32 * MiB, {"EFI/centos/shimx64.efi": b"MZ"}), MiB)
    for report in (validate(disk), validate(disk, boot_mode="UEFI")):
        assert not report.importable and report.facts.boot_modes == []
        finding = assert_finding(report, "esp-no-loader", "error", partition=[1], value=["EFI/centos/shimx64.efi"])
        assert "EFI/BOOT/BOOTX64.EFI" in finding.message and "--removable" in finding.hint
        assert not report.find("boot-none") and not report.find("boot-mode-unsupported")


def test_gpt_disk_with_an_empty_esp_and_no_system(tmp_path):
    """Issue 12: an ESP with no EFI loader at all on a disk with no operating system boots nothing."""
    disk = blank(tmp_path / "d.raw", 64 * MiB)
    sgdisk(disk, "-n1:2048:+32M", "-t1:ef00", "-n2:0:0", "-t2:8300")
    copy_in(disk, make_esp(tmp_path / "esp.img", 32 * MiB, {"EFI/README.txt": b"nothing"}), MiB)
    report = validate(disk)
    assert not report.importable
    assert "no .efi file at all" in assert_finding(report, "esp-no-loader", "error", value=None).message


def test_esp_without_the_fallback_loader_on_a_disk_that_boots_bios(hybrid_gpt, tmp_path):
    """The missing UEFI path does not matter when the disk is imported with BootMode=BIOS, which it then is."""
    disk = sparse_copy(hybrid_gpt, tmp_path / "d.raw")
    copy_in(disk, make_esp(tmp_path / "esp.img", 32 * MiB, {"EFI/debian/grubx64.efi": b"MZ"}), 2 * MiB)
    report = validate(disk)
    assert report.importable and report.facts.boot_modes == ["BIOS"] and report.import_image["BootMode"] == "BIOS"
    assert "UEFI would not" in assert_finding(report, "boot-mode", "info", value="BIOS").message
    assert not report.find("esp-no-loader") and validate(disk, boot_mode="BIOS").importable
    assert_finding(validate(disk, boot_mode="UEFI"), "esp-no-loader", "error")


def test_esp_that_is_not_fat(uefi_gpt, tmp_path):
    disk = sparse_copy(uefi_gpt, tmp_path / "d.raw")
    write_at(disk, MiB, bytes(64 * 1024))
    report = validate(disk)
    assert not report.importable
    assert_finding(report, "esp-not-fat", "warning", partition=1, value=None)
    assert_finding(report, "boot-none", "error")


def test_no_boot_loader_at_all(bios_mbr, tmp_path):
    disk = sparse_copy(bios_mbr, tmp_path / "d.raw")
    write_at(disk, 0, bytes(440))
    report = validate(disk)
    assert not report.importable and report.import_image["BootMode"] is None
    finding = assert_finding(report, "boot-none", "error")
    assert finding.evidence["bios"]["mbr_boot_code"] is False and finding.evidence["supported"] == []
    assert not validate(disk, role="data").find("boot-none")  # boot does not matter for a data disk


def test_gpt_bios_without_a_bios_boot_partition(tmp_path):
    disk = blank(tmp_path / "g.raw", 32 * MiB)
    sgdisk(disk, "-n1:2048:0", "-t1:8300")
    write_boot_code(disk)
    report = validate(disk)
    assert report.facts.boot_modes == ["BIOS"]
    assert_finding(report, "gpt-bios-no-bios-boot-partition", "warning", value="grub")


def test_windows_mbr_code_without_an_active_partition(tmp_path):
    disk = blank(tmp_path / "w.raw", 32 * MiB)
    sfdisk(disk, "label: dos\n2048,,7\n")
    mkfs_into(disk, MiB, 31 * MiB, "mkfs.ext4", "-q", "-F")
    write_boot_code(disk, WINDOWS_BOOT_CODE)
    report = validate(disk)
    assert_finding(report, "mbr-no-active-partition", "error", value="windows", offset=446)


# -- the BIOS boot chain, built by the real tools --------------------------------------------------------

SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")


def loop_devices_missing() -> str | None:
    """Why grub-install cannot be run on a loop device here, None when it can."""
    if shutil.which("grub-install") is None or not Path("/usr/lib/grub/i386-pc/boot.img").exists():
        return "grub-install for i386-pc (package grub-pc-bin) is not installed"
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists() or shutil.which("losetup") is None:
        return "loop devices are unavailable (needs root and /dev/loop-control)"
    return None


@pytest.fixture(scope="module")
def grub_bios_disk(base) -> Path:
    """An MBR disk whose BIOS chain grub-install wrote: boot.img in the MBR, core.img in the gap after it."""
    reason = loop_devices_missing()
    if reason:
        pytest.skip(reason)
    disk = blank(base / "grub-bios.raw", 32 * MiB)
    sfdisk(disk, "label: dos\n2048,,83,*\n")
    mkfs_into(disk, MiB, 31 * MiB, "mkfs.ext4", "-q", "-F")
    mount = base / "grub-mnt"
    mount.mkdir()
    with loop_device(disk) as whole, loop_device(disk, offset=MiB) as partition:
        if subprocess.run(["mount", partition, mount], capture_output=True).returncode != 0:
            pytest.skip("the ext4 partition could not be mounted through a loop device")
        try:
            run("grub-install", "--target=i386-pc", f"--boot-directory={mount / 'boot'}", whole)
        finally:
            run("umount", mount)
    return disk


def test_grub_chain_written_by_grub_install(grub_bios_disk):
    report = validate(grub_bios_disk)
    assert report.facts.boot_modes == ["BIOS"] and not report.find("bios-boot-chain-broken")
    chain = report.find("boot-mode")[0].evidence["bios"]["chain"]
    assert chain["loader"] == "grub" and chain["problem"] is None


def test_grub_core_image_zeroed(grub_bios_disk, tmp_path):
    """grub-install embeds core.img in the gap after the MBR (LBA 1 up to the first partition); zeroed,
    the machine prints 'GRUB' and hangs."""
    whole = sparse_copy(grub_bios_disk, tmp_path / "zeroed.raw")
    write_at(whole, 512, bytes(MiB - 512))
    rest = sparse_copy(grub_bios_disk, tmp_path / "rest.raw")
    write_at(rest, 1024, bytes(MiB - 1024))  # diskboot.img is left, the sectors its blocklist names are gone
    for disk, where in ((whole, 512), (rest, 1024)):
        report = validate(disk)
        assert not report.importable and report.facts.boot_modes == []
        finding = assert_finding(report, "bios-boot-chain-broken", "error", value="grub", offset=where)
        assert "zeroed" in finding.message and "grub-install" in finding.hint
        assert not report.find("boot-none")
        assert_finding(validate(disk, boot_mode="BIOS"), "bios-boot-chain-broken", "error")


def test_grub_core_image_zeroed_in_the_bios_boot_partition(hybrid_gpt, tmp_path):
    """On GPT the core image lies in the BIOS boot partition; zeroed, only UEFI is left."""
    disk = sparse_copy(hybrid_gpt, tmp_path / "d.raw")
    write_at(disk, MiB, bytes(MiB))
    report = validate(disk)
    assert report.importable and report.facts.boot_modes == ["UEFI"]
    assert "BIOS would not" in assert_finding(report, "boot-mode", value="UEFI").message
    finding = assert_finding(validate(disk, boot_mode="BIOS"), "bios-boot-chain-broken", "error", offset=MiB)
    assert "LBA 2048" in finding.message


def test_boot_mode_asked_for_that_the_disk_lacks(bios_mbr):
    finding = assert_finding(validate(bios_mbr, boot_mode="UEFI"), "boot-mode-unsupported", "error", value="UEFI")
    assert "the disk has no EFI system partition" in finding.message  # issue 12: was "has no an EFI ..."


def test_windows_mbr_with_an_ntfs_partition_from_mkntfs(tmp_path):
    """mkntfs, like mkfs.fat, writes boot code that prints 'This is not a bootable disk'."""
    if shutil.which("mkntfs") is None:
        pytest.skip("mkntfs (package ntfs-3g) is not installed")
    disk = blank(tmp_path / "w.raw", 40 * MiB)
    sfdisk(disk, "label: dos\n2048,,7,*\n")
    mkfs_into(disk, MiB, 39 * MiB, "mkntfs", "-q", "-F", "-s", "512", "-p", "2048", "-H", "255", "-S", "63")
    write_boot_code(disk, WINDOWS_BOOT_CODE)
    assert b"This is not a bootable disk" in read_at(disk, MiB, 512)
    report = validate(disk)
    assert report.disks[0].partition_table["mbr_boot_loader"] == "windows"
    assert_finding(report, "bios-boot-chain-broken", "error", value="windows", partition=1)


def syslinux_mbr_disk(tmp_path: Path, name: str, partition: Path | None, mkfs: tuple[str, ...] = ()) -> Path:
    """syslinux's mbr.bin in sector 0 (as its documentation says: dd bs=440 count=1) and one active partition."""
    if not SYSLINUX_MBR.exists():
        pytest.skip("syslinux's mbr.bin (package syslinux-common) is not installed")
    disk = blank(tmp_path / name, 40 * MiB)
    sfdisk(disk, "label: dos\n2048,,c,*\n")
    if mkfs:
        mkfs_into(disk, MiB, 39 * MiB, *mkfs, tmp=tmp_path)
    if partition is not None:
        copy_in(disk, partition, MiB)
    write_at(disk, 0, SYSLINUX_MBR.read_bytes()[:440])
    return disk


def test_syslinux_mbr_with_an_ext4_active_partition(tmp_path):
    """mbr.bin loads the active partition's first sector; ext4 leaves it empty: 'Missing operating system'."""
    disk = syslinux_mbr_disk(tmp_path, "ext4.raw", None, ("mkfs.ext4", "-q", "-F"))
    report = validate(disk)
    assert report.disks[0].partition_table["mbr_boot_loader"] == "syslinux"
    assert not report.importable
    finding = assert_finding(report, "bios-boot-chain-broken", "error", value="syslinux", partition=1, offset=MiB)
    assert "55 AA" in finding.message


def test_syslinux_mbr_with_a_fat_partition_from_mkfs(tmp_path):
    """mkfs.fat writes a boot sector whose code prints 'This is not a bootable disk' and waits for a key."""
    disk = syslinux_mbr_disk(tmp_path, "fat.raw", None, ("mkfs.fat", "-F", "16"))
    assert b"This is not a bootable disk" in read_at(disk, MiB, 512)  # the oracle: what mkfs.fat wrote
    report = validate(disk)
    assert not report.importable
    assert "not a bootable disk" in assert_finding(report, "bios-boot-chain-broken", "error", partition=1).message


def test_syslinux_mbr_with_syslinux_installed(tmp_path):
    if shutil.which("syslinux") is None:
        pytest.skip("syslinux (package syslinux) is not installed")
    fat = blank(tmp_path / "fat.img", 39 * MiB)
    run("mkfs.fat", "-F", "16", fat)
    run("syslinux", "--install", fat)
    report = validate(syslinux_mbr_disk(tmp_path, "syslinux.raw", fat))
    assert report.facts.boot_modes == ["BIOS"] and not report.find("bios-boot-chain-broken")
    assert not report.find("mbr-no-active-partition")


# -- no partition table -----------------------------------------------------------------------------------


def test_bare_file_system_as_system_and_as_data_disk(tmp_path):
    image = blank(tmp_path / "bare.raw", 64 * MiB)
    run("mkfs.ext4", "-q", "-F", image)
    report = validate(image)
    assert not report.importable
    finding = assert_finding(report, "no-partition-table", "error", value="ext4", offset=0)
    assert "bare file system" in finding.message and "--role data" in finding.hint
    assert report.facts.file_system["type"] == "ext4"
    data = validate(image, role="data")
    assert data.importable
    assert_finding(data, "data-disk-unpartitioned", "info", value="ext4")
    assert data.import_image["BootMode"] is None


def test_boot_sector_without_partitions(tmp_path):
    image = blank(tmp_path / "grub.raw", 8 * MiB)
    write_boot_code(image)
    write_at(image, 510, b"\x55\xaa")
    report = validate(image)
    assert_finding(report, "no-partition-table", "error", value="mbr-empty")
    assert not report.find("boot-none")


def test_empty_disk(tmp_path):
    image = blank(tmp_path / "zero.raw", 8 * MiB)
    finding = assert_finding(validate(image), "no-partition-table", value="empty")
    assert "all zeros" in finding.message


# -- file systems -----------------------------------------------------------------------------------------


def mbr_disk_with(tmp_path: Path, second_type: str, size: int = 96 * MiB) -> Path:
    disk = blank(tmp_path / "fs.raw", size)
    sfdisk(disk, f"label: dos\n2048,65536,83,*\n,,{second_type}\n")
    mkfs_into(disk, MiB, 32 * MiB, "mkfs.ext4", "-q", "-F", tmp=tmp_path)
    write_boot_code(disk)
    return disk


def test_lvm_physical_volume_on_the_system_disk(tmp_path):
    disk = mbr_disk_with(tmp_path, "8e")
    write_at(disk, 33 * MiB + 512, lvm_pv_label(device_size=63 * MiB))
    report = validate(disk)
    assert report.importable  # a warning only
    finding = assert_finding(report, "fs-lvm", "warning", partition=2, file_system="lvm2", type="0x8e")
    assert finding.evidence["uuid"] == "abcdef-0123-4567-89AB-CDEF-0123-456789"
    assert not validate(disk, role="data").find("fs-lvm")


def test_swap_partition(tmp_path):
    disk = mbr_disk_with(tmp_path, "82")
    mkfs_into(disk, 33 * MiB, 63 * MiB, "mkswap", tmp=tmp_path)
    assert_finding(validate(disk), "fs-swap-partition", "warning", partition=2, file_system="swap")


def test_luks_partition_on_the_system_disk(tmp_path):
    disk = mbr_disk_with(tmp_path, "83")
    write_at(disk, 33 * MiB, luks2_header("0a1b2c3d-0000-4000-8000-000000000001", "cryptroot"))
    report = validate(disk)
    assert not report.importable
    assert_finding(report, "fs-encrypted", "error", partition=2, file_system="luks", label="cryptroot")
    assert validate(disk, role="data").importable


def test_ext4_needing_recovery_and_with_old_rule_features(tmp_path):
    disk = blank(tmp_path / "e.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,,83,*\n")
    part = mkfs_into(disk, MiB, 63 * MiB, "mkfs.ext4", "-q", "-F", "-O", "quota,project", "-I", "256", tmp=tmp_path)
    write_boot_code(disk)
    report = validate(disk)
    assert report.importable
    assert_finding(report, "fs-ext4-project-quota", "warning", partition=1, value=["project", "quota"])
    # issue 13 #8: mke2fs's default ext4 has '64bit' (its own dumpe2fs says so): a fact, never a warning
    dumped = subprocess.run(["dumpe2fs", "-h", part], capture_output=True, text=True).stdout
    assert "64bit" in next(line for line in dumped.splitlines() if line.startswith("Filesystem features:"))
    assert_finding(report, "fs-ext4-64bit", "info", partition=1)
    assert "fs-ext4-64bit" not in {f.code for f in report.warnings}
    sb = bytearray(read_at(disk, MiB + 1024, 1024))
    struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] | 0x4)
    write_at(disk, MiB + 1024, bytes(sb))
    report = validate(disk)
    assert not report.importable
    assert_finding(report, "fs-needs-recovery", "error", partition=1, value="needs_recovery", offset=MiB)


def test_full_system_file_system(bios_mbr, tmp_path):
    disk = sparse_copy(bios_mbr, tmp_path / "full.raw")
    sb = bytearray(read_at(disk, MiB + 1024, 1024))
    struct.pack_into("<I", sb, 0x0C, 10)  # free blocks: 10
    write_at(disk, MiB + 1024, bytes(sb))
    report = validate(disk)
    assert report.importable
    finding = assert_finding(report, "fs-full", "warning", partition=1)
    block = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
    assert finding.evidence["free"] == 10 * block and finding.evidence["size"] == 63 * MiB
    assert not validate(disk, role="data").find("fs-full")


def test_file_system_larger_than_its_partition(tmp_path):
    disk = blank(tmp_path / "big.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,32768,83,*\n")
    mkfs_into(disk, MiB, 48 * MiB, "mkfs.ext4", "-q", "-F", tmp=tmp_path)
    write_boot_code(disk)
    report = validate(disk)
    assert not report.importable
    assert_finding(report, "fs-larger-than-partition", "error", partition=1, fs_size=48 * MiB,
                   container_size=16 * MiB)


def test_btrfs_root_is_not_documented(tmp_path):
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs missing")
    disk = mbr_disk_with(tmp_path, "83", size=200 * MiB)
    mkfs_into(disk, 33 * MiB, 160 * MiB, "mkfs.btrfs", "-q", "-f", tmp=tmp_path)
    assert_finding(validate(disk), "fs-not-listed", "warning", partition=2, file_system="btrfs")


# -- damaged partition tables ------------------------------------------------------------------------------


def test_truncated_disk_partition_past_the_end(bios_mbr, tmp_path):
    disk = sparse_copy(bios_mbr, tmp_path / "cut.raw")
    with open(disk, "r+b") as f:
        f.truncate(40 * MiB)
    report = validate(disk)
    assert not report.importable
    finding = assert_finding(report, "partition-out-of-bounds", "error", partition=1, end=64 * MiB,
                             disk_size=40 * MiB)
    assert f"qemu-img resize -f raw {disk} {64 * MiB}" in finding.hint
    assert_finding(report, "fs-larger-than-partition") if report.find("fs-larger-than-partition") else None


def test_overlapping_partitions(tmp_path):
    disk = blank(tmp_path / "o.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,40960,83,*\n43008,20480,83\n")
    write_at(disk, 446 + 16 + 8, struct.pack("<I", 30000))
    write_boot_code(disk)
    report = validate(disk)
    assert not report.importable
    assert_finding(report, "partition-overlap", "error", partition=[1, 2], offset=30000 * 512)


def test_gpt_damage(hybrid_gpt, tmp_path):
    bad_crc = sparse_copy(hybrid_gpt, tmp_path / "crc.raw")
    write_at(bad_crc, 512 + 24, struct.pack("<Q", 7))  # "current LBA" changed, CRC left stale
    report = validate(bad_crc)
    assert not report.importable
    assert_finding(report, "gpt-header-invalid", "error", offset=512, backup_usable=True)
    assert len(report.facts.partition_table["partitions"]) == 3  # read from the backup

    no_backup = sparse_copy(hybrid_gpt, tmp_path / "nobackup.raw")
    write_at(no_backup, 96 * MiB - 512, bytes(512))
    report = validate(no_backup)
    assert report.importable and not validate(no_backup, strict=True).importable
    finding = assert_finding(report, "gpt-backup-missing", "warning", lba=96 * MiB // 512 - 1)
    assert finding.hint == f"rewrite the backup GPT at the end of the disk: sgdisk -e {no_backup}"

    no_pmbr = sparse_copy(hybrid_gpt, tmp_path / "nopmbr.raw")
    write_at(no_pmbr, 0, bytes(512))
    report = validate(no_pmbr)
    assert not report.importable
    assert_finding(report, "gpt-protective-mbr-missing", "error", offset=0, value="no 55 AA signature")


def test_gpt_for_4k_sectors(tmp_path):
    if shutil.which("fdisk") is None:
        pytest.skip("fdisk missing")
    disk = tmp_path / "4k.raw"
    gpt_4k(disk, 64 * MiB)
    report = validate(disk, role="data")
    assert not report.importable
    assert_finding(report, "gpt-4k-sectors", "error", sector_size=4096, offset=4096)


# -- containers ----------------------------------------------------------------------------------------------


def test_vmdk_is_refused_with_the_conversion_command(bios_mbr, here):
    """diskimg reads the VMDK: the guest inside is inspected as in the RAW disk it was made from,
    and the format itself is the one more error, with the exact native conversion command."""
    qemu_img("convert", "-O", "vmdk", bios_mbr, "disk.vmdk")
    report = validate("disk.vmdk")
    assert not report.importable
    finding = assert_finding(report, "format-vmdk", "error", format="vmdk")
    assert finding.hint == "diskimg convert disk.vmdk disk.qcow2 -O qcow2"
    assert "invitation-only preview" in finding.message
    assert report.import_image["DiskDeviceMapping"][0]["Format"] == "VMDK"
    raw = validate(bios_mbr)
    assert {f.code for f in report.findings} - {"format-vmdk"} == {f.code for f in raw.findings}
    assert not {item["category"] for item in report.not_checked} & {"size", "partitions", "boot"}
    # a VMDK diskimg does not read (an ESX COWD extent): only its container, converted by qemu-img
    with open("cowd.vmdk", "wb") as f:
        f.write(b"COWD" + (1).to_bytes(4, "little") + bytes(4088))
    finding = assert_finding(validate("cowd.vmdk"), "format-vmdk", "error", format="vmdk")
    assert finding.hint == "diskimg convert --backend qemu-img -f vmdk cowd.vmdk cowd.qcow2 -O qcow2"


def test_other_formats_are_refused(bios_mbr, here):
    qemu_img("convert", "-O", "qed", bios_mbr, "disk.qed")
    finding = assert_finding(validate("disk.qed"), "format-refused", "error", format="qed")
    assert finding.hint == "diskimg convert --backend qemu-img -f qed disk.qed disk.qcow2 -O qcow2"


def test_vhdx_is_refused_and_the_guest_inside_inspected(bios_mbr, here):
    """diskimg reads VHDX: the format is the error, with diskimg's own conversion command, and the
    disk inside is checked like the RAW disk it was made from."""
    qemu_img("convert", "-O", "vhdx", bios_mbr, "disk.vhdx")
    report = validate("disk.vhdx")
    assert not report.importable
    finding = assert_finding(report, "format-refused", "error", format="vhdx")
    assert finding.hint == "diskimg convert disk.vhdx disk.qcow2 -O qcow2"
    raw = validate(bios_mbr)
    assert not {item["category"] for item in report.not_checked} & {"partitions", "boot"}
    assert {f.code for f in report.findings} - {"format-refused"} == {f.code for f in raw.findings}


def test_vdi_is_refused_with_the_native_command_and_its_guest_inspected(bios_mbr, here):
    qemu_img("convert", "-O", "vdi", bios_mbr, "disk.vdi")
    report = validate("disk.vdi")
    assert not report.importable
    finding = assert_finding(report, "format-refused", "error", format="vdi", subformat="dynamic")
    assert finding.hint == "diskimg convert disk.vdi disk.qcow2 -O qcow2"
    # the disk inside was read: the same partition and file-system facts as the RAW disk's own report
    inside = {item["category"] for item in report.not_checked}
    assert not inside & {"partitions", "filesystems", "boot", "integrity"}, report.not_checked
    raw_codes = {f.code for f in validate(bios_mbr).findings}
    assert {f.code for f in report.findings} - {"format-refused"} == raw_codes
    proc = diskimg_cli("validate", "disk.vdi")
    assert proc.returncode == 1 and b"diskimg convert disk.vdi disk.qcow2 -O qcow2" in proc.stdout


def test_compressed_wrapper_is_refused_with_the_decompress_command(bios_mbr, here):
    qemu_img("convert", "-O", "vpc", bios_mbr, "disk.vhd")
    run("gzip", "-k", "disk.vhd")
    report = validate("disk.vhd.gz")
    assert not report.importable
    finding = assert_finding(report, "format-wrapped", "error", format="gzip", inner_format="vhd")
    assert finding.hint == "`gunzip -k disk.vhd.gz`, then `diskimg validate disk.vhd`"


def test_iso_is_refused(here):
    iso = bytearray(64 * 1024)
    iso[0x8000:0x8006] = b"\x01CD001"
    Path("cd.iso").write_bytes(bytes(iso))
    assert_finding(validate("cd.iso"), "format-iso", "error", format="iso9660")


def test_compressed_qcow2(bios_mbr, here):
    qemu_img("convert", "-c", "-O", "qcow2", bios_mbr, "disk.qcow2")
    report = validate("disk.qcow2")
    assert report.importable  # a warning
    finding = assert_finding(report, "qcow2-compressed", "warning")
    assert finding.hint == "diskimg convert disk.qcow2 disk-uncompressed.qcow2 -O qcow2"
    assert finding.evidence["compressed_bytes"] > 0 and finding.evidence["first_guest_offset"] == 0


def test_qcow2_with_a_backing_file(bios_mbr, here):
    qemu_img("convert", "-O", "qcow2", bios_mbr, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    report = validate("top.qcow2")
    assert not report.importable
    finding = assert_finding(report, "backing-file", "error", value="base.qcow2", offset=8)
    assert finding.hint == "merge the chain into one image: diskimg convert --allow-backing top.qcow2 " \
                           "top-full.qcow2 -O qcow2"
    assert not report.find("image-unreadable")
    assert any("backing file" in item["reason"] for item in report.not_checked)
    through = validate("top.qcow2", allow_backing=True)
    assert errors(through) == {"backing-file"} and through.facts.boot_modes == ["BIOS"]


def set_incompatible_bits(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", value | bits))


def test_qcow2_corrupt_and_dirty_bits(bios_mbr, tmp_path):
    corrupt = tmp_path / "corrupt.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, corrupt)
    set_incompatible_bits(corrupt, 0x2)
    report = validate(corrupt)
    assert not report.importable
    assert_finding(report, "qcow2-corrupt", "error", offset=72, value="0x2")
    assert report.facts.partition_table is not None  # the content was still inspected
    dirty = tmp_path / "dirty.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, dirty)
    set_incompatible_bits(dirty, 0x1)
    assert_finding(validate(dirty), "qcow2-dirty", "error", value="0x1")


def test_encrypted_qcow2(tmp_path):
    path = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", path, "30G")
    report = validate(path)
    assert not report.importable
    finding = assert_finding(report, "encrypted", "error", offset=32, value=2)
    assert "encrypt.key-secret=sec0" in finding.hint
    assert not report.find("image-unreadable")
    assert report.facts.disk_image_size == 30  # sizes come from the header


def test_qcow2_features_and_metadata_damage(bios_mbr, tmp_path):
    modern = tmp_path / "zstd.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "compression_type=zstd,extended_l2=on", bios_mbr, modern)
    qemu_img("snapshot", "-c", "before-upgrade", modern)
    report = validate(modern)
    assert report.importable
    assert_finding(report, "qcow2-newer-features", "warning", offset=72, compression_type=1)
    assert_finding(report, "qcow2-snapshots", "info", value=1)

    leaky = tmp_path / "leak.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, leaky)
    h = qcow2_header(leaky)
    write_at(leaky, first_refcount_block(leaky) + 2 * (h.refcount_table_offset // h.cluster_size), struct.pack(">H", 2))
    report = validate(leaky)
    assert report.importable
    assert_finding(report, "integrity-leaks", "warning", leaks=1)
    assert report.facts.integrity["leaks"] == 1

    shared = tmp_path / "shared.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, shared)
    l2 = first_l2_table(shared)
    write_at(shared, l2 + 8, struct.pack(">Q", read_u64(shared, l2)))
    report = validate(shared)
    assert not report.importable
    finding = assert_finding(report, "integrity-corruption", "error", structure="refcount block", corruptions=1)
    assert "diskimg check" in finding.hint

    broken = tmp_path / "broken.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, broken)
    write_at(broken, 40, struct.pack(">Q", 1 << 40))  # the L1 table now lies far past the end of the file
    report = validate(broken)
    assert not report.importable
    assert_finding(report, "image-unreadable", "error", structure="L1 table")
    assert any(item["category"] == "partitions" for item in report.not_checked)


def test_truncated_qcow2(bios_mbr, tmp_path):
    path = tmp_path / "cut.qcow2"
    qemu_img("convert", "-O", "qcow2", bios_mbr, path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    report = validate(path)
    assert not report.importable
    finding = assert_finding(report, "image-truncated", "error", file_size=path.stat().st_size)
    assert finding.evidence["problems"] >= 1


def test_differencing_vhd(bios_mbr, tmp_path):
    path = tmp_path / "child.vhd"
    qemu_img("convert", "-O", "vpc", bios_mbr, path)
    size = path.stat().st_size
    footer = vhdmod.parse_footer(read_at(path, size - 512, 512))
    footer.disk_type = vhdmod.DISK_DIFFERENCING
    write_at(path, size - 512, footer.pack())
    write_at(path, 0, footer.pack())
    header = vhdmod.parse_dynamic_header(read_at(path, 512, 1024))
    header.parent_name_raw = vhdmod.encode_parent_name("parent.vhd")
    write_at(path, 512, header.pack())
    report = validate(path)
    assert not report.importable
    assert_finding(report, "vhd-differencing", "error", value=4, parent="parent.vhd")


def test_vhd_sizes_differ_declare_the_larger(tmp_path):
    path = tmp_path / "sizes.vhd"
    qemu_img("create", "-q", "-f", "vpc", path, "10G")
    size = path.stat().st_size
    footer = vhdmod.parse_footer(read_at(path, size - 512, 512))
    current = footer.current_size
    footer.cylinders = footer.cylinders * 9 // 10  # a geometry that says less than current_size
    chs = footer.chs_size
    write_at(path, size - 512, footer.pack())
    write_at(path, 0, footer.pack())
    report = validate(path, role="data")
    expected = -(-current // GiB)
    assert -(-chs // GiB) < expected
    finding = assert_finding(report, "disk-image-size", "info", value=expected, chs_size=chs, current_size=current,
                             chosen_from="footer current_size")
    assert report.facts.disk_image_size == expected == report.import_image["DiskDeviceMapping"][0]["DiskImageSize"]
    assert finding.evidence["virtual_size"] == chs  # made by qemu: the size is read from the geometry


# -- sizes -------------------------------------------------------------------------------------------------------


def test_size_limits(tmp_path):
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", huge, "3T")
    report = validate(huge, role="data")
    assert not report.importable
    assert_finding(report, "size-too-large", "error", value=3072)
    assert report.facts.disk_image_size == 3072
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, "1500G")
    report = validate(big, role="data")
    assert report.importable
    assert_finding(report, "size-legacy-limit", "warning", value=1500, legacy_limit_gib=1000)
    system = validate(big)
    assert_finding(system, "size-legacy-limit", value=1500, legacy_limit_gib=500)
    assert not system.find("size-system-small")


def test_empty_file_and_odd_sizes(tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert_finding(validate(empty, role="data"), "size-empty", "error", value=0)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(MiB + 100))
    finding = assert_finding(validate(odd, role="data"), "size-unaligned", "warning", value=MiB + 100)
    assert finding.hint == f"pad it to whole sectors: truncate -s {MiB + 512} {odd}"


def test_large_file_needs_multipart_upload(tmp_path):
    disk = blank(tmp_path / "six.raw", 6 * GiB)
    report = validate(disk, role="data")
    assert_finding(report, "upload-multipart", "info", file_size=6 * GiB, threshold=5 * GiB)
    assert report.facts.disk_image_size == 6


# -- disk sets -------------------------------------------------------------------------------------------------


def test_disk_set(bios_mbr, tmp_path):
    datas = []
    for i in range(17):
        datas.append(blank(tmp_path / f"d{i}.raw", MiB))
    report = validate(system=bios_mbr, data=datas)
    assert not report.importable
    assert_finding(report, "too-many-data-disks", "error", value=17, limit=16)
    assert len(report.disks) == 18 and [d.device for d in report.disks] == list(range(1, 19))
    assert len(report.import_image["DiskDeviceMapping"]) == 18
    assert report.disks[1].role == "data" and report.disks[1].boot_modes is None
    unpartitioned = report.find("data-disk-unpartitioned")
    assert len(unpartitioned) == 17 and unpartitioned[0].disk == str(datas[0])
    ok = validate(system=bios_mbr, data=datas[:2])
    assert ok.importable and ok.import_image["BootMode"] == "BIOS"
    twice = validate(system=bios_mbr, data=[datas[0], datas[0]])
    assert_finding(twice, "duplicate-disk", "warning", value=str(datas[0]))


def test_files_that_cannot_be_opened(tmp_path, bios_mbr):
    with pytest.raises(ImageNotFound):
        validate(tmp_path / "missing.raw")
    with pytest.raises(ImageNotFound):
        validate(system=bios_mbr, data=[tmp_path / "missing.raw"])
    with pytest.raises(ImageNotFound):
        validate(tmp_path)
    with pytest.raises(UsageError):
        validate(bios_mbr, boot_mode="CSM")
    with pytest.raises(UsageError):
        validate(bios_mbr, target="nowhere")
    with pytest.raises(UsageError):
        validate()


# -- the catalogue ------------------------------------------------------------------------------------------------


def test_rule_catalogue_is_coherent():
    rules = list_rules("ecs")
    assert rules == list(RULES)
    for rule in rules:
        assert rule.code and rule.title and rule.rationale and rule.source.startswith("§") and rule.references
    source = "".join((ROOT / "diskimg" / name).read_text()
                     for name in ("validation/checks.py", "validation/linux_checks.py", "validation/windows_checks.py",
                                  "validation/context.py", "validation/__init__.py", "inspection/partitions.py"))
    emitted = set(re.findall(r'(?:emit|TableIssue|BootFailure)\(\s*"([a-z0-9-]+)"', source))
    emitted |= set(re.findall(r'"((?:gpt|mbr|partition)-[a-z0-9-]+)"', source)) & set(RULES_BY_CODE)
    assert emitted <= set(RULES_BY_CODE), emitted - set(RULES_BY_CODE)
    assert set(RULES_BY_CODE) <= emitted | {"image-unreadable"}, set(RULES_BY_CODE) - emitted


REFERENCE_NOTES = ROOT.parent / "shared" / "reference" / "cloud-requirements.md"


def test_list_rules_cites_public_documents():
    """`validate --list-rules` names, for every rule, the public documents it comes from (title and
    address), never the sections and tags of the project's own reference notes."""
    text = diskimg_cli("validate", "--list-rules").stdout.decode()
    assert "§" not in text and not re.search(r"\bA-[A-Z]", text), text[:2000]
    listed = json.loads(diskimg_cli("validate", "--list-rules", "--json").stdout)
    for rule in listed:
        assert rule["references"], rule["code"]
        for reference in rule["references"]:
            assert reference["title"] and reference["url"].startswith("https://"), rule["code"]
            assert f"{reference['title']}, {reference['url']}" in text


@pytest.mark.skipif(not REFERENCE_NOTES.is_file(), reason=f"the reference notes are not at {REFERENCE_NOTES}")
def test_rule_references_are_the_documents_the_notes_cite():
    """Each tag the rule sources use stands for the document the reference notes give for that tag
    (their table of key source URLs); other documents are ones the notes cite by address, but for
    three well-known ones (the UEFI specification, qemu-img's manual, Linux's GPT parser)."""
    from diskimg.validation.references import DOCUMENTS

    notes = REFERENCE_NOTES.read_text()
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| (A-[A-Z0-9-]+) \|.*$", notes, re.M)}
    outside_the_notes = {"https://uefi.org/specifications", "https://www.qemu.org/docs/master/tools/qemu-img.html",
                         "https://github.com/torvalds/linux/blob/master/block/partitions/efi.c"}
    for tag, document in DOCUMENTS.items():
        address = document.url.removeprefix("https://")
        if tag.startswith("A-"):
            assert address in rows[tag], (tag, document.url)
        elif document.url not in outside_the_notes:  # the notes shorten some addresses to "…/page"
            assert address in notes or f"…/{address.rsplit('/', 1)[1]}" in notes, (tag, document.url)


def test_validation_reads_metadata_only(tmp_path, monkeypatch):
    """A 2 GiB qcow2 with 128 MiB of data: validation reads tables and superblocks, a few MiB."""
    raw = blank(tmp_path / "d.raw", 2 * GiB)
    sfdisk(raw, "label: dos\n2048,,83,*\n")
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"offset={MiB},nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        raw, str((2 * GiB - MiB) // 4096))
    write_boot_code(raw)
    image = tmp_path / "d.qcow2"
    qemu_img("convert", "-O", "qcow2", raw, image)
    qemu_io(image, "qcow2", "write -P 0x5a 512M 128M")
    counted = [0]
    real_pread, real_into = HostFile.read_at, HostFile.readinto_at

    def read_at(self, offset, length):
        data = real_pread(self, offset, length)
        counted[0] += len(data)
        return data

    def readinto_at(self, offset, buffer):
        got = real_into(self, offset, buffer)
        counted[0] += got
        return got

    monkeypatch.setattr(HostFile, "read_at", read_at)
    monkeypatch.setattr(HostFile, "readinto_at", readinto_at)
    report = validate(image)
    assert report.importable, report.render_text()
    assert counted[0] < 16 * MiB, counted[0]


def test_every_corpus_file_gets_a_report(tmp_path):
    """Third-party images of every kind (up to 64 MiB): a report (findings, never a crash)."""
    entries = corpus_entries(("raw", "vhd", "qcow2", "vmdk", "vhdx", "vdi", "qed", "qcow", "parallels", "bochs",
                             "cloop", "dmg", "iso9660", "luks"))
    if not entries:
        pytest.skip(NO_CORPUS)
    for entry in entries:
        if (entry.get("decompressed_size") or 0) > 64 * MiB:
            continue  # decompressing those takes longer than the rest together
        path = corpus_file(entry, tmp_path)
        report = validate(path)
        assert report.findings and json.dumps(report.to_dict())
        assert report.render_text()
        if entry["format"] not in ("raw", "vhd", "qcow2"):
            assert not report.importable


# -- the command -------------------------------------------------------------------------------------------------


def test_validate_command(bios_mbr, uefi_gpt, tmp_path):
    proc = diskimg_cli("validate", bios_mbr, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["importable"] is True and data["target"] == "ecs"
    assert set(data) == {"target", "importable", "strict", "summary", "disks", "findings", "import_image",
                         "not_checked"}
    assert diskimg_cli("validate", bios_mbr, "--strict").returncode == 1
    proc = diskimg_cli("validate", uefi_gpt, "--boot-mode", "bios")
    assert proc.returncode == 1 and b"boot-mode-unsupported" in proc.stdout and b"NOT importable" in proc.stdout
    proc = diskimg_cli("validate", "--system", uefi_gpt, "--data", bios_mbr, "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["disks"]) == 2
    proc = diskimg_cli("validate", tmp_path / "missing.raw")
    assert proc.returncode == 3 and len(proc.stderr.decode().strip().splitlines()) == 1
    proc = diskimg_cli("validate", "--list-rules", "--json")
    assert proc.returncode == 0 and {r["code"] for r in json.loads(proc.stdout)} == set(RULES_BY_CODE)
    assert b"format-vmdk" in diskimg_cli("validate", "--list-rules").stdout
    assert diskimg_cli("validate").returncode == 2
