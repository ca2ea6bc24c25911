"""Guests whose root is not a plain partition: on an LVM2 logical volume, on btrfs subvolumes beside
snapper snapshots; and the findings about the stack itself.

The guest trees are the Linux builders' (CentOS, SUSE); the volumes are made by the real tools: LVM2's
pvcreate/vgcreate/lvcreate on loop devices over the image files (no device-mapper: LVs are never activated, the
file system is written at the extents lvs reports; a thin volume is written with vgcfgrestore), btrfs subvolumes,
snapshots and the default subvolume by the kernel on a loop mount (btrfs subvolume create/snapshot/set-default).
The oracle is the same guest on a plain partition (the same facts and findings, but for where the root lives),
LVM2's own reports (pvs/vgs/lvs) for names and UUIDs, btrfs subvolume list for subvolumes and snapshots, and the
trees the tests wrote.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.inspection.guest import GuestDisk, GuestVolume, Layer
from diskimg.inspection.signatures import FileSystem
from diskimg.validation import Report

from .support.corpus import corpus_dir
from .support.disks import copy_in, write_boot_code
from .support.files import blank, write_at
from .support.filesystems import Mounted, can_mount
from .support.guests import (
    ELF_X86_64,
    MACHINE_ID,
    RHEL_KERNEL,
    SUSE_KERNEL,
    Link,
    elf_header,
    ext4_image,
    grubenv,
    initramfs,
    mbr_disk,
    module_files,
    new_uuid,
    rhel_tree,
    split_boot,
    suse_tree,
    write_tree,
)
from .support.lvm import EXTENT, HIDDEN, SHOWN, LoopLvm, linear_segment, lv_section, needs_lvm, unique_vg
from .support.tools import qemu_img, run
from .support.units import GiB, MiB
from .support.volumes import (
    FAST_KDF,
    VOLUME_GUID,
    bitlocker_volume,
    luks_format,
    luks_json,
    md_superblock_1,
    mdadm_examine,
)

IMAGE_TOOLS = ("mkfs.ext4", "sfdisk", "qemu-img", "cpio", "gzip")
needs_image_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in IMAGE_TOOLS),
                                       reason="needs " + ", ".join(IMAGE_TOOLS))

DISK = GiB
BOOT = (MiB, 128 * MiB)  # the /boot partition: (offset, size)
SECOND = (129 * MiB, DISK - 130 * MiB)  # the root partition, or the LVM physical volume
ROOT_FS = 96 * MiB  # the root file system (mkfs.ext4 -d), 24 extents of an LV

#: the modules the CentOS builder's initramfs carries
INITRAMFS_MODULES = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "nvme"]
#: dracut's lvm module in an initramfs: the lvm tool and its lvm_scan script
LVM_TOOL = {"/usr/sbin/lvm": elf_header(ELF_X86_64), "/usr/sbin/lvm_scan": "#!/bin/sh\n"}
DM_MOD = f"/usr/lib/modules/{RHEL_KERNEL}/kernel/drivers/md/dm-mod.ko.xz"


def centos(work: Path, root_uuid: str, boot_uuid: str, *, root_spec: str | None = None,
           kernel_root: str | None = None, lvm_tool: bool = True, dm_mod: str | None = "initramfs"
           ) -> tuple[dict, dict]:
    """(root tree, /boot tree) of the CentOS builder, its dracut initramfs also carrying the lvm tool (with
    ``lvm_tool``) and dm-mod (``dm_mod``: "initramfs", "builtin" (listed in modules.builtin) or None); fstab's
    root line names ``root_spec`` and the kernel command line ``root=kernel_root`` when given (else UUID=)."""
    tree = rhel_tree(work, root_uuid, boot_uuid)
    files: dict[str, Any] = {"/init": Link("usr/lib/systemd/systemd"),
                             "/usr/lib/systemd/systemd": elf_header(ELF_X86_64),
                             **module_files(RHEL_KERNEL, INITRAMFS_MODULES)}
    if lvm_tool:
        files.update(LVM_TOOL)
    if dm_mod == "initramfs":
        files[DM_MOD] = b"\xfd7zXZ\x00module dm-mod"
    tree[f"/boot/initramfs-{RHEL_KERNEL}.img"] = initramfs(work, files, "gzip", early=True)
    if dm_mod == "builtin":
        builtin = f"/usr/lib/modules/{RHEL_KERNEL}/modules.builtin"
        tree[builtin] = str(tree[builtin]) + "kernel/drivers/md/dm-mod.ko\n"
    if root_spec is not None:
        tree["/etc/fstab"] = str(tree["/etc/fstab"]).replace(f"UUID={root_uuid} /", f"{root_spec} /")
    if kernel_root is not None:
        tree["/boot/grub2/grubenv"] = grubenv({"saved_entry": f"{MACHINE_ID}-{RHEL_KERNEL}",
                                                "kernelopts": f"root={kernel_root} ro crashkernel=auto"})
    return split_boot(tree)


def file_system(work: Path, name: str, tree: dict, uuid: str, size: int) -> Path:
    return ext4_image(work / f"{name}.ext4", size, write_tree(work / f"tree-{name}", tree), uuid)


def plain_disk(work: Path, boot: Path, root: Path) -> Path:
    """/boot on partition 1, the root on partition 2."""
    disk = mbr_disk(work / "plain.raw", DISK, [(*BOOT, "83"), (*SECOND, "83")])
    copy_in(disk, boot, BOOT[0])
    copy_in(disk, root, SECOND[0])
    write_boot_code(disk)
    return disk


@dataclass
class LvmGuest:
    """A disk with /boot on partition 1 and an LVM physical volume on partition 2, as LVM2's tools report it."""

    disk: Path
    vg: str
    pv_uuid: str
    #: lvs' report of each LV made: lv_name -> {lv_uuid, lv_dm_path, lv_path, ...}
    lvs: dict[str, dict[str, str]]
    #: where each LV's first extent lies in the disk
    starts: dict[str, int]


