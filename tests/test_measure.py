"""measure: the size convert writes, computed without writing; fully_allocated agrees with qemu-img."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .support.images import l1_entries_all_pointing_at_the_first_l2_table
from .support.tools import diskimg_cli, qemu_img, qemu_io, requires_qemu


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


@requires_qemu
def test_l1_entries_sharing_one_l2_table_are_refused_in_seconds(tmp_path):
    """qemu-img check counts such an image corrupt; reading it would map the one table's data again
    for each of 16384 entries (minutes of work for a 1.5 MiB file): the reader refuses it."""
    path = l1_entries_all_pointing_at_the_first_l2_table(tmp_path, "8T")
    oracle = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True)
    assert json.loads(oracle.stdout)["corruptions"] > 0
    proc = diskimg_cli("measure", path, "-O", "qcow2", timeout=20)
    assert proc.returncode == 3 and not proc.stdout
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "same L2 table" in lines[0]


@requires_qemu
def test_measure_and_convert_agree_on_a_2_pib_disk(tmp_path):
    """qemu-img creates a 2 PiB qcow2 and measures it; convert writes it; measure refused it because
    its fully allocated figure (a 2 PiB file) would need a refcount table over qemu's 8 MiB limit."""
    image = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "2P")
    theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", image))
    ours = diskimg_json("measure", image, "-O", "qcow2")
    assert ours["fully_allocated"] == theirs["fully-allocated"]
    out = tmp_path / "out.qcow2"
    diskimg_cli("convert", image, out, "-O", "qcow2", check=True)
    assert ours["required"] == out.stat().st_size
    assert "No errors" in subprocess.run(["qemu-img", "check", out], capture_output=True, text=True).stdout
