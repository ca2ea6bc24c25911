"""diskimg.check: structural checks of qcow2 (compared with ``qemu-img check``), VHD and RAW."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.detection.check import check
from diskimg.errors import DiskImageError, ImageNotFound, UnsupportedFormat
from diskimg.formats.qcow2.structures import decode_refcount_block

from .support.corpus import corpus_entries, corpus_file, corpus_params
from .support.files import read_u64, write_at
from .support.images import (
    first_l2_table,
    first_refcount_block,
    l1_entries_all_pointing_at_the_first_l2_table,
    qcow2_header,
)
from .support.tools import diskimg_cli, qemu_img, qemu_io, requires_qemu, run
from .support.units import MiB


def qemu_check(path: Path) -> dict:
    """``qemu-img check`` of a qcow2, never opening a backing file (as diskimg's check does not)."""
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}})
    proc = subprocess.run(["qemu-img", "check", "--output=json", f"json:{spec}"], capture_output=True)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def assert_agrees_with_qemu(path: Path) -> tuple[dict, object]:
    theirs = qemu_check(path)
    ours = check(path)
    assert ours.corruptions == theirs.get("corruptions", 0), ours.render_text()
    assert ours.leaks == theirs.get("leaks", 0), ours.render_text()
    assert ours.check_errors == theirs.get("check-errors", 0)
    assert ours.image_end_offset == theirs["image-end-offset"]
    assert (ours.allocated_clusters or 0) == theirs.get("allocated-clusters", 0)
    assert ours.total_clusters == theirs["total-clusters"]
    assert (ours.compressed_clusters or 0) == theirs.get("compressed-clusters", 0)
    assert (ours.fragmented_clusters or 0) == theirs.get("fragmented-clusters", 0)
    return theirs, ours


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A 64 MiB qcow2 with data in two L2 ranges, an internal snapshot and a persistent bitmap."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    path = tmp_path_factory.mktemp("q") / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "64M")
    qemu_io(path, "qcow2", "write -P 1 0 256k", "write -P 2 40M 64k")
    qemu_img("snapshot", "-c", "snap1", path)
    qemu_io(path, "qcow2", "write -P 3 0 64k")
    qemu_img("bitmap", "--add", path, "bm0")
    qemu_io(path, "qcow2", "write -P 4 1M 64k")
    return path


def copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


# -- clean images ----------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize(
    "options,writes",
    [
        ("cluster_size=65536", ["write -P 1 0 1M", "write -P 2 100M 64k"]),
        ("compat=0.10", ["write 0 300k"]),
        ("refcount_bits=1,cluster_size=4096", ["write 0 1M"]),
        ("refcount_bits=64", ["write 0 1M"]),
        ("refcount_bits=8", ["write 0 1M"]),
        ("refcount_bits=32,lazy_refcounts=on", ["write 0 1M"]),
        ("extended_l2=on,compression_type=zstd", ["write 0 5k", "write -c 1M 64k", "write -z 2M 64k"]),
        ("preallocation=metadata", []),
    ],
    ids=["plain", "v2", "refcount1", "refcount64", "refcount8", "refcount32", "extl2-zstd", "prealloc"],
)
def test_clean_images_agree_with_qemu_img(tmp_path, options, writes):
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, "256M")
    if writes:
        qemu_io(path, "qcow2", *writes)
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.clean and not ours.problems


@requires_qemu
def test_snapshots_bitmaps_and_compressed_clusters(written, tmp_path):
    _, ours = assert_agrees_with_qemu(written)
    assert ours.clean
    compressed = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", written, compressed)
    _, ours = assert_agrees_with_qemu(compressed)
    assert ours.clean and ours.compressed_clusters > 0


# -- damaged images --------------------------------------------------------------------------------


