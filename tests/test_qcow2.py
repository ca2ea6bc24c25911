"""The qcow2 reader against the qemu-img oracle: images made by qemu-img / qemu-io across options,
refusals, hostile headers and tables, header fuzzing, and the third-party corpus."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.errors import BackingFileError, CorruptImage, DiskImageError, UnsupportedFormat, UsageError
from diskimg.formats.probing import OpenOptions
from diskimg.formats.qcow2.reader import Qcow2Reader, probe
from diskimg.formats.qcow2.structures import (
    MAGIC,
    HeaderExtension,
    Qcow2Header,
    Qcow2Snapshot,
    decode_l2_entry,
    encode_compressed_entry,
    pack_header_extensions,
    pack_snapshot_table,
    parse_header_extensions,
    parse_snapshot_table,
    subcluster_kind,
)
from diskimg.formats.raw import RawReader
from diskimg.host.files import HostFile

from .support.corpus import corpus_dir, corpus_entries, corpus_params
from .support.digests import file_sha256, reader_sha256
from .support.files import write_at
from .support.images import qcow2_header
from .support.tools import assert_extents_sound, qemu_img, qemu_info, qemu_io, qemu_raw, requires_qemu
from .support.units import MiB

pytestmark = requires_qemu


# -- helpers ---------------------------------------------------------------------------------------


def create(path: Path, size: int | str, *options: str, backing: Path | None = None, backing_fmt: str = "qcow2") -> Path:
    args: list[str | os.PathLike] = ["create", "-f", "qcow2", "-q"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def opener(directory: Path):
    """A ParentOpener resolving names against the child's folder, opening with the right reader."""

    def open_parent(names: list[str], fmt: str | None):
        for name in names:
            candidate = Path(name) if os.path.isabs(name) else directory / name
            if candidate.is_file():
                break
        else:
            raise BackingFileError(f"backing file {names[0]!r} not found")
        host = HostFile(candidate)
        if fmt is None:
            fmt = "qcow2" if host.read_at(0, 4) == MAGIC else "raw"
        if fmt == "raw":
            return RawReader.open(host, None, OpenOptions())
        assert fmt == "qcow2", fmt
        return Qcow2Reader.open(host, opener(candidate.parent), OpenOptions())

    return open_parent


def open_qcow2(path: Path, snapshot: str | None = None, backing: bool = True) -> Qcow2Reader:
    return Qcow2Reader.open(
        HostFile(path), opener(path.parent) if backing else None, OpenOptions(snapshot=snapshot)
    )


