"""The qcow2 writer: v3 and v2 images, every cluster size, refcount widths, compressed clusters
(zlib and zstd), to files and to pipes. qemu-img is the oracle: every output passes
``qemu-img check`` with no corruptions and no leaks and ``qemu-img compare`` with its source; our own
reader reads it back identically; zero regions stay unallocated."""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
import threading
import time
import zlib
from array import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import diskimg
from diskimg.errors import OutputError, UsageError
from diskimg.formats import WRITERS
from diskimg.formats.qcow2.structures import (
    EXT_FEATURE_NAMES,
    L1E_OFFSET_MASK,
    Qcow2Header,
    decode_l2_entry,
    pack_refcounts,
    parse_header_extensions,
)
from diskimg.formats.qcow2.writer import FEATURE_NAME_TABLE, Qcow2Writer, plan_layout
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.formats.writer import OutputTarget
from diskimg.units import parse_size

from .support.digests import file_sha256, reader_sha256
from .support.images import feed_writer, pieces_content, random_plan, scan_plan
from .support.tools import diskimg_cli, diskimg_to_pipe, qemu_compare, qemu_img, qemu_info, qemu_io, requires_qemu
from .support.units import GiB, KiB, MiB

DATA = ExtentKind.DATA
ZERO = ExtentKind.ZERO

#: not a multiple of any cluster size above 512: the last cluster is partial
SIZE = 37 * MiB + 3 * 512
TEXT = b"".join(b"line %d of a log file that compresses well\n" % i for i in range(60000))


# -- helpers ---------------------------------------------------------------------------------------