def lv_start(tools: LoopLvm, vg: str, lv: str) -> tuple[Path, int]:
    """(image, byte offset) where the first extent of ``vg/lv`` lies, from pvs' pe_start and lvs' seg_pe_ranges."""
    (report,) = tools.report("lvs", "seg_pe_ranges", f"{vg}/{lv}")
    device, span = report["seg_pe_ranges"].split()[0].split(":")
    (pv,) = tools.report("pvs", "pe_start", device)
    image, offset = tools.where(device)
    return image, offset + int(pv["pe_start"]) + int(span.split("-")[0]) * EXTENT


def lvm_disk(tools: LoopLvm, path: Path, boot: Path, vg: str, volumes: dict[str, Path | int]) -> LvmGuest:
    """``path``: /boot copied into partition 1, partition 2 made a PV of the new group ``vg`` whose linear LVs
    are ``volumes``: name -> a file system image written at its extents, or a number of extents left empty."""
    disk = mbr_disk(path, DISK, [(*BOOT, "83"), (*SECOND, "8e")])
    copy_in(disk, boot, BOOT[0])
    write_boot_code(disk)
    device = tools.attach(disk, *SECOND)
    tools("pvcreate", "-q", device)
    tools("vgcreate", "-q", vg, device)
    starts = {}
    for name, content in volumes.items():
        extents = content if isinstance(content, int) else -(-content.stat().st_size // EXTENT)
        tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", str(extents), "-n", name, vg)
        starts[name] = lv_start(tools, vg, name)[1]
        if not isinstance(content, int):
            write_at(disk, starts[name], content.read_bytes())
    (pv,) = tools.report("pvs", "pv_uuid", device)
    reports = tools.report("lvs", "lv_name,lv_uuid,lv_dm_path,lv_path,lv_size,segtype", vg)
    return LvmGuest(disk, vg, pv["pv_uuid"], {report["lv_name"]: report for report in reports}, starts)


@pytest.fixture(scope="module")
def lvm_tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopLvm]:
    tools = LoopLvm(tmp_path_factory.mktemp("lvm"))
    try:
        yield tools
    finally:
        tools.close()


@dataclass
class CentosGuest:
    """The CentOS guest with its root on partition 2 (``plain``), and the UUIDs of its file systems."""

    plain: Path
    root_uuid: str
    boot_uuid: str


@dataclass
class CentosPair(CentosGuest):
    """The same CentOS guest also on the LV root of a volume group on partition 2."""

    lvm: LvmGuest


@pytest.fixture(scope="module")
def centos_plain(tmp_path_factory: pytest.TempPathFactory) -> CentosGuest:
    if any(shutil.which(t) is None for t in IMAGE_TOOLS):
        pytest.skip("needs " + ", ".join(IMAGE_TOOLS))
    work = tmp_path_factory.mktemp("centos")
    root_uuid, boot_uuid = new_uuid(), new_uuid()
    root_tree, boot_tree = centos(work, root_uuid, boot_uuid)
    plain = plain_disk(work, file_system(work, "boot", boot_tree, boot_uuid, 96 * MiB),
                       file_system(work, "root", root_tree, root_uuid, ROOT_FS))
    return CentosGuest(plain, root_uuid, boot_uuid)


@pytest.fixture(scope="module")
def centos_pair(tmp_path_factory: pytest.TempPathFactory, centos_plain: CentosGuest, lvm_tools: LoopLvm
                ) -> CentosPair:
    work = tmp_path_factory.mktemp("centos-lvm")
    root_uuid, boot_uuid = centos_plain.root_uuid, centos_plain.boot_uuid
    vg = unique_vg("centos-vg")
    mapper = f"/dev/mapper/{vg.replace('-', '--')}-root"  # LVM doubles the dashes inside each name
    # fstab names the LV as /dev/VG/LV, the kernel as /dev/mapper/VG-LV
    root_tree, boot_tree = centos(work, root_uuid, boot_uuid, root_spec=f"/dev/{vg}/root", kernel_root=mapper)
    boot = file_system(work, "boot", boot_tree, boot_uuid, 96 * MiB)
    root = file_system(work, "root", root_tree, root_uuid, ROOT_FS)
    guest = lvm_disk(lvm_tools, work / "lvm.raw", boot, vg, {"root": root, "spare": 2})
    assert guest.lvs["root"]["lv_dm_path"] == mapper
    return CentosPair(centos_plain.plain, root_uuid, boot_uuid, guest)


#: facts that say where the root lives, or that name it, rather than what the guest is
WHERE = {"mounts", "fstab", "boot", "root_stack", "root_needs", "btrfs"}


def guest_facts(report: Report) -> dict[str, Any]:
    guest = dict(report.facts.guest or {})
    guest.pop("root")
    guest["details"] = {key: value for key, value in guest["details"].items() if key not in WHERE}
    return guest


def findings(report: Report) -> dict[str, list[dict[str, Any]]]:
    """Code -> the evidence of each finding, where-facts left out."""
    found: dict[str, list[dict[str, Any]]] = {}
    for finding in report.findings:
        evidence = {key: value for key, value in finding.evidence.items()
                    if key not in ("partition", "offset", "volume", "stack", "root", "bios", "uefi")}
        found.setdefault(finding.code, []).append(evidence)
    return found


