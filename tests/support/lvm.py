"""Builders shared by the tests (moved from test_lvm.py)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from diskimg import open_image
from diskimg.inspection.volumes.lvm import (
    VolumeGroup,
    find_volume_groups,
)

from .disks import sfdisk
from .files import blank, write_at
from .tools import run
from .units import MiB

TOOLS = ("losetup", "pvcreate", "vgcreate", "lvcreate", "vgcfgbackup", "vgcfgrestore", "pvs", "vgs", "lvs", "pvck",
         "mkfs.ext4", "sfdisk")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "LVM2 volumes are built on loop devices, which needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if subprocess.run(["losetup", "-f"], capture_output=True, check=False).returncode != 0:
        return "no free loop device"
    return None


needs_lvm = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


EXTENT = 4 * MiB  # vgcreate's default extent size


class LoopLvm:
    """LVM2's tools over image files attached to loop devices: they see only these devices (a filter), write no
    backups outside the test's folder and never touch device-mapper. ``close`` detaches the devices."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "lvm-system"
        self.folder.mkdir()
        self.devices: dict[str, tuple[Path, int]] = {}  # loop device -> (image, offset in it)

    def attach(self, image: Path, offset: int = 0, size: int | None = None) -> str:
        args = ["losetup", "-f", "--show", "-o", str(offset)] + (["--sizelimit", str(size)] if size else [])
        device = run(*args, image).stdout.decode().strip()
        self.devices[device] = (image, offset)
        accept = ", ".join(f'"a|^{re.escape(name)}$|"' for name in self.devices)
        (self.folder / "lvm.conf").write_text(
            f'devices {{ filter = [ {accept}, "r|.*|" ] global_filter = [ {accept}, "r|.*|" ]\n'
            "  use_devicesfile = 0 obtain_device_list_from_udev = 0 }\n"
            "backup { backup = 0 archive = 0 }\n"
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n")
        return device

    def __call__(self, *args: str | Path) -> str:
        env = {**os.environ, "LVM_SYSTEM_DIR": str(self.folder), "LVM_SUPPRESS_FD_WARNINGS": "1"}
        proc = subprocess.run([str(arg) for arg in args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))}: {proc.stderr.strip()}")
        return proc.stdout

    def report(self, command: str, fields: str, *targets: str) -> list[dict[str, str]]:
        out = self(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *targets)
        report = json.loads(out)["report"][0]
        return next(iter(report.values()))

    def headers(self, device: str) -> dict[str, str]:
        """``pvck --dump headers``: each "name value" line, by name."""
        lines = self("pvck", "--dump", "headers", device).splitlines()
        return dict(line.strip().split(" ", 1) for line in lines if " " in line.strip())

    def where(self, device: str) -> tuple[Path, int]:
        return self.devices[device]

    def close(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False)


def unique_vg(stem: str) -> str:
    """A volume group name no other run on the machine uses at the same time (LVM locks by name)."""
    return f"{stem}-{os.getpid()}-{random.randrange(1 << 30)}"


def lv_section(name: str, status: list[str], segments: list[list[str]]) -> str:
    uuid = "".join(random.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(32))
    uuid = "-".join((uuid[:6], uuid[6:10], uuid[10:14], uuid[14:18], uuid[18:22], uuid[22:26], uuid[26:]))
    text = (f'\t\t{name} {{\n\t\t\tid = "{uuid}"\n\t\t\tstatus = [{", ".join(json.dumps(s) for s in status)}]\n'
            f"\t\t\tflags = []\n\t\t\tsegment_count = {len(segments)}\n")
    for number, lines in enumerate(segments, 1):
        text += f"\t\t\tsegment{number} {{\n" + "".join(f"\t\t\t\t{line}\n" for line in lines) + "\t\t\t}\n"
    return text + "\t\t}\n"


def linear_segment(pv: str, extent: int, count: int) -> list[str]:
    return ["start_extent = 0", f"extent_count = {count}", 'type = "striped"', "stripe_count = 1",
            f'stripes = ["{pv}", {extent}]']


HIDDEN = ["READ", "WRITE"]


SHOWN = ["READ", "WRITE", "VISIBLE"]






