"""The VHD writer: fixed and dynamic VHDs to files and pipes, checked with qemu-img (info, compare),
read back with our own reader, and their layout checked byte by byte against the specification."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
from array import array

import pytest

import diskimg
from diskimg.errors import OutputError, UsageError
from diskimg.formats import WRITERS
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.formats.vhd import VhdWriter
from diskimg.formats.vhd.structures import (
    MAX_GEOMETRY,
    bitmap_size,
    chs_geometry,
    footer_problem,
    parse_dynamic_header,
    parse_footer,
    vhd_checksum,
)
from diskimg.formats.writer import OutputTarget

from .support.digests import file_sha256, reader_sha256
from .support.files import random_sparse_file
from .support.images import feed_writer, pieces_content, random_plan, scan_plan
from .support.tools import diskimg_cli, diskimg_to_pipe, qemu_compare, qemu_img, qemu_info, qemu_io, requires_qemu
from .support.units import GiB, KiB, MiB

#: 100 MiB + 3 sectors: neither a multiple of 2 MiB nor a CHS-representable size
ODD_SIZE = 100 * MiB + 3 * 512
#: 1000 cylinders x 4 heads x 17 sectors: a size the specification's CHS describes exactly
CHS_EXACT_SIZE = 1000 * 4 * 17 * 512

DATA = ExtentKind.DATA
ZERO = ExtentKind.ZERO


# -- helpers ---------------------------------------------------------------------------------------


#: random data at unaligned offsets: inside one block, across block boundaries, one byte, the last sector
ODD_RUNS = [(12345, 70000), (5 * MiB - 100, 3 * MiB + 7), (50 * MiB + 1, 1), (ODD_SIZE - 2000, 2000)]


def nonzero_blocks(path, block_size: int) -> set[int]:
    """Indices of the ``block_size`` blocks of a raw file holding a non-zero byte."""
    blocks = set()
    zero = bytes(block_size)
    with open(path, "rb") as f:
        index = 0
        while chunk := f.read(block_size):
            if chunk != zero[: len(chunk)]:
                blocks.add(index)
            index += 1
    return blocks


def dynamic_layout(path) -> tuple[list[int], int]:
    """Check a dynamic VHD's layout against the specification and return (BAT entries, block size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1536)
        f.seek(size - 512)
        tail = f.read(512)
        assert footer_problem(tail) is None and head[:512] == tail  # the copy at 0 equals the footer
        footer = parse_footer(tail)
        assert footer.disk_type == 3 and footer.data_offset == 512
        header = parse_dynamic_header(head[512:1536])
        assert header.cookie == b"cxsparse" and header.data_offset == 0xFFFFFFFFFFFFFFFF
        assert header.checksum == vhd_checksum(head[512:1536], 36)
        assert header.table_offset == 1536
        assert header.max_table_entries == -(-footer.current_size // header.block_size)
        table_bytes = -(-header.max_table_entries * 4 // 512) * 512
        f.seek(1536)
        table = f.read(table_bytes)
        bat = list(struct.unpack(f">{header.max_table_entries}I", table[: header.max_table_entries * 4]))
        assert table[header.max_table_entries * 4 :] == b"\xff" * (table_bytes - header.max_table_entries * 4)
        span = bitmap_size(header.block_size) + header.block_size
        allocated = [entry for entry in bat if entry != 0xFFFFFFFF]
        # blocks in guest order, packed one after the other from the end of the table to the footer
        expected = [(1536 + table_bytes) // 512 + i * span // 512 for i in range(len(allocated))]
        assert allocated == expected
        assert size == 1536 + table_bytes + len(allocated) * span + 512
        for entry in allocated:
            f.seek(entry * 512)
            assert f.read(bitmap_size(header.block_size)) == b"\xff" * bitmap_size(header.block_size)
    return bat, header.block_size


def allocated_blocks(path) -> set[int]:
    bat, _ = dynamic_layout(path)
    return {index for index, entry in enumerate(bat) if entry != 0xFFFFFFFF}


def check_output(out, source, source_format: str, size: int, subformat: str, *,
                 ranges: list[tuple[int, int]] | None = None) -> None:
    """What every output must satisfy: qemu reads it as a VHD of exactly ``size`` bytes, holding the
    source's content; our reader agrees (over the whole disk, or only over ``ranges`` for big
    sparse disks); the footer is as documented."""
    info = qemu_info(out, "vpc" if subformat == "fixed" else None)  # qemu probes fixed VHDs as raw
    assert info["format"] == "vpc" and info["virtual-size"] == size
    qemu_compare(source, source_format, out, "vpc")
    with diskimg.open_image(out) as disk:
        assert disk.format == "vhd" and disk.subformat == subformat and disk.virtual_size == size
        assert disk.footer.current_size == disk.footer.original_size == size
        assert disk.footer.creator_app == b"dimg" and disk.footer.creator_host_os == b"Wi2k"
        assert disk.footer.features == 2 and disk.footer.format_version == 0x00010000
        assert disk.footer.saved_state == 0 and disk.footer.unique_id.version == 4
        assert abs(disk.footer.timestamp + 946684800 - time.time()) < 600
        with diskimg.open_image(source, source_format) as original:
            if ranges is None:
                assert reader_sha256(disk) == reader_sha256(original)
            else:
                for offset, length in ranges:
                    assert disk.read_at(offset, length) == original.read_at(offset, length)
    if subformat == "fixed":
        assert os.path.getsize(out) == size + 512
    else:
        dynamic_layout(out)


def convert_by(route: str, source, out, subformat: str, *extra: str) -> None:
    if route == "api":
        diskimg.convert(source, out, "vhd", options={"subformat": subformat})
    elif route == "cli":
        proc = diskimg_cli("convert", source, out, "-O", "vhd", "-o", f"subformat={subformat}", *extra)
        assert proc.returncode == 0, proc.stderr
    else:
        diskimg_to_pipe(out, "convert", source, "-", "-O", "vhd", "-o", f"subformat={subformat}", *extra, check=True)


# -- round trips against qemu-img --------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("route", ["api", "cli", "pipe"])
def test_raw_source_round_trip(tmp_path, subformat, route):
    source = tmp_path / "src.raw"
    random_sparse_file(source, ODD_SIZE, ODD_RUNS)
    out = tmp_path / "out.vhd"
    convert_by(route, source, out, subformat)
    check_output(out, source, "raw", ODD_SIZE, subformat)
    with diskimg.open_image(out) as disk:
        assert disk.footer.geometry == MAX_GEOMETRY  # the size is not CHS-representable
    if subformat == "dynamic":
        # only blocks holding data exist, on a file (allocated as data comes) and on a pipe (exact plan)
        assert allocated_blocks(out) == nonzero_blocks(source, 2 * MiB)
    with diskimg.open_image(source) as src:
        assert VhdWriter.measure(ODD_SIZE, scan_plan(src), {"subformat": subformat}) == os.path.getsize(out)


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_chs_exact_size_keeps_its_geometry(tmp_path, subformat):
    assert chs_geometry(CHS_EXACT_SIZE // 512) == (1000, 4, 17)
    source = tmp_path / "src.raw"
    random_sparse_file(source, CHS_EXACT_SIZE, [(CHS_EXACT_SIZE // 3 + 5, 5000), (CHS_EXACT_SIZE - 512, 512)])
    out = tmp_path / "out.vhd"
    diskimg.convert(source, out, "vhd", options={"subformat": subformat})
    check_output(out, source, "raw", CHS_EXACT_SIZE, subformat)
    with diskimg.open_image(out) as disk:
        assert disk.footer.geometry == (1000, 4, 17) and disk.footer.chs_size == CHS_EXACT_SIZE
    # qemu 7.2 takes a non-maximal geometry at its word for an unknown creator: equal here anyway
    chs = f"driver=vpc,force_size_calc=chs,file.filename={out}"
    assert json.loads(qemu_img("info", "--output=json", "--image-opts", chs))["virtual-size"] == CHS_EXACT_SIZE


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_non_chs_size_is_read_exactly_whatever_the_size_rule(tmp_path, subformat):
    source = tmp_path / "src.raw"
    random_sparse_file(source, 64 * MiB, [(MiB + 3, 1000)])
    out = tmp_path / "out.vhd"
    diskimg.convert(source, out, "vhd", options={"subformat": subformat})
    check_output(out, source, "raw", 64 * MiB, subformat)
    for rule in ("current_size", "chs"):  # the saturated geometry: qemu uses current_size even when told chs
        opts = f"driver=vpc,force_size_calc={rule},file.filename={out}"
        size = json.loads(qemu_img("info", "--output=json", "--image-opts", opts))["virtual-size"]
        assert size == 64 * MiB


@requires_qemu
@pytest.mark.parametrize("target", ["file", "pipe"])
def test_qcow2_source(tmp_path, target):
    source = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", source, "64M")
    qemu_io(
        source, "qcow2",
        "write -P 0x11 0 4k", "write -P 0x22 1536k 1M", "write -P 0x33 10000k 17k", "write -z 20M 4M",
        "write -P 0x44 40M 6M", "discard 42M 2M", "write -P 0x55 67108352 512",
    )  # fmt: skip
    out = tmp_path / "out.vhd"
    if target == "file":
        diskimg.convert(source, out, "vhd")
    else:
        diskimg_to_pipe(out, "convert", source, "-", "-O", "vhd", check=True)
    check_output(out, source, "qcow2", 64 * MiB, "dynamic")
    oracle = tmp_path / "oracle.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", source, oracle)
    assert allocated_blocks(out) == nonzero_blocks(oracle, 2 * MiB)


@requires_qemu
def test_sparse_4g_source(tmp_path):
    size = 4 * GiB
    source = tmp_path / "src.raw"
    random_sparse_file(source, size, [(0, 4096), (GiB + 511, 3 * MiB), (size - 65536, 65536)], seed=4)
    for subformat in ("dynamic", "fixed"):
        out = tmp_path / f"{subformat}.vhd"
        diskimg.convert(source, out, "vhd", options={"subformat": subformat})
        # reading 4 GiB of zeros through the readers takes long: qemu-img compare covers the whole disk
        check_output(out, source, "raw", size, subformat, ranges=[(0, 8192), (GiB - 4096, 4 * MiB), (size - MiB, MiB)])
        assert os.stat(out).st_blocks * 512 < 32 * MiB  # holes where there is no data
    assert allocated_blocks(tmp_path / "dynamic.vhd") == {0, 512, 513, 2047}


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_align_gives_a_mib_multiple_with_zero_tail(tmp_path, subformat):
    source = tmp_path / "src.raw"
    random_sparse_file(source, ODD_SIZE, ODD_RUNS)
    out = tmp_path / "out.vhd"
    diskimg.convert(source, out, "vhd", options={"subformat": subformat}, align=1 << 20)
    size = 101 * MiB
    info = qemu_info(out, "vpc")
    assert info["format"] == "vpc" and info["virtual-size"] == size
    qemu_compare(source, "raw", out, "vpc")  # the extra tail reads as zeros
    if subformat == "fixed":
        assert os.path.getsize(out) == size + 512  # what Azure wants: N MiB + 512
    with diskimg.open_image(out) as disk:
        assert disk.virtual_size == size and disk.read_at(ODD_SIZE, size - ODD_SIZE) == bytes(size - ODD_SIZE)


@requires_qemu
def test_unaligned_source_size_is_rounded_to_a_sector(tmp_path):
    source = tmp_path / "src.raw"
    random_sparse_file(source, 5 * MiB + 1000, [(5 * MiB + 100, 900)])  # a raw file of whole sectors plus 1000 bytes
    for subformat in ("dynamic", "fixed"):
        out = tmp_path / f"{subformat}.vhd"
        diskimg.convert(source, out, "vhd", options={"subformat": subformat})
        check_output(out, source, "raw", 5 * MiB + 1024, subformat)


@requires_qemu
@pytest.mark.parametrize("block_size", ["512K", "16M"])
def test_other_block_sizes(tmp_path, block_size):
    source = tmp_path / "src.raw"
    random_sparse_file(source, ODD_SIZE, ODD_RUNS)
    for target in ("file", "pipe"):
        out = tmp_path / f"{target}.vhd"
        if target == "file":
            diskimg.convert(source, out, "vhd", options={"block_size": block_size})
        else:
            diskimg_to_pipe(out, "convert", source, "-", "-O", "vhd", "-o", f"block_size={block_size}", check=True)
        check_output(out, source, "raw", ODD_SIZE, "dynamic")
        bat, block = dynamic_layout(out)
        assert block == (512 * KiB if block_size == "512K" else 16 * MiB)
        assert allocated_blocks(out) == nonzero_blocks(source, block)


@requires_qemu
def test_sparse_size_zero_writes_the_source_allocation(tmp_path):
    """-S 0: every allocated byte is written, zeros included, so allocated zero blocks stay allocated."""
    source = tmp_path / "src.raw"
    random_sparse_file(source, 32 * MiB, [(MiB, 1000)])
    with open(source, "r+b") as f:  # allocated zeros in block 5
        f.seek(10 * MiB + 4096)
        f.write(bytes(8192))
        os.fsync(f.fileno())
    with diskimg.open_image(source) as disk:
        planned = [e for e in disk.extents() if e.kind is DATA]
    if not any(e.start <= 10 * MiB + 4096 < e.end for e in planned):
        pytest.skip("the file system does not report the allocated zeros")
    for target in ("file", "pipe"):
        out = tmp_path / f"{target}.vhd"
        if target == "file":
            diskimg.convert(source, out, "vhd", zero_granularity=0)
        else:
            diskimg_to_pipe(out, "convert", source, "-", "-O", "vhd", "-S", "0", check=True)
        check_output(out, source, "raw", 32 * MiB, "dynamic")
        assert allocated_blocks(out) == {0, 5}


@requires_qemu
def test_checksum_on_a_file_streams_and_hashes_the_output(tmp_path):
    source = tmp_path / "src.raw"
    random_sparse_file(source, ODD_SIZE, ODD_RUNS)
    out = tmp_path / "out.vhd"
    proc = diskimg_cli("convert", source, out, "-O", "vhd", "--checksum", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["sha256"] == file_sha256(out)
    check_output(out, source, "raw", ODD_SIZE, "dynamic")
    assert allocated_blocks(out) == nonzero_blocks(source, 2 * MiB)


# -- big disks and limits ------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("target", ["file", "pipe"])
def test_empty_2000g_disk_is_quick(tmp_path, target):
    source = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", source, "2000G")
    out = tmp_path / "big.vhd"
    started = time.monotonic()
    if target == "file":
        diskimg.convert(source, out, "vhd")
    else:
        diskimg_to_pipe(out, "convert", source, "-", "-O", "vhd", check=True)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"{elapsed:.1f} s"  # generous: a few seconds at most on the slowest machine seen
    info = qemu_info(out, "vpc")
    assert info["format"] == "vpc" and info["virtual-size"] == 2000 * GiB
    assert allocated_blocks(out) == set()
    assert os.path.getsize(out) == 1536 + 2000 * 512 * 4 + 512  # 1,024,000 BAT entries


@requires_qemu
def test_2040g_is_the_dynamic_limit(tmp_path):
    source = tmp_path / "max.qcow2"
    qemu_img("create", "-f", "qcow2", source, "2040G")
    out = tmp_path / "max.vhd"
    diskimg.convert(source, out, "vhd")
    assert qemu_info(out, "vpc")["virtual-size"] == 2040 * GiB

    source = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", source, "2041G")
    refused = tmp_path / "over.vhd"
    with pytest.raises(UsageError, match="2040 GiB"):
        diskimg.convert(source, refused, "vhd")
    proc = diskimg_cli("convert", source, refused, "-O", "vhd")
    assert proc.returncode == 2 and b"2040 GiB" in proc.stderr and b"Traceback" not in proc.stderr
    assert not refused.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@requires_qemu
def test_fixed_above_2040g_is_for_azure(tmp_path):
    """Fixed VHDs may exceed qemu's 2040 GiB (Azure takes up to 32 TiB); qemu refuses to open them,
    our reader reads them. Above 32 TiB is refused."""
    source = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", source, "2041G")
    qemu_io(source, "qcow2", "write -P 0x5a 2000G 64k")
    out = tmp_path / "big.vhd"
    try:
        diskimg.convert(source, out, "vhd", options={"subformat": "fixed"})
    except OutputError as exc:  # a file system without files this large
        pytest.skip(str(exc))
    assert os.path.getsize(out) == 2041 * GiB + 512
    with diskimg.open_image(out) as disk:
        assert disk.virtual_size == 2041 * GiB and disk.read_at(2000 * GiB, 4) == b"\x5a" * 4
    assert subprocess.run(["qemu-img", "info", "-f", "vpc", out], capture_output=True).returncode != 0
    with pytest.raises(UsageError, match="32 TiB"):
        WRITERS["vhd"](_null_target(tmp_path), (32 << 40) + 512, {"subformat": "fixed"}, False)


# -- options -------------------------------------------------------------------------------------


def _null_target(tmp_path, *, streaming: bool = False) -> OutputTarget:
    fd = os.open(tmp_path / "null.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    return OutputTarget(fd, "null.out", hash_output=streaming)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"cluster_size": "64k"}, "does not take"),
        ({"subformat": "sparse"}, "dynamic' or 'fixed"),
        ({"block_size": "3M"}, "power of two"),
        ({"block_size": "256K"}, "power of two"),
        ({"block_size": "512M"}, "power of two"),
        ({"block_size": "big"}, "invalid size"),
        ({"subformat": "fixed", "block_size": "2M"}, "dynamic only"),
        ({"force_size": "off"}, "exact size"),
        ({"force_size": "maybe"}, "on or off"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, options, fragment):
    with pytest.raises(UsageError, match=fragment):
        VhdWriter(_null_target(tmp_path), MiB, options, False)
    with pytest.raises(UsageError, match=fragment):
        VhdWriter.measure(MiB, [], options)


def test_compression_is_refused(tmp_path):
    with pytest.raises(UsageError, match="compress"):
        VhdWriter(_null_target(tmp_path), MiB, {}, True)


@requires_qemu
def test_cli_options_as_qemu_img_takes_them(tmp_path):
    source = tmp_path / "src.raw"
    random_sparse_file(source, 64 * MiB, [(MiB + 3, 1000)])
    out = tmp_path / "out.vhd"
    proc = diskimg_cli("convert", source, out, "-O", "vpc", "-o", "subformat=fixed,force_size")
    assert proc.returncode == 0, proc.stderr
    check_output(out, source, "raw", 64 * MiB, "fixed")
    proc = diskimg_cli("convert", source, tmp_path / "bad.vhd", "-O", "vhd", "-o", "subformat=fixed,block_size=4M")
    assert proc.returncode == 2 and b"dynamic only" in proc.stderr


# -- the writer driven directly: plans, pieces, measure ---------------------------------------------


def _drive(path, size: int, plan: list[Extent], pieces: list[tuple[int, bytes]], options: dict, *,
           streaming: bool) -> VhdWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        target = OutputTarget(fd, str(path), hash_output=streaming)
        writer = VhdWriter(target, size, options, False)
        assert writer.requires_exact_plan == (streaming and options.get("subformat", "dynamic") == "dynamic")
        feed_writer(writer, plan, pieces)
    finally:
        os.close(fd)
    return writer


@pytest.mark.parametrize("seed", range(8))
def test_random_plans_round_trip_and_measure(tmp_path, seed):
    rng = random.Random(seed)
    size = rng.choice([rng.randint(1, 40) * MiB + rng.randint(0, 2 * MiB), 3 * MiB, 8 * MiB]) // 512 * 512
    options = rng.choice([{}, {"block_size": "512K"}, {"block_size": "1M"}, {"subformat": "fixed"}])
    plan, pieces = random_plan(rng, size)
    expected = pieces_content(size, pieces)
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}.vhd"
        _drive(out, size, plan, pieces, options, streaming=streaming)
        assert VhdWriter.measure(size, plan, options) == os.path.getsize(out)
        with diskimg.open_image(out) as disk:
            assert disk.virtual_size == size and disk.read_at(0, size) == expected
        if options.get("subformat") != "fixed":
            block = {"512K": 512 * KiB, "1M": MiB}.get(options.get("block_size", ""), 2 * MiB)
            holding = {i // block for offset, data in pieces for i in range(offset, offset + len(data), 512)}
            assert allocated_blocks(out) == holding


def test_streaming_writes_planned_blocks_that_get_no_data(tmp_path):
    plan = [Extent(0, 3 * MiB, ZERO), Extent(3 * MiB, 4 * MiB, DATA), Extent(7 * MiB, 3 * MiB, ZERO)]
    pieces = [(5 * MiB + 7, b"\x01" * 100)]
    streamed = tmp_path / "streamed.vhd"
    _drive(streamed, 10 * MiB, plan, pieces, {}, streaming=True)
    assert allocated_blocks(streamed) == {1, 2, 3}  # the plan's blocks, even those left empty
    assert os.path.getsize(streamed) == VhdWriter.measure(10 * MiB, plan, {})
    seekable = tmp_path / "seekable.vhd"
    _drive(seekable, 10 * MiB, plan, pieces, {}, streaming=False)
    assert allocated_blocks(seekable) == {2}  # on a file, only the block that got data
    for out in (streamed, seekable):
        with diskimg.open_image(out) as disk:
            assert disk.read_at(5 * MiB, 200) == bytes(7) + b"\x01" * 100 + bytes(93)


@pytest.mark.parametrize("plan", [[Extent(0, 2 * MiB, DATA), Extent(2 * MiB, 2 * MiB, ZERO)], []])
def test_streaming_refuses_data_outside_the_plan(tmp_path, plan):
    with pytest.raises(OutputError, match="plan"):
        _drive(tmp_path / "out.vhd", 4 * MiB, plan, [(3 * MiB, b"\x01")], {}, streaming=True)


def test_measure_for_several_plans():
    span = 2 * MiB + 512
    assert VhdWriter.measure(0, [], {}) == 1536 + 0 + 512
    assert VhdWriter.measure(ODD_SIZE, [Extent(0, ODD_SIZE, ZERO)], {}) == 1536 + 512 + 512
    assert VhdWriter.measure(ODD_SIZE, [Extent(0, ODD_SIZE, DATA)], {}) == 1536 + 512 + 51 * span + 512
    plan = [Extent(0, 2 * MiB - 512, ZERO), Extent(2 * MiB - 512, 1024, DATA), Extent(2 * MiB + 512, 8 * MiB, ZERO)]
    assert VhdWriter.measure(10 * MiB + 512, plan, {}) == 1536 + 512 + 2 * span + 512
    assert VhdWriter.measure(ODD_SIZE - 1000, [], {"subformat": "fixed"}) == (ODD_SIZE - 512) + 512  # whole sectors
    assert VhdWriter.measure(2000 * GiB, [Extent(0, 2000 * GiB, ZERO)], {}) == 1536 + 4096000 + 512
    with pytest.raises(UsageError, match="2040 GiB"):
        VhdWriter.measure(2041 * GiB, [], {})


def test_bat_memory_is_an_array(tmp_path):
    writer = VhdWriter(_null_target(tmp_path), 2040 * GiB, {}, False)
    assert isinstance(writer.bat, array) and writer.bat.itemsize == 4 and len(writer.bat) == 1044480