@needs_lvm
@needs_image_tools
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_root_on_lvm_has_the_facts_and_findings_of_a_plain_partition(centos_pair: CentosPair, tmp_path: Path,
                                                                     fmt: str) -> None:
    images = [centos_pair.plain, centos_pair.lvm.disk]
    if fmt != "raw":
        for number, raw in enumerate(list(images)):
            images[number] = tmp_path / f"{raw.stem}.{fmt}"
            qemu_img("convert", "-f", "raw", "-O", fmt, raw, images[number])
    plain, lvm = map(diskimg.validate, images)
    assert plain.facts.guest is not None and lvm.facts.guest is not None
    assert guest_facts(lvm) == guest_facts(plain)
    assert plain.facts.guest["distribution"] == "centos" and lvm.import_image == plain.import_image
    plain_found, lvm_found = findings(plain), findings(lvm)
    assert set(lvm_found) == set(plain_found) | {"fs-lvm"}, (set(lvm_found) ^ set(plain_found))
    for code, evidence in plain_found.items():
        assert lvm_found[code] == evidence, code
    assert not [item for item in lvm.not_checked if item["category"] == "guest"], lvm.not_checked
    # where it lives: the LV, named as LVM names it
    guest = centos_pair.lvm
    root = lvm.facts.guest["root"]
    assert (root["partition"], root["volume"], root["uuid"]) == (None, f"LV {guest.vg}/root", centos_pair.root_uuid)
    details = lvm.facts.guest["details"]
    fstab = {line["mountpoint"]: line for line in details["fstab"]}
    assert (fstab["/"]["spec"], fstab["/"]["status"], fstab["/"]["volume"]) == (guest.lvs["root"]["lv_path"], "ok",
                                                                                f"LV {guest.vg}/root")
    assert details["boot"]["cmdline"].startswith(f"root={guest.lvs['root']['lv_dm_path']} ")
    assert details["root_needs"] == {"dm_mod": "initramfs", "lvm": "initramfs"}
    assert plain.facts.guest["details"]["root_needs"] == {}


@needs_lvm
@needs_image_tools
def test_volume_list_shows_the_stack(centos_pair: CentosPair, lvm_tools: LoopLvm) -> None:
    """partition -> PV -> VG/LV -> file system, in the JSON and the text, with LVM2's names and UUIDs; fs-lvm
    says what the physical volume holds."""
    guest = centos_pair.lvm
    (vg_report,) = lvm_tools.report("vgs", "vg_uuid", guest.vg)
    report = diskimg.validate(guest.disk)
    volumes = {volume["volume"]: volume for volume in report.facts.volumes}
    assert volumes["partition 2"]["holds"] == {"kind": "lvm-pv", "name": f"LVM2 PV {guest.pv_uuid} of VG {guest.vg}",
                                               "uuid": guest.pv_uuid, "vg": guest.vg, "vg_uuid": vg_report["vg_uuid"]}
    root = volumes[f"LV {guest.vg}/root"]
    lv = guest.lvs["root"]
    assert root["layer"] == {"kind": "lvm-lv", "name": f"LV {guest.vg}/root (linear, 96 MiB)", "vg": guest.vg,
                             "lv": "root", "path": f"{guest.vg}/root", "uuid": lv["lv_uuid"], "type": lv["segtype"],
                             "size": int(lv["lv_size"])}
    assert root["on"] == ["partition 2"] and root["unreadable"] is None
    assert (root["file_system"]["type"], root["file_system"]["uuid"]) == ("ext4", centos_pair.root_uuid)
    stack = f"partition 2 -> LVM2 PV {guest.pv_uuid} of VG {guest.vg} -> LV {guest.vg}/root (linear, 96 MiB) -> ext4"
    assert root["stack"] == stack
    assert volumes[f"LV {guest.vg}/spare"]["file_system"] is None  # an LV holding nothing
    assert report.facts.guest["root"]["stack"] == stack
    text = report.render_text()
    assert f"volumes:       {stack}" in text and f"guest:         CentOS Linux 8 on {stack}" in text
    (lvm,) = report.find("fs-lvm")
    assert (lvm.evidence["pv_uuid"], lvm.evidence["vg"]) == (guest.pv_uuid, guest.vg)
    assert lvm.evidence["logical_volumes"] == [
        {"lv": f"{guest.vg}/{name}", "type": guest.lvs[name]["segtype"], "size": int(guest.lvs[name]["lv_size"]),
         "file_system": "ext4" if name == "root" else None, "unreadable": None} for name in ("root", "spare")]
    assert f"of volume group {guest.vg}, holding root (linear, 96 MiB, ext4), spare (linear, 8 MiB)" in lvm.message


@needs_lvm
@needs_image_tools
@pytest.mark.parametrize("lvm_tool, dm_mod, lacking", [
    (True, "initramfs", []), (True, "builtin", []), (False, "initramfs", ["lvm"]), (True, None, ["dm_mod"]),
    (False, "builtin", ["lvm"]), (False, None, ["dm_mod", "lvm"]),
])
def test_initramfs_that_cannot_assemble_the_root(centos_pair: CentosPair, tmp_path: Path, lvm_tool: bool,
                                                 dm_mod: str | None, lacking: list[str]) -> None:
    """The root on LVM needs dm-mod (built in, as modules.builtin lists it, or in the initramfs) and dracut's lvm
    files in the initramfs; the guest is rebuilt with what the case says and written over /boot and the root LV."""
    guest = centos_pair.lvm
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(guest.disk), str(disk)], check=True)
    root_tree, boot_tree = centos(tmp_path, centos_pair.root_uuid, centos_pair.boot_uuid,
                                  root_spec=f"/dev/{guest.vg}/root",
                                  lvm_tool=lvm_tool, dm_mod=dm_mod)
    copy_in(disk, file_system(tmp_path, "boot", boot_tree, centos_pair.boot_uuid, 96 * MiB), BOOT[0])
    copy_in(disk, file_system(tmp_path, "root", root_tree, centos_pair.root_uuid, ROOT_FS), guest.starts["root"])
    report = diskimg.validate(disk)
    needs = report.facts.guest["details"]["root_needs"]
    assert needs == {"dm_mod": {"initramfs": "initramfs", "builtin": "builtin", None: "missing"}[dm_mod],
                     "lvm": "initramfs" if lvm_tool else "missing"}
    found = report.find("guest-initramfs-cannot-mount-root")
    if not lacking:
        assert not found and report.importable
        return
    (finding,) = found
    assert finding.severity.value == "error" and not report.importable
    assert finding.evidence["value"] == lacking and finding.evidence["kernel"] == RHEL_KERNEL
    assert finding.evidence["initramfs"] == f"/boot/initramfs-{RHEL_KERNEL}.img"
    assert "dracut -f --add lvm" in finding.hint and f"LV {guest.vg}/root" in finding.message


