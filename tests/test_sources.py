"""Disks read through a wrapper (diskimg.streams.sources): bare compressed RAW disks made by gzip, pigz, xz,
zstd and bzip2, and tar archives made by GNU tar (every sparse format) and bsdtar, compressed or
not. The oracles: the original file's bytes, qemu-img for qcow2 members and converted outputs,
the compressors' own tools for damaged streams."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import diskimg
import diskimg.streams.sources  # the module the tests below name as diskimg.streams.sources
from diskimg.errors import ArchiveError, UnsupportedFormat
from diskimg.formats.reader import ExtentKind

from .support.digests import file_sha256, reader_sha256
from .support.disks import sfdisk
from .support.files import sparse_file
from .support.tools import diskimg_cli, diskimg_to_pipe, qemu_compare, qemu_img, qemu_raw, requires_qemu, run
from .support.units import MiB

SIZE = 14 * MiB + 3 * 512  # not a whole MiB: the last chunk is short
#: (offset, length) of data in the test disk: unaligned, across chunk boundaries, at the very end
RUNS = [(0, 4096), (MiB - 700, 5000), (5 * MiB + 12345, MiB + 3), (SIZE - 1536, 1536)]


def has(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse RAW disk with incompressible data in RUNS (an MBR signature at 510)."""
    import random

    rng = random.Random(5)
    runs = [(offset, rng.randbytes(length)) for offset, length in RUNS]
    first = bytearray(runs[0][1])
    first[510:512] = b"\x55\xaa"
    runs[0] = (0, bytes(first))
    return sparse_file(tmp_path_factory.mktemp("sources") / "disk.raw", SIZE, runs)


def compressed(disk: Path, tool: list[str], suffix: str) -> Path:
    out = disk.with_name(f"{disk.name}.{tool[0]}{suffix}")
    if not out.exists():
        with open(out, "wb") as dst:
            subprocess.run([*tool, disk], stdout=dst, check=True)
    return out


def tar_of(disk: Path, *options: str, tool: str = "tar", compress: str = "") -> Path:
    """An archive of ``disk`` made by GNU tar or bsdtar with ``options``, compressed by a tool."""
    label = "-".join(o.strip("-").replace("=", "") for o in options) or "plain"
    out = disk.with_name(f"{tool}-{label}.tar" + (f".{compress}" if compress else ""))
    if not out.exists():
        archive = subprocess.run([tool, *options, "-cf", "-", "-C", str(disk.parent), disk.name],
                                 capture_output=True, check=True).stdout
        if compress:
            archive = subprocess.run([compress, "-c"], input=archive, capture_output=True, check=True).stdout
        out.write_bytes(archive)
    return out


# -- bare compressed disks --------------------------------------------------------------------------


#: (tool, suffix, where the size comes from, decompression passes of open + one forward read): the
#: tail (where a VHD footer or DMG trailer would be) is seen by the pass that counts a gzip or bzip2
#: stream, from the last block of a multi-block xz file decoded alone, and for a zstd file of one
#: frame when the read reaches it
BARE = [
    (["gzip", "-c"], ".gz", "counted", 2),
    (["pigz", "-c", "-p", "2"], ".gz", "counted", 2),
    (["xz", "-c", "-T2", "--block-size=4MiB"], ".xz", "the xz index", 1),
    (["zstd", "-c", "-q"], ".zst", "the zstd frame headers", 1),
    (["bzip2", "-c"], ".bz2", "counted", 2),
]


@pytest.mark.parametrize("tool,suffix,size_from,passes", BARE, ids=[t[0][0] for t in BARE])
def test_bare_compressed_raw_reads_the_disk(disk: Path, tool: list[str], suffix: str, size_from: str,
                                            passes: int) -> None:
    if not has(tool[0]):
        pytest.skip(f"{tool[0]} not installed")
    wrapped = compressed(disk, tool, suffix)
    with diskimg.open_image(wrapped) as reader:
        assert reader.forward_only and reader.format == "raw"
        assert reader.virtual_size == SIZE
        details = reader.info().details
        assert details["wrapper"] == details["compression"] == {".gz": "gzip", ".xz": "xz", ".zst": "zstd",
                                                                 ".bz2": "bzip2"}[suffix]
        assert details["virtual_size_from"].startswith(size_from)
        assert reader_sha256(reader) == file_sha256(disk)
        assert reader.decompression_passes == passes


