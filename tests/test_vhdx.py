"""The VHDX reader: images qemu-img makes and the third-party corpus (Hyper-V, DiscUtils) read as
qemu reads them, the log replayed in memory, differencing disks through confined parents, and
hostile files ending in one error."""

from __future__ import annotations

import io
import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest
from fastcrc import crc32
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg import open_image
from diskimg.detection.probe import detect
from diskimg.errors import BackingFileError, CorruptImage
from diskimg.formats.probing import OpenOptions
from diskimg.formats.vhdx import VhdxReader, probe
from diskimg.host.files import HostFile

from .support.corpus import corpus_entries, corpus_file, corpus_params
from .support.digests import file_sha256, qemu_raw_sha256, reader_sha256
from .support.fuzz import draw_position, exercise_reader, maybe_cut
from .support.tools import assert_extents_sound, diskimg_cli, qemu_img, qemu_io, qemu_raw, requires_qemu
from .support.units import MiB

VHDX_CORPUS = corpus_entries(("vhdx",))
CORPUS_WITH_CONTENT = [entry for entry in VHDX_CORPUS if entry.get("raw_sha256")]
LOG_REPLAY = [entry for entry in VHDX_CORPUS if entry["file"].endswith("vhdx-log-replay.vhdx.gz")]
DIFFERENCING = [entry for entry in VHDX_CORPUS if entry["file"].endswith("differencing.avhdx.gz")]


def open_vhdx(source) -> VhdxReader:
    return VhdxReader.open(HostFile(source), None, OpenOptions())


def make_vhdx(directory: Path, name: str, size: str, *options: str) -> Path:
    path = directory / name
    args = ["-o", ",".join(options)] if options else []
    qemu_img("create", "-q", "-f", "vhdx", *args, path, size)
    return path


# -- qemu-img's images -------------------------------------------------------------------------

QEMU_VARIANTS = [
    ("subformat=dynamic",),
    ("subformat=dynamic", "block_size=1M"),
    ("subformat=dynamic", "block_size=8M", "block_state_zero=off"),
    ("subformat=fixed", "block_size=2M"),
    ("subformat=dynamic", "log_size=2M", "block_size=32M"),
]


@requires_qemu
@pytest.mark.parametrize("options", QEMU_VARIANTS, ids=["-".join(v) for v in QEMU_VARIANTS])
def test_qemu_made_images_read_as_qemu_reads_them(tmp_path, options):
    path = make_vhdx(tmp_path, "disk.vhdx", "70M", *options)
    qemu_io(path, "vhdx", "write -P 0x5a 0 64k", "write -P 0xa5 3M 1M", "write -P 0x33 69M 1M",
            "write -z 3M 4k")
    oracle = qemu_raw(path, "vhdx", tmp_path)
    with open_vhdx(path) as reader:
        assert reader.virtual_size == 70 * MiB
        assert reader_sha256(reader) == file_sha256(oracle)
        assert_extents_sound(reader, oracle)
        info = reader.info()
        assert info.subformat == ("fixed" if "subformat=fixed" in options else "dynamic")
        expected_block = {"block_size=1M": MiB, "block_size=8M": 8 * MiB, "block_size=2M": 2 * MiB,
                          "block_size=32M": 32 * MiB}
        for option in options:
            if option in expected_block:
                assert info.cluster_size == expected_block[option]
    found = detect(path)
    assert found.format == "vhdx" and found.readable and found.subformat == info.subformat


