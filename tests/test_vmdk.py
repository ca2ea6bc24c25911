"""The VMDK reader: every create type qemu-img writes and ESXi descriptors read byte-identical to
``qemu-img convert -O raw``; snapshot chains; extent files confined to the descriptor's directory;
the third-party corpus; hostile headers, tables and descriptors."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg import check, detect, open_image
from diskimg.errors import BackingFileError, CorruptImage, UnsupportedFormat
from diskimg.formats.vmdk.structures import parse_descriptor, parse_header

from .support.corpus import corpus_entries, corpus_file, corpus_params
from .support.digests import file_sha256, qemu_raw_sha256, reader_sha256, reader_sha256_by_extents
from .support.files import sparse_file
from .support.fuzz import exercise_reader, maybe_cut, poke_bytes
from .support.tools import assert_extents_sound, diskimg_cli, qemu_img, qemu_io, qemu_map, qemu_raw, requires_qemu
from .support.units import MiB

pytestmark = requires_qemu

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 40 MiB RAW disk with scattered data, zero runs and a size that is not a whole grain."""
    directory = tmp_path_factory.mktemp("vmdk-source")
    rng = __import__("random").Random(15)
    runs = [(rng.randrange(0, 40 * MiB - 300_000), os.urandom(rng.randrange(1, 300_000))) for _ in range(30)]
    runs.append((10 * MiB, b"\x5a" * (3 * MiB)))  # compresses well
    return sparse_file(directory / "source.raw", 40 * MiB + 7 * 512, runs)


def _assert_reads_like_qemu(image: Path, tmp_path: Path, **open_args) -> None:
    oracle = qemu_raw(image, "vmdk", tmp_path)
    with open_image(image, **open_args) as reader:
        assert reader.virtual_size == oracle.stat().st_size
        assert reader_sha256(reader) == file_sha256(oracle)
        assert_extents_sound(reader, oracle)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_img_subformats_read_like_qemu(source, tmp_path, subformat):
    image = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", source, image)
    found = detect(image)
    assert (found.format, found.subformat, found.readable) == ("vmdk", subformat, True)
    _assert_reads_like_qemu(image, tmp_path)
    with open_image(image) as reader:
        assert reader.info().subformat == subformat


def test_split_sparse_over_several_extent_files(tmp_path):
    image = tmp_path / "big.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", image, "5G")
    qemu_io(image, "vmdk", "write -P 0x11 0 1M", "write -P 0x22 2047M 2M", "write -P 0x33 4095M 1M")
    assert len(list(tmp_path.glob("big-s*.vmdk"))) == 3
    with open_image(image) as reader:
        assert reader.read_at(0, 4096) == b"\x11" * 4096
        assert reader.read_at(2047 * MiB + MiB - 4, 8) == b"\x22" * 8  # across the first extent's end
        assert reader.read_at(4095 * MiB, 1024) == b"\x33" * 1024
        assert reader.read_at(3 * 1024 * MiB, 4096) == bytes(4096)
        data = [(e.start, e.length) for e in reader.extents() if e.kind.value == "data"]
    assert data == [(0, MiB), (2047 * MiB, 2 * MiB), (4095 * MiB, MiB)]


def test_zero_grains_read_as_zeros(tmp_path):
    """GTE 1 (zeroed-grain flag): zeros, not the backing file and not sector 1."""
    image = tmp_path / "z.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", image, "16M")
    qemu_io(image, "vmdk", "write -P 0x77 0 4M", "write -z 1M 1M")
    _assert_reads_like_qemu(image, tmp_path)
    with open_image(image) as reader:
        assert reader.read_at(MiB, 4096) == bytes(4096)
        assert reader.read_at(0, 16) == b"\x77" * 16
        assert "zeroed-grain" in reader.info().features


