"""Builders shared by the tests (moved from test_lvm.py)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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

