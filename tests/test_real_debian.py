"""The validator against real Debian 12 systems (issue 13): a healthy BIOS/MBR and UEFI/GPT install
built by mmdebstrap, grub-install, update-initramfs and update-grub (tests/support/real_debian.py), and copies
of them broken by one change each. The verdict each copy must get comes from what the system does when
booted (issue 13's boots; test_boot_under_qemu repeats two of them here).

Findings are matched by the prefix of their code (``CODE_*`` below: tighten them to the rule codes once
they exist) and by their message or evidence naming the culprit, so that these tests pin the verdict,
not the wording.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from .support.disks import mkfs_into, sfdisk
from .support.files import read_at, write_at
from .support.real_debian import (
    FIRMWARES,
    cache_dir,
    chroot_ready,
    ext4_list,
    ext4_read,
    mounted,
    open_session_disks,
    why_not_usable,
)
from .support.tools import diskimg_cli, run
from .support.units import MiB

#: the code (prefix) of the finding each broken copy must get; tighten to the exact rule codes
CODE_ROOT_UNRESOLVED = "guest-boot-entry-broken"  # 1: root= names a device the instance will not have
CODE_BIOS_CHAIN = "bios-boot-chain-broken"  # 2: GRUB's core image gone, or a chain-loading MBR before a VBR without code
CODE_UEFI_REMOVABLE = "esp-no-loader"  # 3: no \EFI\BOOT\BOOTX64.EFI
CODE_CLOUD_INIT_OFF = "guest-cloud-init-disabled"  # 4: cloud-init installed but not running
CODE_SSHD_NO_KEYS = "guest-ssh-host-keys-missing"  # 4: no cloud-init and no SSH host keys: sshd fails at boot
CODE_FSTAB = "guest-fstab"  # 5: fstab resolved across every disk of the machine
CODE_SELINUX = "guest-selinux"  # 6: SELinux configured but no policy
CODE_STATIC_IP = "guest-static-ip"  # 7: a static address cloud-init rewrites
CODE_EXT4_64BIT = "fs-ext4-64bit"  # 8: must not warn on every current ext4
CODE_RECOVERY = "guest-boot-recovery-mode"  # 9: default entry boots to a console no one reaches

#: the warnings a healthy 2 GiB real install may get: its size, below the recommended 20 GiB
HEALTHY_WARNINGS = {"size-system-small"}


@pytest.fixture(scope="session")
def real_debian(tmp_path_factory):
    """The healthy disks, built on first use and cached (see tests/support/real_debian.py)."""
    reason = why_not_usable(building=not all((cache_dir() / f"{firmware}.qcow2").exists() for firmware in FIRMWARES))
    if reason:
        pytest.skip(reason)
    disks, times = open_session_disks(tmp_path_factory.mktemp("real-debian"))
    print(f"real Debian disks in {cache_dir()} (build times, s: {times})")
    yield disks
    for disk in disks.values():
        disk.raw.unlink()


@pytest.fixture(autouse=True)
def drop_copies(tmp_path):
    """Each copy holds a gigabyte of a real system: pytest's last three sessions do not keep them."""
    yield
    for copy in tmp_path.glob("*.raw"):
        copy.unlink()


@pytest.fixture(scope="session")
def healthy_reports(real_debian):
    return {firmware: validate(disk.raw) for firmware, disk in real_debian.items()}


