"""The command line: JSON outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_public_names_resolve_after_every_module_is_loaded():
    """The API is imported lazily: each public name is what it says even once the modules of the
    same stem (conversion, validation, ...) are loaded, which sets attributes on the package."""
    code = (
        "import importlib, pkgutil, diskimg\n"
        "for m in pkgutil.walk_packages(diskimg.__path__, 'diskimg.'):\n"
        "    if m.name != 'diskimg.__main__': importlib.import_module(m.name)\n"
        "import types\n"
        "bad = [n for n in diskimg.__all__ if isinstance(getattr(diskimg, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert all(callable(getattr(diskimg, n)) for n in ('convert', 'compare', 'check', 'validate', 'export',"
        " 'verify', 'unpack', 'detect', 'open_image', 'measure'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_convert_does_not_load_the_validator_or_the_archivers(tmp_path):
    """Start-up time counts on every run: converting loads neither validation, guest inspection,
    nor the archive and compression modules."""
    source = tmp_path / "d.raw"
    source.write_bytes(b"\1" * 4096 + bytes(1 << 20))
    code = (
        "import sys\nfrom diskimg.cli import main\n"
        f"try: main(['convert', '--no-progress', {str(source)!r}, {str(tmp_path / 'o.qcow2')!r}, '-O', 'qcow2'])\n"
        "except SystemExit as exit: assert exit.code == 0, exit.code\n"
        "loaded = [m for m in ('diskimg.validation', 'diskimg.guest', 'diskimg.fs', 'diskimg.exporter',"
        " 'diskimg.unpacker', 'diskimg.sources', 'zlib_ng', 'lz4', 'tqdm') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