def test_concatenated_members_and_frames_are_one_disk(disk: Path, tmp_path: Path) -> None:
    """gzip members, xz streams (with stream padding) and zstd frames concatenated (as pigz
    --independent, pzstd or a split-and-compress pipeline produce them) read as one disk."""
    data = disk.read_bytes()
    half = len(data) // 2 + 1000
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(data[:half])
    second.write_bytes(data[half:])
    for tool, suffix, padding in ((["gzip", "-c"], ".gz", b""), (["xz", "-c"], ".xz", bytes(8)),
                                  (["zstd", "-c", "-q"], ".zst", b"")):
        parts = [run(*tool, part).stdout for part in (first, second)]
        joined = tmp_path / f"joined{suffix}"
        joined.write_bytes(parts[0] + padding + parts[1])
        with diskimg.open_image(joined) as reader:
            assert reader.virtual_size == SIZE
            assert reader_sha256(reader) == file_sha256(disk), suffix


def test_zstd_without_content_size_is_counted(disk: Path, tmp_path: Path) -> None:
    """zstd compressing a pipe does not record the content size: one counting pass is made."""
    out = tmp_path / "piped.zst"
    out.write_bytes(run("bash", "-c", f"cat {disk} | zstd -q -c").stdout)
    with diskimg.open_image(out) as reader:
        assert reader.info().details["virtual_size_from"].startswith("counted")
        assert reader.virtual_size == SIZE
        assert reader_sha256(reader) == file_sha256(disk)


def test_backward_reads_restart_and_cached_chunks_do_not(disk: Path) -> None:
    wrapped = compressed(disk, ["xz", "-c", "-T2", "--block-size=4MiB"], ".xz")
    expected = disk.read_bytes()
    with diskimg.open_image(wrapped) as reader:
        assert reader.read_at(0, 512) == expected[:512]
        assert reader.read_at(SIZE - 4096, 4096) == expected[-4096:]
        assert reader.decompression_passes == 1  # forward so far
        assert reader.read_at(SIZE - 100_000, 512) == expected[SIZE - 100_000 : SIZE - 100_000 + 512]
        assert reader.decompression_passes == 1  # within the cached chunks
        assert reader.read_at(MiB - 700, 5000) == expected[MiB - 700 : MiB + 4300]
        assert reader.decompression_passes == 2  # behind the cache: decompression started over
        # the file view (partition and file system parsers) works too
        reader.seek(510)
        assert reader.read(2) == b"\x55\xaa"