def make_tree(root: Path, label: str) -> Path:
    """A small tree: files of a few sizes, a subdirectory, a symbolic link; ``label`` in the data so the
    trees of two volumes differ."""
    rng = random.Random(label)
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text(f"{label}\n")
    (root / "data").mkdir()
    for size in (0, 1000, 70000, 300000):
        (root / f"data/size-{size}").write_bytes(rng.randbytes(size))
    os.symlink("etc/hostname", root / "name-link")
    return root


def ext4_file(folder: Path, name: str, size: int) -> tuple[Path, Path]:
    """An ext4 of ``size`` bytes made by mkfs.ext4 -d from a new tree; returns (image file, tree)."""
    tree = make_tree(folder / f"tree-{name}", name)
    image = blank(folder / f"{name}.ext4", size)
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-d", tree, image)
    return image, tree


def place_striped(tools: LoopLvm, ranges: str, stripe_size: int, image: Path, pe_starts: dict[str, int]) -> None:
    """dd ``image`` over the stripes lvs reports: chunks of ``stripe_size`` bytes go round the stripes in turn
    (the kernel's dm-stripe layout)."""
    stripes = []
    for item in ranges.split():
        device, span = item.split(":")
        disk, offset = tools.where(device)
        stripes.append((disk, offset + pe_starts[device] + int(span.split("-")[0]) * EXTENT))
    data = image.read_bytes()
    for number, start in enumerate(range(0, len(data), stripe_size)):
        row, stripe = divmod(number, len(stripes))
        disk, base = stripes[stripe]
        write_at(disk, base + row * stripe_size, data[start : start + stripe_size])


@dataclass
class TwoDisks:
    tools: LoopLvm
    vg: str
    system: Path
    data: Path
    partition: tuple[int, int]  # the PV partition of the system disk (offset, size)
    system_pv: str  # loop devices
    data_pv: str
    trees: dict[str, Path]
    #: where lvs says each LV's first extent lies: (image, byte offset)
    starts: dict[str, tuple[Path, int]]

    def areas(self, system: bool = True, data: bool = True) -> list[tuple[object, int, int]]:
        """The candidate areas of the disks as diskimg opens them: the system disk's partitions, the data disk."""
        found: list[tuple[object, int, int]] = []
        if system:
            reader = open_image(self.system)
            found += [(reader, 1 * MiB, 8 * MiB), (reader, *self.partition)]
        if data:
            reader = open_image(self.data)
            found.append((reader, 0, reader.virtual_size))
        return found


def more_volumes(system: str, data: str) -> str:
    """LVs lvcreate cannot make without device-mapper, as LVM2 writes them (lib/raid, lib/mirror, lib/thin,
    lib/snapshot): a raid1 and a mirror with a leg on each disk, a thin pool with a thin LV, a snapshot of root."""
    return "".join((
        lv_section("mirrored", SHOWN, [["start_extent = 0", "extent_count = 2", 'type = "raid1"', "device_count = 2",
                                 "region_size = 1024",
                                 ('raids = ["mirrored_rmeta_0", "mirrored_rimage_0", "mirrored_rmeta_1", '
                                 '"mirrored_rimage_1"]')]]),
        lv_section("mirrored_rmeta_0", HIDDEN, [linear_segment(system, 5, 1)]),
        lv_section("mirrored_rimage_0", HIDDEN, [linear_segment(system, 6, 2)]),
        lv_section("mirrored_rmeta_1", HIDDEN, [linear_segment(data, 2, 1)]),
        lv_section("mirrored_rimage_1", HIDDEN, [linear_segment(data, 3, 2)]),
        lv_section("legacy", SHOWN, [["start_extent = 0", "extent_count = 2", 'type = "mirror"', "mirror_count = 2",
                               "region_size = 1024", 'mirrors = ["legacy_mimage_0", 0, "legacy_mimage_1", 0]']]),
        lv_section("legacy_mimage_0", HIDDEN, [linear_segment(system, 8, 2)]),
        lv_section("legacy_mimage_1", HIDDEN, [linear_segment(data, 5, 2)]),
        lv_section("pool", SHOWN, [["start_extent = 0", "extent_count = 2", 'type = "thin-pool"',
                             'metadata = "pool_tmeta"', 'pool = "pool_tdata"', "transaction_id = 1", "chunk_size = 128",
                             'discards = "passdown"', "zero_new_blocks = 1"]]),
        lv_section("pool_tmeta", HIDDEN, [linear_segment(data, 7, 1)]),
        lv_section("pool_tdata", HIDDEN, [linear_segment(data, 8, 2)]),
        lv_section("thin", SHOWN, [["start_extent = 0", "extent_count = 4", 'type = "thin"', 'thin_pool = "pool"',
                             "transaction_id = 0", "device_id = 1"]]),
        lv_section("snap", SHOWN, [linear_segment(data, 10, 1)]),
        lv_section("snapshot0", HIDDEN, [["start_extent = 0", "extent_count = 3", 'type = "snapshot"', "chunk_size = 8",
                                   'origin = "root"', 'cow_store = "snap"']]),
    ))


