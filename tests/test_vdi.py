"""The VDI reader: images made by qemu-img and VirtualBox (the corpus) read as qemu-img reads them,
the block map's special entries, refused versions and types, hostile headers and maps."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import diskimg
from diskimg.errors import CorruptImage, DiskImageError, UnsupportedFormat
from diskimg.formats.probing import OpenOptions
from diskimg.formats.reader import ExtentKind
from diskimg.formats.vdi.reader import VdiReader
from diskimg.formats.vdi.structures import (
    DISCARDED,
    UNALLOCATED,
    VdiHeader,
    parse_block_map,
    parse_header,
    probe,
)
from diskimg.host.files import HostFile

from .support.corpus import corpus_entries, corpus_params
from .support.digests import file_sha256, qemu_raw_sha256, reader_sha256
from .support.fuzz import exercise_reader, maybe_cut, poke_bytes
from .support.tools import assert_extents_sound, diskimg_cli, qemu_img, qemu_io, qemu_map, qemu_raw, requires_qemu
from .support.units import MiB

pytestmark = requires_qemu


def open_vdi(source) -> VdiReader:
    return VdiReader.open(HostFile(source), None, OpenOptions())


def make_vdi(directory: Path, name: str, size: str, *writes: str, static: bool = False) -> Path:
    path = directory / name
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", path, size)
    if writes:
        qemu_io(path, "vdi", *writes)
    return path


def header_of(path: Path) -> VdiHeader:
    return parse_header(path.read_bytes()[:512])


def rewrite_header(path: Path, **changes) -> None:
    data = bytearray(path.read_bytes())
    data[:512] = dataclasses.replace(parse_header(bytes(data[:512])), **changes).pack()
    path.write_bytes(bytes(data))


def set_map_entry(path: Path, index: int, value: int) -> None:
    offset = header_of(path).offset_bmap + 4 * index
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


def expect_error(path: Path, error: type[DiskImageError], match: str) -> DiskImageError:
    with pytest.raises(error, match=match) as caught, open_vdi(path) as reader:
        reader.read_at(0, min(reader.virtual_size, 64 * MiB))
    return caught.value


@pytest.fixture
def sample(tmp_path) -> Path:
    """5 MiB dynamic, blocks 1 and 3 written (qemu allocates them in write order: 3 first)."""
    return make_vdi(tmp_path, "sample.vdi", "5M", "write -P 0x5a 3M 64k", "write -P 0xa5 1M 4k",
                    "write -P 0x33 3584k 512k")


# -- reads against qemu-img -----------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("size", ["5M", "3000K", "2560"])
def test_reads_like_qemu(tmp_path, static, size):
    writes = ("write -P 0x5a 0 4k", "write -P 0x11 1000k 100k") if size != "2560" else ("write -P 0x5a 512 1k",)
    path = make_vdi(tmp_path, "disk.vdi", size, *writes, static=static)
    oracle = qemu_raw(path, "vdi", tmp_path)
    with open_vdi(path) as reader:
        assert reader.virtual_size == oracle.stat().st_size
        assert reader_sha256(reader) == file_sha256(oracle)
        assert_extents_sound(reader, oracle)
        assert reader.info().subformat == ("fixed" if static else "dynamic")


def test_block_order_and_map_follow_the_block_map(sample, tmp_path):
    table = parse_block_map(sample.read_bytes()[512 : 512 + 20])
    assert list(table) == [UNALLOCATED, 1, UNALLOCATED, 0, UNALLOCATED]  # qemu's allocation, written order
    with open_vdi(sample) as reader:
        assert reader_sha256(reader) == qemu_raw_sha256(sample, "vdi", tmp_path)
        ours = [(e.start, e.length, e.kind is ExtentKind.DATA) for e in reader.extents()]
    theirs = [(e["start"], e["length"], e["data"]) for e in qemu_map(sample, "vdi")]
    assert ours == theirs


def test_static_image_holes_are_zero_extents(tmp_path):
    path = make_vdi(tmp_path, "static.vdi", "64M", "write -P 0x5a 5M 100k", static=True)
    oracle = qemu_raw(path, "vdi", tmp_path)
    with open_vdi(path) as reader:
        extents = list(reader.extents())
        assert_extents_sound(reader, oracle)
        assert sum(e.length for e in extents if e.kind is ExtentKind.DATA) < 2 * MiB  # not the 64 MiB qemu maps
        assert reader_sha256(reader) == file_sha256(oracle)


def test_discarded_blocks_read_as_zeros(sample, tmp_path):
    set_map_entry(sample, 3, DISCARDED)  # what VirtualBox writes for a discarded block
    with open_vdi(sample) as reader:
        assert reader.read_at(3 * MiB, MiB) == bytes(MiB)
        assert reader_sha256(reader) == qemu_raw_sha256(sample, "vdi", tmp_path)
        assert [e.kind for e in reader.extents(3 * MiB, MiB)] == [ExtentKind.ZERO]
        assert reader.info().details["blocks_discarded"] == 1


def test_odd_disk_size_rounds_up_like_qemu(sample, tmp_path):
    rewrite_header(sample, disk_size=5 * MiB - 1000)  # VBoxManage convertfromraw writes such sizes
    with open_vdi(sample) as reader:
        assert reader.virtual_size == 5 * MiB - 512
        assert reader_sha256(reader) == qemu_raw_sha256(sample, "vdi", tmp_path)


def test_detect_and_info(sample):
    found = diskimg.detect(sample)
    assert (found.format, found.subformat, found.version, found.readable) == ("vdi", "dynamic", "1.1", True)
    info = diskimg.open_image(sample).info()
    assert info.cluster_size == MiB and info.creator == "QEMU VM Virtual Disk Image"
    assert info.details["blocks_allocated"] == 2 == info.details["blocks_mapped"]
    proc = diskimg_cli("convert", sample, sample.with_suffix(".raw"), "-O", "raw")
    assert proc.returncode == 0, proc.stderr
    assert sample.with_suffix(".raw").read_bytes() == qemu_raw(sample, "vdi", sample.parent).read_bytes()


# -- the corpus (VirtualBox 2009 and 4.0.8, qemu) --------------------------------------------------------


@pytest.mark.parametrize("entry", corpus_params(corpus_entries(("vdi",))))
def test_corpus(entry, corpus_files):
    path = corpus_files(entry)
    assert probe(path.read_bytes()[:512]).readable
    with open_vdi(path) as reader:
        assert reader.virtual_size == entry["virtual_size"]
        if reader.virtual_size > 1 << 30:  # the empty 8 GiB VirtualBox disk: metadata only
            assert [e.kind for e in reader.extents()] == [ExtentKind.ZERO]
            assert reader.read_at(reader.virtual_size - MiB, MiB) == bytes(MiB)
            return
        assert reader_sha256(reader) == entry["raw_sha256"]


# -- what is refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0x00000001, 0x00010000, 0x00010002, 0x00020001])
def test_other_versions_refused_naming_the_version(sample, version):
    rewrite_header(sample, version=version)
    shown = f"{version >> 16}.{version & 0xFFFF}"
    expect_error(sample, UnsupportedFormat, f"VDI version {shown} .*is not read")
    found = diskimg.detect(sample)
    assert found.format == "vdi" and not found.readable and f"version {shown}" in found.description
    proc = diskimg_cli("convert", sample, sample.with_suffix(".raw"), "-O", "raw", text=True)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
    assert f"version {shown}" in proc.stderr and not sample.with_suffix(".raw").exists()


@pytest.mark.parametrize("image_type, name", [(3, "undo"), (4, "differencing")])
def test_undo_and_differencing_named_and_refused(sample, image_type, name):
    rewrite_header(sample, image_type=image_type)
    error = expect_error(sample, UnsupportedFormat, f"{name} VDI images .* are not read")
    assert "VBoxManage clonemedium" in str(error)
    assert diskimg.detect(sample).subformat == name


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"signature": 0x12345678}, CorruptImage, "no VDI signature"),
        ({"image_type": 9}, CorruptImage, "unknown image type 9"),
        ({"header_size": 100}, CorruptImage, "header size 100"),
        ({"sector_size": 4096}, UnsupportedFormat, "sector size 4096"),
        ({"block_size": 3 * MiB}, CorruptImage, "not a power of two"),
        ({"block_size": 0}, CorruptImage, "not a power of two"),
        ({"block_extra": 512}, UnsupportedFormat, "extra bytes per block"),
        ({"offset_bmap": 513}, CorruptImage, "block map offset 513 is not a multiple of 512"),
        ({"offset_data": 1000}, CorruptImage, "data offset 1000"),
        ({"offset_bmap": 0}, CorruptImage, "overlaps the header"),
        ({"offset_data": 512}, CorruptImage, "overlaps the block map"),
        ({"disk_size": 6 * MiB}, CorruptImage, "exceeds the 5 blocks"),
        ({"disk_size": 2**63}, CorruptImage, "exceeds"),
        ({"blocks_in_image": 2**32 - 1}, CorruptImage, "block map over"),
        ({"blocks_allocated": 6}, CorruptImage, "6 blocks allocated of 5"),
        ({"uuid_link": __import__("uuid").UUID(int=7)}, UnsupportedFormat, "names a parent"),
    ],
)
def test_hostile_headers(sample, changes, error, match):
    rewrite_header(sample, **changes)
    expect_error(sample, error, match)


def test_hostile_block_maps(sample):
    good = sample.read_bytes()
    set_map_entry(sample, 1, 5)
    expect_error(sample, CorruptImage, "block 1 points at block 5, past the image's 5 blocks")
    sample.write_bytes(good)
    set_map_entry(sample, 4, 0)
    expect_error(sample, CorruptImage, "blocks 3 and 4 both point at block 0")
    sample.write_bytes(good)
    set_map_entry(sample, 4, 2)  # inside the image's block count, past the end of the file
    expect_error(sample, CorruptImage, "block 4 at offset .* ends past the end of the file")
    sample.write_bytes(good[: len(good) - 4096])
    expect_error(sample, CorruptImage, "truncated")
    sample.write_bytes(good[:520])
    expect_error(sample, CorruptImage, "block map .* ends past the end of the file")
    sample.write_bytes(good[:300])
    expect_error(sample, CorruptImage, "too small to be a VDI")


def test_forced_vdi_on_another_format_is_a_mismatch(sample, tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    proc = diskimg_cli("info", "-f", "vdi", raw, text=True)
    assert proc.returncode == 3 and "forced format vdi, but the file has no VDI header" in proc.stderr
    proc = diskimg_cli("info", "-f", "raw", sample, text=True)
    assert proc.returncode == 3 and "has a VDI header" in proc.stderr
    assert diskimg_cli("info", "-f", "vdi", sample).returncode == 0


def test_cli_error_is_one_line(sample):
    set_map_entry(sample, 4, 0)
    proc = diskimg_cli("info", sample, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "both point at block 0" in proc.stderr and "Traceback" not in proc.stderr


# -- fuzzing ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory) -> bytes:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    path = make_vdi(tmp_path_factory.mktemp("fuzz"), "seed.vdi", "3M", "write -P 0x5a 2M 64k", "write -P 1 0 4k")
    return path.read_bytes()


_FIELDS = ["version", "header_size", "image_type", "offset_bmap", "offset_data", "sector_size", "disk_size",
           "block_size", "block_extra", "blocks_in_image", "blocks_allocated"]
_EDGES = [0, 1, 3, 511, 512, 1023, 4096, MiB, 2**31, 2**32 - 2, 2**32 - 1]


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_diskimage_errors(fuzz_seed, data):
    image = bytearray(fuzz_seed)
    header = parse_header(bytes(image[:512]))
    for _ in range(data.draw(st.integers(0, 3))):
        name = data.draw(st.sampled_from(_FIELDS))
        limit = 2**64 - 1 if name == "disk_size" else 2**32 - 1
        value = data.draw(st.one_of(st.sampled_from(_EDGES), st.integers(0, limit)))
        header = dataclasses.replace(header, **{name: value})
    image[:512] = header.pack()
    poke_bytes(data, image, [(0, 1536)], count=(0, 6))  # the map and around it
    maybe_cut(data, image)
    probe(bytes(image[:512]))
    exercise_reader(lambda: open_vdi(io.BytesIO(bytes(image))))


# -- check ---------------------------------------------------------------------------------------------


def qemu_check_json(path: Path) -> dict:
    proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "vdi", path], capture_output=True, text=True,
                          check=False)  # exit 2 when it finds corruptions
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "damage",
    ["none", "shared block", "count", "shared block and count", "past the blocks"],
)
def test_check_counts_corruptions_like_qemu(sample, damage):
    if "shared block" in damage:
        set_map_entry(sample, 4, 0)
    if "count" in damage:
        rewrite_header(sample, blocks_allocated=1)
    if damage == "past the blocks":
        set_map_entry(sample, 4, 9)
    theirs = qemu_check_json(sample)
    ours = diskimg.check(sample)
    assert ours.corruptions == theirs.get("corruptions", 0), ours.render_text()
    assert ours.clean == (damage == "none")
    assert ours.total_clusters == 5 and ours.allocated_clusters == (3 if "shared" in damage else 2)
    proc = diskimg_cli("check", sample, "--json")
    assert proc.returncode == (0 if damage == "none" else 1)
    assert json.loads(proc.stdout)["corruptions"] == theirs.get("corruptions", 0)


def test_check_reports_what_the_reader_refuses(sample):
    rewrite_header(sample, version=0x00000001)
    ours = diskimg.check(sample, "vdi")
    assert ours.check_errors == 1 and "version 0.1" in ours.problems[0].message
    sample.write_bytes(sample.read_bytes()[:600])
    rewrite_header(sample, version=0x00010001)
    assert diskimg.check(sample).truncated