def validate(*args: object) -> dict:
    """``diskimg validate --json`` of one disk (a path) or of a machine (``--system A --data B``)."""
    proc = diskimg_cli("validate", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["importable"]
    return report


def findings(report: dict, prefix: str, culprit: str, severities: tuple[str, ...] = ("warning", "error")
             ) -> list[dict]:
    """The findings whose code starts with ``prefix``, of one of these severities, whose message or
    evidence names ``culprit`` (case-insensitive)."""
    return [f for f in report["findings"]
            if f["code"].startswith(prefix) and f["severity"] in severities
            and culprit.lower() in json.dumps([f["message"], f["evidence"]]).lower()]


def shown(report: dict) -> list[tuple[str, str, str]]:
    return [(f["severity"], f["code"], f["message"]) for f in report["findings"] if f["severity"] != "info"]


def assert_not_importable_naming(report: dict, prefix: str, culprit: str) -> None:
    assert not report["importable"], shown(report)
    assert findings(report, prefix, culprit, ("error",)), (f"no error {prefix}* naming {culprit!r}", shown(report))


def assert_at_most_warning(report: dict, culprit: str) -> None:
    """Importable, and nothing naming ``culprit`` above a warning."""
    assert report["importable"], shown(report)
    assert not findings(report, "", culprit, ("error",)), shown(report)


def guest(report: dict) -> dict:
    return report["disks"][0]["guest"]


# -- the healthy installs ----------------------------------------------------------------------------


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_healthy_install_is_importable_with_the_right_facts(real_debian, healthy_reports, firmware):
    disk, report = real_debian[firmware], healthy_reports[firmware]
    assert report["importable"], shown(report)
    warnings = {f["code"] for f in report["findings"] if f["severity"] != "info"}
    assert warnings <= HEALTHY_WARNINGS, shown(report)
    assert not [f for f in report["findings"] if f["code"] == CODE_EXT4_64BIT and f["severity"] != "info"]

    facts = guest(report)
    assert (facts["distribution"], facts["version"]) == ("debian", "12")
    # /etc/os-release links to /usr/lib/os-release
    assert f"VERSION_ID=\"{facts['version']}\"" in ext4_read(disk.raw, disk.root, "/usr/lib/os-release").decode()
    kernels = sorted(name.removeprefix("vmlinuz-") for name in ext4_list(disk.raw, disk.root, "/boot")
                     if name.startswith("vmlinuz-"))
    assert len(kernels) == 1 and facts["details"]["default_kernel"] == kernels[0]
    # the initramfs as cpio lists it (initramfs-tools writes one gzip cpio on a VM without microcode)
    initrd = ext4_read(disk.raw, disk.root, f"/boot/initrd.img-{kernels[0]}")
    listing = run("sh", "-c", "zcat | cpio -t --quiet", input=initrd).stdout.decode()
    for module in ("virtio_blk", "virtio_pci", "virtio_net", "virtio_scsi", "nvme"):
        assert re.search(rf"/{module}\.ko", listing), module
        assert facts["details"]["boot_drivers"][module] == "initramfs"
    assert report["import_image"]["BootMode"] == firmware.upper()


def test_fstab_entry_on_the_data_disk(real_debian, tmp_path):
    """Issue 13 item 5: fstab resolves across every disk of the machine."""
    disk = real_debian["bios"]
    system = disk.copy(tmp_path / "system.raw")
    data = tmp_path / "data.raw"
    with open(data, "wb") as f:
        f.truncate(64 * MiB)
    sfdisk(data, "label: dos\nstart=2048, type=83\n")
    mkfs_into(data, MiB, 63 * MiB, "mkfs.ext4", "-q", tmp=tmp_path)
    data_uuid = run("blkid", "-o", "value", "-s", "UUID", "-p", "-O", str(MiB), data).stdout.decode().strip()
    with mounted(system, disk.root, tmp_path / "root") as root:
        (root / "data").mkdir()
        with open(root / "etc/fstab", "a") as fstab:
            fstab.write(f"UUID={data_uuid} /data ext4 defaults 0 2\n")

    report = validate("--system", system, "--data", data)
    assert report["importable"], shown(report)
    assert not findings(report, CODE_FSTAB, data_uuid, ("error",)), shown(report)
    alone = validate(system)  # the system disk alone: the data file system is missing indeed
    assert findings(alone, CODE_FSTAB, data_uuid, ("error",)), shown(alone)


# -- images that do not boot ---------------------------------------------------------------------------


def edit_grub_cfg(raw: Path, root_partition: tuple[int, int], mountpoint: Path, change) -> None:
    with mounted(raw, root_partition, mountpoint) as root:
        cfg = root / "boot/grub/grub.cfg"
        text = cfg.read_text()
        changed = change(text)
        assert changed != text
        cfg.write_text(changed)


def root_on_the_build_loop_device(grub_cfg: str) -> str:
    """grub.cfg as update-grub writes it in a chroot without /dev/disk/by-uuid."""
    return re.sub(r"root=UUID=\S+", "root=/dev/loop0p1", grub_cfg)


def test_root_names_the_build_machines_loop_device(real_debian, tmp_path):
    """Issue 13 item 1: update-grub without /dev/disk/by-uuid writes root=/dev/loop0p1; the boot stops at
    'ALERT! /dev/loop0p1 does not exist'."""
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "loop-root.raw")
    edit_grub_cfg(broken, disk.root, tmp_path / "root", root_on_the_build_loop_device)
    assert_not_importable_naming(validate(broken), CODE_ROOT_UNRESOLVED, "loop0p1")