@requires_qemu
def test_4096_byte_logical_sectors(tmp_path):
    """qemu-img makes (and reads) 512-byte sectors only; the metadata item is patched to 4096
    (items carry no checksum). In a disk without parent the sector size changes only the chunk
    ratio (here above the block count either way), so qemu's reading before the patch is the
    oracle."""
    path = make_vhdx(tmp_path, "disk.vhdx", "40M", "block_size=1M")
    qemu_io(path, "vhdx", "write -P 0x77 1M 2M", "write -P 0x12 39M 8k")
    expected = qemu_raw_sha256(path, "vhdx", tmp_path)
    data = bytearray(path.read_bytes())
    item = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
    table = data.index(b"metadata")  # the metadata table: entries of 32 bytes after a 32-byte header
    entry = data.index(item, table)
    offset = struct.unpack_from("<I", data, entry + 16)[0]
    assert struct.unpack_from("<I", data, table + offset)[0] == 512
    struct.pack_into("<I", data, table + offset, 4096)
    path.write_bytes(bytes(data))
    with open_vhdx(path) as reader:
        assert reader.info().details["logical_sector_size"] == 4096
        assert reader_sha256(reader) == expected


# -- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", corpus_params(CORPUS_WITH_CONTENT))
def test_corpus_reads_as_qemu_reads_it(entry, tmp_path):
    """Hyper-V's and DiscUtils' files; for those with a log, the manifest's hash is qemu's reading
    after ``qemu-img check -r all`` replayed the log into a scratch copy."""
    path = corpus_file(entry, tmp_path)
    with open_vhdx(path) as reader:
        assert reader.virtual_size == entry["virtual_size"]
        assert reader_sha256(reader) == entry["raw_sha256"]


@pytest.mark.parametrize("entry", corpus_params(LOG_REPLAY))
def test_log_is_replayed_in_memory_never_written(entry, tmp_path):
    path = corpus_file(entry, tmp_path)
    before = path.read_bytes()
    with open_vhdx(path) as reader:
        assert reader.info().details["log_entries_replayed"] > 0
        assert "log-replayed" in reader.info().features
    assert path.read_bytes() == before
    proc = diskimg_cli("info", "--json", path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["details"]["log_entries_replayed"] > 0


def _log_tail_entry(data: bytes) -> int:
    """The file offset of the first entry of the active log sequence, found by MS-VHDX's layout:
    the log lies where the current header (the higher sequence number, at 64 or 128 KiB) says; the
    entry ('loge') with the highest sequence number names the sequence's first entry (its tail)."""
    _, current = max((struct.unpack_from("<Q", data, at + 8)[0], at) for at in (64 * 1024, 128 * 1024))
    log_length, log_offset = struct.unpack_from("<IQ", data, current + 68)
    entries = [(struct.unpack_from("<Q", data, log_offset + at + 16)[0], log_offset + at)
               for at in range(0, log_length, 4096) if data[log_offset + at : log_offset + at + 4] == b"loge"]
    _, newest = max(entries)
    return log_offset + struct.unpack_from("<I", data, newest + 12)[0]


@pytest.mark.parametrize("entry", corpus_params(LOG_REPLAY))
def test_log_whose_sequence_is_broken_is_refused(entry, tmp_path):
    data = bytearray(corpus_file(entry, tmp_path).read_bytes())
    data[_log_tail_entry(bytes(data)) + 100] ^= 0xFF  # the first entry of the sequence no longer verifies
    path = tmp_path / "broken.vhdx"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="log cannot be replayed"):
        open_vhdx(path)
    proc = diskimg_cli("info", path)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("entry", corpus_params(LOG_REPLAY))
def test_torn_newest_log_entry_is_left_out(entry, tmp_path):
    """MS-VHDX 2.3.3: an entry whose checksum fails is not part of any sequence, so the entry
    before it heads the active sequence (here reaching back to the sequence's earlier tail)."""
    data = bytearray(corpus_file(entry, tmp_path).read_bytes())
    _, current = max((struct.unpack_from("<Q", data, at + 8)[0], at) for at in (64 * 1024, 128 * 1024))
    log_length, log_offset = struct.unpack_from("<IQ", data, current + 68)
    entries = sorted((struct.unpack_from("<Q", data, log_offset + at + 16)[0], log_offset + at)
                     for at in range(0, log_length, 4096) if data[log_offset + at : log_offset + at + 4] == b"loge")
    data[entries[-1][1] + 100] ^= 0xFF
    path = tmp_path / "torn.vhdx"
    path.write_bytes(bytes(data))
    with open_vhdx(path) as reader:
        previous_tail = struct.unpack_from("<I", data, entries[-2][1] + 12)[0] + log_offset
        expected = sum(1 for _, offset in entries[:-1] if offset >= previous_tail)
        assert reader.info().details["log_entries_replayed"] == expected


