"""The command line: JSON outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import FIXTURES, diskimg_cli, qemu_img, requires_qemu


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert fragment in lines[0]


@requires_qemu
def test_info_json_agrees_with_qemu_img():
    example = FIXTURES / "example.qcow2"
    ours = json.loads(diskimg_cli("info", "--json", example).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", example))
    assert ours["format"] == "qcow2"
    assert ours["virtual_size"] == theirs["virtual-size"]
    assert ours["cluster_size"] == theirs["cluster-size"]
    assert ours["file_size"] == example.stat().st_size


@requires_qemu
def test_map_json_covers_the_disk():
    example = FIXTURES / "example.qcow2"
    extents = json.loads(diskimg_cli("map", "--json", example).stdout)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == json.loads(qemu_img("info", "--output=json", example))["virtual-size"]
    assert {e["kind"] for e in extents} == {"data", "zero"}


def test_quick_start_example_is_importable():
    """The README's first command chains `validate` of the shipped example with `&&`: it must pass.
    The example is an Ubuntu-shaped system made by scripts/make_example.py from the test builders."""
    proc = diskimg_cli("validate", "--json", FIXTURES / "example.qcow2")
    assert proc.returncode == 0, proc.stdout[-2000:]
    report = json.loads(proc.stdout)
    assert report["importable"]
    assert report["import_image"]["Platform"] == "Ubuntu" and report["import_image"]["BootMode"] == "BIOS"


def test_missing_file_is_exit_3(tmp_path):
    assert_one_error_line(diskimg_cli("info", tmp_path / "nope.qcow2"), 3, "no such file")


def test_usage_errors_are_exit_2(tmp_path):
    assert diskimg_cli("info").returncode == 2
    assert diskimg_cli("convert", "a", "b", "-O", "vmdk").returncode == 2
    assert_one_error_line(diskimg_cli("convert", FIXTURES / "example.qcow2", tmp_path / "x", "-S", "3"), 2, "-S")


def test_unwritable_output_is_exit_4(tmp_path):
    proc = diskimg_cli("convert", FIXTURES / "example.qcow2", tmp_path / "no" / "dir" / "out.raw")
    assert_one_error_line(proc, 4, "cannot create")


@pytest.mark.parametrize("garbage", [b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 200, b"conectix" + b"\x00" * 504])
def test_corrupt_headers_are_exit_3_without_traceback(tmp_path, garbage):
    image = tmp_path / "bad.img"
    image.write_bytes(garbage)
    proc = diskimg_cli("convert", image, tmp_path / "out.raw")
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert not (tmp_path / "out.raw").exists()