def test_grub_core_image_zeroed(real_debian, tmp_path):
    """Issue 13 item 2: boot.img in the MBR loads a core image that is gone ('GRUB GRUB GRUB')."""
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "no-core.raw")
    # boot.img keeps the LBA of the core image's first sector at 0x5C (GRUB's boot.S, kernel_sector)
    core_lba = struct.unpack("<Q", read_at(broken, 0x5C, 8))[0]
    core = ext4_read(broken, disk.root, "/boot/grub/i386-pc/core.img")
    assert 0 < core_lba < disk.partitions[0][0] // 512
    # grub-install put it there (grub-bios-setup patches the blocklist and boot drive in its first sectors)
    assert read_at(broken, (core_lba + 2) * 512, len(core) - 1024) == core[1024:]
    write_at(broken, core_lba * 512, bytes(len(core)))
    assert_not_importable_naming(validate(broken), CODE_BIOS_CHAIN, "core")


def test_syslinux_mbr_before_an_ext4_active_partition(real_debian, tmp_path):
    """Issue 13 item 2: syslinux's mbr.bin chain-loads the active partition's boot sector, which ext4
    leaves without code ('Nothing to boot'); the MBR is syslinux's, not Windows'."""
    mbr_bin = Path("/usr/lib/syslinux/mbr/mbr.bin")
    if not mbr_bin.exists():
        pytest.skip("needs syslinux's mbr.bin (package syslinux-common)")
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "syslinux-mbr.raw")
    code = mbr_bin.read_bytes()
    assert len(code) <= 440
    write_at(broken, 0, code)
    report = validate(broken)
    assert_not_importable_naming(report, CODE_BIOS_CHAIN, "syslinux")
    assert report["disks"][0]["partition_table"]["mbr_boot_loader"] != "windows"


def test_esp_without_the_removable_path(real_debian, tmp_path):
    """Issue 13 item 3: a new instance has empty NVRAM: without \\EFI\\BOOT\\BOOTX64.EFI the firmware
    stops in its shell, though \\EFI\\debian\\shimx64.efi is there."""
    disk = real_debian["uefi"]
    broken = disk.copy(tmp_path / "no-removable.raw")
    esp = f"{broken}@@{disk.esp[0]}"
    assert "BOOTX64" in run("mdir", "-b", "-i", esp, "::/EFI/BOOT").stdout.decode().upper()
    run("mdel", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI")
    assert_not_importable_naming(validate(broken), CODE_UEFI_REMOVABLE, "BOOTX64.EFI")


CLOUD_INIT_UNITS = ("cloud-init-local.service", "cloud-init.service", "cloud-config.service", "cloud-final.service")


def disable_by_file(root: Path) -> None:
    (root / "etc/cloud/cloud-init.disabled").touch()


def mask_services(root: Path) -> None:
    for unit in CLOUD_INIT_UNITS:  # what systemctl mask writes
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")


def datasources_without_aliyun(root: Path) -> None:
    (root / "etc/cloud/cloud.cfg.d/99_datasources.cfg").write_text("datasource_list: [NoCloud, None]\n")


def disable_on_the_command_line(root: Path) -> None:
    cfg = root / "boot/grub/grub.cfg"
    cfg.write_text(re.sub(r"(root=UUID=\S+)", r"\1 cloud-init=disabled", cfg.read_text()))


@pytest.mark.parametrize(("change", "culprit"), [
    (disable_by_file, "cloud-init.disabled"),
    (mask_services, "/dev/null"),
    (datasources_without_aliyun, "NoCloud"),
    (disable_on_the_command_line, "cloud-init=disabled"),
], ids=["disabled-file", "masked", "datasource-list", "kernel-command-line"])
def test_cloud_init_installed_but_not_running(real_debian, tmp_path, change, culprit):
    """Issue 13 item 4: the instance would get no hostname, keys or network: reported as cloud-init
    missing is (the same severity in the rule catalogue), naming what turns it off."""
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "cloud-init-off.raw")
    with mounted(broken, disk.root, tmp_path / "root") as root:
        change(root)
    rules = {r["code"]: r["severity"] for r in json.loads(diskimg_cli("validate", "--list-rules", "--json").stdout)}
    severity = rules["guest-cloud-init-missing"]
    assert rules[CODE_CLOUD_INIT_OFF] == severity
    report = validate(broken)
    assert findings(report, CODE_CLOUD_INIT_OFF, culprit, (severity,)), shown(report)
    assert not findings(validate(disk.raw), CODE_CLOUD_INIT_OFF, "")