@pytest.mark.parametrize("create_type", ["vmfs", "vmfsThin"])
def test_esxi_descriptor_with_flat_data(source, tmp_path, create_type):
    """An ESXi descriptor (VMFS extent, ``-flat.vmdk``): qemu reads ``vmfs``; ``vmfsThin`` differs
    only in how ESXi allocates the file, so it must read like the same descriptor as ``vmfs``."""
    shutil.copyfile(source, tmp_path / "esx-flat.vmdk")
    sectors = source.stat().st_size // 512
    text = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{}"\n\n'
        f'# Extent description\nRW {sectors} VMFS "esx-flat.vmdk"\n\n#DDB\nddb.adapterType = "lsilogic"\n'
    )
    (tmp_path / "esx.vmdk").write_text(text.format(create_type))
    (tmp_path / "oracle.vmdk").write_text(text.format("vmfs"))
    with open_image(tmp_path / "esx.vmdk") as reader:
        assert reader_sha256(reader) == qemu_raw_sha256(tmp_path / "oracle.vmdk", "vmdk", tmp_path)
        assert reader.info().details["adapter_type"] == "lsilogic"


def test_flat_extents_with_offsets(source, tmp_path):
    """Extent lines with a sector offset into the flat file, as the spec allows."""
    shutil.copyfile(source, tmp_path / "data.bin")
    (tmp_path / "d.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "data.bin" 20480\nRW 4096 FLAT "data.bin" 0\n'
    )
    _assert_reads_like_qemu(tmp_path / "d.vmdk", tmp_path)


def test_zero_extent_reads_as_zeros(source, tmp_path):
    """A ZERO extent is zeros of its size between the others (the VMware spec; qemu 7.2 skips the
    line, shifting what follows, so the source file's bytes are the oracle here)."""
    shutil.copyfile(source, tmp_path / "data.bin")
    (tmp_path / "d.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "data.bin" 20480\nRW 1000 ZERO\nRW 4096 FLAT "data.bin" 0\n'
    )
    data = source.read_bytes()
    with open_image(tmp_path / "d.vmdk") as reader:
        assert reader.virtual_size == (2048 + 1000 + 4096) * 512
        assert reader.read_at(0, MiB) == data[10 * MiB : 11 * MiB]
        assert reader.read_at(MiB, 1000 * 512) == bytes(1000 * 512)
        assert reader.read_at(MiB + 1000 * 512, 2 * MiB) == data[: 2 * MiB]


@pytest.mark.parametrize("name", ["../outside-flat.vmdk", "/etc/hostname", "sub/../../outside-flat.vmdk"])
def test_extent_files_confined_to_the_descriptor_directory(tmp_path, name):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside-flat.vmdk").write_bytes(bytes(MiB))
    descriptor = inner / "d.vmdk"
    descriptor.write_text(
        f'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT "{name}" 0\n'
    )
    with pytest.raises(BackingFileError, match="outside the descriptor's directory"):
        open_image(descriptor)
    proc = diskimg_cli("convert", descriptor, tmp_path / "out.raw", "-O", "raw", text=True)
    assert proc.returncode == 3 and not (tmp_path / "out.raw").exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "outside the descriptor's directory" in proc.stderr


def test_missing_extent_file(tmp_path):
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", tmp_path / "m.vmdk", "8M")
    (tmp_path / "m-flat.vmdk").unlink()
    with pytest.raises(BackingFileError, match="not found"):
        open_image(tmp_path / "m.vmdk")