def thin_volumes(pv: str) -> str:
    """A thin pool and a thin LV named root in it, as LVM2 writes them (lib/thin): what lvcreate --thin makes."""
    return "".join((
        lv_section("pool", SHOWN, [["start_extent = 0", "extent_count = 4", 'type = "thin-pool"', 'metadata = "pool_tmeta"',
                             'pool = "pool_tdata"', "transaction_id = 1", "chunk_size = 128", 'discards = "passdown"',
                             "zero_new_blocks = 1"]]),
        lv_section("pool_tmeta", HIDDEN, [linear_segment(pv, 2, 1)]),
        lv_section("pool_tdata", HIDDEN, [linear_segment(pv, 3, 4)]),
        lv_section("root", SHOWN, [["start_extent = 0", "extent_count = 24", 'type = "thin"', 'thin_pool = "pool"',
                             "transaction_id = 0", "device_id = 1"]]),
    ))


@needs_lvm
@needs_image_tools
def test_root_on_a_thin_volume_cannot_be_checked(centos_pair: CentosPair, lvm_tools: LoopLvm, tmp_path: Path) -> None:
    """A root on a thin LV (its blocks mapped by the pool's own metadata, not read): an error naming the LV, not
    "no operating system found"; the boot partition is still read."""
    vg = unique_vg("thin-vg")
    _, boot_tree = centos(tmp_path, centos_pair.root_uuid, centos_pair.boot_uuid,
                          kernel_root=f"/dev/mapper/{vg.replace('-', '--')}-root")
    guest = lvm_disk(lvm_tools, tmp_path / "thin.raw", file_system(tmp_path, "boot", boot_tree, centos_pair.boot_uuid,
                                                                   96 * MiB), vg, {"spare": 2})
    backup = tmp_path / "backup.txt"
    lvm_tools("vgcfgbackup", "-q", "-f", backup, vg)
    text = backup.read_text()
    end = text.rindex("\t}\n\n}")  # the end of logical_volumes
    backup.write_text(text[:end] + thin_volumes("pv0") + text[end:])
    lvm_tools("vgcfgrestore", "-q", "--force", "-f", backup, vg)
    (lv,) = lvm_tools.report("lvs", "lv_name,segtype,lv_uuid", f"{vg}/root")
    assert lv["segtype"] == "thin"
    report = diskimg.validate(guest.disk)
    assert not report.importable and report.facts.guest is None
    assert not report.find("guest-not-found")
    (finding,) = report.find("guest-root-unreadable")
    assert finding.severity.value == "error"
    (volume,) = finding.evidence["volumes"]
    assert finding.evidence["value"] == [f"LV {vg}/root"] and "thin volume" in volume["reason"]
    assert volume["stack"] == (f"partition 2 -> LVM2 PV {guest.pv_uuid} of VG {vg} -> LV {vg}/root (thin, 96 MiB) -> "
                               f"not read: {volume['reason']}")
    assert volume["stack"] in finding.message
    volumes = {volume["volume"]: volume for volume in report.facts.volumes}
    assert volumes[f"LV {vg}/root"]["layer"]["uuid"] == lv["lv_uuid"] and volumes[f"LV {vg}/root"]["unreadable"]
    assert f"LV {vg}/pool" not in volumes  # a pool holds volumes, not a file system
    assert any("partition 2" in item["reason"] or f"{vg}/root" in item["reason"] for item in report.not_checked
               if item["check"] == "guest_found")


