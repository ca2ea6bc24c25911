"""RAW reading and the first converter (any readable image -> sparse RAW, to a file or a pipe)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import diskimg
from diskimg.conversion.zeroes import nonzero_runs
from diskimg.errors import OutputError
from diskimg.formats.raw import RawWriter
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.formats.writer import OutputTarget

from .support.digests import file_content_hash, file_sha256, reader_content_hash, reader_sha256
from .support.files import sparse_file
from .support.tools import FIXTURES, assert_extents_sound, qemu_img, qemu_io, qemu_raw, requires_qemu
from .support.units import MiB


@requires_qemu
def test_raw_reader_matches_qemu_and_maps_holes(tmp_path):
    image = tmp_path / "disk.raw"
    rng = random.Random(7)
    sparse_file(image, 32 * MiB + 1234, [(3 * MiB + 17, rng.randbytes(100_000)), (20 * MiB, rng.randbytes(2 * MiB))])
    with diskimg.open_image(image) as disk:
        oracle = qemu_raw(image, "raw", tmp_path)
        # like qemu, a file that is not whole sectors is a disk rounded up to 512 bytes
        assert disk.format == "raw" and disk.virtual_size == oracle.stat().st_size == 32 * MiB + 1536
        assert reader_sha256(disk) == file_sha256(oracle)
        assert_extents_sound(disk, oracle)
        extents = list(disk.extents())
        # the file system reports holes: most of the disk is ZERO, known without reading
        assert sum(e.length for e in extents if e.kind.value == "zero") > 20 * MiB


def test_reader_is_a_seekable_file(tmp_path):
    image = tmp_path / "disk.raw"
    sparse_file(image, 4 * MiB, [(510, b"\x55\xaa")])
    with diskimg.open_image(image) as disk:
        disk.seek(508)
        assert disk.read(4) == b"\x00\x00\x55\xaa"
        assert disk.tell() == 512
        assert disk.seek(-2, os.SEEK_END) == 4 * MiB - 2
        assert disk.read(10) == b"\x00\x00"
        assert disk.read(10) == b""
        assert disk.read_at(510, 2) == b"\x55\xaa"  # the positional form does not move the position


@pytest.mark.parametrize("streaming", [False, True])
def test_raw_writer_checks_bounds_and_order_like_the_other_writers(tmp_path, streaming):
    """Data past the disk is refused (the output does not grow), as is data out of order where the
    target is written in order; on a file written at positions, disjoint ranges may come in any order."""
    path = tmp_path / "out.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        writer = RawWriter(OutputTarget(fd, str(path), hash_output=streaming), MiB, {}, False)
        assert writer.concurrent_writes is not streaming
        writer.plan([Extent(0, MiB, ExtentKind.DATA)])
        for offset, data in [(MiB - 2, b"abcd"), (MiB, b"x"), (-1, b"xy")]:
            with pytest.raises(OutputError, match="out of order or past the disk's 1048576 bytes"):
                writer.write(offset, data)
        writer.write(8192, b"\x02" * 10)
        if streaming:
            with pytest.raises(OutputError, match="out of order"):
                writer.write(4096, b"\x01" * 10)
        else:
            writer.write(4096, b"\x01" * 10)
        writer.write(MiB - 2, b"ab")  # up to the very end
        writer.finish()
    finally:
        os.close(fd)
    expected = bytearray(MiB)
    if not streaming:
        expected[4096:4106] = b"\x01" * 10
    expected[8192:8202] = b"\x02" * 10
    expected[MiB - 2 :] = b"ab"
    assert path.read_bytes() == expected


@pytest.mark.parametrize("granularity", [0, 512, 4096, 65536, 1 << 20])
def test_nonzero_runs_against_a_byte_model(granularity):
    rng = random.Random(granularity)
    data = bytearray(3 * MiB + 4096)
    for _ in range(40):
        start = rng.randrange(len(data))
        data[start : start + rng.randint(1, 20000)] = rng.randbytes(min(20000, len(data) - start))[: len(data[start : start + 20000])]
    runs = list(nonzero_runs(bytes(data), granularity))
    covered = bytearray(len(data))
    previous_end = -1
    for start, end in runs:
        assert start > previous_end  # sorted, merged
        previous_end = end
        covered[start:end] = data[start:end]
        if granularity:
            assert start % granularity == 0 and (end % granularity == 0 or end == len(data))
    assert covered == data  # every non-zero byte lies in a run
    for start, end in runs:  # and no aligned piece of zeros does
        for piece in range(start, end, granularity or len(data) + 1):
            piece_data = data[piece : min(piece + granularity, end)]
            if granularity and piece % granularity == 0 and len(piece_data) in (granularity, len(data) - piece):
                assert any(piece_data), f"zero piece at {piece} inside run {start}-{end}"


@requires_qemu
@pytest.mark.parametrize("options", ["compat=0.10", "compat=1.1,cluster_size=4096", "cluster_size=2M"])
def test_convert_qcow2_to_sparse_file(tmp_path, options):
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, image, "40M")
    qemu_io(image, "qcow2", "write -P 0x5a 1M 3M", "write -P 0x11 17M 4097", "write -z 30M 2M")
    target = tmp_path / "out.raw"
    result = diskimg.convert(image, target, "raw")
    assert result.virtual_size == 40 * MiB and result.target_format == "raw"
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, target], check=True, capture_output=True)
    assert os.stat(target).st_blocks * 512 < 8 * MiB  # sparse: zeros are holes
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


@requires_qemu
def test_convert_to_a_pipe_carries_every_byte(tmp_path):
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", image, "9M")
    qemu_io(image, "qcow2", "write -P 0x77 4M 100k")
    proc = subprocess.run([sys.executable, "-m", "diskimg", "convert", str(image), "-", "-O", "raw"],
                          capture_output=True, check=True)
    oracle = qemu_raw(image, "qcow2", tmp_path)
    assert proc.stdout == oracle.read_bytes()


@requires_qemu
def test_convert_refuses_existing_target_and_source(tmp_path):
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", image, "1M")
    target = tmp_path / "out.raw"
    target.write_bytes(b"keep me")
    with pytest.raises(diskimg.OutputError, match="already exists"):
        diskimg.convert(image, target, "raw")
    assert target.read_bytes() == b"keep me"
    with pytest.raises(diskimg.OutputError, match="source image"):
        diskimg.convert(image, image, "raw", force=True)
    diskimg.convert(image, target, "raw", force=True)
    assert target.stat().st_size == 1 * MiB


@requires_qemu
def test_failed_conversion_leaves_nothing(tmp_path):
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", image, "8M")
    qemu_io(image, "qcow2", "write -P 0x01 0 64k", "write -P 0x02 6M 64k")
    # cut the file inside the last data cluster: reading it must fail, and no output may remain
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.truncate(size - 32768)
    target = tmp_path / "out.raw"
    with pytest.raises(diskimg.CorruptImage):
        diskimg.convert(image, target, "raw")
    assert sorted(os.listdir(tmp_path)) == ["src.qcow2"]


@requires_qemu
def test_fixture_example_reads_like_qemu(tmp_path):
    """A 20 GiB sparse disk: both sides are hashed by their extents (our reader's map, the holes of
    qemu-img's sparse RAW), so that the holes cost nothing."""
    example = FIXTURES / "example.qcow2"
    with diskimg.open_image(example) as disk:
        assert reader_content_hash(disk) == file_content_hash(qemu_raw(example, "qcow2", tmp_path))


@requires_qemu
def test_file_outputs_do_not_depend_on_thread_timing(tmp_path):
    """Two threads convert at once, but clusters are allocated in guest order: the same bytes every run."""
    image = tmp_path / "src.raw"
    rng = random.Random(3)
    sparse_file(image, 64 * MiB, [(rng.randrange(64 * MiB - 300_000), rng.randbytes(rng.randint(1, 300_000)))
                                 for _ in range(60)])
    outputs = []
    for run_number in range(4):
        target = tmp_path / f"out{run_number}.qcow2"
        diskimg.convert(image, target, "qcow2", options={"cluster_size": "4k"})
        outputs.append(target.read_bytes())
    assert all(output == outputs[0] for output in outputs)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", image, tmp_path / "out0.qcow2"], check=True)