@requires_qemu
def test_leak_from_an_extra_refcount_on_an_unused_cluster(written, tmp_path):
    path = copy(written, tmp_path / "leak.qcow2")
    cs = qcow2_header(path).cluster_size
    size = path.stat().st_size
    spare = -(-size // cs)  # the cluster after the last one in use
    with open(path, "r+b") as f:
        f.truncate((spare + 1) * cs)
    write_at(path, first_refcount_block(path) + 2 * spare, struct.pack(">H", 1))
    _, ours = assert_agrees_with_qemu(path)
    assert ours.leaks == 1 and ours.corruptions == 0 and ours.leaked_clusters == [spare]
    assert not ours.clean


@requires_qemu
def test_leak_from_a_refcount_raised_on_a_used_cluster(written, tmp_path):
    path = copy(written, tmp_path / "leak2.qcow2")
    h = qcow2_header(path)
    cluster = h.refcount_table_offset // h.cluster_size
    write_at(path, first_refcount_block(path) + 2 * cluster, struct.pack(">H", 2))
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.leaks == 1 and ours.corruptions == 0


@requires_qemu
def test_corruption_two_l2_entries_point_at_one_cluster(tmp_path):
    path = tmp_path / "dup.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write -P 7 0 128k")
    l2 = first_l2_table(path)
    write_at(path, l2 + 8, struct.pack(">Q", read_u64(path, l2)))
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.corruptions == 1 and ours.leaks == 1
    assert any("2 references" in p.message for p in ours.problems)


@requires_qemu
def test_corruption_refcount_lowered_under_a_data_cluster(tmp_path):
    path = tmp_path / "low.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write -P 7 0 128k")
    h = qcow2_header(path)
    data = read_u64(path, first_l2_table(path)) & 0x00FFFFFFFFFFFE00
    write_at(path, first_refcount_block(path) + 2 * (data // h.cluster_size), struct.pack(">H", 0))
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.corruptions == 2  # refcount 0 < 1 reference, and OFLAG_COPIED disagrees


@requires_qemu
def test_corrupt_bit_is_reported_as_a_flag(written, tmp_path):
    path = copy(written, tmp_path / "flag.qcow2")
    h = qcow2_header(path)
    write_at(path, 72, struct.pack(">Q", h.incompatible_features | 0x2))
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.flags == ["corrupt"] and not ours.clean and ours.corruptions == 0


@requires_qemu
def test_truncated_qcow2(tmp_path):
    path = tmp_path / "cut.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1G")
    qemu_io(path, "qcow2", "write -P 1 0 1M", "write -P 2 500M 64k")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "qcow2", "write -P 3 0 128k")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.truncated and ours.corruptions > 0
    assert any(p.kind == "truncated" for p in ours.problems)


@requires_qemu
def test_oversized_l1_is_reported_not_read(tmp_path):
    """An l1_size of 1.6 billion entries (12 GiB of table): qemu-img refuses the image; we report
    the header as corrupt and read none of the table (this once read the whole claimed table)."""
    path = tmp_path / "l1size.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write -P 1 0 1M")
    write_at(path, 36, struct.pack(">I", 0x623498DA))  # header: l1_size
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode != 0
    result = check(path, "qcow2")
    assert not result.clean and result.corruptions == 1 and result.allocated_clusters is None
    assert result.problems[0].kind == "corruption" and "L1 table" in result.problems[0].message


@requires_qemu
def test_unaligned_l2_table_offset(tmp_path):
    path = tmp_path / "l1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write 0 64k")
    h = qcow2_header(path)
    write_at(path, h.l1_table_offset, struct.pack(">Q", read_u64(path, h.l1_table_offset) + 512))
    theirs = qemu_check(path)
    ours = check(path)
    assert ours.corruptions == theirs["corruptions"] > 0
    assert any("not cluster aligned" in p.message for p in ours.problems)


L2_ENTRY_DAMAGE = {
    # name: (qemu-img create options, qemu-io command, the u64 written at this offset of the first L2 table,
    # a function of the entry there)
    "invalid subcluster bitmap on an allocated cluster": (
        "extended_l2=on", "write -P 7 0 128k", 8, lambda entry: 0x1_FFFFFFFF),  # allocated and zero at once
    "compressed entry with a subcluster bitmap": ("extended_l2=on", "write -c -P 7 0 64k", 8, lambda entry: 1),
    "unaligned preallocated cluster": ("preallocation=metadata", "", 0, lambda entry: entry | 0x200 | 1),
}