@needs_lvm
@needs_image_tools
def test_volume_group_across_the_disks_of_the_machine(centos_pair: CentosPair, lvm_tools: LoopLvm,
                                                      tmp_path: Path) -> None:
    """A volume group over the system disk and a data disk (its LV srv on the data disk) and a second group
    wholly on the data disk: validated together, every LV resolves and the stack names both disks; the system
    disk alone misses the data disk's PV (named by the UUID pvs reports) and the second group's LV."""
    vg, solo = unique_vg("span-vg"), unique_vg("solo-vg")
    root_tree, boot_tree = centos(tmp_path, centos_pair.root_uuid, centos_pair.boot_uuid, root_spec=f"/dev/{vg}/root")
    root_tree["/etc/fstab"] = str(root_tree["/etc/fstab"]) + (
        f"/dev/{vg}/srv /srv ext4 defaults 0 2\n"
        f"/dev/mapper/{solo.replace('-', '--')}-logs /var/log/x ext4 defaults 0 2\n")
    system = mbr_disk(tmp_path / "system.raw", DISK, [(*BOOT, "83"), (*SECOND, "8e")])
    copy_in(system, file_system(tmp_path, "boot", boot_tree, centos_pair.boot_uuid, 96 * MiB), BOOT[0])
    write_boot_code(system)
    data = mbr_disk(tmp_path / "data.raw", 256 * MiB, [(MiB, 127 * MiB, "8e"), (128 * MiB, 127 * MiB, "8e")])
    system_pv = lvm_tools.attach(system, *SECOND)
    data_pv, solo_pv = lvm_tools.attach(data, MiB, 127 * MiB), lvm_tools.attach(data, 128 * MiB, 127 * MiB)
    lvm_tools("pvcreate", "-q", system_pv, data_pv, solo_pv)
    lvm_tools("vgcreate", "-q", vg, system_pv, data_pv)
    lvm_tools("vgcreate", "-q", solo, solo_pv)
    made = {"root": (vg, system_pv, file_system(tmp_path, "root", root_tree, centos_pair.root_uuid, ROOT_FS)),
            "srv": (vg, data_pv, file_system(tmp_path, "srv", {"/readme": "srv\n"}, new_uuid(), 8 * MiB)),
            "logs": (solo, solo_pv, file_system(tmp_path, "logs", {"/readme": "logs\n"}, new_uuid(), 8 * MiB))}
    for name, (group, device, image) in made.items():
        extents = str(image.stat().st_size // EXTENT)
        lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", extents, "-n", name, group, device)
        write_at(*lv_start(lvm_tools, group, name), image.read_bytes())
    uuids = {pv["pv_name"]: pv["pv_uuid"] for pv in lvm_tools.report("pvs", "pv_name,pv_uuid", system_pv, data_pv)}

    together = diskimg.validate(system=system, data=[data])
    assert not together.find("fs-lvm-pv-missing") and not together.find("guest-fstab-unresolved"), [
        (f.code, f.message) for f in together.errors]
    fstab = {line["mountpoint"]: line for line in together.facts.guest["details"]["fstab"]}
    assert [(fstab[point]["status"], fstab[point]["volume"]) for point in ("/", "/srv")] == [
        ("ok", f"LV {vg}/root"), ("ok", f"LV {vg}/srv")]
    volumes = {volume["volume"]: volume for volume in together.facts.volumes}
    assert volumes[f"LV {vg}/srv"]["stack"] == (
        f"(partition 2 of {system} -> LVM2 PV {uuids[system_pv]} of VG {vg}) + (partition 1 of {data} -> LVM2 PV "
        f"{uuids[data_pv]} of VG {vg}) -> LV {vg}/srv (linear, 8 MiB) -> ext4")
    assert [volume["volume"] for volume in together.disks[1].volumes] == ["partition 1", "partition 2",
                                                                          f"LV {solo}/logs"]

    alone = diskimg.validate(system)
    (missing,) = alone.find("fs-lvm-pv-missing")
    assert missing.severity.value == "error" and missing.evidence["value"] == uuids[data_pv]
    assert (missing.evidence["vg"], missing.evidence["logical_volumes"]) == (vg, ["srv"])
    assert uuids[data_pv] in missing.message and data_pv in missing.message  # where LVM last saw it
    assert alone.facts.guest["root"]["volume"] == f"LV {vg}/root"  # wholly on the system disk: still read
    unresolved = [f.evidence["spec"] for f in alone.find("guest-fstab-unresolved")]
    assert unresolved == [f"/dev/mapper/{solo.replace('-', '--')}-logs"]

    (missing,) = diskimg.validate(data, role="data").find("fs-lvm-pv-missing")
    assert missing.evidence["value"] == uuids[system_pv] and missing.evidence["logical_volumes"] == ["root"]


@pytest.mark.skipif(corpus_dir() is None or not (corpus_dir() / "dfvfs/lvm.qcow2").is_file(),
                    reason="the corpus's dfvfs/lvm.qcow2 is not there")
def test_corpus_lvm_image_lists_its_logical_volume() -> None:
    """dfvfs's lvm.qcow2 (written by LVM2 2.03.06): its MANIFEST names VG test_volume_group, LV
    test_logical_volume holding ext2."""
    report = diskimg.validate(corpus_dir() / "dfvfs/lvm.qcow2", role="data")
    volumes = {volume["volume"]: volume for volume in report.facts.volumes}
    lv = volumes["LV test_volume_group/test_logical_volume"]
    assert (lv["layer"]["vg"], lv["layer"]["type"], lv["file_system"]["type"]) == ("test_volume_group", "linear",
                                                                                   "ext2")
    assert lv["on"] == ["the whole disk"] and volumes["the whole disk"]["holds"]["vg"] == "test_volume_group"
    assert lv["stack"].startswith("the whole disk -> LVM2 PV ") and lv["stack"].endswith(") -> ext2")



# -- btrfs -----------------------------------------------------------------------------------------------------

needs_btrfs = pytest.mark.skipif(not can_mount() or any(shutil.which(t) is None for t in ("mkfs.btrfs", "btrfs")),
                                 reason="btrfs volumes are made by the kernel on a loop mount: needs root and "
                                        "btrfs-progs")
BTRFS_MODULE = f"/lib/modules/{SUSE_KERNEL}/kernel/fs/btrfs/btrfs.ko.xz"
BTRFS_SIZE = 320 * MiB


def suse(work: Path, root_uuid: str, fstab: str | None = None, grub_args: str = "") -> dict:
    """The SUSE builder's tree with btrfs as a module, in its initramfs too (as SLES ships it); ``fstab``
    replaces /etc/fstab, ``grub_args`` go on the kernel command line."""
    tree = suse_tree(work, root_uuid)
    tree[BTRFS_MODULE] = b"\xfd7zXZ\x00module btrfs"
    modules = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_scsi"]
    tree[f"/boot/initrd-{SUSE_KERNEL}"] = initramfs(work, {
        "/init": Link("usr/lib/systemd/systemd"), **module_files(SUSE_KERNEL, modules, "/lib/modules"),
        BTRFS_MODULE: b"btrfs"}, "xz", False)
    if fstab is not None:
        tree["/etc/fstab"] = fstab
    if grub_args:
        tree["/boot/grub2/grub.cfg"] = str(tree["/boot/grub2/grub.cfg"]).replace(
            f"root=UUID={root_uuid} ", f"root=UUID={root_uuid} {grub_args} ")
    return tree


def with_version(tree: dict, version: str) -> dict:
    release = str(tree["/etc/os-release"]).replace('VERSION_ID="15.5"', f'VERSION_ID="{version}"')
    return {**tree, "/etc/os-release": release}


def subvolume_lists(mounted: Path) -> tuple[set[str], set[str], str]:
    """(every subvolume's path, the snapshots' paths, the default subvolume's path) as ``btrfs subvolume`` lists
    them on the mounted volume."""
    def paths(*options: str) -> set[str]:
        out = run("btrfs", "subvolume", "list", *options, mounted).stdout.decode()
        return {line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line}

    default = run("btrfs", "subvolume", "get-default", mounted).stdout.decode()
    return paths(), paths("-s"), default.split(" path ", 1)[1].strip() if " path " in default else ""


@dataclass
class BtrfsGuest:
    disk: Path
    subvolumes: set[str]
    snapshots: set[str]
    default: str


def btrfs_disk(work: Path, name: str, uuid: str, build: Any, boot: Path | None = None) -> BtrfsGuest:
    """A disk whose partition 1 is a btrfs of ``uuid`` (after ``boot``'s ext4 /boot on partition 1, when
    given) laid out by ``build(mount point)`` through the kernel, with btrfs subvolume list's view of it."""
    image = blank(work / f"{name}.btrfs", BTRFS_SIZE)
    run("mkfs.btrfs", "-q", "-f", "-U", uuid, image)
    mounted = Mounted(image, work / f"{name}-mnt", "")
    try:
        build(mounted.where)
        subvolumes, snapshots, default = subvolume_lists(mounted.where)
    finally:
        mounted.close()
    layout = ([(*BOOT, "83")] if boot else []) + [(SECOND[0] if boot else MiB, BTRFS_SIZE, "83")]
    disk = mbr_disk(work / f"{name}.raw", DISK, layout)
    if boot:
        copy_in(disk, boot, BOOT[0])
    copy_in(disk, image, layout[-1][0])
    write_boot_code(disk)
    return BtrfsGuest(disk, subvolumes, snapshots, default)


def snapper_build(tree: dict) -> Any:
    """How a snapper install lays out the root on btrfs: @, @/.snapshots, the root in the snapshot
    @/.snapshots/1/snapshot (the default subvolume), an older read-only snapshot 2 of it (its os-release one
    version behind), @/home and @/var."""
    def build(mount: Path) -> None:
        for name in ("@", "@/.snapshots"):
            run("btrfs", "subvolume", "create", mount / name)
        (mount / "@/.snapshots/1").mkdir()
        (mount / "@/.snapshots/2").mkdir()
        root = mount / "@/.snapshots/1/snapshot"
        run("btrfs", "subvolume", "create", root)
        write_tree(root, with_version(tree, "15.4"))
        run("btrfs", "subvolume", "snapshot", "-r", root, mount / "@/.snapshots/2/snapshot")
        (root / "etc/os-release").write_text(str(tree["/etc/os-release"]))
        for name in ("@/home", "@/var"):
            run("btrfs", "subvolume", "create", mount / name)
        run("btrfs", "subvolume", "set-default", root)

    return build


def snapper_fstab(uuid: str) -> str:
    return (f"UUID={uuid}  /  btrfs  defaults  0  0\nUUID={uuid}  /.snapshots  btrfs  subvol=/@/.snapshots  0  0\n"
            f"UUID={uuid}  /home  btrfs  subvol=/@/home  0  0\n")


@pytest.fixture(scope="module")
def suse_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BtrfsGuest]:
    """SLES on ext4 (partition 1), and the same SLES on btrfs as snapper lays it out."""
    if not can_mount() or any(shutil.which(t) is None for t in ("mkfs.btrfs", "btrfs", *IMAGE_TOOLS)):
        pytest.skip("needs root, btrfs-progs and " + ", ".join(IMAGE_TOOLS))
    work = tmp_path_factory.mktemp("suse")
    uuid = new_uuid()
    plain = mbr_disk(work / "plain.raw", DISK, [(MiB, BTRFS_SIZE, "83")])
    copy_in(plain, ext4_image(work / "root.ext4", 96 * MiB, write_tree(work / "tree", suse(work, uuid)), uuid), MiB)
    write_boot_code(plain)
    return plain, btrfs_disk(work, "snapper", uuid, snapper_build(suse(work, uuid, fstab=snapper_fstab(uuid))))