def build_two_disks(lvm_tools: LoopLvm, tmp_path: Path) -> TwoDisks:
    system = blank(tmp_path / "system.img", 64 * MiB)
    sfdisk(system, "label: dos\nstart=2048, size=16384, type=83\nstart=18432, type=8e\n")
    partition = (18432 * 512, 64 * MiB - 18432 * 512)
    data = blank(tmp_path / "data.img", 64 * MiB)
    system_pv = lvm_tools.attach(system, *partition)
    data_pv = lvm_tools.attach(data)
    vg = unique_vg("guest-vg")
    lvm_tools("pvcreate", "-q", system_pv, data_pv)
    lvm_tools("vgcreate", "-q", vg, system_pv, data_pv)
    lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", "3", "-n", "root", vg,
              f"{system_pv}:0-2")
    lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-i", "2", "-I", "64k", "-l", "4", "-n",
              "stripes", vg, f"{system_pv}:3-4", f"{data_pv}:0-1")
    backup = tmp_path / "backup.txt"
    lvm_tools("vgcfgbackup", "-q", "-f", backup, vg)
    text = backup.read_text()
    keys = {device: key for key, device in re.findall(r'(pv\d+) \{\s*id = "[^"]*"\s*device = "([^"]+)"', text)}
    end = text.rindex("\t}\n\n}")  # the end of logical_volumes
    (tmp_path / "full.txt").write_text(text[:end] + more_volumes(keys[system_pv], keys[data_pv]) + text[end:])
    lvm_tools("vgcfgrestore", "-q", "--force", "-f", tmp_path / "full.txt", vg)

    pe_starts = {pv["pv_name"]: int(pv["pe_start"]) for pv in lvm_tools.report("pvs", "pv_name,pe_start",
                                                                                system_pv, data_pv)}
    starts = {}
    for lv in lvm_tools.report("lvs", "lv_name,seg_pe_ranges", "-a", vg):
        if lv["seg_pe_ranges"].startswith("/dev/"):
            device, span = lv["seg_pe_ranges"].split()[0].split(":")
            image, offset = lvm_tools.where(device)
            starts[lv["lv_name"].strip("[]")] = (image, offset + pe_starts[device] + int(span.split("-")[0]) * EXTENT)
    (stripes,) = lvm_tools.report("lvs", "seg_pe_ranges,stripe_size", f"{vg}/stripes")
    trees = {}
    image, trees["root"] = ext4_file(tmp_path, "root", 3 * EXTENT)
    write_at(*starts["root"], image.read_bytes())
    image, trees["stripes"] = ext4_file(tmp_path, "stripes", 4 * EXTENT)
    place_striped(lvm_tools, stripes["seg_pe_ranges"], int(stripes["stripe_size"]), image, pe_starts)
    for name, legs in (("mirrored", ("mirrored_rimage_0", "mirrored_rimage_1")),
                       ("legacy", ("legacy_mimage_0", "legacy_mimage_1"))):
        image, trees[name] = ext4_file(tmp_path, name, 2 * EXTENT)
        for leg in legs:  # a mirror's legs hold the same data
            write_at(*starts[leg], image.read_bytes())
    return TwoDisks(lvm_tools, vg, system, data, partition, system_pv, data_pv, trees, starts)


def assemble(areas: list[tuple[object, int, int]], vg_name: str) -> VolumeGroup:
    scan = find_volume_groups(areas)  # type: ignore[arg-type]
    assert scan.problems == []
    (group,) = [vg for vg in scan.volume_groups if vg.name == vg_name]
    return group