@requires_qemu
@pytest.mark.parametrize("name", list(L2_ENTRY_DAMAGE))
def test_l2_entries_qemu_judges_are_counted_as_qemu_img_check_counts(tmp_path, name):
    """The L2 entry states of the one decoder (``decode_l2_table``) against qemu-img check: a cluster with an
    invalid bitmap is still referenced, a compressed one with a bitmap is not, an unaligned one is reported."""
    options, command, where, damage = L2_ENTRY_DAMAGE[name]
    path = tmp_path / "l2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, "4M")
    if command:
        qemu_io(path, "qcow2", command)
    l2 = first_l2_table(path)
    write_at(path, l2 + where, struct.pack(">Q", damage(read_u64(path, l2 + where))))
    theirs, ours = assert_agrees_with_qemu(path)
    assert ours.corruptions > 0 and any(p.offset == l2 for p in ours.problems), ours.render_text()


HEADER_DAMAGE = {
    # name: (the qcow2 spec's header fields patched, as (offset, struct format, value); exit code)
    "virtual size 2^63": ([(24, ">Q", 1 << 63)], 1),
    "unknown incompatible bit": ([(72, ">Q", 1 << 20)], 3),
    "compression type 7": ([(72, ">Q", 1 << 3), (104, ">B", 7)], 3),
    "backing name of 4 GiB": ([(8, ">QI", 512, 0xFFFFFFFF)], 1),
    "backing name past the end": ([(8, ">QI", 10 << 20, 16)], 1),
    "external data file bit": ([(72, ">Q", 1 << 2)], 3),
}


@requires_qemu
@pytest.mark.parametrize("name", list(HEADER_DAMAGE))
def test_a_header_qemu_refuses_is_never_clean(tmp_path, name):
    """Header fields no reader takes: a corruption (exit 1), or for a feature diskimg does not take
    the refusal every command gives (exit 3); this once said "No errors were found"."""
    path = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write -P 1 0 1M")
    edits, code = HEADER_DAMAGE[name]
    for offset, layout, *values in edits:
        write_at(path, offset, struct.pack(layout, *values))
    oracle = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert oracle.returncode != 0 and "Could not open" in oracle.stderr
    proc = diskimg_cli("check", path)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 1:
        assert b"CORRUPTION" in proc.stdout and b"No errors" not in proc.stdout
        assert check(path).corruptions == 1
    else:
        assert not proc.stdout and proc.stderr == diskimg_cli("info", path).stderr
    assert diskimg_cli("info", path).returncode == 3


@requires_qemu
def test_an_image_with_an_external_data_file_is_refused_as_by_info(tmp_path):
    path = tmp_path / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.bin'}", path, "1M")
    with pytest.raises(UnsupportedFormat, match="external data file"):
        check(path)


@requires_qemu
def test_l1_entries_sharing_one_l2_table_are_counted_without_walking_it_again(tmp_path):
    """Each L2 table is walked once however many L1 entries point at it, its references counted
    as often: the counts agree with qemu-img check's, in seconds (this took minutes)."""
    path = l1_entries_all_pointing_at_the_first_l2_table(tmp_path, "8T")
    theirs = qemu_check(path)
    assert theirs["corruptions"] > 0
    proc = diskimg_cli("check", "--json", path, timeout=20)
    assert proc.returncode == 1
    ours = json.loads(proc.stdout)
    assert ours["corruptions"] == theirs["corruptions"]
    assert ours["allocated_clusters"] == theirs["allocated-clusters"]
    assert ours["image_end_offset"] == theirs["image-end-offset"]