@needs_btrfs
@needs_image_tools
def test_root_on_btrfs_default_subvolume_beside_snapper_snapshots(suse_pair: tuple[Path, BtrfsGuest]) -> None:
    """The root is the default subvolume (snapper's 1/snapshot), read once; the older snapshot is listed, never
    inspected as a root; the guest's facts and findings are those of the same SLES on ext4, but for the file
    system's own (btrfs is not documented, ext4's 64bit feature is not there)."""
    plain_disk_path, guest = suse_pair
    plain, btrfs = diskimg.validate(plain_disk_path), diskimg.validate(guest.disk)
    assert guest.default == "@/.snapshots/1/snapshot" and "@/.snapshots/2/snapshot" in guest.snapshots
    assert guest_facts(btrfs) == guest_facts(plain)
    assert btrfs.facts.guest["version"] == "15.5"  # not the older snapshot's 15.4
    plain_found, btrfs_found = findings(plain), findings(btrfs)
    assert set(btrfs_found) == set(plain_found) - {"fs-ext4-64bit"} | {"fs-not-listed"}, set(btrfs_found) ^ set(
        plain_found)
    for code in set(plain_found) - {"fs-ext4-64bit"}:
        assert btrfs_found[code] == plain_found[code], code
    assert len(btrfs.find("guest-os")) == 1
    root = btrfs.facts.guest["root"]
    assert root["volume"] == "partition 1, btrfs subvolume @/.snapshots/1/snapshot (default)"
    assert root["stack"] == "partition 1 -> btrfs subvolume @/.snapshots/1/snapshot (default) -> btrfs"
    details = btrfs.facts.guest["details"]
    listed = details["btrfs"]
    assert (listed["root"], listed["default"]) == (guest.default, guest.default)
    assert set(listed["snapshots"]) == guest.snapshots and listed["snapshot_count"] == len(guest.snapshots)
    assert set(listed["subvolumes"]) | set(listed["snapshots"]) == guest.subvolumes
    assert details["root_needs"] == {"btrfs": "initramfs"}
    fstab = {line["mountpoint"]: line for line in details["fstab"]}
    assert fstab["/home"]["volume"] == "partition 1, btrfs subvolume @/home" and fstab["/home"]["status"] == "ok"
    text = btrfs.render_text()
    assert "guest:         SUSE Linux Enterprise Server 15 SP5 on partition 1 -> btrfs subvolume " \
           "@/.snapshots/1/snapshot (default) -> btrfs" in text