@pytest.mark.parametrize("entry", corpus_params(LOG_REPLAY))
def test_log_flushed_past_a_truncated_file_is_refused(entry, tmp_path):
    data = corpus_file(entry, tmp_path).read_bytes()
    path = tmp_path / "cut.vhdx"
    path.write_bytes(data[: 4 * MiB])
    with pytest.raises(CorruptImage, match="log cannot be replayed"):
        open_vhdx(path)


# -- differencing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", corpus_params(DIFFERENCING))
def test_differencing_parent_needs_allow_backing(entry, tmp_path):
    path = corpus_file(entry, tmp_path)
    with open_vhdx(path) as reader:
        info = reader.info()
    assert info.subformat == "differencing" and info.backing_format == "vhdx"
    assert info.backing_file.endswith("Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx")
    with pytest.raises(BackingFileError, match="allow-backing"):
        open_image(path)
    proc = diskimg_cli("validate", "--json", path)
    refused = [f for f in json.loads(proc.stdout)["findings"] if f["code"] == "format-refused"]
    assert refused[0]["hint"].startswith("diskimg convert --allow-backing ")
    # the relative path is not there; the absolute one lies outside the image's directory
    with pytest.raises(BackingFileError, match="outside the allowed directories"):
        open_image(path, allow_backing=True)


def _set_data_write_guid(path: Path, value: uuid.UUID) -> None:
    """Give a VHDX's current header another data write GUID (CRC-32C recomputed per MS-VHDX)."""
    data = bytearray(path.read_bytes())
    current = max((struct.unpack_from("<Q", data, at + 8)[0], at) for at in (64 * 1024, 128 * 1024))[1]
    data[current + 32 : current + 48] = value.bytes_le
    data[current + 4 : current + 8] = bytes(4)
    struct.pack_into("<I", data, current + 4, crc32.iscsi(bytes(data[current : current + 4096])))
    path.write_bytes(bytes(data))


@requires_qemu
@pytest.mark.parametrize("entry", corpus_params(DIFFERENCING))
def test_differencing_reads_parent_where_the_child_has_no_sectors(entry, tmp_path):
    """Hyper-V's checkpoint over a parent made by qemu-img (0x11 everywhere it was written) whose
    data write GUID is set to the child's parent_linkage: sectors of partially present blocks
    whose bitmap bit is set come from the child, all others from the parent."""
    child = tmp_path / "child.avhdx"
    shutil.copyfile(corpus_file(entry, tmp_path), child)
    with open_vhdx(child) as alone:
        size = alone.virtual_size
        linkage = uuid.UUID(alone.layout.locator.entries["parent_linkage"])
        child_runs = list(alone._runs(0, size))
    parent = make_vhdx(tmp_path, "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx", str(size))
    qemu_io(parent, "vhdx", "write -P 0x11 0 64M")
    with pytest.raises(BackingFileError, match="data write GUID"):
        open_image(child, allow_backing=True)
    _set_data_write_guid(parent, linkage)
    with open_image(child, allow_backing=True) as reader:
        assert reader.parent is not None
        raw_child = child.read_bytes()
        checked = 0
        for run in child_runs:
            if run.start >= 64 * MiB:
                break
            length = min(run.length, 64 * MiB - run.start)
            got = reader.read_at(run.start, length)
            if run.kind.name == "HOST":
                assert got == raw_child[run.host_offset : run.host_offset + length]
            else:
                assert got == b"\x11" * length
            checked += 1
        assert checked > 1