@requires_qemu
def test_overlapping_tables_stop_the_walk_with_a_verdict(tmp_path):
    """L1 entries pointing at every 512-byte step of the file (unaligned, so each is a different
    table to qemu): the check reports the corruptions and stops walking within the file's worth of
    entries instead of reading the file thousands of times over."""
    path = tmp_path / "steps.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "32T")
    qemu_io(path, "qcow2", "write -P 1 0 4M")
    h = qcow2_header(path)
    steps = path.stat().st_size // 512
    # (qemu-img check walks all of them: 12 million lines of errors in over a minute)
    write_at(path, h.l1_table_offset, b"".join(struct.pack(">Q", 512 * i) for i in range(1, steps)))
    proc = diskimg_cli("check", "--json", path, timeout=20)
    assert proc.returncode == 1
    ours = json.loads(proc.stdout)
    assert ours["corruptions"] >= steps - 1 - steps // 128  # every unaligned L1 entry (spec: L2 tables are aligned)
    assert ours["check_errors"] == 1  # the walk stopped


def test_refcount_block_widths():
    # sub-byte widths are packed least significant bits first (qcow2 spec, "Refcount block entry")
    assert list(decode_refcount_block(bytes([0b11100100]), 0)) == [0, 0, 1, 0, 0, 1, 1, 1]
    assert list(decode_refcount_block(bytes([0b11100100]), 1)) == [0, 1, 2, 3]
    assert list(decode_refcount_block(bytes([0x21]), 2)) == [1, 2]
    assert list(decode_refcount_block(bytes([0x21]), 3)) == [0x21]
    assert list(decode_refcount_block(struct.pack(">HH", 1, 513), 4)) == [1, 513]
    assert list(decode_refcount_block(struct.pack(">II", 1, 1 << 20), 5)) == [1, 1 << 20]
    assert list(decode_refcount_block(struct.pack(">Q", 1 << 40), 6)) == [1 << 40]


@requires_qemu
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6 * 4096 - 8), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_damaged_metadata_never_raises_anything_else(written, tmp_path, edits):
    """Random writes over the header, L1, refcount table and first tables: a result, not a crash."""
    path = tmp_path / "fuzz.qcow2"
    shutil.copyfile(written, path)
    for offset, data in edits:
        write_at(path, offset, data)
    try:
        result = check(path, "qcow2")
    except DiskImageError:
        return
    assert result.to_dict()["format"] == "qcow2"


# -- VHD -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_vhd(tmp_path_factory) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    path = tmp_path_factory.mktemp("vhd") / "dyn.vhd"
    qemu_img("create", "-q", "-f", "vpc", path, "64M")
    qemu_io(path, "vpc", "write -P 1 0 3M", "write -P 2 40M 64k")
    return path


def bat_offset(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(512 + 16)
        return struct.unpack(">Q", f.read(8))[0]


@requires_qemu
def test_vhd_dynamic_and_fixed_clean(dynamic_vhd, tmp_path):
    result = check(dynamic_vhd)
    assert result.format == "vhd" and result.clean, result.render_text()
    assert result.allocated_clusters == 3 and result.total_clusters == 33  # qemu rounds 64M up to CHS
    assert result.image_end_offset == dynamic_vhd.stat().st_size
    fixed = tmp_path / "fixed.vhd"
    qemu_img("convert", "-O", "vpc", "-o", "subformat=fixed", dynamic_vhd, fixed)
    assert check(fixed).clean


@requires_qemu
def test_vhd_truncated(dynamic_vhd, tmp_path):
    path = copy(dynamic_vhd, tmp_path / "cut.vhd")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3 * MiB)
    result = check(path)
    assert result.truncated and not result.clean
    kinds = [p.kind for p in result.problems]
    assert kinds.count("truncated") >= 2  # the footer is gone and blocks lie past the end
    assert any("copy at offset 0" in p.message for p in result.problems)