@needs_btrfs
@needs_image_tools
def test_btrfs_root_without_the_module_at_boot(tmp_path: Path) -> None:
    """The snapper layout with an initramfs lacking btrfs (the module only on the root): it cannot mount the
    root."""
    uuid = new_uuid()
    tree = suse(tmp_path, uuid, fstab=snapper_fstab(uuid))
    modules = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_scsi"]
    tree[f"/boot/initrd-{SUSE_KERNEL}"] = initramfs(tmp_path, {
        "/init": Link("usr/lib/systemd/systemd"), **module_files(SUSE_KERNEL, modules, "/lib/modules")}, "xz", False)
    guest = btrfs_disk(tmp_path, "no-module", uuid, snapper_build(tree))
    report = diskimg.validate(guest.disk)
    (finding,) = report.find("guest-initramfs-cannot-mount-root")
    assert finding.severity.value == "error" and finding.evidence["value"] == ["btrfs"]
    assert finding.evidence["needs"] == {"btrfs": "module"}  # on the root, which it is needed to mount
    assert finding.evidence["initramfs"] == f"/boot/initrd-{SUSE_KERNEL}" and "--add-drivers btrfs" in finding.hint


@needs_btrfs
@needs_image_tools
@pytest.mark.parametrize("named_by", ["rootflags", "fstab"])
def test_btrfs_root_is_the_subvolume_the_boot_mounts(tmp_path: Path, named_by: str) -> None:
    """Subvolumes root-old (made first, one version behind) and root of a top level that holds no system, /boot
    on ext4: the root is the subvolume the kernel command line's rootflags=subvol= or fstab's / line names."""
    uuid, boot_uuid = new_uuid(), new_uuid()
    fstab = f"UUID={uuid} / btrfs {'subvol=root' if named_by == 'fstab' else 'defaults'} 0 0\n" \
            f"UUID={boot_uuid} /boot ext4 defaults 0 2\n"
    tree = suse(tmp_path, uuid, fstab=fstab, grub_args="rootflags=subvol=root" if named_by == "rootflags" else "")
    root_tree, boot_tree = split_boot(tree)

    def build(mount: Path) -> None:
        for name, version in (("root-old", "15.4"), ("root", "15.5")):
            run("btrfs", "subvolume", "create", mount / name)
            write_tree(mount / name, with_version(root_tree, version))

    boot = file_system(tmp_path, "boot", boot_tree, boot_uuid, 96 * MiB)
    guest = btrfs_disk(tmp_path, named_by, uuid, build, boot)
    assert guest.default == ""  # the top level
    report = diskimg.validate(guest.disk)
    facts = report.facts.guest
    assert facts["version"] == "15.5" and facts["root"]["volume"] == "partition 2, btrfs subvolume root"
    assert facts["details"]["btrfs"]["root"] == "root" and facts["details"]["mounts"]["/boot"] == 1
    assert len(report.find("guest-os")) == 1



# -- encrypted volumes and md arrays -------------------------------------------------------------------------

THIRD = (385 * MiB, 256 * MiB)  # a third partition, after a root partition of 256 MiB


@needs_image_tools
@pytest.mark.parametrize("kind", ["luks", "bitlocker"])
def test_encrypted_volume_on_the_system_disk(centos_plain: CentosGuest, tmp_path: Path, kind: str) -> None:
    """A LUKS2 volume made by cryptsetup luksFormat (its UUID and cipher from luksDump), or a BitLocker volume
    laid out from libbde's tables, beside the CentOS root: an error with the UUID and cipher; the guest on the
    other partitions is still inspected."""
    if kind == "luks" and shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    if kind == "luks":
        volume = luks_format(tmp_path / "crypt.img", 32 * MiB, "--type", "luks2", *FAST_KDF)
        uuid = run("cryptsetup", "luksUUID", volume).stdout.decode().strip()
        cipher = luks_json(volume)["segments"]["0"]["encryption"]
        shown = f"LUKS2 {uuid} ({cipher})"
    else:
        volume = bitlocker_volume(tmp_path / "bde.img", 0x8004)
        uuid, cipher = str(VOLUME_GUID), "aes-xts-128"  # the method the test wrote: 0x8004, as libbde names it
        shown = f"BitLocker {uuid} ({cipher})"
    root_tree, boot_tree = centos(tmp_path, centos_plain.root_uuid, centos_plain.boot_uuid)
    disk = mbr_disk(tmp_path / "disk.raw", DISK, [(*BOOT, "83"), (SECOND[0], 256 * MiB, "83"), (*THIRD, "83")])
    copy_in(disk, file_system(tmp_path, "boot", boot_tree, centos_plain.boot_uuid, 96 * MiB), BOOT[0])
    copy_in(disk, file_system(tmp_path, "root", root_tree, centos_plain.root_uuid, ROOT_FS), SECOND[0])
    copy_in(disk, volume, THIRD[0])
    write_boot_code(disk)
    report = diskimg.validate(disk)
    (finding,) = report.find("fs-encrypted")
    assert finding.severity.value == "error" and not report.importable
    assert (finding.evidence["uuid"], finding.evidence["cipher"], finding.evidence["partition"]) == (uuid, cipher, 3)
    assert shown in finding.message and "ECS cannot import" in finding.message
    volumes = {item["volume"]: item for item in report.facts.volumes}
    assert volumes["partition 3"]["stack"] == f"partition 3 -> {shown}"
    assert f"volumes:       partition 3 -> {shown}" in report.render_text()
    assert report.facts.guest["root"]["partition"] == 2  # the guest beside it is still read