@requires_qemu
def test_parent_outside_the_image_directory_is_refused(tmp_path):
    entry = DIFFERENCING[0] if DIFFERENCING else pytest.skip("no corpus")
    inner = tmp_path / "inner"
    inner.mkdir()
    data = corpus_file(entry, tmp_path).read_bytes()
    name = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
    marker = ".\\" + name
    data = data.replace(marker.encode("utf-16-le"), ("..\\" + name[1:]).encode("utf-16-le"))
    (inner / "child.avhdx").write_bytes(data)
    make_vhdx(tmp_path, "G" + name[1:], "8G")  # where the locator now points: outside inner/
    with pytest.raises(BackingFileError, match="outside the allowed directories"):
        open_image(inner / "child.avhdx", allow_backing=True)


# -- hostile files ------------------------------------------------------------------------------


@requires_qemu
def test_truncated_bat_block_is_one_error(tmp_path):
    path = make_vhdx(tmp_path, "disk.vhdx", "64M", "block_size=1M")
    qemu_io(path, "vhdx", "write -P 0x5a 60M 1M")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - MiB // 2)
    with pytest.raises(CorruptImage, match="outside the file"):
        open_vhdx(path)
    proc = diskimg_cli("convert", path, tmp_path / "out.raw")
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out.raw").exists()


class _Seeds(list):
    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"<{len(self)} seed images>"


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory) -> list[bytes]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    directory = tmp_path_factory.mktemp("fuzz")
    path = make_vhdx(directory, "seed.vhdx", "6M", "block_size=1M", "log_size=1M")
    qemu_io(path, "vhdx", "write -P 0x5a 0 64k", "write -P 0xa5 2M 4k")
    seeds = _Seeds([path.read_bytes()])
    if LOG_REPLAY:
        seeds.append(corpus_file(LOG_REPLAY[0], directory).read_bytes())
    return seeds


def _fuzz_regions(data: bytes) -> list[tuple[int, int]]:
    """Identifier, both headers, both region tables, the log, the metadata table and the BAT."""
    regions = [(0, 600), (64 * 1024, 64 * 1024 + 80), (128 * 1024, 128 * 1024 + 80), (192 * 1024, 192 * 1024 + 80),
               (256 * 1024, 256 * 1024 + 80), (MiB, MiB + 8192)]
    for at in (data.find(b"metadata"), data.find(b"metadata") + 64 * 1024):
        if at > 0:
            regions.append((at, at + 256))
    return regions


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_diskimage_errors(fuzz_seeds, data):
    image = bytearray(data.draw(st.sampled_from(fuzz_seeds)))
    regions = _fuzz_regions(bytes(image))
    for _ in range(data.draw(st.integers(1, 8))):
        position = draw_position(data, regions, len(image))
        if data.draw(st.booleans()):
            image[position] = data.draw(st.integers(0, 255))
        else:  # a large number where a field may be
            struct.pack_into("<Q", image, position - position % 8, data.draw(st.sampled_from(
                [2**63 - 1, 2**64 - 1, 2**32, (2**44 - 1) << 20 | 6, 7, 6 | 1 << 20])))
    if data.draw(st.booleans()):  # fix the checksums so the mutation reaches deeper checks
        for at, length in ((64 * 1024, 4096), (128 * 1024, 4096), (192 * 1024, 65536), (256 * 1024, 65536)):
            image[at + 4 : at + 8] = bytes(4)
            struct.pack_into("<I", image, at + 4, crc32.iscsi(bytes(image[at : at + length])))
    maybe_cut(data, image)

    def detect_then_open() -> VhdxReader:
        detect(io.BytesIO(bytes(image)))
        return open_vhdx(io.BytesIO(bytes(image)))

    exercise_reader(detect_then_open)