def test_qcow2_inside_a_compressed_file_is_refused_with_the_command(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    run("xz", "-k", image)
    with pytest.raises(UnsupportedFormat) as caught:
        diskimg.open_image(tmp_path / "disk.qcow2.xz")
    assert caught.value.format == "qcow2"
    assert "random access" in str(caught.value) and f"xz -dk {tmp_path}/disk.qcow2.xz" in str(caught.value)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_damaged_streams_raise_archive_error(disk: Path, tmp_path: Path, kind: str, damage: str) -> None:
    """A truncated or corrupted stream (the tool itself rejects it) is one ArchiveError, at open or
    at the read that reaches the damage, never a wrong disk."""
    suffix = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}[kind]
    data = bytearray(compressed(disk, [kind, "-c"] + (["-q"] if kind == "zstd" else []), suffix).read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x55
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(bytes(data))
    assert subprocess.run([kind, "-t", bad], capture_output=True).returncode != 0  # the oracle agrees
    with pytest.raises(ArchiveError):
        with diskimg.open_image(bad) as reader:
            reader_sha256(reader)
            diskimg.streams.sources.finish_archive(reader)  # checks what follows the data: end CRCs, trailers


# -- tar archives -----------------------------------------------------------------------------------


TARS = [
    ("tar", ("-S", "--format=gnu")),
    ("tar", ("-S", "--format=oldgnu")),
    ("tar", ("-S", "--format=posix")),
    ("tar", ("-S", "--format=posix", "--sparse-version=0.0")),
    ("tar", ("-S", "--format=posix", "--sparse-version=0.1")),
    ("tar", ("-S", "--format=posix", "--sparse-version=1.0")),
    ("tar", ("--format=gnu",)),  # not sparse: the map is one DATA extent
    ("bsdtar", ("--format=pax",)),
    ("bsdtar", ("--format=gnutar",)),
]


#: every archive flavour uncompressed and gzip'ed (ECS's .tar.gz); zstd and xz on a few
COMPRESSED_TARS = [(tool, options, compress) for tool, options in TARS for compress in ("", "gzip")] + [
    (*TARS[0], "zstd"), (*TARS[5], "zstd"), (*TARS[2], "xz"), (*TARS[7], "xz")]


@pytest.mark.parametrize("tool,options,compress", COMPRESSED_TARS,
                         ids=[f"{t}{''.join(o)}-{c or 'none'}" for t, o, c in COMPRESSED_TARS])
def test_tar_member_reads_with_its_sparse_map(disk: Path, tool: str, options: tuple[str, ...], compress: str) -> None:
    if not has(tool) or (compress and not has(compress)):
        pytest.skip(f"{tool} or {compress} not installed")
    archive = tar_of(disk, *options, tool=tool, compress=compress)
    with diskimg.open_image(archive) as reader:
        details = reader.info().details
        assert details["wrapper"] == "tar" and details["member"] == "disk.raw"
        assert details.get("compression") == (compress or None)
        assert reader.forward_only == bool(compress)
        assert reader.virtual_size == SIZE
        extents = list(reader.extents())
        if details["sparse"]:
            # the map comes from the headers: holes are ZERO before any data is read
            allocated = sum(e.length for e in extents if e.kind is ExtentKind.DATA)
            assert allocated < SIZE // 4
        assert reader_sha256(reader) == file_sha256(disk)
        position = 0
        data = disk.read_bytes()
        for extent in extents:
            assert extent.start == position
            position = extent.end
            if extent.kind is ExtentKind.ZERO:
                assert data[extent.start : extent.end] == bytes(extent.length)
        assert position == SIZE


@requires_qemu
def test_qcow2_in_an_uncompressed_tar_is_read_in_place(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 31M 64k", image)
    run("tar", "-cf", tmp_path / "disk.qcow2.tar", "-C", tmp_path, "disk.qcow2")
    with diskimg.open_image(tmp_path / "disk.qcow2.tar") as reader:
        assert reader.format == "qcow2" and not reader.forward_only
        assert reader_sha256(reader) == file_sha256(qemu_raw(image, "qcow2", tmp_path))
    run("gzip", "-k", tmp_path / "disk.qcow2.tar")
    with pytest.raises(UnsupportedFormat) as caught:
        diskimg.open_image(tmp_path / "disk.qcow2.tar.gz")
    assert "gunzip -k" in str(caught.value) and "uncompressed tar" in str(caught.value)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_links_and_devices_in_a_tar_are_refused(tmp_path: Path, kind: str) -> None:
    (tmp_path / "d").mkdir()
    target = tmp_path / "d" / "disk.raw"
    target.write_bytes(bytes(4096))
    if kind == "symlink":
        (tmp_path / "d" / "link").symlink_to("/etc/passwd")
    elif kind == "hardlink":
        (tmp_path / "d" / "link").hardlink_to(target)
    else:
        import os

        os.mkfifo(tmp_path / "d" / "link")
    names = ["link", "disk.raw"] if kind != "hardlink" else ["disk.raw", "link"]
    run("tar", "-cf", tmp_path / "x.tar", "-C", tmp_path / "d", *names)
    with pytest.raises(ArchiveError, match=kind if kind != "fifo" else "fifo"):
        with diskimg.open_image(tmp_path / "x.tar") as reader:
            reader.read_at(0, 4096)
            diskimg.streams.sources.finish_archive(reader)


@requires_qemu
def test_a_second_disk_is_refused(disk: Path, tmp_path: Path) -> None:
    """In a plain tar (read at random) when it is opened; in a compressed one (read forward) when
    the reader has passed the first disk (``finish_archive``, which unpack calls)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "d.qcow2", "16M")
    (tmp_path / "disk.raw").write_bytes(bytes(8192))
    run("tar", "-cf", tmp_path / "two.tar", "-C", tmp_path, "d.qcow2", "disk.raw")
    with pytest.raises(ArchiveError, match="more than one disk"):
        diskimg.open_image(tmp_path / "two.tar")
    run("tar", "-czf", tmp_path / "two.tar.gz", "-C", tmp_path, "disk.raw", "d.qcow2")
    with diskimg.open_image(tmp_path / "two.tar.gz") as reader:
        assert reader.read_at(0, 8192) == bytes(8192)
        with pytest.raises(ArchiveError, match="more than one disk"):
            diskimg.streams.sources.finish_archive(reader)


# -- the commands ---------------------------------------------------------------------------------


def test_info_says_the_disk_is_read_through_the_wrapper(disk: Path) -> None:
    archive = tar_of(disk, "-S", "--format=gnu", compress="gzip")
    proc = diskimg_cli("info", "--json", archive)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["format"] == "raw" and facts["virtual_size"] == SIZE
    assert facts["details"]["wrapper"] == "tar" and facts["details"]["compression"] == "gzip"
    assert facts["details"]["member"] == "disk.raw" and facts["details"]["inner_format"] == "raw"
    assert "sequential" in facts["details"]["access"]
    text = diskimg_cli("info", archive).stdout.decode()
    assert "member: disk.raw" in text and "wrapper: tar" in text


@requires_qemu
@pytest.mark.parametrize("target_format", ["qcow2", "vhd", "raw"])
def test_convert_a_sparse_tar_gz_to_a_pipe_in_one_pass(disk: Path, tmp_path: Path, target_format: str) -> None:
    """The tar sparse map is the exact plan a streamed qcow2/VHD needs: no pre-scan, one pass."""
    archive = tar_of(disk, "-S", "--format=posix", compress="gzip")
    out = tmp_path / f"out.{target_format}"
    proc = diskimg_to_pipe(out, "convert", archive, "-", "-O", target_format, "--progress", "json", check=True)
    stderr = proc.stderr.decode()
    assert '"phase": "scan"' not in stderr and "one decompression pass" in stderr
    qemu_compare(out, "vpc" if target_format == "vhd" else target_format, disk, "raw")
    if target_format == "qcow2":
        assert json.loads(qemu_img("check", "--output=json", out))["check-errors"] == 0


@requires_qemu
def test_convert_a_bare_gz_to_a_pipe_says_the_scan_costs_a_pass(disk: Path, tmp_path: Path) -> None:
    wrapped = compressed(disk, ["gzip", "-c"], ".gz")
    out = tmp_path / "out.qcow2"
    proc = diskimg_to_pipe(out, "convert", wrapped, "-", "-O", "qcow2", "--progress", "json", check=True)
    stderr = proc.stderr.decode()
    # the size is counted (one pass), the zero pre-scan (one), the conversion (one)
    assert '"phase": "scan"' in stderr and "3 decompression passes" in stderr
    qemu_compare(out, "qcow2", disk, "raw")
    assert out.stat().st_size < SIZE // 2  # the pre-scan left the zero ranges unallocated


@requires_qemu
def test_convert_to_a_file_is_sparse_and_one_pass(disk: Path, tmp_path: Path) -> None:
    archive = tar_of(disk, "-S", "--format=oldgnu", compress="zstd")
    result = diskimg.convert(archive, tmp_path / "out.raw", "raw")
    assert result.decompression_passes == 1 and result.source_format == "raw"
    qemu_compare(tmp_path / "out.raw", "raw", disk, "raw")
    assert (tmp_path / "out.raw").stat().st_blocks * 512 < SIZE // 4


def test_validate_inspects_the_disk_inside_in_one_pass(tmp_path: Path) -> None:
    """The wrapper is still refused (the importer reads the file as is), but the partition table of
    the disk inside is inspected, and the report says how it was read."""
    image = tmp_path / "mbr.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    sfdisk(image, "label: dos\n,16M,L\n")
    run("xz", "-k", image)
    proc = diskimg_cli("validate", "--json", tmp_path / "mbr.raw.xz")
    assert proc.returncode == 1, proc.stderr  # not importable: the container
    report = json.loads(proc.stdout)
    codes = {finding["code"]: finding for finding in report["findings"]}
    assert codes["format-wrapped"]["severity"] == "error"
    assert "decompressed once" in codes["wrapped-inspected"]["message"]
    table = report["disks"][0]["partition_table"]
    assert table["scheme"] in ("mbr", "dos") and table["partitions"][0]["size"] == 16 * MiB


# -- hostile input ------------------------------------------------------------------------------------


def _small_archives(tmp: Path) -> dict[str, bytes]:
    """A sparse GNU tar, its gzip and zstd streams, and a bare xz disk: small, for mutation."""
    import random

    disk = sparse_file(tmp / "small.raw", 256 * 1024, [(0, random.Random(3).randbytes(3000)), (200_000, b"\x01" * 700)])
    plain = run("tar", "-S", "--format=gnu", "-cf", "-", "-C", tmp, disk.name).stdout
    return {"tar": plain, "tar.gz": run("gzip", "-c", input=plain).stdout,
            "tar.zst": run("zstd", "-q", "-c", input=plain).stdout, "raw.xz": run("xz", "-c", disk).stdout}


@pytest.fixture(scope="module")
def small_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _small_archives(tmp_path_factory.mktemp("small"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["tar", "tar.gz", "tar.zst", "raw.xz"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_archives_raise_only_diskimg_errors(small_archives: dict[str, bytes], tmp_path: Path, kind: str,
                                                    edits: list[tuple[float, int]], cut: float | None) -> None:
    data = bytearray(small_archives[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"mutated.{kind}"
    path.write_bytes(bytes(data))
    try:
        with diskimg.open_image(path) as reader:
            assert reader.virtual_size <= diskimg.streams.sources.MAX_MEMBER_SIZE
            for extent in reader.extents():  # the DATA extents: a forged size cannot make this long
                for offset in range(extent.start, extent.end if extent.kind is ExtentKind.DATA else 0, 4 * MiB):
                    reader.read_at(offset, 4 * MiB)
            diskimg.streams.sources.finish_archive(reader)
    except diskimg.DiskImageError:
        pass


# -- a format known by its end (a fixed VHD's footer, a DMG trailer) inside a wrapper ----------------

VHD_SIZE = 6 * MiB
#: how each wrapper is made from the fixed VHD, and the decompression passes convert takes to read
#: the VHD through it (seeing its end included; None: read in place), or False when it refuses it
#: (exit 3): where seeing the end of the stream costs a pass of its own (an xz or zstd file of one
#: block or frame, a compressed tar), it is seen only once read
WRAPPED_VHDS = {
    "gz": (lambda src, out: _pipe(["gzip", "-c", src], out), 2),  # the pass counting the size sees the end
    "bz2": (lambda src, out: _pipe(["bzip2", "-c", src], out), 2),
    "xz": (lambda src, out: _pipe(["xz", "-c", src], out), False),
    # 1 MiB blocks: the last one holds the footer's 512 bytes, the tail spans two blocks
    "xz-blocks": (lambda src, out: _pipe(["xz", "-c", "-T2", "--block-size=1MiB", src], out), 1),
    "zst": (lambda src, out: _pipe(["zstd", "-c", "-q", src], out), False),
    "zst-frames": (lambda src, out: _zstd_two_frames(src, out), 1),
    "tar": (lambda src, out: run("tar", "-cf", out, "-C", src.parent, src.name), None),
    "tar-sparse": (lambda src, out: run("tar", "-cSf", out, "-C", src.parent, src.name), None),
    "tar.gz": (lambda src, out: run("tar", "-czf", out, "-C", src.parent, src.name), False),
}


def _pipe(command: list, out: Path) -> None:
    with open(out, "wb") as f:
        subprocess.run(command, stdout=f, check=True)


def _zstd_two_frames(src: Path, out: Path) -> None:
    """Two zstd frames recording their sizes (as pzstd or a split-and-compress pipeline write them):
    the last one holds the end."""
    data = src.read_bytes()
    parts = (data[: len(data) // 2], data[len(data) // 2 :])
    out.write_bytes(b"".join(subprocess.run(["zstd", "-c", "-q", f"--stream-size={len(part)}"], input=part,
                                            capture_output=True, check=True).stdout for part in parts))


@pytest.fixture(scope="module")
def fixed_vhd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fixed VHD written by qemu-img from random data (at its start, middle and very end), and
    what qemu-img reads from it (the oracle)."""
    import random

    directory = tmp_path_factory.mktemp("fixed")
    rng = random.Random(12)
    source = sparse_file(directory / "source.raw", VHD_SIZE,
                         [(0, rng.randbytes(3 * MiB // 2)), (3 * MiB + 77, rng.randbytes(5000)),
                          (VHD_SIZE - 4096, rng.randbytes(4096))])
    vhd = directory / "disk.vhd"
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", source, vhd)
    expected = directory / "qemu.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, expected)
    return vhd, expected


def _one_line_refusal(proc: subprocess.CompletedProcess, word: str) -> None:
    stderr = proc.stderr.decode()
    assert proc.returncode == 3 and stderr.count("\n") == 1 and word in stderr.lower(), (proc.returncode, stderr)
    assert "Traceback" not in stderr


@requires_qemu
@pytest.mark.parametrize("wrapper", list(WRAPPED_VHDS))
def test_a_fixed_vhd_in_a_wrapper_is_read_as_a_vhd_or_refused(fixed_vhd: tuple[Path, Path], tmp_path: Path,
                                                            wrapper: str) -> None:
    """Its footer is never disk data: diskimg's RAW equals qemu-img's of the bare VHD, or it refuses."""
    vhd, expected = fixed_vhd
    make, passes = WRAPPED_VHDS[wrapper]
    wrapped = tmp_path / f"disk.vhd.{wrapper}"
    make(vhd, wrapped)
    out = tmp_path / "out.raw"
    proc = diskimg_cli("convert", wrapped, out, "-O", "raw", "--json")
    if passes is not False:
        assert proc.returncode == 0, proc.stderr
        assert file_sha256(out) == file_sha256(expected)
        assert json.loads(proc.stdout)["decompression_passes"] == passes
    else:
        _one_line_refusal(proc, "vhd")
        assert not out.exists()
    # info sees the end of the disk inside at open (a compressed tar's member too: one pass)
    facts = json.loads(diskimg_cli("info", "--json", wrapped).stdout)
    qemu_facts = json.loads(qemu_img("info", "--output=json", "-f", "vpc", vhd))
    assert facts["format"] == "vhd" and facts["subformat"] == "fixed"
    assert facts["virtual_size"] == qemu_facts["virtual-size"]


@requires_qemu
@pytest.mark.parametrize("wrapper", list(WRAPPED_VHDS))
def test_unpack_of_a_wrapped_fixed_vhd_to_qcow2_keeps_its_virtual_size(fixed_vhd: tuple[Path, Path], tmp_path: Path,
                                                                      wrapper: str) -> None:
    """``unpack -O qcow2`` gives the VHD's own virtual size (qemu-img's), never the footer as a
    512-byte longer disk, through every wrapper (a compressed tar's member is restored as the VHD it
    turns out to be at its end, then converted); without ``-O`` the VHD comes back byte for byte."""
    vhd, expected = fixed_vhd
    make = WRAPPED_VHDS[wrapper][0]
    wrapped = tmp_path / f"disk.vhd.{wrapper}"
    make(vhd, wrapped)
    out = tmp_path / "out"
    proc = diskimg_cli("unpack", wrapped, "--out", out, "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    (restored,) = out.iterdir()
    qemu_facts = json.loads(qemu_img("info", "--output=json", "-f", "vpc", vhd))
    assert json.loads(qemu_img("info", "--output=json", restored))["virtual-size"] == qemu_facts["virtual-size"]
    qemu_compare(restored, "qcow2", expected, "raw")
    plain = tmp_path / "plain"
    proc = diskimg_cli("unpack", wrapped, "--out", plain)
    assert proc.returncode == 0, proc.stderr
    (restored,) = plain.iterdir()
    assert file_sha256(restored) == file_sha256(vhd)


def _koly() -> bytes:
    """A UDIF trailer as Apple's format lays it out: 'koly', version 4, header size 512, at the file's end."""
    return (b"koly" + struct.pack(">II", 4, 512)).ljust(512, b"\0")


TRAILER_WRAPPERS = {
    "gz": ["gzip", "-k"], "bz2": ["bzip2", "-k"], "xz": ["xz", "-k"], "zst": ["zstd", "-k", "-q"],
    "tar": ["tar", "-cf", "disk.dmg.tar"], "tar.gz": ["tar", "-czf", "disk.dmg.tar.gz"],
}


@pytest.mark.parametrize("wrapper", list(TRAILER_WRAPPERS))
def test_a_trailer_format_in_a_wrapper_is_named_and_refused(tmp_path: Path, wrapper: str) -> None:
    """A DMG is known by its trailer at the end: through any wrapper it is named and refused with
    its conversion advice, and nothing is written (a compressed tar's member at its end)."""
    import random

    rng = random.Random(7)
    image = tmp_path / "disk.dmg"
    image.write_bytes(rng.randbytes(2 * MiB + 1000) + _koly())  # beyond the first MiB that open reads
    subprocess.run([*TRAILER_WRAPPERS[wrapper], "disk.dmg"], cwd=tmp_path, check=True)
    proc = diskimg_cli("convert", tmp_path / f"disk.dmg.{wrapper}", tmp_path / "out.raw", "-O", "raw")
    _one_line_refusal(proc, "dmg")
    assert "qemu-img convert -f dmg" in proc.stderr.decode()  # the conversion advice of the format
    assert not (tmp_path / "out.raw").exists()
    proc = diskimg_cli("info", "--json", tmp_path / f"disk.dmg.{wrapper}")
    assert proc.returncode == 0 and json.loads(proc.stdout)["inner_format"] == "dmg", proc.stdout


# -- the same, on the shared corpus (images made by other tools) -------------------------------------

CORPUS_FIXED_VHD = "dissect-hypervisor/vhd/fixed.vhd.gz"
CORPUS_DMG = "qemu-iotests/simple-dmg.dmg.bz2"


def _corpus_path(name: str) -> Path:
    from .support.corpus import NO_CORPUS, corpus_dir

    directory = corpus_dir()
    if directory is None:
        pytest.skip(f"{NO_CORPUS} (this test reads its {name})")
    if not (directory / name).is_file():
        pytest.skip(f"the corpus at {directory} has no {name}")
    return directory / name


@requires_qemu
def test_corpus_gzipped_fixed_vhd_is_read_without_its_footer(tmp_path: Path) -> None:
    wrapped = _corpus_path(CORPUS_FIXED_VHD)
    vhd = tmp_path / "fixed.vhd"
    _pipe(["gzip", "-dc", wrapped], vhd)
    expected = tmp_path / "qemu.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, expected)
    out = tmp_path / "out.raw"
    proc = diskimg_cli("convert", wrapped, out, "-O", "raw")
    assert proc.returncode == 0, proc.stderr
    assert file_sha256(out) == file_sha256(expected)
    assert not out.read_bytes()[-512:].startswith(b"conectix")
    unpacked = tmp_path / "unpacked"
    proc = diskimg_cli("unpack", wrapped, "--out", unpacked, "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    qemu_facts = json.loads(qemu_img("info", "--output=json", "-f", "vpc", vhd))
    assert json.loads(qemu_img("info", "--output=json", unpacked / "fixed.qcow2"))["virtual-size"] == \
        qemu_facts["virtual-size"]


def test_corpus_bzipped_dmg_is_named_and_refused(tmp_path: Path) -> None:
    wrapped = _corpus_path(CORPUS_DMG)
    proc = diskimg_cli("convert", wrapped, tmp_path / "out.raw", "-O", "raw")
    _one_line_refusal(proc, "dmg")
    assert not (tmp_path / "out.raw").exists()