def check_info(reader: Qcow2Reader, path: Path) -> None:
    expected = qemu_info(path, "qcow2", force_share=True)
    info = reader.info()
    assert info.format == "qcow2"
    assert info.virtual_size == reader.virtual_size == expected["virtual-size"]
    assert info.cluster_size == expected["cluster-size"]
    data = expected["format-specific"]["data"]
    details = info.details
    assert details["compat"] == data["compat"]
    assert info.version == ("2" if data["compat"] == "0.10" else "3")
    assert info.subformat == "v" + info.version
    assert details["refcount_bits"] == data["refcount-bits"]
    assert details["compression_type"] == data.get("compression-type", "zlib")
    assert details["lazy_refcounts"] == data.get("lazy-refcounts", False)
    assert details["extended_l2"] == data.get("extended-l2", False)
    assert details["corrupt"] == data.get("corrupt", False)
    assert details["dirty"] == expected.get("dirty-flag", False)
    assert info.backing_file == expected.get("backing-filename")
    assert info.backing_format == expected.get("backing-filename-format")
    theirs = expected.get("snapshots", [])
    assert [(s.id, s.name, s.vm_state_size) for s in info.snapshots] == [
        (s["id"], s["name"], s["vm-state-size"]) for s in theirs
    ]
    for ours, their in zip(info.snapshots, theirs):
        when = datetime.fromtimestamp(their["date-sec"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert ours.date == when
    json.dumps(info.to_dict())  # JSON-able


def check_against_qemu(path: Path, tmp_path: Path, info: bool = True) -> Qcow2Reader:
    """Bytes, extents and facts of our reading equal qemu's."""
    oracle = qemu_raw(path, "qcow2", tmp_path)
    with open_qcow2(path) as reader:
        assert reader.virtual_size == oracle.stat().st_size
        assert reader_sha256(reader) == file_sha256(oracle)
        assert_extents_sound(reader, oracle)
        # an unaligned positional read in the middle agrees too
        if reader.virtual_size > 10000:
            with open(oracle, "rb") as f:
                f.seek(777)
                assert reader.read_at(777, 9000) == f.read(9000)
        if info:
            check_info(reader, path)
    oracle.unlink()
    return reader


def compressed_clusters(path: Path) -> int:
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True, check=False
    )
    return json.loads(result.stdout).get("compressed-clusters", 0)


def patterned_raw(path: Path, size: int) -> Path:
    """Compressible text, a few incompressible clusters and holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        position = 0
        line = 0
        while position < size:
            block = b"".join(b"line %08d: a compressible test pattern for qcow2\n" % (line + i) for i in range(4096))
            block = block[: min(len(block), size - position)]
            f.seek(position)
            f.write(block)
            line += 4096
            position += 2 * len(block)  # leave a hole of the same size after each block
        f.seek(size // 3)
        f.write(os.urandom(min(200_000, size - size // 3)))
    return path


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 300k",
    "write -P 0x33 5000 3333",
    "write -P 0x44 3M 1M",
    "write -z 3200k 128k",
    "discard 3600k 64k",
    "write -P 0x55 7777777 12345",
    "write -P 0x66 2047k 2k",
]


# -- images made by qemu-img / qemu-io ---------------------------------------------------------------


IMAGE_CASES = {
    "compat-0.10": ("compat=0.10",),
    "compat-1.1": ("compat=1.1",),
    "cluster-512": ("cluster_size=512",),
    "cluster-4k": ("cluster_size=4096",),
    "cluster-64k": ("cluster_size=65536",),
    "cluster-2M": ("cluster_size=2M",),
    "v2-cluster-512": ("compat=0.10", "cluster_size=512"),
    "lazy-refcounts": ("lazy_refcounts=on",),
    "extended-l2-64k": ("extended_l2=on",),
    "extended-l2-16k": ("extended_l2=on", "cluster_size=16k"),
    "extended-l2-2M": ("extended_l2=on", "cluster_size=2M"),
    "prealloc-metadata": ("preallocation=metadata",),
    "prealloc-falloc": ("preallocation=falloc",),
    "prealloc-full": ("preallocation=full",),
    "prealloc-metadata-v2": ("preallocation=metadata", "compat=0.10"),
    **{f"refcount-bits-{bits}": (f"refcount_bits={bits}",) for bits in (1, 2, 4, 8, 16, 32, 64)},
}


@pytest.mark.parametrize("options", IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_images_made_by_qemu(tmp_path, options):
    image = create(tmp_path / "a.qcow2", 8 * MiB, *options)
    qemu_io(image, "qcow2", *WRITES)
    check_against_qemu(image, tmp_path)


def test_small_l2_cache(tmp_path, monkeypatch):
    """Many L2 tables (512-byte clusters) through a cache of two tables read the same."""
    monkeypatch.setattr(Qcow2Reader, "L2_CACHE_TABLES", 2)
    image = create(tmp_path / "a.qcow2", 4 * MiB, "cluster_size=512")
    qemu_io(image, "qcow2", "write -P 0x31 0 1M", "write -P 0x32 3M 333k", "write -z 100k 10k")
    check_against_qemu(image, tmp_path, info=False)


def test_untouched_and_empty_images(tmp_path):
    check_against_qemu(create(tmp_path / "empty.qcow2", 0), tmp_path)
    check_against_qemu(create(tmp_path / "blank.qcow2", 64 * MiB), tmp_path)
    # a virtual size that ends inside a cluster, with data in that last cluster
    image = create(tmp_path / "odd.qcow2", 8 * MiB + 1536)
    qemu_io(image, "qcow2", "write -P 0x77 8388000 2000")
    check_against_qemu(image, tmp_path)


def test_unaligned_writes_at_odd_offsets(tmp_path):
    image = create(tmp_path / "odd.qcow2", 16 * MiB, "cluster_size=4096")
    commands = [f"write -P {0x10 + i} {offset} {length}" for i, (offset, length) in enumerate(
        [(1, 511), (4095, 2), (65537, 70000), (1048575, 4097), (9999999, 123457), (16 * MiB - 513, 513)]
    )]  # fmt: skip
    qemu_io(image, "qcow2", *commands)
    check_against_qemu(image, tmp_path)


def test_zero_clusters_and_discards(tmp_path):
    image = create(tmp_path / "z.qcow2", 8 * MiB)
    qemu_io(
        image, "qcow2",
        "write -P 0xaa 0 4M", "write -z 64k 192k", "write -z -u 1M 256k", "discard 2M 512k",
        "write -z 3000000 5000",
    )  # fmt: skip
    with open_qcow2(image) as reader:
        kinds = {extent.kind.value for extent in reader.extents(64 * 1024, 192 * 1024)}
        assert kinds == {"zero"}
    check_against_qemu(image, tmp_path)


def test_dirty_image_left_by_a_crash(tmp_path):
    image = create(tmp_path / "dirty.qcow2", 8 * MiB, "lazy_refcounts=on")
    # qemu-io kills itself after writing, so the dirty bit stays set
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 3M 100k", "-c", "sigraise 9",
         str(image)],
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert qcow2_header(image).incompatible_features & 1
    check_against_qemu(image, tmp_path)
    with open_qcow2(image) as reader:
        assert "dirty" in reader.info().features
        assert reader.info().details["dirty"] is True


def test_persistent_bitmaps(tmp_path):
    image = create(tmp_path / "b.qcow2", 4 * MiB)
    qemu_io(image, "qcow2", "write -P 0x21 64k 1M")
    qemu_img("bitmap", "--add", "-f", "qcow2", image, "b0")
    qemu_img("bitmap", "--add", "-f", "qcow2", image, "b1")
    check_against_qemu(image, tmp_path)
    with open_qcow2(image) as reader:
        info = reader.info()
        assert "bitmaps" in info.features
        assert info.details["bitmaps"] == 2


def test_corrupt_bit_is_readable(tmp_path):
    image = create(tmp_path / "c.qcow2", 4 * MiB)
    qemu_io(image, "qcow2", "write -P 0x12 0 200k")
    patch(image, 72, ">Q", 2)
    check_against_qemu(image, tmp_path)
    with open_qcow2(image) as reader:
        assert "corrupt" in reader.info().features


def test_extended_l2_subclusters(tmp_path):
    image = create(tmp_path / "x.qcow2", 4 * MiB, "extended_l2=on")  # 2 KiB subclusters
    qemu_io(
        image, "qcow2",
        "write -P 0x01 2k 2k", "write -P 0x02 10k 7k", "write -z 64k 4k", "write -P 0x03 70k 2k",
        "write -z 200k 64k", "discard 72k 2k", "write -P 0x04 1M 64k", "discard 1M 4k",
    )  # fmt: skip
    with open_qcow2(image) as reader:
        extents = list(reader.extents(0, 64 * 1024))
        assert [(e.start, e.length, e.kind.value) for e in extents][:3] == [
            (0, 2048, "zero"), (2048, 2048, "data"), (4096, 6144, "zero")
        ]  # fmt: skip
    check_against_qemu(image, tmp_path)


# -- compressed clusters ---------------------------------------------------------------------------

COMPRESSED_CASES = {
    "zlib-64k": ("compression_type=zlib",),
    "zstd-64k": ("compression_type=zstd",),
    "zlib-512": ("cluster_size=512",),
    "zlib-4k-v2": ("cluster_size=4096", "compat=0.10"),
    "zstd-4k": ("compression_type=zstd", "cluster_size=4096"),
    "zlib-2M": ("cluster_size=2M",),
    "zstd-extended-l2": ("compression_type=zstd", "extended_l2=on"),
}


@pytest.mark.parametrize("options", COMPRESSED_CASES.values(), ids=COMPRESSED_CASES.keys())
def test_compressed_images(tmp_path, options):
    raw = patterned_raw(tmp_path / "src.raw", 6 * MiB + 512)
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(options), raw, image)
    assert compressed_clusters(image) > 0
    check_against_qemu(image, tmp_path)
    if "zstd" in options[0]:
        with open_qcow2(image) as reader:
            assert "compression_type=zstd" in reader.info().features
    # overwrite parts: compressed clusters get replaced by normal ones, partially
    qemu_io(image, "qcow2", "write -P 0x99 100000 70000", "write -z 3M 64k", "write -P 0x98 5M 1000")
    check_against_qemu(image, tmp_path)


def test_compressed_reads_within_one_cluster(tmp_path):
    raw = patterned_raw(tmp_path / "src.raw", 2 * MiB)
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, image)
    data = raw.read_bytes()
    with open_qcow2(image) as reader:
        for offset, length in [(0, 1), (1, 100), (65535, 2), (70000, 60000), (0, 2 * MiB), (2 * MiB - 3, 3)]:
            assert reader.read_at(offset, length) == data[offset : offset + length]
        reader.seek(123456)
        assert reader.read(1000) == data[123456:124456]


# -- internal snapshots ------------------------------------------------------------------------------


def test_internal_snapshots(tmp_path):
    image = create(tmp_path / "s.qcow2", 8 * MiB)
    qemu_io(image, "qcow2", "write -P 0x11 0 1M", "write -P 0x12 4M 64k")
    qemu_img("snapshot", "-c", "s1", image)
    qemu_io(image, "qcow2", "write -P 0x21 512k 1M", "write -z 4M 64k", "write -P 0x22 7M 100k")
    qemu_img("snapshot", "-c", "second one", image)
    qemu_io(image, "qcow2", "discard 0 256k", "write -P 0x31 6M 64k")
    check_against_qemu(image, tmp_path)
    for wanted, opts in [
        ("s1", "snapshot.name=s1"),
        ("1", "snapshot.id=1"),
        ("second one", "snapshot.name=second one"),
        ("2", "snapshot.id=2"),
    ]:
        oracle = tmp_path / "snap.raw"
        qemu_img("convert", "-f", "qcow2", "-l", opts, "-O", "raw", image, oracle)
        with open_qcow2(image, snapshot=wanted) as reader:
            assert reader_sha256(reader) == file_sha256(oracle)
            assert_extents_sound(reader, oracle)
            assert reader.info().details["snapshot"] == ("1" if wanted in ("s1", "1") else "2")
        oracle.unlink()
    with pytest.raises(UsageError, match=r"'nope'.*1 \('s1'\), 2 \('second one'\)"):
        open_qcow2(image, snapshot="nope")
    with open_qcow2(image) as reader:
        assert [(s.id, s.name, s.virtual_size) for s in reader.info().snapshots] == [
            ("1", "s1", 8 * MiB), ("2", "second one", 8 * MiB)
        ]  # fmt: skip


def test_snapshot_of_a_resized_image_keeps_its_size(tmp_path):
    image = create(tmp_path / "r.qcow2", 1 * MiB)
    qemu_io(image, "qcow2", "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "small", image)
    qemu_img("resize", "-f", "qcow2", image, "3M")
    qemu_io(image, "qcow2", "write -P 0x22 2M 64k")
    check_against_qemu(image, tmp_path)
    # qemu-img convert -l reads the snapshot at the current size; the snapshot itself is 1 MiB
    oracle = tmp_path / "snap.raw"
    qemu_img("convert", "-f", "qcow2", "-l", "snapshot.name=small", "-O", "raw", image, oracle)
    with open_qcow2(image, snapshot="small") as reader:
        assert reader.virtual_size == 1 * MiB
        assert reader.read_at(0, MiB) == oracle.read_bytes()[:MiB]
    assert oracle.read_bytes()[MiB:] == bytes(2 * MiB)


# -- backing chains ----------------------------------------------------------------------------------


def test_backing_chain_qcow2(tmp_path):
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io(base, "qcow2", "write -P 0xb0 0 8M")
    mid = create(tmp_path / "mid.qcow2", 8 * MiB, backing=base)
    qemu_io(mid, "qcow2", "write -P 0xb1 1M 1M", "write -z 3M 512k", "discard 5M 1M", "write -P 0xb2 6000 7000")
    top = create(tmp_path / "top.qcow2", 12 * MiB, backing=mid)  # bigger than its parent
    qemu_io(top, "qcow2", "write -P 0xc0 1536k 64k", "write -z 7M 64k", "write -P 0xc1 10M 100k", "discard 2M 64k")
    check_against_qemu(top, tmp_path)
    check_against_qemu(mid, tmp_path)
    with open_qcow2(top) as reader:
        assert reader.backing_file == "mid.qcow2"
        assert isinstance(reader.parent, Qcow2Reader)
        assert reader.info().backing_format == "qcow2"


def test_backing_raw_and_v2_overlay(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(3 * MiB))
    overlay = create(
        tmp_path / "ov.qcow2", 4 * MiB, "compat=0.10", "cluster_size=4096", backing=base, backing_fmt="raw"
    )
    qemu_io(overlay, "qcow2", "write -P 0x01 4097 10000", "write -z 1M 64k", "write -P 0x02 3500k 100k")
    check_against_qemu(overlay, tmp_path)
    with open_qcow2(overlay) as reader:
        assert isinstance(reader.parent, RawReader)


def test_extended_l2_over_backing(tmp_path):
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "qcow2", "write -P 0xee 0 4M")
    top = create(tmp_path / "top.qcow2", 4 * MiB, "extended_l2=on", backing=base)
    qemu_io(
        top, "qcow2",
        "write -P 0x01 2k 2k", "write -z 20k 6k", "write -P 0x02 66k 1k", "discard 128k 64k", "write -P 0x03 1M 64k",
    )  # fmt: skip
    check_against_qemu(top, tmp_path)


def test_backing_file_not_opened_unless_asked(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "qcow2", "write -P 0x42 0 2M")
    top = create(tmp_path / "top.qcow2", 2 * MiB, backing=base)
    qemu_io(top, "qcow2", "write -P 0x43 0 64k")
    with open_qcow2(top, backing=False) as reader:
        assert reader.parent is None
        assert reader.backing_file == "base.qcow2"
        assert reader.read_at(0, 65536) == b"\x43" * 65536  # allocated in the overlay
        with pytest.raises(BackingFileError):
            reader.read_at(65536, 10)
        with pytest.raises(BackingFileError):
            list(reader.extents())


def test_the_file_view_reads_to_the_end_of_a_disk_larger_than_one_read(tmp_path):
    """read(), readall() and a BufferedReader over a disk larger than MAX_READ never stop short at
    MAX_READ: reads in pieces reach the disk's end, and a single read that would return more than
    MAX_READ raises (the position untouched); readinto fills a buffer of any size."""
    size = 72 * MiB
    assert size > Qcow2Reader.MAX_READ
    base = create(tmp_path / "base.qcow2", size)
    qemu_io(base, "qcow2", "write -P 0x61 0 1M", "write -P 0x62 63M 2M", "write -P 0x63 71M 1M")
    top = create(tmp_path / "top.qcow2", size, backing=base)  # all but one cluster read from the backing file
    qemu_io(top, "qcow2", "write -P 0x64 68M 64k")
    for image in (base, top):
        oracle = qemu_raw(image, "qcow2", tmp_path).read_bytes()
        assert len(oracle) == size
        with open_qcow2(image) as reader:
            buffered = io.BufferedReader(reader)
            for read_everything in (reader.read, reader.readall, buffered.read, functools.partial(reader.read, size)):
                with pytest.raises(ValueError, match="in pieces"):
                    read_everything()
                assert reader.tell() == 0
            buffered.detach()  # (a BufferedReader closes its raw file when collected)
            buffered = io.BufferedReader(reader, buffer_size=MiB)
            assert b"".join(iter(functools.partial(buffered.read, 8 * MiB), b"")) == oracle
            buffered.detach()
            reader.seek(0)
            whole = bytearray(size + 4096)
            assert reader.readinto(whole) == size and whole[:size] == oracle
            assert reader.tell() == size and reader.read() == b"" and reader.readall() == b""
            reader.seek(-12 * MiB, os.SEEK_END)
            assert reader.read() == oracle[-12 * MiB :]  # the rest of the disk, to its end
            reader.seek(10 * MiB)
            buffered = io.BufferedReader(reader)
            assert buffered.read() == oracle[10 * MiB :]
            buffered.detach()


# -- refusals ------------------------------------------------------------------------------------------


def test_unknown_incompatible_feature_bit(tmp_path):
    image = create(tmp_path / "a.qcow2", MiB)
    patch(image, 72, ">Q", 1 << 10)
    with pytest.raises(UnsupportedFormat, match="unknown incompatible feature bit 10"):
        open_qcow2(image)


def test_unknown_incompatible_feature_named_by_the_image(tmp_path):
    image = create(tmp_path / "a.qcow2", MiB)
    data = bytearray(image.read_bytes()[:65536])
    header = Qcow2Header.parse(data)
    extensions = parse_header_extensions(data[header.header_length :])
    table_at = header.header_length
    for item in extensions.items:
        if item.type == 0x6803F857:
            break
        table_at += 8 + len(item.data) + (-len(item.data) % 8)
    # turn the table's first entry (incompatible bit 0, "dirty bit") into bit 5, "foo"
    entry = table_at + 8
    patch(image, entry, ">BB", 0, 5)
    with open(image, "r+b") as f:
        f.seek(entry + 2)
        f.write(b"foo".ljust(46, b"\0"))
    patch(image, 72, ">Q", 1 << 5)
    with pytest.raises(UnsupportedFormat, match=r"unknown incompatible feature bit 5 \('foo'\)"):
        open_qcow2(image)


@pytest.mark.parametrize("method", ["luks", "aes"])
def test_encrypted_images_are_refused(tmp_path, method):
    image = tmp_path / "enc.qcow2"
    options = f"encrypt.format={method},encrypt.key-secret=sec0"
    if method == "luks":
        options += ",encrypt.iter-time=50"
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o", options, image, "1M")
    expected = rf"encrypted \({method.upper()}\) qcow2 images are not supported"
    with pytest.raises(UnsupportedFormat, match=expected) as err:
        open_qcow2(image)
    assert "qemu-img convert --object secret" in str(err.value)
    assert probe(image.read_bytes()[:65536], b"", image.stat().st_size).hint


def test_external_data_file_is_refused(tmp_path):
    image = tmp_path / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'x.bin'}", image, "1M")
    with pytest.raises(UnsupportedFormat, match="external data file '.*x.bin' is not supported"):
        open_qcow2(image)


# -- hostile images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    """64 KiB clusters: compressed clusters, data at 0 and 1 MiB, a snapshot."""
    directory = tmp_path_factory.mktemp("small")
    raw = patterned_raw(directory / "src.raw", 4 * MiB)
    image = directory / "small.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, image)
    qemu_io(image, "qcow2", "write -P 0x11 0 64k", "write -P 0x12 1M 128k")
    qemu_img("snapshot", "-c", "snap", image)
    assert compressed_clusters(image) > 0
    return image


def l2_entry_location(image: Path, guest: int, entry_size: int = 8) -> tuple[int, int]:
    """(file offset of the L2 entry for a guest offset, its first 64 bits)."""
    header = qcow2_header(image)
    data = image.read_bytes()
    (l1_entry,) = struct.unpack_from(">Q", data, header.l1_table_offset + 8 * (guest // header.l1_span))
    index = (guest // header.cluster_size) % header.l2_entries
    where = (l1_entry & 0x00FFFFFFFFFFFE00) + entry_size * index
    return where, struct.unpack_from(">Q", data, where)[0]


def compressed_entry_location(image: Path) -> tuple[int, int]:
    """(file offset, value) of the first compressed entry of the first L2 table."""
    header = qcow2_header(image)
    table, _ = l2_entry_location(image, 0)
    data = image.read_bytes()
    for index in range(header.l2_entries):
        (value,) = struct.unpack_from(">Q", data, table + 8 * index)
        if value & (1 << 62):
            return table + 8 * index, value
    raise AssertionError("no compressed cluster")


def _hostile(image: Path, case: str) -> None:
    header = qcow2_header(image)
    size = image.stat().st_size
    if case == "l1-size-2^31-1":
        patch(image, 36, ">I", 2**31 - 1)
    elif case == "l1-size-beyond-file":
        patch(image, 36, ">I", 3_000_000)
    elif case == "l1-offset-past-eof":
        patch(image, 40, ">Q", size + 1000 * 65536)
    elif case == "l1-offset-unaligned":
        patch(image, 40, ">Q", header.l1_table_offset + 8)
    elif case == "cluster-bits-8":
        patch(image, 20, ">I", 8)
    elif case == "cluster-bits-22":
        patch(image, 20, ">I", 22)
    elif case == "cluster-bits-huge":
        patch(image, 20, ">I", 0xFFFFFFFF)
    elif case == "refcount-order-7":
        patch(image, 96, ">I", 7)
    elif case == "header-length-overflowing":
        patch(image, 100, ">I", 0xFFFFFFF8)
    elif case == "header-length-past-cluster":
        patch(image, 100, ">I", 65536 + 8)
    elif case == "header-length-too-small":
        patch(image, 100, ">I", 64)
    elif case == "extension-length-overflowing":
        patch(image, header.header_length + 4, ">I", 0xFFFFFF00)
    elif case == "backing-name-past-eof":
        patch(image, 8, ">QI", 10**12, 10)
    elif case == "backing-name-too-long":
        patch(image, 8, ">QI", 4096, 5000)
    elif case == "nb-snapshots-huge":
        patch(image, 60, ">I", 2**31)
    elif case == "nb-snapshots-past-eof":
        patch(image, 60, ">I", 60000)
    elif case == "snapshot-extra-huge":
        patch(image, header.snapshots_offset + 36, ">I", 2**31)
    elif case == "snapshot-l1-past-eof":
        patch(image, header.snapshots_offset, ">Q", size + 65536 * 4)
    elif case == "virtual-size-2^63":
        patch(image, 24, ">Q", 2**63 + 1)
    elif case == "virtual-size-beyond-l1":
        patch(image, 24, ">Q", 2**40)
    elif case == "refcount-table-clusters-0":
        patch(image, 56, ">I", 0)
    elif case == "refcount-table-unaligned":
        patch(image, 48, ">Q", header.refcount_table_offset + 512)
    elif case == "compression-type-unknown":
        patch(image, 104, ">B", 7)
    elif case == "compression-bit-without-type":
        patch(image, 72, ">Q", 1 << 3)
    elif case == "extended-l2-small-clusters":
        patch(image, 72, ">Q", 1 << 4)
        patch(image, 20, ">I", 12)
    elif case == "crypt-method-unknown":
        patch(image, 32, ">I", 9)
    elif case == "version-1":
        patch(image, 4, ">I", 1)
    elif case == "version-4":
        patch(image, 4, ">I", 4)
    elif case == "truncated-header":
        with open(image, "r+b") as f:
            f.truncate(90)
    # cases that open, then fail when the mapping is used
    elif case == "l2-entry-past-eof":
        where, _ = l2_entry_location(image, 0)
        patch(image, where, ">Q", (1 << 63) | ((size + 100 * 65536) & ~0xFFFF))
    elif case == "l2-entry-unaligned":
        where, value = l2_entry_location(image, 0)
        patch(image, where, ">Q", value + 512)
    elif case == "l1-entry-past-eof":
        patch(image, header.l1_table_offset, ">Q", (1 << 63) | (size + 65536 * 50) & ~0xFFFF)
    elif case == "l1-entry-unaligned":
        with open(image, "rb") as f:
            f.seek(header.l1_table_offset)
            (value,) = struct.unpack(">Q", f.read(8))
        patch(image, header.l1_table_offset, ">Q", value + 4096)
    elif case == "compressed-entry-past-eof":
        where, value = compressed_entry_location(image)
        patch(image, where, ">Q", (1 << 62) | (size + 12345))
    elif case == "compressed-entry-garbage":
        where, value = compressed_entry_location(image)
        patch(image, where, ">Q", (1 << 62) | (3 << 54) | 17)  # points into the header
    else:  # pragma: no cover
        raise AssertionError(case)


OPEN_FAILURES = [
    "l1-size-2^31-1", "l1-size-beyond-file", "l1-offset-past-eof", "l1-offset-unaligned", "cluster-bits-8",
    "cluster-bits-22", "cluster-bits-huge", "refcount-order-7", "header-length-overflowing",
    "header-length-past-cluster", "header-length-too-small", "extension-length-overflowing", "backing-name-past-eof",
    "backing-name-too-long", "nb-snapshots-huge", "nb-snapshots-past-eof", "snapshot-extra-huge",
    "virtual-size-2^63", "virtual-size-beyond-l1", "refcount-table-clusters-0", "refcount-table-unaligned",
    "compression-type-unknown", "compression-bit-without-type", "extended-l2-small-clusters", "crypt-method-unknown",
    "version-1", "version-4", "truncated-header",
]  # fmt: skip
READ_FAILURES = [
    "l2-entry-past-eof", "l2-entry-unaligned", "l1-entry-past-eof", "l1-entry-unaligned", "compressed-entry-past-eof",
    "compressed-entry-garbage",
]  # fmt: skip


@pytest.mark.parametrize("case", OPEN_FAILURES + READ_FAILURES)
def test_hostile_images_fail_cleanly(small_image, tmp_path, case):
    image = tmp_path / "hostile.qcow2"
    shutil.copyfile(small_image, image)
    _hostile(image, case)
    tracemalloc.start()
    began = time.monotonic()
    try:
        if case in OPEN_FAILURES:
            with pytest.raises(DiskImageError) as err:
                open_qcow2(image)
        else:
            with open_qcow2(image) as reader:
                with pytest.raises(CorruptImage) as err:
                    read_everything(reader)
                if case == "compressed-entry-garbage":  # extents come from metadata alone
                    list(reader.extents())
                else:
                    with pytest.raises(CorruptImage):
                        list(reader.extents())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - began < 5
    assert peak < 16 * MiB, f"{case}: {peak} bytes allocated"
    assert str(err.value)
    if case in ("l2-entry-past-eof", "compressed-entry-past-eof"):
        assert "past the end of the file" in str(err.value)


def test_snapshot_with_l1_past_eof_fails_when_selected(small_image, tmp_path):
    image = tmp_path / "hostile.qcow2"
    shutil.copyfile(small_image, image)
    _hostile(image, "snapshot-l1-past-eof")
    with open_qcow2(image) as reader:  # the active layer is fine
        reader_sha256(reader)
    with pytest.raises(CorruptImage, match="snapshot 1 L1 table"):
        open_qcow2(image, snapshot="snap")


def read_everything(reader, cap: int = 16 * MiB) -> None:
    for offset in range(0, min(reader.virtual_size, cap), MiB):
        reader.read_at(offset, MiB)


def test_truncated_data_cluster_is_corrupt(tmp_path):
    """A data cluster cut by the end of the file means a truncated image: qemu reads zeros past
    the end, we refuse (a truncated download must not convert silently)."""
    image = create(tmp_path / "t.qcow2", 4 * MiB)
    qemu_io(image, "qcow2", "write -P 0x61 3M 64k")
    _, value = l2_entry_location(image, 3 * MiB)
    host = value & 0x00FFFFFFFFFFFE00
    with open(image, "r+b") as f:
        f.truncate(host + 1000)
    with open_qcow2(image) as reader:
        assert reader.read_at(0, 65536) == bytes(65536)
        with pytest.raises(CorruptImage, match=f"truncated: guest offset {3 * MiB} maps to host offset {host}"):
            reader.read_at(3 * MiB, 10)
        with pytest.raises(CorruptImage):
            list(reader.extents())


@pytest.mark.parametrize("case", ["invalid-subcluster-bitmap", "unaligned-preallocated-cluster"])
def test_l2_entries_qemu_refuses_to_read(tmp_path, case):
    """What qemu-img convert refuses (qemu's QCOW2_SUBCLUSTER_INVALID; a preallocated cluster off its
    alignment) the reader refuses too, in reads and in the allocation map."""
    if case == "invalid-subcluster-bitmap":
        image = create(tmp_path / "x.qcow2", 4 * MiB, "extended_l2=on")
        qemu_io(image, "qcow2", "write -P 0x63 0 128k")
        where, _ = l2_entry_location(image, 0, entry_size=16)
        write_at(image, where + 8, struct.pack(">Q", (1 << 32) | 0xFFFFFFFF))  # subcluster 0 allocated and zero
        message = "invalid subcluster bitmap"
    else:
        image = create(tmp_path / "z.qcow2", 4 * MiB, "preallocation=metadata")
        where, value = l2_entry_location(image, 0)
        write_at(image, where, struct.pack(">Q", value | 0x200 | 1))  # reads as zeros, host offset 512 bytes off
        message = "not cluster aligned"
    qemu = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, tmp_path / "out.raw"],
                          capture_output=True)
    assert qemu.returncode != 0
    with open_qcow2(image) as reader:
        with pytest.raises(CorruptImage, match=message):
            reader.read_at(0, 512)
        with pytest.raises(CorruptImage, match=message):
            list(reader.extents())


def test_extended_l2_partial_last_cluster(tmp_path):
    """With subclusters, only the allocated ones must lie inside the file."""
    image = create(tmp_path / "x.qcow2", 4 * MiB, "extended_l2=on")
    qemu_io(image, "qcow2", "write -P 0x62 3M 2k")
    _, value = l2_entry_location(image, 3 * MiB, entry_size=16)
    host = value & 0x00FFFFFFFFFFFE00
    with open(image, "r+b") as f:
        f.truncate(host + 2048)
    check_against_qemu(image, tmp_path, info=False)


# -- fuzzing ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory) -> dict[str, tuple[bytes, int]]:
    """Small valid images and the file offset of one of their L2 tables."""
    directory = tmp_path_factory.mktemp("fuzz")
    images = {}
    raw = patterned_raw(directory / "src.raw", 1 * MiB)
    for name, options in [("c512", "cluster_size=512"), ("c64k", "cluster_size=65536"), ("xl2", "extended_l2=on")]:
        image = directory / f"{name}.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, raw, image)
        qemu_io(image, "qcow2", "write -P 0x11 0 10k", "write -z 300k 64k", "write -P 0x12 600k 3k")
        qemu_img("snapshot", "-c", "s", image)
        header = qcow2_header(image)
        with open(image, "rb") as f:
            f.seek(header.l1_table_offset)
            (l1,) = struct.unpack(">Q", f.read(8))
        where = l1 & 0x00FFFFFFFFFFFE00
        images[name] = (image.read_bytes(), where - where % header.cluster_size)
    return images


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    which=st.sampled_from(["c512", "c64k", "xl2"]),
    in_l2=st.booleans(),
    mutations=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzzed_images_raise_only_diskimage_errors(fuzz_images, tmp_path_factory, which, in_l2, mutations):
    data, l2_at = fuzz_images[which]
    mutated = bytearray(data)
    base = l2_at if in_l2 else 0
    for offset, value in mutations:
        if base + offset < len(mutated):
            mutated[base + offset] = value
    path = tmp_path_factory.getbasetemp() / "fuzzed.qcow2"
    path.write_bytes(mutated)
    try:
        with open_qcow2(path, backing=False) as reader:
            read_everything(reader)
            total = sum(extent.length for extent in reader.extents())
            assert total == reader.virtual_size
            reader.info()
    except DiskImageError:
        pass


# -- pure structures ------------------------------------------------------------------------------------------


def test_structures_round_trip(small_image, tmp_path):
    data = small_image.read_bytes()
    header = Qcow2Header.parse(data)
    assert header.pack() == data[: header.header_length]
    v2 = create(tmp_path / "v2.qcow2", MiB, "compat=0.10")
    v2_data = v2.read_bytes()
    assert Qcow2Header.parse(v2_data).pack() == v2_data[:72]
    area = data[header.header_length : header.cluster_size]
    extensions = parse_header_extensions(area)
    packed = extensions.pack()
    assert packed == area[: len(packed)]
    assert extensions.feature_names[(0, 0)] == "dirty bit"
    assert pack_header_extensions([HeaderExtension(0xE2792ACA, b"raw")]) == (
        b"\xe2\x79\x2a\xca\x00\x00\x00\x03raw\0\0\0\0\0" + bytes(8)
    )
    table = parse_snapshot_table(data[header.snapshots_offset :], header.nb_snapshots)
    assert [s.name for s in table] == ["snap"]
    assert table[0].disk_size == 4 * MiB
    packed_table = pack_snapshot_table(table)
    stored = data[header.snapshots_offset : header.snapshots_offset + len(packed_table)]
    assert packed_table == stored + bytes(len(packed_table) - len(stored))  # qemu may omit the last padding
    odd = Qcow2Snapshot(65536, 1, "7", "\udcff name", extra=bytes(16))
    assert parse_snapshot_table(odd.pack(), 1) == [odd]


def test_l2_entry_codec():
    for cluster_bits in (9, 12, 16, 21):
        for offset, length in [(12345, 100), (1 << 30, 1 << cluster_bits), (511, 2)]:
            entry = encode_compressed_entry(offset, length, cluster_bits)
            decoded = decode_l2_entry(entry, cluster_bits)
            assert decoded.kind == "compressed" and decoded.host_offset == offset
            assert decoded.compressed_length >= length
    assert decode_l2_entry(0, 16).kind == "unallocated"
    assert decode_l2_entry(1, 16).kind == "zero"
    assert decode_l2_entry(1, 16, extended=True).kind == "unallocated"
    assert decode_l2_entry((1 << 63) | 0x50000, 16) == ("normal", 0x50000, 0, True)
    bitmap = 0b0110 | (0b1000 << 32)  # subclusters 1, 2 allocated; 3 reads as zero
    kinds = [subcluster_kind(0x50000, bitmap, index) for index in range(5)]
    assert kinds == ["unallocated", "normal", "normal", "zero", "unallocated"]
    with pytest.raises(ValueError):
        subcluster_kind(0, 1, 0)  # allocated without a host cluster


def test_probe(small_image, tmp_path):
    head = small_image.read_bytes()[:65536]
    found = probe(head, b"", small_image.stat().st_size)
    assert found is not None
    assert (found.format, found.version, found.subformat, found.readable) == ("qcow2", "3", "v3", True)
    v2 = create(tmp_path / "v2.qcow2", MiB, "compat=0.10")
    found = probe(v2.read_bytes(), b"", v2.stat().st_size)
    assert found is not None and (found.version, found.subformat) == ("2", "v2")
    assert probe(b"QFI\xfb\0\0\0\1" + bytes(64), b"", 72) is None  # qcow v1
    assert probe(b"QFI\xfb\0\0", b"", 6) is None
    assert probe(bytes(512), b"", 512) is None
    assert probe(head[:80], b"", 80) is not None  # a truncated header is still qcow2


# -- third-party corpus ---------------------------------------------------------------------------------------

CORPUS = corpus_entries(("qcow2",))


def _materialize(entry: dict, tmp_path: Path) -> Path:
    """The image, decompressed into tmp_path with its qcow2 siblings (backing chains need them)."""
    source = corpus_dir() / entry["file"]  # type: ignore[operator]
    if not entry["file"].endswith(".gz"):
        return source
    for sibling in source.parent.glob("*.qcow2.gz"):
        with gzip.open(sibling, "rb") as src, open(tmp_path / sibling.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return tmp_path / source.name[:-3]


@pytest.mark.parametrize("entry", corpus_params(CORPUS))
def test_corpus(entry, tmp_path):
    image = _materialize(entry, tmp_path)
    if "data-file" in image.name:
        with pytest.raises(UnsupportedFormat, match="external data file 'data-file.bin'"):
            open_qcow2(image)
        return
    assert entry["qemu_img_ok"]
    with open_qcow2(image) as reader:
        assert reader.virtual_size == entry["virtual_size"]
        assert reader_sha256(reader) == entry["raw_sha256"]
        assert sum(extent.length for extent in reader.extents()) == reader.virtual_size
        reader.info()
    for snapshot_id, digest in (entry.get("snapshot_raw_sha256") or {}).items():
        with open_qcow2(image, snapshot=snapshot_id) as reader:
            assert reader_sha256(reader) == digest
