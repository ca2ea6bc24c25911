"""The VDI writer: dynamic and static VDIs to files and pipes, checked by qemu-img (check, compare,
map), read back by our reader, their layout checked against the header's own fields."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

import diskimg
from diskimg.errors import OutputError, UsageError
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.formats.vdi.structures import (
    UNALLOCATED,
    VdiHeader,
    parse_block_map,
    parse_header,
)
from diskimg.formats.vdi.writer import VdiWriter
from diskimg.formats.writer import OutputTarget

from .support.files import random_sparse_file
from .support.images import feed_writer, pieces_content, random_plan
from .support.tools import (
    assert_extents_sound,
    diskimg_cli,
    diskimg_to_pipe,
    qemu_compare,
    qemu_img,
    qemu_io,
    qemu_raw,
    requires_qemu,
)
from .support.units import GiB, MiB

DATA, ZERO = ExtentKind.DATA, ExtentKind.ZERO
ODD_SIZE = 20 * MiB + 3 * 512
ODD_RUNS = [(12345, 70000), (5 * MiB - 100, 3 * MiB + 7), (15 * MiB + 1, 1), (ODD_SIZE - 2000, 2000)]


def layout(path) -> tuple[VdiHeader, list[int]]:
    """The header and block map of a written VDI, checked against the documented layout."""
    data = path.read_bytes()
    header = parse_header(data[:512])
    assert header.text == b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    assert (header.version, header.header_size, header.offset_bmap, header.block_size) == (0x10001, 400, 512, MiB)
    assert header.uuid_image.version == 4 and header.uuid_link.int == header.uuid_parent.int == 0
    blocks = header.blocks_in_image
    assert blocks == -(-header.disk_size // MiB)
    assert header.offset_data == 512 + -(-4 * blocks // 512) * 512
    table = list(parse_block_map(data[512 : 512 + 4 * blocks]))
    allocated = [entry for entry in table if entry != UNALLOCATED]
    assert allocated == list(range(len(allocated)))  # blocks in guest order, packed
    assert header.blocks_allocated == len(allocated)
    assert len(data) == header.offset_data + len(allocated) * MiB
    return header, table


def qemu_check(path) -> None:
    qemu_img("check", "-f", "vdi", path)  # fails the test on any error qemu finds


def convert_by(route: str, source, out, *options: str) -> None:
    extra = ["-o", ",".join(options)] if options else []
    if route == "api":
        diskimg.convert(source, out, "vdi", options=dict(o.split("=") for o in options))
    elif route == "cli":
        proc = diskimg_cli("convert", source, out, "-O", "vdi", *extra)
        assert proc.returncode == 0, proc.stderr
    else:
        diskimg_to_pipe(out, "convert", source, "-", "-O", "vdi", *extra, check=True)


@requires_qemu
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("route", ["api", "cli", "pipe"])
def test_raw_source_round_trip(tmp_path, static, route):
    source = tmp_path / "src.raw"
    random_sparse_file(source, ODD_SIZE, ODD_RUNS)
    out = tmp_path / "out.vdi"
    convert_by(route, source, out, *(["static=on"] if static else []))
    qemu_check(out)
    qemu_compare(source, "raw", out, "vdi")
    info = json.loads(qemu_img("info", "--output=json", out))
    assert info["format"] == "vdi" and info["virtual-size"] == ODD_SIZE
    header, table = layout(out)
    assert header.image_type == (2 if static else 1) and header.disk_size == ODD_SIZE
    if static:
        assert table == list(range(header.blocks_in_image))
    else:
        holding = {b for start, length in ODD_RUNS for b in range(start // MiB, (start + length - 1) // MiB + 1)}
        assert {i for i, entry in enumerate(table) if entry != UNALLOCATED} == holding
    with diskimg.open_image(out) as disk:
        assert disk.subformat == ("fixed" if static else "dynamic")
        assert_extents_sound(disk, qemu_raw(out, "vdi", tmp_path))


@requires_qemu
@pytest.mark.parametrize("source_format", ["qcow2", "vhd", "vdi"])
def test_other_sources_and_back(tmp_path, source_format):
    source = tmp_path / f"src.{source_format}"
    qemu_img("create", "-q", "-f", "vpc" if source_format == "vhd" else source_format, source, "9M")
    qemu = "vpc" if source_format == "vhd" else source_format
    qemu_io(source, qemu, "write -P 0x5a 1M 64k", "write -P 0x11 7M 2M")
    out = tmp_path / "out.vdi"
    diskimg.convert(source, out, "vdi")
    qemu_check(out)
    qemu_compare(source, qemu, out, "vdi")
    back = tmp_path / "back.qcow2"
    diskimg.convert(out, back, "qcow2")
    qemu_compare(source, qemu, back, "qcow2")


@requires_qemu
def test_empty_and_tiny_disks(tmp_path):
    for size in (0, 512, 1000, MiB, MiB + 512):
        source = tmp_path / f"empty-{size}.raw"
        source.write_bytes(b"")
        os.truncate(source, size)
        out = tmp_path / f"empty-{size}.vdi"
        proc = diskimg_cli("convert", source, out, "-O", "vdi")
        assert proc.returncode == 0, proc.stderr
        qemu_check(out)
        header, table = layout(out)
        assert header.disk_size == -(-size // 512) * 512 and set(table) <= {UNALLOCATED}


@requires_qemu
def test_empty_4t_disk_is_quick_and_small(tmp_path):
    source = tmp_path / "big.raw"
    source.write_bytes(b"")
    os.truncate(source, 4096 * GiB)
    for target in ("file", "pipe"):
        out = tmp_path / f"big-{target}.vdi"
        if target == "file":
            diskimg.convert(source, out, "vdi")
        else:
            diskimg_to_pipe(out, "convert", source, "-", "-O", "vdi", check=True)
        qemu_check(out)
        assert os.path.getsize(out) == 512 + 4 * 4 * MiB


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"subformat": "dynamic"}, "does not take"),
        ({"block_size": "1M"}, "does not take"),
        ({"static": "maybe"}, "expected on or off"),
        ({"preallocation": "full"}, "preallocation='full' is not supported"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, options, fragment):
    fd = os.open(tmp_path / "x.vdi", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(UsageError, match=fragment):
            VdiWriter(OutputTarget(fd, "x.vdi"), MiB, options, False)
    finally:
        os.close(fd)
    source = tmp_path / "s.raw"
    source.write_bytes(bytes(MiB))
    text = ",".join(f"{key}={value}" for key, value in options.items())
    proc = diskimg_cli("convert", source, tmp_path / "bad.vdi", "-O", "vdi", "-o", text)
    assert proc.returncode == 2 and fragment.split("'")[0].encode() in proc.stderr
    assert not (tmp_path / "bad.vdi").exists()


def test_too_big_is_refused(tmp_path):
    with pytest.raises(UsageError, match="at most 16 TiB"):
        VdiWriter.measure(16 * 1024 * GiB + 512, [], {})


def test_compression_is_refused(tmp_path):
    fd = os.open(tmp_path / "x.vdi", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(UsageError, match="cannot be compressed"):
            VdiWriter(OutputTarget(fd, "x.vdi"), MiB, {}, True)
    finally:
        os.close(fd)


# -- the writer driven directly: plans, pieces, measure ---------------------------------------------


def _drive(path, size: int, plan: list[Extent], pieces: list[tuple[int, bytes]], options: dict, *,
           streaming: bool) -> VdiWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        writer = VdiWriter(OutputTarget(fd, str(path), hash_output=streaming), size, options, False)
        assert writer.requires_exact_plan == (streaming and options.get("static", "off") == "off")
        feed_writer(writer, plan, pieces, reserve=not streaming)
    finally:
        os.close(fd)
    return writer


@requires_qemu
@pytest.mark.parametrize("seed", range(6))
def test_random_plans_round_trip_and_measure(tmp_path, seed):
    rng = random.Random(seed)
    size = rng.choice([rng.randint(1, 30) * MiB + rng.randint(0, 2 * MiB), 3 * MiB]) // 512 * 512
    options = rng.choice([{}, {"static": "on"}])
    plan, pieces = random_plan(rng, size)
    expected = pieces_content(size, pieces)
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}.vdi"
        _drive(out, size, plan, pieces, options, streaming=streaming)
        assert VdiWriter.measure(size, plan, options) == os.path.getsize(out)
        qemu_check(out)
        _, table = layout(out)
        with diskimg.open_image(out) as disk:
            assert disk.virtual_size == size and disk.read_at(0, size) == expected
        if not options:
            holding = {i // MiB for offset, data in pieces for i in range(offset, offset + len(data), 512)}
            assert {i for i, entry in enumerate(table) if entry != UNALLOCATED} == holding


def test_streaming_keeps_planned_blocks_that_get_no_data(tmp_path):
    plan = [Extent(0, 3 * MiB, ZERO), Extent(3 * MiB, 2 * MiB, DATA), Extent(5 * MiB, 3 * MiB, ZERO)]
    pieces = [(4 * MiB + 7, b"\x01" * 100)]
    streamed = tmp_path / "streamed.vdi"
    _drive(streamed, 8 * MiB, plan, pieces, {}, streaming=True)
    assert layout(streamed)[1][3:5] == [0, 1]  # the plan's blocks, even the one left empty
    seekable = tmp_path / "seekable.vdi"
    _drive(seekable, 8 * MiB, plan, pieces, {}, streaming=False)
    assert layout(seekable)[1][3:5] == [UNALLOCATED, 0]  # on a file, only the block that got data
    for out in (streamed, seekable):
        with diskimg.open_image(out) as disk:
            assert disk.read_at(4 * MiB, 200) == bytes(7) + b"\x01" * 100 + bytes(93)


@pytest.mark.parametrize("plan", [[Extent(0, MiB, DATA), Extent(MiB, 3 * MiB, ZERO)], []])
def test_streaming_refuses_data_outside_the_plan(tmp_path, plan):
    with pytest.raises(OutputError, match="plan"):
        _drive(tmp_path / "out.vdi", 4 * MiB, plan, [(3 * MiB, b"\x01")], {}, streaming=True)


def test_measure_for_several_plans():
    assert VdiWriter.measure(0, [], {}) == 512
    assert VdiWriter.measure(ODD_SIZE, [Extent(0, ODD_SIZE, ZERO)], {}) == 1024
    assert VdiWriter.measure(ODD_SIZE, [Extent(0, ODD_SIZE, DATA)], {}) == 1024 + 21 * MiB
    assert VdiWriter.measure(ODD_SIZE, [], {"static": "on"}) == 1024 + 21 * MiB
    plan = [Extent(0, MiB - 512, ZERO), Extent(MiB - 512, 1024, DATA), Extent(MiB + 512, 4 * MiB, ZERO)]
    assert VdiWriter.measure(5 * MiB + 512, plan, {}) == 1024 + 2 * MiB
    assert VdiWriter.measure(1024 * GiB, [], {}) == 512 + 4 * MiB


def test_map_entries_are_little_endian(tmp_path):
    out = tmp_path / "le.vdi"
    _drive(out, 3 * MiB, [Extent(0, 2 * MiB, ZERO), Extent(2 * MiB, MiB, DATA)], [(2 * MiB, b"\x07")], {},
           streaming=True)
    data = out.read_bytes()
    assert struct.unpack_from("<3I", data, 512) == (UNALLOCATED, UNALLOCATED, 0)
    assert struct.unpack_from("<I", data, 64)[0] == 0xBEDA107F