def test_snapshot_chain_only_with_allow_backing(source, tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", source, base)
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    qemu_io(child, "vmdk", "write -P 0xc4 1M 128k", "write -P 0xc5 39M 64k")
    with pytest.raises(BackingFileError, match="--allow-backing"):
        open_image(child)
    _assert_reads_like_qemu(child, tmp_path, allow_backing=True)
    with open_image(child, allow_backing=True) as reader:
        assert reader.info().backing_file == "base.vmdk"


def test_snapshot_parent_changed_is_refused(source, tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "8M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    data = bytearray(base.read_bytes())
    at = data.index(b"CID=") + 4
    data[at : at + 8] = b"0badf00d"
    base.write_bytes(bytes(data))
    with pytest.raises(BackingFileError, match="CID 0badf00d"):
        open_image(child, allow_backing=True)


def test_snapshot_parent_outside_directory_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "8M")
    child = tmp_path / "inner" / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk", child)
    with pytest.raises(BackingFileError, match="outside the allowed directories"):
        open_image(child, allow_backing=True)


def test_other_create_types_refused_with_the_conversion_command(tmp_path):
    descriptor = tmp_path / "s.vmdk"
    descriptor.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="seSparse"\n'
                          'RW 2048 SESPARSE "s-sesparse.vmdk"\n')
    found = detect(descriptor)
    assert not found.readable and "qemu-img convert -f vmdk" in found.hint
    proc = diskimg_cli("convert", "--backend", "native", descriptor, tmp_path / "o.raw", "-O", "raw", text=True)
    assert proc.returncode == 3 and "seSparse" in proc.stderr and "qemu-img convert -f vmdk" in proc.stderr
    with pytest.raises(UnsupportedFormat, match="seSparse"):
        open_image(descriptor, source_format="vmdk")


# -- the corpus -----------------------------------------------------------------------------------

_CORPUS = corpus_entries(("vmdk",))


@pytest.mark.parametrize("entry", corpus_params(_CORPUS))
def test_corpus(entry, tmp_path):
    """Read in place: what qemu-img reads hashes the same; what it refuses, diskimg refuses in one line."""
    path = corpus_file(entry, tmp_path)
    if entry.get("raw_sha256"):
        with open_image(path, source_format="vmdk") as reader:
            assert reader_sha256_by_extents(reader) == entry["raw_sha256"]
            assert reader.virtual_size == entry["virtual_size"]
    else:
        proc = diskimg_cli("convert", path, tmp_path / "out.raw", "-O", "raw", text=True)
        assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "out.raw").exists()


# -- hostile images -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("vmdk-fuzz")
    made = {}
    for subformat in ("monolithicSparse", "streamOptimized"):
        path = directory / f"{subformat}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, "4M")
        if subformat == "monolithicSparse":
            qemu_io(path, "vmdk", "write -P 0x5a 0 64k", "write -P 0xa5 2M 4k")
        else:
            raw = directory / "r.raw"
            raw.write_bytes(b"\x5a" * 65536 + bytes(2 * MiB - 65536) + os.urandom(4096))
            path.unlink()
            qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path)
        made[subformat] = path.read_bytes()
    return made