def test_no_cloud_init_and_no_ssh_host_keys(real_debian, tmp_path):
    """Issue 13 item 4: with cloud-init purged nothing makes SSH host keys, and sshd fails at boot."""
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "no-keys.raw")
    with mounted(broken, disk.root, tmp_path / "root") as root:
        with chroot_ready(root):
            run("chroot", root, "dpkg", "--purge", "cloud-init")
        keys = list((root / "etc/ssh").glob("ssh_host_*"))
        assert keys
        for key in keys:
            key.unlink()
    report = validate(broken)
    assert findings(report, "guest-cloud-init", "cloud-init"), shown(report)
    assert findings(report, CODE_SSHD_NO_KEYS, "ssh"), shown(report)


# -- false alarms on a system that boots -------------------------------------------------------------


def test_default_entry_in_recovery_mode(real_debian, tmp_path):
    """Issue 13 item 9: 'single' boots to a console no one can reach: a warning."""
    disk = real_debian["bios"]
    broken = disk.copy(tmp_path / "single.raw")
    edit_grub_cfg(broken, disk.root, tmp_path / "root",
                  lambda text: re.sub(r"(root=UUID=\S+ ro)", r"\1 single", text, count=1))
    report = validate(broken)
    assert findings(report, CODE_RECOVERY, "single", ("warning",)), shown(report)


def test_selinux_enforcing_without_a_policy(real_debian, tmp_path):
    """Issue 13 item 6: Debian has no SELinux policy (AppArmor is its module): the config alone does nothing."""
    disk = real_debian["bios"]
    changed = disk.copy(tmp_path / "selinux.raw")
    with mounted(changed, disk.root, tmp_path / "root") as root:
        assert not list((root / "etc/selinux").glob("*/policy"))
        (root / "etc/selinux").mkdir(exist_ok=True)
        (root / "etc/selinux/config").write_text("SELINUX=enforcing\nSELINUXTYPE=default\n")
    report = validate(changed)
    assert report["importable"], shown(report)
    assert not [f for f in report["findings"] if f["code"].startswith(CODE_SELINUX) and f["severity"] != "info"]


STATIC_ENI = "auto eth0\niface eth0 inet static\n    address 192.168.10.5/24\n    gateway 192.168.10.1\n"


@pytest.mark.parametrize("network_config", ["enabled", "disabled"])
def test_static_address_in_cloud_inits_own_file(real_debian, tmp_path, network_config):
    """Issue 13 item 7: cloud-init rewrites 50-cloud-init on first boot unless its network configuration
    is disabled: a warning at most while enabled, an error when disabled."""
    disk = real_debian["bios"]
    changed = disk.copy(tmp_path / "static.raw")
    with mounted(changed, disk.root, tmp_path / "root") as root:
        (root / "etc/network/interfaces.d/50-cloud-init").write_text(STATIC_ENI)
        if network_config == "disabled":
            (root / "etc/cloud/cloud.cfg.d/99-disable-network-config.cfg").write_text("network: {config: disabled}\n")
    report = validate(changed)
    if network_config == "enabled":
        assert_at_most_warning(report, "50-cloud-init")
    else:
        assert_not_importable_naming(report, CODE_STATIC_IP, "50-cloud-init")


# -- the oracle: a boot ------------------------------------------------------------------------------


def boot_serial(image: Path, fmt: str, log: Path, seconds: float, until: tuple[str, ...]) -> str:
    """Boot a BIOS disk under qemu's TCG (nested KVM is not to be relied on) with writes discarded, and
    return its serial console (kept in ``log``) up to the first of ``until`` or the timeout."""
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "1024", "-snapshot",
                             "-display", "none", "-monitor", "none", "-serial", f"file:{log}", "-nic", "none",
                             "-drive", f"file={image},format={fmt},if=virtio"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    text = ""
    try:
        while time.monotonic() < deadline and qemu.poll() is None:
            time.sleep(1)
            text = log.read_text(errors="replace") if log.exists() else ""
            if any(marker in text for marker in until):
                break
    finally:
        qemu.kill()
        qemu.wait()
    return text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64 (qemu-system-x86)")
def test_boot_under_qemu(real_debian, tmp_path):
    """The oracle itself: the healthy install reaches its login prompt; root=/dev/loop0p1 stops in the
    initramfs."""
    disk = real_debian["bios"]
    healthy = boot_serial(disk.qcow2, "qcow2", tmp_path / "healthy.serial", 300, ("login:",))
    assert "login:" in healthy, healthy[-2000:]
    broken = disk.copy(tmp_path / "loop-root.raw")
    edit_grub_cfg(broken, disk.root, tmp_path / "root", root_on_the_build_loop_device)
    stopped = boot_serial(broken, "raw", tmp_path / "loop-root.serial", 300, ("(initramfs)", "login:"))
    assert re.search(r"ALERT!\s+/dev/loop0p1 does not exist", stopped) and "login:" not in stopped, stopped[-2000:]