# -- check --------------------------------------------------------------------------------------


def _bat_offset(data: bytes) -> int:
    """The BAT region's file offset from region table 1 (MS-VHDX: entries of 32 bytes after a
    16-byte header; GUID 2DC27766-F623-4200-9D64-115E9BFD4A08)."""
    bat = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
    table = 192 * 1024
    count = struct.unpack_from("<I", data, table + 8)[0]
    for index in range(count):
        entry = table + 16 + 32 * index
        if data[entry : entry + 16] == bat:
            return struct.unpack_from("<Q", data, entry + 16)[0]
    raise AssertionError("no BAT region")


@requires_qemu
@pytest.mark.parametrize("options", [("subformat=dynamic",), ("subformat=fixed", "block_size=1M")])
def test_check_of_qemu_images_is_clean(tmp_path, options):
    path = make_vhdx(tmp_path, "disk.vhdx", "20M", *options)
    qemu_io(path, "vhdx", "write -P 0x5a 0 64k", "write -P 0xa5 5M 1M")
    qemu_img("check", "-f", "vhdx", path)
    proc = diskimg_cli("check", "--json", path)
    assert proc.returncode == 0, proc.stdout
    result = json.loads(proc.stdout)
    assert result["clean"] and result["format"] == "vhdx" and result["allocated_clusters"] >= 1


@requires_qemu
def test_check_finds_overlapping_blocks_and_a_damaged_region_table_copy(tmp_path):
    path = make_vhdx(tmp_path, "disk.vhdx", "8M", "block_size=1M")
    qemu_io(path, "vhdx", "write -P 1 0 1M", "write -P 2 1M 1M")
    data = bytearray(path.read_bytes())
    bat = _bat_offset(bytes(data))
    data[bat + 8 : bat + 16] = data[bat : bat + 8]  # block 1 points at block 0's MiB
    data[256 * 1024 + 40] ^= 1  # region table copy 2 no longer verifies
    path.write_bytes(bytes(data))
    proc = diskimg_cli("check", "--json", path)
    assert proc.returncode == 1
    messages = [p["message"] for p in json.loads(proc.stdout)["problems"]]
    assert any("region table copy 2" in m for m in messages), messages
    assert any("overlaps block 0" in m for m in messages), messages
    proc = diskimg_cli("convert", path, tmp_path / "out.raw", text=True)
    assert proc.returncode == 3 and "overlaps" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("entry", corpus_params(LOG_REPLAY))
def test_check_names_a_log_to_replay(entry, tmp_path):
    proc = diskimg_cli("check", "--json", corpus_file(entry, tmp_path))
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["flags"] == ["log"] and result["corruptions"] == 0


@settings(deadline=None, max_examples=100)
@given(st.binary(min_size=0, max_size=2048), st.binary(min_size=0, max_size=70000), st.integers(0, 2**40))
def test_probe_never_raises(head, rest, size):
    """Detection of anything that starts with the signature names it, damaged or not."""
    data = b"vhdxfile" + head + rest

    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    found = probe(data[:128 * 1024], read_at, size)
    assert found.format == "vhdx" and found.readable


@requires_qemu
def test_a_huge_empty_disk_opens_and_checks_in_bounded_time(tmp_path):
    """64 TiB at 1 MiB blocks: a BAT of 64 Mi entries (512 MiB, sparse), all zero blocks; the
    entries needing a look are found by a C scan, not a Python loop over every entry."""
    import time

    path = make_vhdx(tmp_path, "huge.vhdx", "64T", "block_size=1M")
    started = time.monotonic()
    with open_vhdx(path) as reader:
        assert reader.info().details["payload_states"] == {"zero": 64 * 1024 * 1024}
        assert list(reader.extents())[0].length == 64 * 1024**4
    proc = diskimg_cli("check", "--json", path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["allocated_clusters"] == 0
    assert time.monotonic() - started < 30