def test_hostile_headers(seeds, tmp_path):
    image = bytearray(seeds["monolithicSparse"])
    cases = {
        "capacity": (12, struct.pack("<Q", 1 << 62), "out of range"),
        "grain": (20, struct.pack("<Q", 3), "grain size"),
        "directory": (56, struct.pack("<Q", 1 << 40), "grain directory"),
        "gtes": (44, struct.pack("<I", 1 << 20), "entries per grain table"),
        "huge-directory": (12, struct.pack("<Q", (1 << 62) // 512 - 1), "too big"),
    }
    for name, (offset, value, message) in cases.items():
        bad = bytearray(image)
        bad[offset : offset + len(value)] = value
        path = tmp_path / f"{name}.vmdk"
        path.write_bytes(bytes(bad))
        with pytest.raises(CorruptImage, match=message):
            open_image(path)
    header = parse_header(bytes(image[:512]))
    first_table = struct.unpack_from("<I", image, header.gd_offset * 512)[0]
    bad = bytearray(image)  # a grain table entry far past the end of the file
    struct.pack_into("<I", bad, first_table * 512, 1 << 30)
    (tmp_path / "gte.vmdk").write_bytes(bytes(bad))
    with open_image(tmp_path / "gte.vmdk") as reader, pytest.raises(CorruptImage, match="past the end"):
        reader.read_at(0, 4096)


def test_stream_optimized_directory_in_the_footer(tmp_path):
    """VMware's layout (the corpus's iotest-version3 has it): gdOffset in the header is
    0xffffffffffffffff and the footer at the end holds the real one; cut, the file is refused."""
    entry = next((e for e in _CORPUS if e["file"].endswith("iotest-version3.vmdk.bz2")), None)
    if entry is None:
        pytest.skip("no corpus with iotest-version3.vmdk.bz2")
    path = corpus_file(entry, tmp_path)
    assert parse_header(path.read_bytes()[:512]).gd_offset == 0xFFFFFFFFFFFFFFFF
    cut = tmp_path / "cut.vmdk"
    cut.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(CorruptImage, match="incomplete"):
        open_image(cut)


def test_descriptor_parser_rejects_garbage():
    with pytest.raises(CorruptImage, match="neither a setting nor an extent"):
        parse_descriptor(b'createType="monolithicFlat"\n!!!\n')
    with pytest.raises(CorruptImage, match="2\\^63"):
        parse_descriptor(b'RW 18014398509481984 ZERO\n')


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_diskimage_errors(seeds, data):
    """Mutated headers, directories, tables, markers and cuts: a DiskImageError or a read, bounded."""
    image = bytearray(seeds[data.draw(st.sampled_from(sorted(seeds)))])
    poke_bytes(data, image, [(0, 512), (512, 2048), (2048, min(len(image), 1 << 16)),
                             (max(0, len(image) - 1536), len(image))])
    maybe_cut(data, image)
    exercise_reader(lambda: open_image(io.BytesIO(bytes(image)), source_format="vmdk"), read_tail=False)


# -- diskimg check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_check_clean_where_qemu_img_check_is(source, tmp_path, subformat):
    image = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", source, image)
    qemu_img("check", image)
    result = check(image)
    assert result.clean, result.problems
    if "Sparse" in subformat or subformat == "streamOptimized":
        data_grains = sum(1 for e in qemu_map(image, "vmdk") if e["data"] for _ in range(e["length"] // 65536))
        assert result.allocated_clusters >= data_grains > 0


def test_check_finds_bad_grain_table_entries(tmp_path):
    image = tmp_path / "bad.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", image, "8M")
    qemu_io(image, "vmdk", "write -P 1 0 256k")
    data = bytearray(image.read_bytes())
    header = parse_header(bytes(data[:512]))
    table = struct.unpack_from("<I", data, header.gd_offset * 512)[0] * 512
    second = struct.unpack_from("<I", data, table + 4)[0]
    struct.pack_into("<I", data, table, 1 << 24)  # grain 0 past the end of the file
    struct.pack_into("<I", data, table + 8, second)  # grain 2 shares grain 1's sector
    struct.pack_into("<I", data, table + 12, 5)  # grain 3 inside the header and descriptor
    image.write_bytes(bytes(data))
    assert subprocess.run(["qemu-img", "check", image], capture_output=True).returncode != 0  # qemu sees it too
    result = check(image)
    messages = " | ".join(problem.message for problem in result.problems)
    assert result.corruptions == 3, messages
    assert "past the end" in messages and "share the sector" in messages and "inside the metadata" in messages
    proc = diskimg_cli("check", image, text=True)
    assert proc.returncode == 1 and "CORRUPTION" in proc.stdout


def test_check_refuses_vmdk_it_does_not_read(tmp_path):
    cowd = tmp_path / "c.vmdk"
    cowd.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(4088))
    with pytest.raises(UnsupportedFormat, match="qemu-img convert -f vmdk"):
        check(cowd)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.sampled_from([
    "# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff", "parentCID=zz",
    'createType="monolithicFlat"', 'createType="twoGbMaxExtentSparse"', 'RW 2048 FLAT "a-flat.vmdk" 0',
    'RW 99999999999999999999 SPARSE "b.vmdk"', "RW 1 ZERO", 'RDONLY 8 VMFS "/etc/passwd"', "RW 4 FLAT",
    'parentFileNameHint="../p.vmdk"', "ddb.adapterType = \"ide\"", "\x00junk", "garbage line",
]), max_size=12), st.binary(max_size=64))
def test_descriptor_parser_only_corrupt_image(lines, noise):
    try:
        descriptor = parse_descriptor("\n".join(lines).encode() + noise)
    except CorruptImage:
        return
    assert descriptor.sectors < 1 << 54