@requires_qemu
def test_vhd_block_used_twice(dynamic_vhd, tmp_path):
    path = copy(dynamic_vhd, tmp_path / "dup.vhd")
    table = bat_offset(path)
    with open(path, "rb") as f:
        f.seek(table)
        first = f.read(4)
    write_at(path, table + 4, first)
    result = check(path)
    assert result.corruptions >= 1
    assert any("point at the same sector" in p.message for p in result.problems)


@requires_qemu
def test_vhd_header_checksum(dynamic_vhd, tmp_path):
    path = copy(dynamic_vhd, tmp_path / "sum.vhd")
    write_at(path, 512 + 36, b"\0\0\0\0")
    result = check(path)
    assert result.corruptions == 1 and "checksum" in result.problems[0].message
    assert result.problems[0].offset == 512 + 36


@requires_qemu
def test_vhd_footer_copy_damaged(dynamic_vhd, tmp_path):
    path = copy(dynamic_vhd, tmp_path / "copy.vhd")
    write_at(path, 20, b"\x01")
    result = check(path)
    assert result.corruptions == 1 and result.problems[0].structure == "footer copy"


def test_raw_is_clean(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    result = check(path)
    assert result.clean and result.format == "raw" and result.image_end_offset == 4096


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ImageNotFound):
        check(tmp_path / "nope.qcow2")
    vmdk = tmp_path / "x.vmdk"
    vmdk.write_bytes(b"KDMV" + struct.pack("<I", 1) + bytes(504))
    with pytest.raises(UnsupportedFormat):
        check(vmdk)


# -- the command -----------------------------------------------------------------------------------


@requires_qemu
def test_check_command_exit_codes_and_json(written, tmp_path):
    proc = diskimg_cli("check", written, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["clean"] is True and data["format"] == "qcow2"
    for key in ("corruptions", "leaks", "check_errors", "truncated", "flags", "image_end_offset", "total_clusters",
                "allocated_clusters", "fragmented_clusters", "compressed_clusters", "problems"):
        assert key in data
    damaged = copy(written, tmp_path / "d.qcow2")
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    proc = diskimg_cli("check", damaged)
    assert proc.returncode == 1 and b"truncated" in proc.stdout
    proc = diskimg_cli("check", tmp_path / "missing.qcow2")
    assert proc.returncode == 3 and len(proc.stderr.decode().strip().splitlines()) == 1
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1024))
    assert diskimg_cli("check", "-f", "raw", raw).returncode == 0
    run("true")


@requires_qemu
@pytest.mark.parametrize("forced", ["vpc", "raw"])
def test_a_forced_format_the_file_contradicts_is_refused_as_by_every_command(tmp_path, forced):
    """qemu-img refuses to open a qcow2 as vpc; check says what info and map say (exit 3), not
    "no valid footer" (exit 1) or, forced to raw, "No errors were found"."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    oracle = subprocess.run(["qemu-img", "info", "-f", forced, path], capture_output=True)
    if forced == "vpc":
        assert oracle.returncode != 0
    answers = {command: diskimg_cli(command, "-f", forced, path) for command in ("check", "info", "map")}
    for proc in answers.values():
        assert proc.returncode == 3 and not proc.stdout
        assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert answers["check"].stderr == answers["info"].stderr == answers["map"].stderr
    assert b"forced format" in answers["check"].stderr


# -- the third-party corpus ------------------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("entry", corpus_params(corpus_entries(("qcow2",))))
def test_corpus_qcow2_agrees_with_qemu_img(entry, tmp_path):
    path = corpus_file(entry, tmp_path)
    if entry["file"].endswith("data-file.qcow2.gz"):
        pytest.skip("its external data file is not stored beside it after decompression")
    assert_agrees_with_qemu(path)


@pytest.mark.parametrize("entry", corpus_params(corpus_entries(("vhd",))))
def test_corpus_vhd_checks_without_crashing(entry, tmp_path):
    path = corpus_file(entry, tmp_path)
    result = check(path, "vhd")
    if entry.get("qemu_img_ok") and "differencing" not in (entry.get("notes") or ""):
        assert not result.corruptions and not result.truncated, result.render_text()