MD_MEMBER = 160 * MiB
MD_DATA = 2048  # sectors before the data (mdadm's 1 MiB for 1.2)


def md_members(disk: Path, starts: list[int], level: int, root: Path) -> None:
    """md 1.2 superblocks (md_p.h, as the crypt tests build and mdadm --examine reads them) on the partitions at
    ``starts``, one array of ``level``; the root file system written into each member's data area."""
    sectors = MD_MEMBER // 512
    usable = sectors - MD_DATA
    for number, start in enumerate(starts):
        sb = md_superblock_1(level=level, raid_disks=len(starts), size=usable - usable % 8, data_offset=MD_DATA,
                             data_size=usable, super_offset=8, dev_number=number, roles=list(range(len(starts))),
                             chunk=1024 if level == 5 else 0, layout=2 if level == 5 else 0)
        write_at(disk, start + 4096, sb)
        copy_in(disk, root, start + MD_DATA * 512)


@needs_image_tools
@pytest.mark.skipif(shutil.which("mdadm") is None, reason="mdadm not installed")
@pytest.mark.parametrize("level", [1, 5])
def test_root_on_an_md_array(centos_plain: CentosGuest, tmp_path: Path, level: int) -> None:
    """The root on an md 1.2 array over partitions 2 and 3 (fstab: /dev/md/root): a RAID1 array is read through a
    member, with the facts of the plain guest; a RAID5 array is named, and nothing inside can be checked."""
    root_tree, boot_tree = centos(tmp_path, centos_plain.root_uuid, centos_plain.boot_uuid, root_spec="/dev/md/root")
    second = (SECOND[0], MD_MEMBER)
    third = (SECOND[0] + MD_MEMBER, MD_MEMBER)
    disk = mbr_disk(tmp_path / "md.raw", DISK, [(*BOOT, "83"), (*second, "fd"), (*third, "fd")])
    copy_in(disk, file_system(tmp_path, "boot", boot_tree, centos_plain.boot_uuid, 96 * MiB), BOOT[0])
    md_members(disk, [second[0], third[0]], level,
               file_system(tmp_path, "root", root_tree, centos_plain.root_uuid, ROOT_FS))
    write_boot_code(disk)
    member = tmp_path / "member.img"
    subprocess.run(["dd", f"if={disk}", f"of={member}", "bs=1M", f"skip={second[0] // MiB}",
                    f"count={MD_MEMBER // MiB}", "status=none"], check=True)
    examined = mdadm_examine(member)
    report = diskimg.validate(disk)
    volumes = {item["volume"]: item for item in report.facts.volumes}
    array = volumes["md array root"]
    assert array["layer"]["uuid"] == examined["Array UUID"] and array["layer"]["name"] == examined["Name"]
    assert array["layer"]["level"] == examined["Raid Level"] and array["on"] == ["partition 2", "partition 3"]
    assert volumes["partition 2"]["holds"]["uuid"] == examined["Array UUID"]
    if level == 5:
        assert report.facts.guest is None and not report.importable
        (finding,) = report.find("guest-root-unreadable")
        assert finding.evidence["value"] == ["md array root"] and "raid5" in finding.evidence["volumes"][0]["reason"]
        return
    plain = diskimg.validate(centos_plain.plain)
    assert guest_facts(report) == guest_facts(plain)
    assert (report.facts.guest["root"]["volume"], report.facts.guest["root"]["uuid"]) == ("md array root",
                                                                                        centos_plain.root_uuid)
    fstab = {line["mountpoint"]: line for line in report.facts.guest["details"]["fstab"]}
    assert (fstab["/"]["status"], fstab["/"]["volume"]) == ("ok", "md array root")
    member = f"md member (active) of raid1 array {examined['Name']}"
    assert array["stack"] == f"(partition 2 -> {member}) + (partition 3 -> {member}) -> md raid1 array root -> ext4"
    assert findings(report) == findings(plain)


def test_names_of_assembled_volumes_resolve_or_are_not_judged() -> None:
    """An LV and an md array among the volumes: their device-mapper and md names resolve to them; another LV's
    name is missing, saying which LVs there are; /dev/dm-N and /dev/mdN are numbered at boot, so not judged; a
    partition's instance name never names an assembled volume."""
    pv = GuestVolume("partition 2", 2, MiB, MiB, FileSystem("lvm2"))
    member = GuestVolume("partition 3", 3, 2 * MiB, MiB, FileSystem("md"))
    lv = GuestVolume("LV vg-a/root", None, 0, MiB, FileSystem("ext4", uuid="u1"), below=(pv,),
                     layer=Layer("lvm-lv", "LV vg-a/root", {"path": "vg-a/root"}),
                     device_names=("/dev/mapper/vg--a-root", "/dev/vg-a/root"))
    array = GuestVolume("md array data", None, 0, MiB, FileSystem("xfs"), below=(member,),
                        layer=Layer("md-array", "md raid1 array data", {}), device_names=("/dev/md/data",))
    disk = GuestDisk(None, [pv, member, lv, array])  # type: ignore[arg-type]
    for spec in ("/dev/mapper/vg--a-root", "/dev/vg-a/root", "UUID=u1"):
        assert disk.resolve(spec).volume is lv, spec
    assert disk.resolve("/dev/md/data").volume is array
    missing = disk.resolve("/dev/mapper/vg--a-swap")
    assert missing.status == "missing" and "vg-a/root" in (missing.reason or "")
    assert disk.resolve("/dev/md/other").status == "missing"
    assert disk.resolve("/dev/dm-0").status == disk.resolve("/dev/md127").status == "unknown"
    assert disk.resolve("/dev/vda2").volume is pv  # the partition, not what is assembled on it
    assert disk.unassembled() == []
