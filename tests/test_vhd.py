"""The VHD driver: pure structures, detection, reads checked against qemu-img, differencing disks
built by hand from the specification, hostile files and the third-party corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.bitmaps import bitmap_runs
from diskimg.errors import BackingFileError, CorruptImage, UsageError
from diskimg.formats.probing import OpenOptions
from diskimg.formats.reader import ExtentKind
from diskimg.formats.vhd import VhdReader, probe
from diskimg.formats.vhd.structures import (
    DISK_DIFFERENCING,
    DynamicHeader,
    ParentLocator,
    VhdFooter,
    bitmap_size,
    chs_geometry,
    encode_parent_name,
    footer_problem,
    host_path,
    parse_dynamic_header,
    parse_footer,
    vhd_checksum,
)
from diskimg.host.files import HostFile

from .support.corpus import NO_CORPUS, corpus_dir, corpus_entries, corpus_params
from .support.digests import qemu_raw_sha256, reader_sha256
from .support.fuzz import exercise_reader, maybe_cut, poke_bytes
from .support.images import rewrite_footers
from .support.tools import assert_extents_sound, qemu_img, qemu_io, qemu_raw, requires_qemu
from .support.units import MiB

BLOCK = 2 * MiB


# -- helpers ------------------------------------------------------------------------------------


def open_vhd(source, open_parent=None, vhd_size="auto") -> VhdReader:
    return VhdReader.open(HostFile(source), open_parent, OpenOptions(vhd_size=vhd_size))


def make_vhd(directory: Path, name: str, size: str, subformat: str = "dynamic", force_size: bool = False) -> Path:
    path = directory / name
    options = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    qemu_img("create", "-q", "-f", "vpc", "-o", options, path, size)
    return path


def qemu_virtual_size(path: Path, image_opts: str | None = None) -> int:
    if image_opts:
        return json.loads(qemu_img("info", "--output=json", "--image-opts", image_opts))["virtual-size"]
    return json.loads(qemu_img("info", "--output=json", "-f", "vpc", path))["virtual-size"]


def size_opts(path: Path, rule: str) -> str:
    return f"driver=vpc,force_size_calc={rule},file.filename={path}"


def rewrite_header(path: Path, *, checksum: int | None = None, **changes) -> DynamicHeader:
    data = bytearray(path.read_bytes())
    offset = parse_footer(bytes(data[-512:])).data_offset
    header = dataclasses.replace(parse_dynamic_header(bytes(data[offset : offset + 1024])), **changes)
    data[offset : offset + 1024] = header.pack(checksum=checksum)
    path.write_bytes(bytes(data))
    return header


def set_bat_entry(path: Path, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    offset = parse_footer(bytes(data[-512:])).data_offset
    table = parse_dynamic_header(bytes(data[offset : offset + 1024])).table_offset
    data[table + 4 * index : table + 4 * index + 4] = value.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def bat_entry(path: Path, index: int) -> int:
    data = path.read_bytes()
    offset = parse_footer(data[-512:]).data_offset
    table = parse_dynamic_header(data[offset : offset + 1024]).table_offset
    return int.from_bytes(data[table + 4 * index : table + 4 * index + 4], "big")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_file(path: Path):
    data = path.read_bytes()
    return probe(data[:65536], data[-1024:], len(data))


# -- pure structures ----------------------------------------------------------------------------


def test_chs_geometry_known_values():
    # qemu rounds 4 GiB up to CHS 8323/16/63 (4295467008 bytes), the spec algorithm gives it back
    assert chs_geometry(4295467008 // 512) == (8323, 16, 63)
    assert chs_geometry(4 * 1024**3 // 512) == (8322, 16, 63)  # rounds down
    assert chs_geometry(10 * MiB // 512) == (301, 4, 17)  # the Hyper-V 10 MiB disks of the corpus
    assert chs_geometry(65535 * 16 * 63) == (16191, 16, 255)
    assert chs_geometry(10**15) == (65535, 16, 255)
    assert chs_geometry(0) == (0, 4, 17)


@given(st.integers(min_value=0, max_value=70000 * 16 * 255))
def test_chs_geometry_never_exceeds(sectors):
    c, h, s = chs_geometry(sectors)
    assert c * h * s <= sectors and c <= 65535 and h <= 16 and s <= 255


def test_checksum_is_ones_complement_of_byte_sum():
    assert vhd_checksum(bytes(512)) == 0xFFFFFFFF
    assert vhd_checksum(b"\x01\x02") == 0xFFFFFFFC
    assert vhd_checksum(b"\x01\x02\xff\xff\xff\xff", 2) == 0xFFFFFFFC


footers = st.builds(
    VhdFooter,
    features=st.integers(0, 2**32 - 1),
    data_offset=st.integers(0, 2**64 - 1),
    timestamp=st.integers(0, 2**32 - 1),
    creator_app=st.binary(min_size=4, max_size=4),
    creator_version=st.integers(0, 2**32 - 1),
    original_size=st.integers(0, 2**64 - 1),
    current_size=st.integers(0, 2**64 - 1),
    cylinders=st.integers(0, 65535),
    heads=st.integers(0, 255),
    sectors_per_track=st.integers(0, 255),
    disk_type=st.integers(0, 2**32 - 1),
    unique_id=st.uuids(),
    saved_state=st.integers(0, 255),
    reserved=st.binary(min_size=427, max_size=427),
)


@given(footers)
def test_footer_pack_round_trips(footer):
    packed = footer.pack()
    assert len(packed) == 512 and footer_problem(packed) is None
    parsed = parse_footer(packed)
    assert parsed == dataclasses.replace(footer, checksum=footer.computed_checksum())
    assert parsed.pack() == packed
    if packed[511] == 0:  # an old 511-byte footer parses the same
        assert parse_footer(packed[:511]) == parsed


locators = st.builds(
    ParentLocator,
    platform_code=st.binary(min_size=4, max_size=4),
    data_space=st.integers(0, 2**32 - 1),
    data_length=st.integers(0, 2**32 - 1),
    reserved=st.integers(0, 2**32 - 1),
    data_offset=st.integers(0, 2**64 - 1),
)
headers = st.builds(
    DynamicHeader,
    data_offset=st.integers(0, 2**64 - 1),
    table_offset=st.integers(0, 2**64 - 1),
    max_table_entries=st.integers(0, 2**32 - 1),
    block_size=st.integers(0, 2**32 - 1),
    parent_unique_id=st.uuids(),
    parent_timestamp=st.integers(0, 2**32 - 1),
    parent_name_raw=st.binary(min_size=512, max_size=512),
    parent_locators=st.lists(locators, min_size=8, max_size=8),
    reserved2=st.binary(min_size=256, max_size=256),
)


@given(headers)
def test_dynamic_header_pack_round_trips(header):
    packed = header.pack()
    assert len(packed) == 1024
    parsed = parse_dynamic_header(packed)
    assert parsed.checksum == vhd_checksum(packed, 36)
    assert parsed == dataclasses.replace(header, checksum=parsed.checksum)
    assert parsed.pack() == packed


def test_bitmap_size_and_runs():
    assert bitmap_size(2 * MiB) == 512
    assert bitmap_size(512) == 512
    assert bitmap_size(4 * MiB) == 1024
    assert bitmap_runs(b"\xff" * 512, 4096) == ([0], [1])
    assert bitmap_runs(bytes(512), 4096) == ([0], [0])
    assert bitmap_runs(b"\x00\x0f\xff\x80" + bytes(508), 4096) == ([0, 12, 25], [0, 1, 0])
    assert bitmap_runs(b"\xa0", 4) == ([0, 1, 2, 3], [1, 0, 1, 0])  # bits past the block ignored


@given(st.binary(min_size=1, max_size=64))
def test_bitmap_runs_match_bits(bitmap):
    sectors = len(bitmap) * 8
    starts, bits = bitmap_runs(bitmap, sectors)
    expanded = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else sectors
        expanded += [bits[i]] * (end - start)
    assert expanded == [(bitmap[s >> 3] >> (7 - (s & 7))) & 1 for s in range(sectors)]
    assert all(a != b for a, b in itertools.pairwise(bits))


def test_host_paths():
    assert host_path(".\\fat-parent.vhd", b"W2ru") == "fat-parent.vhd"
    assert host_path("..\\base\\p.vhd", b"W2ru") == "../base/p.vhd"
    if os.name != "nt":
        assert host_path("C:\\Projects\\p.vhd", b"W2ku") == "/Projects/p.vhd"
        assert host_path("\\\\?\\C:\\VMs\\p.vhd", b"W2ku") == "/VMs/p.vhd"
        assert host_path("\\\\server\\share\\p.vhd", b"W2ku") == "//server/share/p.vhd"
    assert host_path("file://localhost/Users/me/p%20q.vhd", b"MacX") == "/Users/me/p q.vhd"


def test_libvhdi_footer_fragment():
    directory = corpus_dir()
    if directory is None:
        pytest.skip(NO_CORPUS)
    data = (directory / "libvhdi" / "file_footer.1").read_bytes()
    footer = parse_footer(data)
    assert footer_problem(data) is None
    assert footer.disk_type == DISK_DIFFERENCING and footer.current_size == 512 * MiB
    assert footer.creator_app == b"vpc " and footer.creator == "vpc  1.0 (Wi2k)"
    assert footer.pack() == data  # exact round trip of a third-party footer
    detection = probe(data, data, len(data))
    assert detection is not None and detection.subformat == "differencing"
    # a footer alone is not an image: its dynamic header would lie past the end of the file
    with pytest.raises(CorruptImage, match="dynamic header"):
        open_vhd(directory / "libvhdi" / "file_footer.1")


# -- detection ----------------------------------------------------------------------------------


@requires_qemu
def test_probe(tmp_path):
    fixed = make_vhd(tmp_path, "f.vhd", "3M", "fixed")
    dynamic = make_vhd(tmp_path, "d.vhd", "3M")
    found = probe_file(fixed)
    assert (found.format, found.subformat, found.version, found.readable) == ("vhd", "fixed", "1.0", True)
    assert "qemu" in found.description
    assert probe_file(dynamic).subformat == "dynamic"
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    assert probe_file(raw) is None
    # damaged tail footer: the copy at offset 0 still names a dynamic VHD
    data = bytearray(dynamic.read_bytes())
    data[-100] ^= 0xFF
    found = probe(bytes(data[:65536]), bytes(data[-1024:]), len(data))
    assert found.subformat == "dynamic" and "offset 0" in found.description
    # both damaged: still a VHD, a corrupt one
    data[100] ^= 0xFF
    found = probe(bytes(data[:65536]), bytes(data[-1024:]), len(data))
    assert found.format == "vhd" and "corrupt" in found.description
    # an old Virtual PC 511-byte footer
    old = fixed.read_bytes()[:-1]
    assert probe(old[:65536], old[-1024:], len(old)).subformat == "fixed"


# -- images made by qemu-img ---------------------------------------------------------------------

WRITES = (
    "write -P 0xab 1M 3M",  # straddles the first 2 MiB block boundary
    "write -P 0x5c 2047k 2k",
    "write -P 0x11 5000000 12345",  # unaligned start and length
    "write -P 0xee 7M 512",
)


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("force_size", [False, True])
def test_qemu_images(tmp_path, subformat, force_size):
    path = make_vhd(tmp_path, "x.vhd", "10M", subformat, force_size)
    qemu_io(path, "vpc", *WRITES)
    with open_vhd(path) as reader:
        assert reader.virtual_size == qemu_virtual_size(path)
        assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path)
        assert_extents_sound(reader, qemu_raw(path, "vpc", tmp_path))
        info = reader.info()
        assert info.format == "vhd" and info.subformat == subformat and info.version == "1.0"
        assert info.details["size_source"] == ("current_size" if force_size else "chs")
        assert info.details["creator_app"] == ("qem2" if force_size else "qemu")
        assert info.details["footer_source"] == "tail"
        json.dumps(info.to_dict())
        if subformat == "dynamic":
            assert info.cluster_size == BLOCK
            assert info.details["allocated_blocks"] == 4  # blocks 0, 1, 2 and 3 hold data
            assert info.details["footer_copy_matches"] is True
            zero = [e for e in reader.extents() if e.kind is ExtentKind.ZERO]
            assert zero and zero[0].start == 4 * BLOCK
        else:
            assert list(reader.extents())[0].host_offset == 0
        # positional reads at odd places
        oracle = qemu_raw(path, "vpc", tmp_path).read_bytes()
        for offset, length in ((0, 1), (BLOCK - 7, 20), (5000000 - 3, 12350), (reader.virtual_size - 5, 100)):
            assert reader.read_at(offset, length) == oracle[offset : offset + length]


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_convert_random_raw(tmp_path, subformat):
    rng = random.Random(7)
    raw = tmp_path / "in.raw"
    parts = [rng.randbytes(3 * MiB + 123), bytes(4 * MiB), rng.randbytes(MiB), bytes(1000), rng.randbytes(777)]
    raw.write_bytes(b"".join(parts))
    path = tmp_path / "out.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat}", raw, path)
    with open_vhd(path) as reader:
        assert reader.virtual_size == qemu_virtual_size(path) >= raw.stat().st_size
        assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path)
        assert_extents_sound(reader, qemu_raw(path, "vpc", tmp_path))
        assert reader.read_at(0, raw.stat().st_size) == raw.read_bytes()


QEMU72_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


@requires_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("creator", [b"vbox", b"wa\0\0", b"win ", b"vpc ", b"qemu", b"d2v "])
def test_size_rule_by_creator(tmp_path, subformat, creator):
    path = make_vhd(tmp_path, "x.vhd", "64M", subformat, force_size=True)
    qemu_io(path, "vpc", "write -P 0x42 63M 1M")  # the tail that CHS sizing cuts off
    geometry = chs_geometry(64 * MiB // 512)
    cylinders, heads, sectors = geometry
    footer = rewrite_footers(path, creator_app=creator, cylinders=cylinders, heads=heads, sectors_per_track=sectors)
    chs = footer.chs_size
    assert chs < 64 * MiB
    ours_chs = creator in (b"vpc ", b"qemu")
    with open_vhd(path) as reader:
        assert reader.virtual_size == (chs if ours_chs else 64 * MiB)
        assert reader.info().details["size_source"] == ("chs" if ours_chs else "current_size")
        qemu_chs = creator not in QEMU72_CURRENT_SIZE_CREATORS
        if ours_chs == qemu_chs:
            assert reader.virtual_size == qemu_virtual_size(path)
            assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path)
        else:  # qemu 7.2 predates the 2025 rule: ask it for current_size explicitly
            opts = size_opts(path, "current_size")
            assert reader.virtual_size == qemu_virtual_size(path, opts)
            assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path, opts)
    for rule in ("chs", "current_size"):
        with open_vhd(path, vhd_size=rule) as reader:
            assert reader.virtual_size == (chs if rule == "chs" else 64 * MiB)
            assert reader.info().details["size_source"] == rule
            assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path, size_opts(path, rule))
    with pytest.raises(UsageError):
        open_vhd(path, vhd_size="bogus")


@requires_qemu
def test_fixed_current_size_past_data_reads_zeros(tmp_path):
    path = make_vhd(tmp_path, "x.vhd", "10M", "fixed")  # creator qemu: current_size = CHS size = data
    data_size = path.stat().st_size - 512
    qemu_io(path, "vpc", f"write -P 0x77 0 {data_size}")
    rewrite_footers(path, current_size=data_size + MiB)
    with open_vhd(path) as reader:
        assert reader.virtual_size == data_size == qemu_virtual_size(path)
        assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path)
    with open_vhd(path, vhd_size="current_size") as reader:
        assert reader.virtual_size == data_size + MiB
        assert reader.read_at(data_size - 4, 8) == b"\x77" * 4 + bytes(4)
        assert reader.read_at(data_size, MiB) == bytes(MiB)  # never the footer's bytes
        extents = list(reader.extents())
        assert extents[-1].kind is ExtentKind.ZERO and extents[-1].start == data_size


@requires_qemu
def test_damaged_footers(tmp_path):
    path = make_vhd(tmp_path, "x.vhd", "6M")
    qemu_io(path, "vpc", "write -P 0x33 1M 2M")
    expected = qemu_raw_sha256(path, "vpc", tmp_path)
    original = path.read_bytes()
    # tail footer damaged: the copy at offset 0 is used
    data = bytearray(original)
    data[-512 + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with open_vhd(path) as reader:
        info = reader.info()
        assert info.details["footer_source"] == "head_copy" and "footer-from-head-copy" in info.features
        assert "checksum" in info.details["tail_footer_problem"]
        assert reader_sha256(reader) == expected
    # tail footer gone altogether (cookie overwritten)
    data[-512:-504] = b"garbage!"
    path.write_bytes(bytes(data))
    with open_vhd(path) as reader:
        assert reader.info().details["footer_source"] == "head_copy"
        assert reader_sha256(reader) == expected
    # head copy damaged, tail fine: the tail is used, the damage reported
    data = bytearray(original)
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with open_vhd(path) as reader:
        details = reader.info().details
        assert details["footer_source"] == "tail" and "checksum" in details["head_copy_problem"]
        assert reader_sha256(reader) == expected
    # both damaged
    data[-512 + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="checksum") as caught:
        open_vhd(path)
    assert caught.value.offset == len(data) - 512


@requires_qemu
def test_old_511_byte_footer(tmp_path):
    path = make_vhd(tmp_path, "x.vhd", "3M", "fixed")
    qemu_io(path, "vpc", "write -P 0x99 0 1M")
    expected = qemu_raw_sha256(path, "vpc", tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with open_vhd(path) as reader:
        assert reader.info().details["footer_length"] == 511
        assert reader_sha256(reader) == expected


@requires_qemu
def test_dynamic_disks_ignore_the_sector_bitmap(tmp_path):
    """Decision: like qemu (and Hyper-V, whose dynamic blocks all carry full bitmaps in our
    corpus), an allocated block of a *dynamic* disk reads as its stored data whatever its bitmap."""
    path = make_vhd(tmp_path, "x.vhd", "4M")
    qemu_io(path, "vpc", "write -P 0x3c 0 1M")
    data = bytearray(path.read_bytes())
    bitmap_at = bat_entry(path, 0) * 512
    data[bitmap_at : bitmap_at + 512] = bytes(512)
    path.write_bytes(bytes(data))
    with open_vhd(path) as reader:
        assert reader.info().details["sector_bitmap_honoured"] is False
        assert reader.read_at(0, 16) == b"\x3c" * 16
        assert reader_sha256(reader) == qemu_raw_sha256(path, "vpc", tmp_path)


@requires_qemu
def test_empty_2tb_dynamic_is_one_zero_extent(tmp_path):
    path = make_vhd(tmp_path, "big.vhd", "2000G", force_size=True)
    with open_vhd(path) as reader:
        assert reader.virtual_size == 2000 * 1024**3
        extents = list(reader.extents())
        assert [(e.start, e.length, e.kind) for e in extents] == [(0, reader.virtual_size, ExtentKind.ZERO)]
        assert reader.read_at(reader.virtual_size - MiB, MiB) == bytes(MiB)
        assert reader.info().details["allocated_blocks"] == 0


# -- differencing disks built from the specification -------------------------------------------

#: one W2ru locator (a Windows path relative to the child, UTF-16LE) naming parent.vhd beside the child
PARENT_VHD_BESIDE = ((b"W2ru", ".\\parent.vhd".encode("utf-16-le")),)


def build_differencing(
    path: Path,
    *,
    size: int,
    parent_id: uuid.UUID,
    blocks: dict[int, tuple[bytes, bytes]],
    block_size: int = BLOCK,
    parent_name: str = "parent.vhd",
    locators: list[tuple[bytes, bytes]] = PARENT_VHD_BESIDE,
    creator: bytes = b"win ",
) -> VhdFooter:
    """A differencing VHD: footer copy, header, BAT, locator data, blocks (bitmap + data), footer."""
    entries = -(-size // block_size)
    table_offset = 1536
    position = table_offset + -(-entries * 4 // 512) * 512
    locator_entries = []
    locator_data = b""
    for code, payload in locators:
        space = -(-len(payload) // 512) * 512 or 512
        locator_entries.append(ParentLocator(code, space, len(payload), 0, position + len(locator_data)))
        locator_data += payload.ljust(space, b"\0")
    position += len(locator_data)
    bat = [0xFFFFFFFF] * entries
    block_data = b""
    for index, (bitmap, data) in sorted(blocks.items()):
        assert len(data) == block_size
        bat[index] = (position + len(block_data)) // 512
        block_data += bitmap.ljust(bitmap_size(block_size), b"\0") + data
    geometry = chs_geometry(size // 512)
    footer = VhdFooter(
        data_offset=512, timestamp=12345, creator_app=creator, original_size=size, current_size=size,
        cylinders=geometry[0], heads=geometry[1], sectors_per_track=geometry[2], disk_type=DISK_DIFFERENCING,
        unique_id=uuid.uuid4(),
    )  # fmt: skip
    header = DynamicHeader(
        table_offset=table_offset,
        max_table_entries=entries,
        block_size=block_size,
        parent_unique_id=parent_id,
        parent_name_raw=encode_parent_name(parent_name),
        parent_locators=locator_entries + [ParentLocator() for _ in range(8 - len(locator_entries))],
    )
    bat_bytes = b"".join(entry.to_bytes(4, "big") for entry in bat).ljust(-(-entries * 4 // 512) * 512, b"\xff")
    packed = footer.pack()
    path.write_bytes(packed + header.pack() + bat_bytes + locator_data + block_data + packed)
    return footer


def overlay(parent: bytes, blocks: dict[int, tuple[bytes, bytes]], block_size: int) -> bytes:
    """The Python model of a differencing disk: the parent's bytes, with a child's sector wherever
    its bitmap bit is 1."""
    model = bytearray(parent)
    for index, (bitmap, data) in blocks.items():
        for sector in range(block_size // 512):
            if bitmap[sector >> 3] >> (7 - (sector & 7)) & 1:
                at = index * block_size + sector * 512
                if at < len(model):
                    model[at : at + 512] = data[sector * 512 : sector * 512 + 512][: len(model) - at]
    return bytes(model)


def opener_in(directory: Path, calls: list | None = None):
    def open_parent(candidates: list[str], format: str | None):
        if calls is not None:
            calls.append((list(candidates), format))
        for name in candidates:
            candidate = directory / name
            if candidate.is_file():
                return open_vhd(candidate)
        raise BackingFileError(f"parent {candidates!r} not found")

    return open_parent


def make_child_blocks(rng: random.Random, block_size: int, count: int) -> dict[int, tuple[bytes, bytes]]:
    sectors = block_size // 512
    nbytes = max(1, sectors // 8)
    mixed = bytearray(rng.choice((0, 0xFF, rng.randrange(256))) for _ in range(nbytes))
    mixed[0] = 0b10110001
    blocks = {
        0: (bytes(mixed), rng.randbytes(block_size)),  # mixed bitmap
        2: (b"\xff" * nbytes, rng.randbytes(block_size)),  # all from the child
        3: (bytes(nbytes), rng.randbytes(block_size)),  # allocated, nothing set: all from the parent
    }
    if count > 5:
        blocks[count - 1] = (bytes([0x0F]) + b"\xff" * (nbytes - 1), rng.randbytes(block_size))
    return blocks


@requires_qemu
@pytest.mark.parametrize("block_size", [BLOCK, 4096])
def test_differencing_built_by_hand(tmp_path, block_size):
    size = 8 * MiB
    parent_path = make_vhd(tmp_path, "parent.vhd", "8M", force_size=True)
    qemu_io(parent_path, "vpc", "write -P 0x61 0 3M", "write -P 0x62 5M 1M", "write -P 0x63 7M 1M")
    parent_bytes = qemu_raw(parent_path, "vpc", tmp_path).read_bytes()
    with open_vhd(parent_path) as parent:
        parent_id = parent.unique_id
    rng = random.Random(block_size)
    blocks = make_child_blocks(rng, block_size, size // block_size)
    child = tmp_path / "child.vhd"
    build_differencing(child, size=size, parent_id=parent_id, blocks=blocks, block_size=block_size)
    model = overlay(parent_bytes, blocks, block_size)
    model_file = tmp_path / "model.raw"
    model_file.write_bytes(model)

    calls: list = []
    with open_vhd(child, opener_in(tmp_path, calls)) as reader:
        assert calls == [(["parent.vhd"], "vhd")]
        assert reader.parent is not None and reader.backing_file == "parent.vhd"
        assert reader_sha256(reader) == sha256(model)
        assert_extents_sound(reader, model_file)
        for _ in range(40):
            offset = rng.randrange(size)
            length = rng.randrange(1, 3 * block_size)
            assert reader.read_at(offset, length) == model[offset : offset + length]
        info = reader.info()
        assert info.subformat == "differencing" and info.backing_file == "parent.vhd"
        assert info.details["parent_unique_id"] == str(parent_id)
        assert info.details["sector_bitmap_honoured"] is True
        assert info.details["parent_locators"][0]["platform_code"] == "W2ru"
        assert info.details["parent_locators"][0]["path"] == ".\\parent.vhd"
        # the file view (io.RawIOBase) goes through the same runs
        reader.seek(block_size - 100)
        assert reader.read(300) == model[block_size - 100 : block_size + 200]


@requires_qemu
def test_differencing_bitmap_cache_is_bounded(tmp_path):
    from diskimg.formats.vhd.reader import BITMAP_CACHE_BLOCKS

    block_size = 4096
    parent_path = make_vhd(tmp_path, "parent.vhd", "4M", force_size=True)
    qemu_io(parent_path, "vpc", "write -P 0x71 0 4M")
    with open_vhd(parent_path) as parent:
        parent_id = parent.unique_id
    rng = random.Random(9)
    blocks = {i: (bytes([rng.randrange(256)]), rng.randbytes(block_size)) for i in range(0, 1024, 2)}
    child = tmp_path / "child.vhd"
    build_differencing(child, size=4 * MiB, parent_id=parent_id, blocks=blocks, block_size=block_size)
    model = overlay(b"\x71" * (4 * MiB), blocks, block_size)
    with open_vhd(child, opener_in(tmp_path)) as reader:
        assert reader_sha256(reader) == sha256(model)
        assert 0 < len(reader._bitmap_runs_cache) <= BITMAP_CACHE_BLOCKS


@requires_qemu
def test_differencing_through_open_image(tmp_path):
    import diskimg

    parent_path = make_vhd(tmp_path, "parent.vhd", "4M", force_size=True)
    qemu_io(parent_path, "vpc", "write -P 0x61 0 4M")
    with open_vhd(parent_path) as parent:
        parent_id = parent.unique_id
    rng = random.Random(5)
    blocks = {1: (b"\x0f" * 512, rng.randbytes(BLOCK))}
    child = tmp_path / "child.vhd"
    build_differencing(child, size=4 * MiB, parent_id=parent_id, blocks=blocks)
    model = overlay(qemu_raw(parent_path, "vpc", tmp_path).read_bytes(), blocks, BLOCK)
    assert diskimg.detect(str(child)).subformat == "differencing"
    with diskimg.open_image(str(child), allow_backing=True) as reader:
        assert isinstance(reader, VhdReader) and reader.parent is not None
        assert reader_sha256(reader) == sha256(model)
    with pytest.raises(BackingFileError):
        diskimg.open_image(str(child))
    assert diskimg.image_info(str(child)).backing_file == "parent.vhd"


@requires_qemu
def test_differencing_without_parent(tmp_path):
    parent_path = make_vhd(tmp_path, "parent.vhd", "8M", force_size=True)
    with open_vhd(parent_path) as parent:
        parent_id = parent.unique_id
    rng = random.Random(1)
    blocks = {2: (b"\xff" * 512, rng.randbytes(BLOCK))}
    child = tmp_path / "child.vhd"
    build_differencing(child, size=8 * MiB, parent_id=parent_id, blocks=blocks)
    with open_vhd(child) as reader:
        assert reader.parent is None and reader.backing_file == "parent.vhd"
        info = reader.info()
        assert info.backing_file == "parent.vhd" and info.details["parent_opened"] is False
        assert reader.read_at(2 * BLOCK + 5, 1000) == blocks[2][1][5:1005]  # only the child's sectors
        with pytest.raises(BackingFileError):
            reader.read_at(0, 512)
        with pytest.raises(BackingFileError):
            list(reader.extents())
    # a parent whose unique id does not match is refused
    other = make_vhd(tmp_path, "other.vhd", "8M", force_size=True)
    build_differencing(child, size=8 * MiB, parent_id=uuid.uuid4(), blocks=blocks, parent_name="other.vhd",
                       locators=[])  # fmt: skip
    with pytest.raises(BackingFileError, match="unique id"):
        open_vhd(child, opener_in(tmp_path))
    assert other.exists()


@requires_qemu
def test_differencing_locator_order(tmp_path):
    child = tmp_path / "child.vhd"
    locators = [
        (b"W2ku", "C:\\VMs\\base\\parent.vhd".encode("utf-16-le")),
        (b"W2ru", "..\\base\\parent.vhd".encode("utf-16-le")),
        (b"MacX", b"file://localhost/Users/me/parent.vhd"),
    ]
    build_differencing(child, size=4 * MiB, parent_id=uuid.uuid4(), blocks={}, locators=locators,
                       parent_name="C:\\VMs\\base\\parent.vhd")  # fmt: skip
    with open_vhd(child) as reader:
        expected = ["../base/parent.vhd", "C:\\VMs\\base\\parent.vhd", "/Users/me/parent.vhd"]
        if os.name != "nt":
            expected[1] = "/VMs/base/parent.vhd"
        assert reader.parent_candidates[:3] == expected
        assert reader.parent_candidates[-1] == "parent.vhd"  # the name's base name, last
        assert reader.backing_file == "C:\\VMs\\base\\parent.vhd"


# -- hostile files --------------------------------------------------------------------------------


@pytest.fixture
def small_dynamic(tmp_path) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    path = make_vhd(tmp_path, "small.vhd", "6M", force_size=True)
    qemu_io(path, "vpc", "write -P 0x5a 0 1M", "write -P 0xa5 4M 1M")
    return path


def expect_corrupt(path: Path, match: str | None = None):
    with pytest.raises(CorruptImage, match=match), open_vhd(path) as reader:
        reader.read_at(0, reader.virtual_size)
        list(reader.extents())


def test_hostile_truncated(small_dynamic):
    data = small_dynamic.read_bytes()
    small_dynamic.write_bytes(data[: len(data) // 2])  # footer gone; the head copy leads to blocks past EOF
    expect_corrupt(small_dynamic, "past the end of the file")
    small_dynamic.write_bytes(data[:100])
    expect_corrupt(small_dynamic, "too small")
    small_dynamic.write_bytes(data[:1000])
    expect_corrupt(small_dynamic)


def test_hostile_bat_past_eof(small_dynamic):
    rewrite_header(small_dynamic, table_offset=10**12)
    expect_corrupt(small_dynamic, "max_table_entries")


def test_hostile_huge_table(small_dynamic):
    rewrite_header(small_dynamic, max_table_entries=1073741825, block_size=512)
    expect_corrupt(small_dynamic, "1073741825")


def test_hostile_table_too_small(small_dynamic):
    rewrite_header(small_dynamic, max_table_entries=2)
    expect_corrupt(small_dynamic, "covers")


@pytest.mark.parametrize("block_size", [3 * MiB, 256, 0, 1 << 30])
def test_hostile_block_size(small_dynamic, block_size):
    rewrite_header(small_dynamic, block_size=block_size)
    expect_corrupt(small_dynamic, "block size")


def test_hostile_header_checksum(small_dynamic):
    rewrite_header(small_dynamic, checksum=0x12345678)
    expect_corrupt(small_dynamic, "checksum")


def test_hostile_header_offset(small_dynamic):
    rewrite_footers(small_dynamic, data_offset=2**63)
    expect_corrupt(small_dynamic, "outside the file")


def test_hostile_disk_type(small_dynamic):
    rewrite_footers(small_dynamic, disk_type=5)
    expect_corrupt(small_dynamic, "disk type 5")


def test_hostile_block_past_eof(small_dynamic):
    set_bat_entry(small_dynamic, 2, 0x00FFFFFF)
    expect_corrupt(small_dynamic, "past the end of the file")


def test_hostile_duplicate_blocks(small_dynamic):
    set_bat_entry(small_dynamic, 1, bat_entry(small_dynamic, 0))
    expect_corrupt(small_dynamic, "both point")


def test_hostile_overlapping_blocks(small_dynamic):
    set_bat_entry(small_dynamic, 1, bat_entry(small_dynamic, 0) + 8)
    expect_corrupt(small_dynamic, "overlap")


def test_hostile_block_over_metadata(small_dynamic):
    set_bat_entry(small_dynamic, 1, 1)  # sector 1: the dynamic header
    expect_corrupt(small_dynamic, "overlap")


def test_hostile_locator(tmp_path):
    child = tmp_path / "child.vhd"
    build_differencing(child, size=4 * MiB, parent_id=uuid.uuid4(), blocks={})
    rewrite_header(child, parent_locators=[ParentLocator(b"W2ru", 512, 24, 0, 10**9)] + [ParentLocator()] * 7)
    expect_corrupt(child, "locator")
    rewrite_header(child, parent_locators=[ParentLocator(b"W2ku", 512, 2**31, 0, 1536)] + [ParentLocator()] * 7)
    expect_corrupt(child, "locator")
    # undecodable text is not fatal: the locator is skipped (its data lies after the BAT, at 2048)
    header = rewrite_header(child, parent_locators=[ParentLocator(b"MacX", 512, 4, 0, 2048)] + [ParentLocator()] * 7)
    data = bytearray(child.read_bytes())
    data[2048:2052] = b"\xff\xfe\xfd\xfc"
    child.write_bytes(bytes(data))
    with open_vhd(child) as reader:
        assert reader.info().details["parent_locators"][0]["path"] is None
        assert reader.parent_candidates == ["parent.vhd"]
    assert header.parent_name == "parent.vhd"


def test_not_a_vhd(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(8192))
    expect_corrupt(path, "not a VHD")


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory) -> bytes:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    directory = tmp_path_factory.mktemp("fuzz")
    path = make_vhd(directory, "seed.vhd", "3M")
    qemu_io(path, "vpc", "write -P 0x5a 0 64k", "write -P 0xa5 2M 4k")
    return path.read_bytes()


# Regions of the seed worth mutating: footer copy, dynamic header, BAT, first bitmap, footer.
def _regions(size: int) -> list[tuple[int, int]]:
    return [(0, 512), (512, 1536), (1536, 2048), (2048, 2560), (size - 512, size)]


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_diskimage_errors(fuzz_seed, data):
    image = bytearray(fuzz_seed)
    poke_bytes(data, image, _regions(len(image)))
    if data.draw(st.booleans()):  # fix the checksums so the mutation reaches deeper checks
        footer = parse_footer(bytes(image[-512:]))
        image[-512:] = footer.pack()
        image[:512] = parse_footer(bytes(image[:512])).pack()
        header = parse_dynamic_header(bytes(image[512:1536]))
        image[512:1536] = header.pack()
    maybe_cut(data, image)
    exercise_reader(lambda: open_vhd(io.BytesIO(bytes(image))))


@settings(deadline=None, max_examples=60)
@given(st.binary(min_size=0, max_size=1200), st.binary(min_size=0, max_size=1024), st.integers(0, 2**40))
def test_probe_never_raises(head, tail, size):
    probe(head, tail, size)


# -- the corpus ---------------------------------------------------------------------------------

_CORPUS_VHD = corpus_entries(("vhd",))


@pytest.mark.parametrize("entry", corpus_params(_CORPUS_VHD))
def test_corpus(entry, corpus_files):
    path = corpus_files(entry)
    if not entry["qemu_img_ok"]:
        # afl5 (dynamic header past the end of the file; its table claim is absurd too) and
        # dfvfs/image*.vhd (footer AND its copy fail the checksum): refused, with a clear message.
        with pytest.raises(CorruptImage) as caught:
            open_vhd(path)
        assert str(caught.value) and caught.value.offset is not None
        return
    with open_vhd(path) as reader:
        info = reader.info()
        assert info.details["footer_source"] == "tail"
        if info.details["size_source"] == "current_size":
            assert reader.virtual_size == entry["vhd_footer_current_size"]
        if reader.virtual_size == entry["virtual_size"]:
            expected = entry["raw_sha256"]
        else:  # we use current_size where qemu 7.2 used CHS (caml, the 2025 qemu rule)
            assert reader.virtual_size == entry["raw_size_current_size"]
            expected = entry["raw_sha256_current_size"]
        if info.subformat == "differencing":
            assert reader.backing_file
            with pytest.raises(BackingFileError):
                reader.read_at(0, reader.virtual_size)
            return
        if reader.virtual_size > 1 << 30:  # the 127 GiB empty disks: metadata only
            assert all(extent.kind is ExtentKind.ZERO for extent in reader.extents())
            assert reader.read_at(reader.virtual_size - MiB, MiB) == bytes(MiB)
            return
        assert reader_sha256(reader) == expected


def test_corpus_fat_differential(corpus_files, tmp_path):
    entries = [entry for entry in _CORPUS_VHD if entry["file"] == "dfvfs/fat-differential.vhd"]
    if not entries or shutil.which("qemu-img") is None:
        pytest.skip(f"{NO_CORPUS}; or qemu-img not installed")
    entry = entries[0]
    child = tmp_path / "fat-differential.vhd"
    shutil.copyfile(corpus_files(entry), child)
    with open_vhd(child) as reader:
        info = reader.info()
        assert info.backing_file == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
        assert [loc["platform_code"] for loc in info.details["parent_locators"]] == ["W2ku", "W2ru"]
        assert info.details["parent_locators"][1]["path"] == ".\\fat-parent.vhd"
        assert reader.parent_candidates[0] == "fat-parent.vhd"  # the relative locator first
        assert info.details["parent_unique_id"] == "5fa21a55-f394-aa4d-9958-1951a67d5540"
    # The parent is not in the corpus (missing-parent case)
    with pytest.raises(BackingFileError):
        open_vhd(child, opener_in(tmp_path))
    # An empty parent with the expected unique id: the disk then reads as the child's own sectors,
    # which is what qemu (following no parent link) produced for the manifest.
    parent = make_vhd(tmp_path, "fat-parent.vhd", "4M", force_size=True)
    rewrite_footers(parent, unique_id=uuid.UUID("5fa21a55-f394-aa4d-9958-1951a67d5540"))
    with open_vhd(child, opener_in(tmp_path)) as reader:
        assert reader_sha256(reader) == entry["qemu_convert_sha256_without_parent"]
        assert any(extent.kind is ExtentKind.DATA for extent in reader.extents())


def test_corpus_footers_round_trip(corpus_files):
    for entry in _CORPUS_VHD:
        if entry["decompressed_size"] and entry["decompressed_size"] > 64 * MiB:
            continue
        data = corpus_files(entry).read_bytes()
        tail = data[-512:]
        if footer_problem(tail) is None:
            assert parse_footer(tail).pack() == tail, entry["file"]
