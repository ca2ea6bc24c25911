"""measure: the size convert writes, computed without writing; fully_allocated agrees with qemu-img."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import diskimg_cli, qemu_img, qemu_io, requires_qemu


def diskimg_json(*args) -> dict:
    proc = diskimg_cli(*args, "--json", check=True)
    return json.loads(proc.stdout)


@pytest.fixture
def source(tmp_path):
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", image, "300M")
    qemu_io(image, "qcow2", "write -P 0x31 1M 5M", "write -P 0x32 100M 64k", "write -z 200M 4M")
    return image


@requires_qemu
@pytest.mark.parametrize("fmt,options", [("qcow2", ""), ("qcow2", "cluster_size=2M,compat=0.10"),
                                         ("vhd", ""), ("vhd", "subformat=fixed"), ("raw", ""),
                                         ("vdi", ""), ("vdi", "static=on")])
def test_required_is_the_size_of_the_streamed_output(source, tmp_path, fmt, options):
    extra = ["-o", options] if options else []
    measured = diskimg_json("measure", source, "-O", fmt, *extra)
    streamed = subprocess.run(
        f"{sys.executable} -m diskimg convert -S 0 {source} - -O {fmt} {' '.join(extra)} | wc -c",
        shell=True, capture_output=True, check=True)
    assert measured["required"] == int(streamed.stdout)
    assert measured["virtual_size"] == 300 << 20


@requires_qemu
def test_fully_allocated_agrees_with_qemu_img(source):
    ours = diskimg_json("measure", source, "-O", "qcow2")
    theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-f", "qcow2", source))
    assert ours["fully_allocated"] == theirs["fully-allocated"]


@requires_qemu
def test_scan_finds_zeros_inside_allocated_data(tmp_path):
    image = tmp_path / "full.raw"
    with open(image, "wb") as f:  # fully written: the map says data everywhere
        f.write(b"\x01" * 65536 + bytes(8 << 20) + b"\x02" * 65536)
    by_map = diskimg_json("measure", image, "-O", "qcow2")
    by_content = diskimg_json("measure", image, "-O", "qcow2", "-S", "4k")
    assert by_map["data_bytes"] == image.stat().st_size and by_content["data_bytes"] == 2 * 65536
    assert by_content["required"] < by_map["required"]


def test_unknown_options_are_usage_errors(tmp_path):
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(1 << 20))
    for fmt in ("raw", "qcow2", "vhd", "vdi"):
        proc = subprocess.run([sys.executable, "-m", "diskimg", "measure", image, "-O", fmt, "-o", "no_such=1"],
                              capture_output=True)
        assert proc.returncode == 2 and b"no_such" in proc.stderr