def make_source(path, size: int = SIZE, seed: int = 0) -> None:
    """A sparse raw disk: random data at unaligned offsets (one piece crossing cluster boundaries,
    one byte alone, the partial last cluster), compressible text, written zeros inside the data
    (allocated in the file, zero in content) and holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in [(12345, 70000), (MiB - 100, 200), (3 * MiB, 2 * MiB + 7), (9 * MiB + 1, 1),
                               (size - 2000, 2000)]:
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(20 * MiB + 333)
        f.write(TEXT[: 3 * MiB // 2])
        f.seek(30 * MiB + 5000)
        f.write(TEXT[:40000])
        f.seek(3 * MiB + 100 * KiB)  # a zero range inside the random data
        f.write(bytes(200 * KiB))
        f.seek(25 * MiB)  # allocated zeros
        f.write(bytes(256 * KiB))


def nonzero_clusters(path, cluster_size: int, granularity: int = 4096) -> set[int]:
    """Indices of the clusters of a raw file holding a non-zero byte, seen at the converter's zero
    granularity (4 KiB, as qemu-img's -S): a zero 512-byte cluster in a non-zero 4 KiB block counts."""
    found = set()
    block = max(cluster_size, granularity)
    zero = bytes(block)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        index = 0
        while chunk := f.read(block):
            if chunk != zero[: len(chunk)]:
                first = index * block // cluster_size
                found.update(range(first, min(first + block // cluster_size, -(-size // cluster_size))))
            index += 1
    return found


def mapped_clusters(path, cluster_size: int) -> set[int]:
    """Guest clusters ``qemu-img map`` reports as data."""
    found: set[int] = set()
    for extent in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path)):
        if extent["data"]:
            found.update(range(extent["start"] // cluster_size, -(-(extent["start"] + extent["length"]) // cluster_size)))
    return found


def qemu_check(path) -> dict:
    proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["check-errors"] == 0
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result
    return result


def check_output(out, source, *, source_format: str = "raw", options: dict | None = None, compressed: bool = False,
                 exact_allocation: bool = True) -> dict:
    """What every output must satisfy; returns the ``qemu-img check`` result."""
    options = options or {}
    cluster_size = parse_size(options.get("cluster_size", "64k"))
    v2 = options.get("compat") == "0.10"
    result = qemu_check(out)
    qemu_compare(source, source_format, out, "qcow2")
    info = qemu_info(out, "qcow2")
    data = info["format-specific"]["data"]
    assert info["cluster-size"] == cluster_size
    assert data["compat"] == ("0.10" if v2 else "1.1")
    assert data["refcount-bits"] == int(options.get("refcount_bits", 16))
    if not v2:
        assert data["compression-type"] == options.get("compression_type", "zlib")
        assert data["lazy-refcounts"] == (options.get("lazy_refcounts") == "on")
        assert data["corrupt"] is False and data["extended-l2"] is False
    with diskimg.open_image(source, source_format) as original, diskimg.open_image(out) as written:
        assert written.format == "qcow2" and written.virtual_size == original.virtual_size
        assert info["virtual-size"] == original.virtual_size
        assert reader_sha256(written) == reader_sha256(original)
    if compressed:
        assert result.get("compressed-clusters", 0) > 0
    if exact_allocation and source_format == "raw":
        # zero regions left unallocated: exactly the clusters holding data are allocated
        holding = nonzero_clusters(source, cluster_size)
        assert result["allocated-clusters"] == len(holding)
        assert mapped_clusters(out, cluster_size) == holding
    # the file ends with the last cluster in use
    assert result["image-end-offset"] == os.path.getsize(out)
    check_header(out, options)
    return result


def check_header(out, options: dict) -> None:
    cluster_size = parse_size(options.get("cluster_size", "64k"))
    with open(out, "rb") as f:
        first = f.read(cluster_size)
    header = Qcow2Header.parse(first)
    if options.get("compat") == "0.10":
        assert header.version == 2 and header.header_length == 72
        assert first[72:] == bytes(cluster_size - 72)  # no extensions, as qemu writes v2
        return
    assert header.version == 3 and header.header_length == 112
    assert header.incompatible_features == (8 if options.get("compression_type") == "zstd" else 0)
    assert header.autoclear_features == 0
    extensions = parse_header_extensions(first[112:], 112)
    if cluster_size > 4096:  # as qemu: the feature name table only with clusters above 4 KiB
        assert [item.type for item in extensions.items] == [EXT_FEATURE_NAMES]
        assert sorted(extensions.feature_names.items()) == sorted(((k, b), n) for k, b, n in FEATURE_NAME_TABLE)
    else:
        assert extensions.items == []


def _options_args(options: dict) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []


# -- conversions of a raw source -------------------------------------------------------------------

CASES = [
    ({}, False),
    ({"compat": "0.10"}, False),
    ({"cluster_size": "512"}, False),
    ({"cluster_size": "4k"}, False),
    ({"cluster_size": "2M"}, False),
    ({"refcount_bits": "1"}, False),
    ({"refcount_bits": "8", "lazy_refcounts": "on"}, False),
    ({"refcount_bits": "64", "cluster_size": "16k"}, False),
    ({}, True),
    ({"compression_type": "zstd"}, True),
    ({"cluster_size": "512"}, True),
    ({"cluster_size": "2M", "refcount_bits": "2"}, True),
    ({"compat": "0.10", "cluster_size": "8k"}, True),
    ({"refcount_bits": "1", "compression_type": "zstd", "cluster_size": "4k"}, True),
]


@requires_qemu
@pytest.mark.parametrize("options, compress", CASES, ids=lambda v: str(v))
def test_raw_source_through_the_api(tmp_path, options, compress):
    source = tmp_path / "src.raw"
    make_source(source)
    out = tmp_path / "out.qcow2"
    result = diskimg.convert(source, out, "qcow2", options=options, compress=compress)
    assert result.target_format == "qcow2" and result.virtual_size == SIZE
    check_output(out, source, options=options, compressed=compress)
    if not compress:
        with diskimg.open_image(source) as disk:
            bound = Qcow2Writer.measure(SIZE, list(disk.extents()), options)
            assert os.path.getsize(out) <= bound  # the plan (the source's allocation) is an upper bound


@requires_qemu
@pytest.mark.parametrize("args, options, compress", [
    (["-o", "cluster_size=2M"], {"cluster_size": "2M"}, False),
    (["-c"], {}, True),
    (["-c", "-o", "compression_type=zstd"], {"compression_type": "zstd"}, True),
    (["-o", "compat=0.10"], {"compat": "0.10"}, False),
])
def test_cli(tmp_path, args, options, compress):
    source = tmp_path / "src.raw"
    make_source(source)
    out = tmp_path / "out.qcow2"
    proc = diskimg_cli("convert", source, out, "-O", "qcow2", *args)
    assert proc.returncode == 0, proc.stderr
    check_output(out, source, options=options, compressed=compress)


@requires_qemu
@pytest.mark.parametrize("options", [{}, {"compat": "0.10", "cluster_size": "512"}, {"cluster_size": "2M"},
                                     {"refcount_bits": "1", "lazy_refcounts": "on"}], ids=str)
def test_pipe(tmp_path, options):
    source = tmp_path / "src.raw"
    make_source(source)
    out = tmp_path / "out.qcow2"
    proc = diskimg_to_pipe(out, "convert", source, "-", "-O", "qcow2", *_options_args(options))
    assert proc.returncode == 0, proc.stderr
    check_output(out, source, options=options)
    with diskimg.open_image(source) as disk:  # the pipe's size is what measure() says for the exact plan
        assert Qcow2Writer.measure(SIZE, scan_plan(disk), options) == os.path.getsize(out)


@requires_qemu
def test_checksum_streams_to_a_file_and_hashes_the_output(tmp_path):
    source = tmp_path / "src.raw"
    make_source(source)
    out = tmp_path / "out.qcow2"
    proc = diskimg_cli("convert", source, out, "-O", "qcow2", "--checksum", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sha256"] == file_sha256(out)
    check_output(out, source)


@requires_qemu
def test_sparse_size_zero_writes_every_allocated_cluster(tmp_path):
    """-S 0: the source's allocation is written, zeros included, on a file and on a pipe."""
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB + 5)
        f.write(b"\x01" * 10)
        f.seek(5 * MiB)
        f.write(bytes(128 * KiB))  # allocated zeros: two clusters
        os.fsync(f.fileno())
    with diskimg.open_image(source) as disk:
        allocated = [e for e in disk.extents() if e.kind is DATA]
    if not any(e.start <= 5 * MiB < e.end for e in allocated):
        pytest.skip("the file system does not report the allocated zeros")
    expected = {c for e in allocated for c in range(e.start // (64 * KiB), -(-e.end // (64 * KiB)))}
    for route in ("file", "pipe"):
        out = tmp_path / f"{route}.qcow2"
        if route == "file":
            diskimg.convert(source, out, "qcow2", zero_granularity=0)
        else:
            assert diskimg_to_pipe(out, "convert", source, "-", "-O", "qcow2", "-S", "0").returncode == 0
        result = check_output(out, source, exact_allocation=False)
        assert result["allocated-clusters"] == len(expected)
        assert mapped_clusters(out, 64 * KiB) == expected


# -- other sources ---------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("source_format", ["qcow2", "vpc"])
@pytest.mark.parametrize("route", ["file", "pipe", "compressed"])
def test_qemu_made_sources(tmp_path, source_format, route):
    source = tmp_path / f"src.{source_format}"
    qemu_img("create", "-f", source_format, source, "48M")
    qemu_io(source, source_format, "write -P 0xab 0 64k", "write -P 0x11 1000k 333k", "write -P 0x5c 20M 4M",
            "write -z 21M 1M", "write -P 0x01 47M 512")
    out = tmp_path / "out.qcow2"
    if route == "pipe":
        assert diskimg_to_pipe(out, "convert", source, "-", "-O", "qcow2").returncode == 0
    else:
        diskimg.convert(source, out, "qcow2", compress=route == "compressed")
    result = check_output(out, source, source_format=source_format, compressed=route == "compressed")
    with diskimg.open_image(source, "vhd" if source_format == "vpc" else "qcow2") as disk:
        holding = {c for c in range(disk.virtual_size // (64 * KiB))
                   if disk.read_at(c * 64 * KiB, 64 * KiB) != bytes(64 * KiB)}
    assert result["allocated-clusters"] == len(holding)


@requires_qemu
def test_our_compressed_output_converts_back(tmp_path):
    source = tmp_path / "src.raw"
    make_source(source)
    compressed = tmp_path / "c.qcow2"
    diskimg.convert(source, compressed, "qcow2", compress=True, options={"compression_type": "zstd"})
    plain = tmp_path / "plain.qcow2"
    diskimg.convert(compressed, plain, "qcow2")
    check_output(plain, source)
    back = tmp_path / "back.raw"
    diskimg.convert(plain, back, "raw")
    assert file_sha256(back) == file_sha256(source)


# -- big disks -------------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("route", ["file", "pipe"])
def test_2000g_nearly_empty_disk_is_quick(tmp_path, route):
    source = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", source, "2000G")
    qemu_io(source, "qcow2", "write -P 0x33 0 100k", "write -P 0x44 1000G 64k", "write -P 0x55 1999G 1M")
    out = tmp_path / "out.qcow2"
    started = time.monotonic()
    if route == "file":
        diskimg.convert(source, out, "qcow2")
    else:
        assert diskimg_to_pipe(out, "convert", source, "-", "-O", "qcow2").returncode == 0
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"{elapsed:.1f} s"  # generous: cost follows the data, not the virtual size
    result = qemu_check(out)
    assert result["allocated-clusters"] == 2 + 1 + 16
    qemu_compare(source, "qcow2", out, "qcow2")
    info = qemu_info(out, "qcow2")
    assert info["virtual-size"] == 2000 * GiB
    with diskimg.open_image(out) as disk:
        assert disk.read_at(1999 * GiB - 1, 3) == b"\x00\x55\x55"
        assert disk.read_at(1000 * GiB + 64 * KiB - 1, 2) == b"\x44\x00"
    assert os.path.getsize(out) < 2 * MiB


@requires_qemu
def test_2000g_empty_disk(tmp_path):
    source = tmp_path / "big.raw"
    with open(source, "wb") as f:
        f.truncate(2000 * GiB)
    for route in ("file", "pipe"):
        out = tmp_path / f"{route}.qcow2"
        if route == "file":
            diskimg.convert(source, out, "qcow2")
        else:
            assert diskimg_to_pipe(out, "convert", source, "-", "-O", "qcow2").returncode == 0
        result = qemu_check(out)
        assert result.get("allocated-clusters", 0) == 0 and result["image-end-offset"] == os.path.getsize(out)
        assert qemu_info(out, "qcow2")["virtual-size"] == 2000 * GiB
        # header, refcount table and block, and a 4000-entry L1 table
        assert os.path.getsize(out) == 4 * 64 * KiB


@requires_qemu
def test_empty_and_tiny_disks(tmp_path):
    for size in (0, 512, 4096 + 512):
        source = tmp_path / f"{size}.raw"
        with open(source, "wb") as f:
            f.write(b"\x07" * size)
        out = tmp_path / f"{size}.qcow2"
        diskimg.convert(source, out, "qcow2")
        qemu_check(out)
        assert qemu_info(out, "qcow2")["virtual-size"] == size
        if size:
            qemu_compare(source, "raw", out, "qcow2")


# -- compression -----------------------------------------------------------------------------------


def _compressed_entries(path) -> tuple[Qcow2Header, list]:
    """The decoded L2 entries of compressed clusters, walking the tables by hand."""
    with open(path, "rb") as f:
        header = Qcow2Header.parse(f.read(4096))
        f.seek(header.l1_table_offset)
        l1 = struct.unpack(f">{header.l1_size}Q", f.read(8 * header.l1_size))
        found = []
        for l1_entry in l1:
            if not l1_entry & L1E_OFFSET_MASK:
                continue
            assert l1_entry >> 63  # COPIED: the table's refcount is 1
            f.seek(l1_entry & L1E_OFFSET_MASK)
            table = struct.unpack(f">{header.l2_entries}Q", f.read(header.cluster_size))
            for entry in table:
                decoded = decode_l2_entry(entry, header.cluster_bits)
                if decoded.kind == "compressed":
                    assert not decoded.copied  # compressed clusters never carry COPIED
                    found.append(decoded)
                elif decoded.kind == "normal":
                    assert decoded.copied
    return header, found


@requires_qemu
def test_deflate_window_is_4k(tmp_path):
    """qemu inflates with windowBits -12: matches further back than 4 KiB would corrupt its reads.
    The data repeats at 1 KiB and at 6 KiB, so a larger window would use the longer matches."""
    rng = random.Random(5)
    blocks = [rng.randbytes(1024) for _ in range(3)]
    pattern = b"".join(block * 2 for block in blocks)  # A A B B C C: 6 KiB, then again
    cluster = (pattern * 11)[: 64 * KiB]
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(4 * MiB)
        for index in range(8):
            f.seek(index * 256 * KiB)
            f.write(cluster)
    out = tmp_path / "out.qcow2"
    diskimg.convert(source, out, "qcow2", compress=True)
    check_output(out, source, compressed=True)
    header, entries = _compressed_entries(out)
    assert len(entries) == 8
    with open(out, "rb") as f:
        for entry in entries:
            f.seek(entry.host_offset)
            stored = f.read(entry.compressed_length)
            assert zlib.decompressobj(-12).decompress(stored, header.cluster_size) == cluster


@requires_qemu
def test_incompressible_clusters_are_stored_plain(tmp_path):
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))
    for kind in ("zlib", "zstd"):
        out = tmp_path / f"{kind}.qcow2"
        diskimg.convert(source, out, "qcow2", compress=True, options={"compression_type": kind})
        result = check_output(out, source, options={"compression_type": kind})
        assert result.get("compressed-clusters", 0) == 0 and result["allocated-clusters"] == 16


@requires_qemu
@pytest.mark.parametrize("refcount_bits", ["1", "2", "16"])
def test_tiny_compressed_clusters_share_host_clusters_within_the_refcount_width(tmp_path, refcount_bits):
    """Thousands of clusters that compress to a few bytes: host clusters are shared by as many
    compressed clusters as the refcount width allows (qemu counts one reference per cluster)."""
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.write(b"".join(bytes([i % 251 + 1]) * 4096 for i in range(2048)))  # 8 MiB
    out = tmp_path / "out.qcow2"
    options = {"cluster_size": "4k", "refcount_bits": refcount_bits, "compression_type": "zstd"}
    diskimg.convert(source, out, "qcow2", compress=True, options=options)
    result = check_output(out, source, options=options, compressed=True)
    assert result["compressed-clusters"] == 2048
    data_clusters = os.path.getsize(out) // 4096
    if refcount_bits == "16":
        assert data_clusters < 64  # a few bytes each: many share one host cluster
    elif refcount_bits == "1":
        assert data_clusters > 2048  # one reference per host cluster


@requires_qemu
def test_compression_needs_a_file(tmp_path):
    source = tmp_path / "src.raw"
    make_source(source, size=4 * MiB)
    proc = diskimg_to_pipe(tmp_path / "out.qcow2", "convert", source, "-", "-O", "qcow2", "-c")
    assert proc.returncode == 2 and b"pipe" in proc.stderr and b"Traceback" not in proc.stderr
    # with --checksum to a file, the converter hashes the finished file instead of the stream
    out = tmp_path / "out2.qcow2"
    proc = diskimg_cli("convert", source, out, "-O", "qcow2", "-c", "--checksum", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sha256"] == file_sha256(out)
    check_output(out, source, compressed=True)


def test_compressing_writer_refuses_a_streaming_target(tmp_path):
    fd = os.open(tmp_path / "out.qcow2", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(UsageError, match="pipe"):
            Qcow2Writer(OutputTarget(fd, "out", hash_output=True), MiB, {}, True)
    finally:
        os.close(fd)


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, fragment", [
    ({"compat": "2.0"}, "compat"),
    ({"cluster_size": "3k"}, "power of two"),
    ({"cluster_size": "4M"}, "power of two"),
    ({"cluster_size": "256"}, "power of two"),
    ({"cluster_size": "big"}, "invalid size"),
    ({"compression_type": "lz4"}, "zlib or zstd"),
    ({"compression_type": "zstd", "compat": "0.10"}, "compat=1.1"),
    ({"refcount_bits": "3"}, "power of two"),
    ({"refcount_bits": "128"}, "power of two"),
    ({"refcount_bits": "8", "compat": "0.10"}, "compat=1.1"),
    ({"lazy_refcounts": "on", "compat": "0.10"}, "compat=1.1"),
    ({"lazy_refcounts": "maybe"}, "on or off"),
    ({"preallocation": "metadata"}, "preallocation"),
    ({"extended_l2": "on"}, "extended_l2"),
    ({"backing_file": "x"}, "does not take"),
])
def test_bad_options_are_usage_errors(tmp_path, options, fragment):
    source = tmp_path / "src.raw"
    source.write_bytes(bytes(MiB))
    with pytest.raises(UsageError, match=fragment):
        diskimg.convert(source, tmp_path / "out.qcow2", "qcow2", options=options)
    assert not (tmp_path / "out.qcow2").exists()


def test_size_limits(tmp_path):
    with pytest.raises(UsageError, match="cluster_size"):  # L1 above 32 MiB with 512-byte clusters
        Qcow2Writer.measure(200 * GiB, [], {"cluster_size": "512"})
    assert Qcow2Writer.measure(100 * GiB, [], {"cluster_size": "512"}) > 0


def test_registered():
    assert WRITERS["qcow2"] is Qcow2Writer and Qcow2Writer.supports_compression


@requires_qemu
@pytest.mark.parametrize("cluster_size", ["4k", "64k"])
def test_header_extensions_match_qemu(tmp_path, cluster_size):
    made = tmp_path / "qemu.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", made, "1G")
    out = tmp_path / "ours.qcow2"
    _drive(out, GiB, [Extent(0, GiB, ZERO)], [], {"cluster_size": cluster_size}, streaming=False)
    with open(made, "rb") as f:
        theirs = f.read(4096)
    with open(out, "rb") as f:
        ours = f.read(4096)
    assert ours[112:] == theirs[112:]  # the extension area, byte for byte
    mine, qemus = Qcow2Header.parse(ours), Qcow2Header.parse(theirs)
    for name in ("version", "cluster_bits", "virtual_size", "l1_size", "refcount_order", "header_length",
                 "incompatible_features", "compatible_features", "autoclear_features", "compression_type"):
        assert getattr(mine, name) == getattr(qemus, name), name


# -- the writer driven directly --------------------------------------------------------------------


def _drive(path, size: int, plan: list[Extent], pieces: list[tuple[int, bytes]], options: dict, *,
           streaming: bool, compress: bool = False, regular: bool = True) -> Qcow2Writer:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        target = OutputTarget(fd, str(path), hash_output=streaming)
        if not regular:  # behave as a block device: old bytes stay where nothing is written
            target.is_regular_file = False
        writer = Qcow2Writer(target, size, options, compress)
        assert writer.requires_exact_plan == streaming
        assert writer.concurrent_writes == (not streaming and not compress)
        with contextlib.closing(writer):
            feed_writer(writer, plan, pieces)
    finally:
        os.close(fd)
    return writer


@requires_qemu
@pytest.mark.parametrize("seed", range(6))
def test_random_plans_streamed_and_positional(tmp_path, seed):
    rng = random.Random(seed)
    size = rng.randint(1, 24) * MiB + rng.randint(0, MiB) // 512 * 512
    options = rng.choice([{}, {"cluster_size": "512"}, {"cluster_size": "4k", "refcount_bits": "4"},
                          {"cluster_size": "2M"}, {"compat": "0.10"}])
    plan, pieces = random_plan(rng, size, TEXT)
    expected = pieces_content(size, pieces)
    cluster_size = parse_size(options.get("cluster_size", "64k"))
    for mode in ("streaming", "positional", "compressed"):
        out = tmp_path / f"{mode}.qcow2"
        _drive(out, size, plan, pieces, options, streaming=mode == "streaming", compress=mode == "compressed")
        qemu_check(out)
        with diskimg.open_image(out) as disk:
            assert disk.virtual_size == size and disk.read_at(0, size) == expected
        if mode == "streaming":
            assert os.path.getsize(out) == Qcow2Writer.measure(size, plan, options)
            planned = {c for e in plan if e.kind is DATA for c in range(e.start // cluster_size,
                                                                        -(-e.end // cluster_size))}
            assert mapped_clusters(out, cluster_size) == planned
        else:
            holding = {i // cluster_size for offset, data in pieces for i in range(offset, offset + len(data), 512)}
            holding |= {(offset + len(data) - 1) // cluster_size for offset, data in pieces}
            assert mapped_clusters(out, cluster_size) == holding
            assert os.path.getsize(out) <= Qcow2Writer.measure(size, plan, options)


@requires_qemu
def test_streaming_writes_planned_clusters_that_get_no_data(tmp_path):
    plan = [Extent(0, 3 * MiB, ZERO), Extent(3 * MiB, MiB, DATA), Extent(4 * MiB, 4 * MiB, ZERO)]
    pieces = [(3 * MiB + 200 * KiB + 7, b"\x01" * 100)]
    streamed = tmp_path / "streamed.qcow2"
    _drive(streamed, 8 * MiB, plan, pieces, {}, streaming=True)
    assert qemu_check(streamed)["allocated-clusters"] == 16  # the plan's clusters, even empty ones
    seekable = tmp_path / "seekable.qcow2"
    _drive(seekable, 8 * MiB, plan, pieces, {}, streaming=False)
    assert qemu_check(seekable)["allocated-clusters"] == 1  # on a file, only the cluster that got data
    for out in (streamed, seekable):
        with diskimg.open_image(out) as disk:
            assert disk.read_at(3 * MiB + 200 * KiB, 200) == bytes(7) + b"\x01" * 100 + bytes(93)


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("plan", [[Extent(0, 2 * MiB, DATA), Extent(2 * MiB, 2 * GiB, ZERO)], []])
def test_data_outside_the_plan_is_refused(tmp_path, plan, streaming):
    with pytest.raises(OutputError, match="plan"):
        _drive(tmp_path / "out.qcow2", 2 * GiB + 2 * MiB, plan, [(2 * GiB, b"\x01")], {}, streaming=streaming)


@requires_qemu
@pytest.mark.parametrize("compress", [False, True])
def test_unwritten_parts_of_clusters_are_zeroed_on_a_block_device(tmp_path, compress):
    """Where no hole can be left (a block device), the parts of allocated clusters that get no data
    are written as zeros: the device's old bytes never show through."""
    out = tmp_path / "device.img"
    out.write_bytes(b"\xee" * (16 * MiB))
    plan = [Extent(0, 16 * MiB, DATA)]
    pieces = [(1000, b"\x01" * 3000), (100 * KiB, b"\x02" * 10), (5 * MiB - 7, os.urandom(70000))]
    _drive(out, 16 * MiB, plan, pieces, {}, streaming=False, compress=compress, regular=False)
    qemu_check(out)
    with diskimg.open_image(out, "qcow2") as disk:
        assert disk.read_at(0, 16 * MiB) == pieces_content(16 * MiB, pieces)
    raw = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", out, raw)
    assert raw.read_bytes() == pieces_content(16 * MiB, pieces)


@requires_qemu
@pytest.mark.parametrize("cut, regular", [("chunks", True), ("pieces", True), ("pieces", False)])
def test_concurrent_writes_in_any_order(tmp_path, cut, regular):
    """``concurrent_writes``: two threads at once, disjoint ranges in any order. "chunks" feeds
    4 MiB chunks as the converter does; "pieces" shuffles small pieces, so that clusters are shared
    between threads and reached out of order (on a "block device" too, where nothing reads as zero
    unless written)."""
    rng = random.Random(3)
    size = 24 * MiB
    plan, pieces = random_plan(rng, size, TEXT)
    step_limit = 4 * MiB if cut == "chunks" else 20000
    units: list[list[tuple[int, bytes]]] = []
    for offset, data in pieces:
        position = offset
        while position < offset + len(data):
            step = min(offset + len(data) - position, step_limit - position % step_limit,
                       rng.randint(1, step_limit))
            units.append([(position, data[position - offset :][:step])])
            position += step
    if cut == "chunks":  # one unit per 4 MiB chunk, its pieces in order
        grouped: dict[int, list] = {}
        for unit in units:
            grouped.setdefault(unit[0][0] // (4 * MiB), []).extend(unit)
        units = list(grouped.values())
    rng.shuffle(units)
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"" if regular else b"\xee" * (size + 8 * MiB))  # a fresh file, or a used "device"
    fd = os.open(out, os.O_RDWR)
    try:
        target = OutputTarget(fd, str(out))
        target.is_regular_file = regular
        writer = Qcow2Writer(target, size, {"cluster_size": "16k"}, False)
        assert writer.concurrent_writes
        writer.plan(plan)
        errors: list = []

        def work(part: list) -> None:
            try:
                for unit in part:
                    for offset, data in unit:
                        writer.write(offset, data)
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(units[i::2],)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        writer.finish()
    finally:
        os.close(fd)
    result = qemu_check(out)
    assert result["allocated-clusters"] == len({i // (16 * KiB) for o, d in pieces for i in range(o, o + len(d))})
    with diskimg.open_image(out, "qcow2") as disk:
        assert disk.read_at(0, size) == pieces_content(size, pieces)


# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_sub_byte_refcounts(bits):
    rng = random.Random(bits)
    counts = [rng.randrange(1 << bits) for _ in range(4096)]
    packed = pack_refcounts(array("B", counts), bits)
    assert len(packed) == 4096 * bits // 8
    for index, count in enumerate(counts):  # bit 0 is the least significant bit
        bit = index * bits
        assert (packed[bit // 8] >> (bit % 8)) & ((1 << bits) - 1) == count


def test_pack_wide_refcounts_are_big_endian():
    assert pack_refcounts(array("H", [1, 0x0203]), 16) == b"\x00\x01\x02\x03"
    assert pack_refcounts(array("Q", [5]), 64) == b"\x00" * 7 + b"\x05"


@given(cluster_bits=st.integers(9, 21), order=st.integers(0, 6), tables=st.integers(0, 5000),
       data=st.integers(0, 1 << 24))
def test_refcount_blocks_cover_every_cluster_and_no_more(cluster_bits, order, tables, data):
    layout = plan_layout(cluster_bits, order, 1 << 30, tables, data)
    per_block = ((1 << cluster_bits) * 8) >> order
    total = layout.total_clusters
    assert layout.refcount_blocks * per_block >= total  # the blocks count every cluster, their own too
    assert (layout.refcount_blocks - 1) * per_block < total  # and there is no spare block
    assert layout.refcount_table_clusters * (1 << cluster_bits) // 8 >= layout.refcount_blocks


# -- hypothesis: random sparse disks through the converter ------------------------------------------


@st.composite
def sparse_disks(draw):
    size = draw(st.integers(1, 6 * 1024)) * 512  # up to 3 MiB
    runs = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 300 * KiB), st.booleans()), max_size=6))
    return size, runs


@requires_qemu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(disk=sparse_disks(), cluster_bits=st.integers(9, 21), v2=st.booleans(), compress=st.booleans(),
       zstd=st.booleans(), stream=st.booleans(), seed=st.integers(0, 1 << 30))
def test_random_sparse_disks_round_trip(tmp_path, disk, cluster_bits, v2, compress, zstd, stream, seed):
    size, runs = disk
    rng = random.Random(seed)
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(size)
        for offset, length, compressible in runs:
            length = min(length, size - offset)
            f.seek(offset)
            f.write(TEXT[seed % 1000 :][:length] if compressible else rng.randbytes(length))
    options = {"cluster_size": str(1 << cluster_bits)}
    if v2:
        options["compat"] = "0.10"
    elif zstd:
        options["compression_type"] = "zstd"
    out = tmp_path / "out.qcow2"
    if out.exists():
        out.unlink()
    # checksum=True streams the output (the exact-plan path) unless it is compressed
    diskimg.convert(source, out, "qcow2", options=options, compress=compress, checksum=stream)
    qemu_check(out)
    with diskimg.open_image(out) as written:
        assert written.read_at(0, size) == source.read_bytes()
    qemu_compare(source, "raw", out, "qcow2")
