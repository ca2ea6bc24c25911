"""The LVM2 reader against volumes LVM2's own tools built on loop devices over image files (the oracle: their
pvs/vgs/lvs JSON reports, pvck's dump of the on-disk headers, vgcfgbackup's text), ext4 file systems made by
mkfs.ext4 -d placed at the extents lvs reports and compared with their source trees, and the LVM2 image of the
shared corpus. There is no device-mapper here: LVs are made with ``lvcreate --driverloaded n`` or written with
``vgcfgrestore`` from a metadata file, and never activated."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from diskimg import open_image
from diskimg.errors import CorruptImage, UnsupportedFormat
from diskimg.inspection.fs import open_filesystem
from diskimg.inspection.signatures import lvm_crc
from diskimg.inspection.volumes import lvm
from diskimg.inspection.volumes.lvm import (
    LvmVolume,
    find_volume_groups,
    metadata_text_ranges,
    parse_config,
    parse_label,
    parse_mda_header,
    parse_metadata,
)

from .support.corpus import corpus_dir
from .support.disks import FileDisk
from .support.files import blank, read_at, write_at
from .support.fs_compare import assert_tree_equal
from .support.lvm import (
    EXTENT,
    LoopLvm,
    TwoDisks,
    assemble,
    needs_lvm,
    unique_vg,
)
from .support.units import MiB

# -- a system disk and a data disk, one volume group over both ---------------------------------------------------
















def assert_reads_tree(volume: LvmVolume, tree: Path) -> None:
    fs = open_filesystem(volume, 0, volume.size)
    assert fs is not None and fs.type == "ext4"
    assert assert_tree_equal(fs, tree) >= 7


@needs_lvm
def test_volume_group_as_lvm_reports_it(two_disks: TwoDisks) -> None:
    tools, vg = two_disks.tools, two_disks.vg
    group = assemble(two_disks.areas(), vg)
    (vg_report,) = tools.report("vgs", "vg_name,vg_uuid,vg_extent_size,vg_seqno,pv_count", vg)
    assert (group.uuid, group.metadata.extent_bytes, group.metadata.seqno) == (
        vg_report["vg_uuid"], int(vg_report["vg_extent_size"]), int(vg_report["vg_seqno"]))
    pvs = tools.report("pvs", "pv_name,pv_uuid,pe_start,pv_pe_count", two_disks.system_pv, two_disks.data_pv)
    assert len(group.physical_volumes) == int(vg_report["pv_count"]) == 2
    for pv in pvs:
        (entry,) = [entry for entry in group.metadata.physical_volumes.values() if entry.uuid == pv["pv_uuid"]]
        assert (entry.pe_start * 512, entry.pe_count, entry.device) == (int(pv["pe_start"]), int(pv["pv_pe_count"]),
                                                                       pv["pv_name"])
        assert group.physical_volumes[pv["pv_uuid"]].label.uuid == pv["pv_uuid"]
    assert group.missing == []
    lvs = tools.report("lvs", "lv_name,lv_uuid,lv_size,segtype,lv_role,lv_dm_path", "-a", vg)
    assert {lv["lv_name"].strip("[]") for lv in lvs} == {lv.name for lv in group.logical_volumes} - {"snapshot0"}
    for report in lvs:
        lv = group.logical_volume(report["lv_name"].strip("[]"))
        assert lv is not None
        assert (lv.uuid, lv.size) == (report["lv_uuid"], int(report["lv_size"]))
        assert lv.visible == (not report["lv_name"].startswith("["))
        expected = "snapshot" if "snapshot" in report["lv_role"].split(",") else report["segtype"]
        assert lv.kind == expected, lv.name
        if lv.visible:
            assert f"/dev/mapper/{lv.mapper_name}" == report["lv_dm_path"]


@needs_lvm
def test_segments_as_lvm_reports_them(two_disks: TwoDisks) -> None:
    tools, vg = two_disks.tools, two_disks.vg
    group = assemble(two_disks.areas(), vg)
    keys = {entry.key: entry.uuid for entry in group.metadata.physical_volumes.values()}
    names = {pv["pv_uuid"]: pv["pv_name"] for pv in tools.report("pvs", "pv_name,pv_uuid", two_disks.system_pv,
                                                                   two_disks.data_pv)}
    reports = tools.report("lvs", "lv_name,seg_start_pe,seg_size_pe,segtype,stripes,stripe_size,devices", "-a", vg)
    for report in reports:
        lv = group.metadata.logical_volumes[report["lv_name"].strip("[]")]
        (segment,) = lv.segments
        assert (segment.start_extent, segment.extent_count) == (int(report["seg_start_pe"]),
                                                                int(report["seg_size_pe"]))
        if report["segtype"] in ("linear", "striped"):
            assert segment.stripe_count == int(report["stripes"])
            assert segment.stripe_size * 512 == int(report["stripe_size"])
            devices = [f"{names[keys[area.name]]}({area.extent})" for area in segment.areas]
            assert ",".join(devices) == report["devices"]
        if report["segtype"] in ("raid1", "mirror"):
            assert ",".join(f"{area.name}({area.extent})" for area in segment.areas) == report["devices"]


@needs_lvm
def test_pv_label_and_metadata_area_as_pvck_dumps_them(two_disks: TwoDisks) -> None:
    tools = two_disks.tools
    for device in (two_disks.system_pv, two_disks.data_pv):
        dump = tools.headers(device)
        image, offset = tools.where(device)
        label = parse_label(read_at(image, offset, 2048))
        assert label is not None
        assert label.sector * 512 == int(dump["label_header"].split()[-1])
        assert label.uuid.replace("-", "") == dump["pv_header.pv_uuid"]
        assert label.device_size == int(dump["pv_header.device_size"])
        assert label.data_areas[0].offset == int(dump["pv_header.disk_locn[0].offset"])
        (area,) = label.metadata_areas
        assert (area.offset, area.size) == (int(dump["pv_header.disk_locn[2].offset"]),
                                            int(dump["pv_header.disk_locn[2].size"]))
        header = parse_mda_header(read_at(image, offset + area.offset, 512))
        assert (header.start, header.size) == (int(dump["mda_header_1.start"]), int(dump["mda_header_1.size"]))
        committed = header.locations[0]
        assert (committed.offset, committed.size, committed.checksum) == (
            int(dump["mda_header_1.raw_locn[0].offset"]), int(dump["mda_header_1.raw_locn[0].size"]),
            int(dump["mda_header_1.raw_locn[0].checksum"], 16))


@needs_lvm
def test_linear_lv_on_a_partition_reads_its_ext4(two_disks: TwoDisks) -> None:
    group = assemble(two_disks.areas(), two_disks.vg)
    assert_reads_tree(group.open("root"), two_disks.trees["root"])


@needs_lvm
def test_striped_lv_over_system_and_data_disks_reads_its_ext4(two_disks: TwoDisks) -> None:
    group = assemble(two_disks.areas(), two_disks.vg)
    volume = group.open("stripes")
    assert volume.size == 4 * EXTENT
    assert_reads_tree(volume, two_disks.trees["stripes"])


@needs_lvm
@pytest.mark.parametrize("name, second_leg", [("mirrored", "mirrored_rimage_1"), ("legacy", "legacy_mimage_1")])
def test_raid1_and_mirror_read_their_first_leg(two_disks: TwoDisks, name: str, second_leg: str) -> None:
    write_at(*two_disks.starts[second_leg], b"\xff" * MiB)  # the second leg's superblock and more wiped
    group = assemble(two_disks.areas(), two_disks.vg)
    assert assemble(two_disks.areas(), two_disks.vg).open(second_leg).read_at(0, 4096) == b"\xff" * 4096
    assert_reads_tree(group.open(name), two_disks.trees[name])


@needs_lvm
@pytest.mark.parametrize("name, first_leg", [("mirrored", "mirrored_rimage_0"), ("legacy", "legacy_mimage_0")])
def test_raid1_and_mirror_read_the_leg_whose_disk_is_given(two_disks: TwoDisks, name: str, first_leg: str) -> None:
    write_at(*two_disks.starts[first_leg], b"\xff" * MiB)  # not read: its disk is not given
    scan = find_volume_groups(two_disks.areas(system=False))  # type: ignore[arg-type]
    (group,) = scan.volume_groups
    assert group.logical_volume(first_leg).unreadable_reason is not None
    assert group.logical_volume(name).unreadable_reason is None
    assert_reads_tree(group.open(name), two_disks.trees[name])


@needs_lvm
def test_thin_and_snapshot_volumes_are_named_not_read(two_disks: TwoDisks) -> None:
    group = assemble(two_disks.areas(), two_disks.vg)
    for name, kind in (("thin", "thin"), ("pool", "thin-pool"), ("snap", "snapshot")):
        lv = group.logical_volume(name)
        assert lv is not None and lv.kind == kind
        assert lv.unreadable_reason
        with pytest.raises(UnsupportedFormat, match=name):
            group.open(name)
    assert group.logical_volume("root").unreadable_reason is None  # the snapshot's origin reads as it is


@needs_lvm
def test_missing_pv_is_named_by_its_uuid(two_disks: TwoDisks) -> None:
    scan = find_volume_groups(two_disks.areas(data=False))  # type: ignore[arg-type]
    assert scan.problems == []
    (group,) = scan.volume_groups
    (data_pv,) = two_disks.tools.report("pvs", "pv_uuid", two_disks.data_pv)
    (missing,) = group.missing
    assert missing.uuid == data_pv["pv_uuid"]
    assert missing.device == two_disks.data_pv
    assert data_pv["pv_uuid"] in missing.message
    assert "stripes" in missing.logical_volumes
    stripes = group.logical_volume("stripes")
    assert stripes is not None and data_pv["pv_uuid"] in (stripes.unreadable_reason or "")
    with pytest.raises(UnsupportedFormat, match=data_pv["pv_uuid"]):
        group.open("stripes")
    assert_reads_tree(group.open("root"), two_disks.trees["root"])  # wholly on the system disk
    assert_reads_tree(group.open("mirrored"), two_disks.trees["mirrored"])  # its first leg is there


@needs_lvm
def test_metadata_wrapping_round_the_circular_buffer(lvm_tools: LoopLvm, tmp_path: Path) -> None:
    image = blank(tmp_path / "pv.img", 32 * MiB)
    device = lvm_tools.attach(image)
    vg = unique_vg("wrap")
    lvm_tools("pvcreate", "-q", "--metadatasize", "32k", "--dataalignment", "64k", device)  # a 60 KiB area
    lvm_tools("vgcreate", "-q", vg, device)
    for number in range(200):  # each change writes a new copy after the last one
        lvm_tools("vgchange", "-q", "--addtag", f"tag{number:03d}-" + "x" * 60, vg)
        dump = lvm_tools.headers(device)
        if int(dump["mda_header_1.raw_locn[0].offset"]) + int(dump["mda_header_1.raw_locn[0].size"]) > int(
                dump["mda_header_1.size"]):
            break
    else:
        pytest.fail("the metadata never wrapped")
    start = int(dump["mda_header_1.start"])
    header = parse_mda_header(read_at(image, start, 512))
    ranges = metadata_text_ranges(header)
    assert ranges is not None and len(ranges) == 2 and ranges[1][0] == 512
    text = b"".join(read_at(image, start + offset, size) for offset, size in ranges)
    (report,) = lvm_tools.report("vgs", "vg_seqno,vg_tags", vg)
    (section,) = parse_config(text).sections.values()
    assert section.values["tags"] == report["vg_tags"].split(",") and len(report["vg_tags"].split(",")) == number + 1
    group = assemble([(FileDisk(image), 0, 32 * MiB)], vg)
    assert group.metadata.seqno == int(report["vg_seqno"])


@needs_lvm
def test_a_damaged_metadata_area_leaves_the_second_copy(lvm_tools: LoopLvm, tmp_path: Path) -> None:
    image = blank(tmp_path / "pv.img", 32 * MiB)
    device = lvm_tools.attach(image)
    vg = unique_vg("copies")
    lvm_tools("pvcreate", "-q", "--pvmetadatacopies", "2", device)
    lvm_tools("vgcreate", "-q", vg, device)
    lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", "2", "-n", "lv", vg)
    dump = lvm_tools.headers(device)
    assert "mda_header_2.start" in dump
    write_at(image, int(dump["mda_header_1.start"]) + 100, b"\xee")
    scan = find_volume_groups([(FileDisk(image), 0, 32 * MiB)])
    (problem,) = scan.problems
    assert "checksum" in problem.message and problem.offset == int(dump["mda_header_1.start"])
    (group,) = scan.volume_groups
    (report,) = lvm_tools.report("lvs", "lv_name,lv_size", vg)
    assert group.open("lv").size == int(report["lv_size"])


# -- the shared corpus ------------------------------------------------------------------------------------------


def test_corpus_lvm_image_reads_as_its_manifest_says() -> None:
    corpus = corpus_dir()
    if corpus is None or not (corpus / "dfvfs/lvm.qcow2").is_file():
        pytest.skip("the shared corpus (dfvfs/lvm.qcow2) is not here")
    (entry,) = [item for item in json.loads((corpus / "manifest.json").read_text())["guest_data"]
                if item["file"] == "dfvfs/lvm.qcow2"]
    facts = re.search(r"VG (\S+) \(extent_size (\d+) sectors, pe_start (\d+) sectors, pe_count (\d+)\), "
                      r"LV (\S+) \(1 linear segment, pv0 extent 0\) holding an (\S+) file system \(files (.*)\)",
                      entry["kind"])
    assert facts is not None
    reader = open_image(corpus / "dfvfs/lvm.qcow2")
    scan = find_volume_groups([(reader, 0, reader.virtual_size)])
    assert scan.problems == []
    (group,) = scan.volume_groups
    (pv,) = group.metadata.physical_volumes.values()
    (lv,) = group.logical_volumes
    assert (group.name, group.metadata.extent_size, pv.pe_start, pv.pe_count, lv.name) == (
        facts[1], int(facts[2]), int(facts[3]), int(facts[4]), facts[5])
    assert lv.kind == "linear" and lv.size == pv.pe_count * group.metadata.extent_bytes
    ((area,),) = [segment.areas for segment in group.metadata.logical_volumes[lv.name].segments]
    assert (area.name, area.extent) == ("pv0", 0)
    fs = open_filesystem(group.open(lv.name), 0, lv.size)
    assert fs is not None and fs.type == facts[6]
    files = {path.lstrip("/") for path, stat in fs.walk("/") if not stat.is_dir}
    assert files == set(facts[7].split(", "))


# -- hostile metadata -------------------------------------------------------------------------------------------

REAL_TEXT = b"""# Generated by LVM2 version 2.03.16(2) (2022-05-18): Mon Dec  7 02:15:42 2026

contents = "Text Format Volume Group"
version = 1

description = "vgcfgbackup -f vgx.txt vgx"

creation_host = "vm"\t# Linux vm 6.18.44 #1 SMP PREEMPT_DYNAMIC @0 x86_64
creation_time = 1796609742\t# Mon Dec  7 02:15:42 2026

vgx {
\tid = "SMzG8a-MolE-Hulm-R12K-vspm-Aeq0-g8cvWR"
\tseqno = 6
\tformat = "lvm2"\t\t\t# informational
\tstatus = ["RESIZEABLE", "READ", "WRITE"]
\tflags = []
\textent_size = 8192\t\t# 4 Megabytes
\tmax_lv = 0
\tmax_pv = 0
\tmetadata_copies = 0

\tphysical_volumes {

\t\tpv0 {
\t\t\tid = "z3ZViY-ReFn-5llL-Tu4C-hljI-li1I-kRDDwa"
\t\t\tdevice = "/dev/loop0"\t# Hint only

\t\t\tstatus = ["ALLOCATABLE"]
\t\t\tflags = []
\t\t\tdev_size = 131072\t# 64 Megabytes
\t\t\tpe_start = 2048
\t\t\tpe_count = 15\t# 60 Megabytes
\t\t}

\t\tpv1 {
\t\t\tid = "PBGxMj-0BgW-y7lr-GWnT-suD2-115l-xuXO3x"
\t\t\tdevice = "/dev/loop1"\t# Hint only

\t\t\tstatus = ["ALLOCATABLE"]
\t\t\tflags = []
\t\t\tdev_size = 131072\t# 64 Megabytes
\t\t\tpe_start = 2048
\t\t\tpe_count = 15\t# 60 Megabytes
\t\t}
\t}

\tlogical_volumes {

\t\tlv1 {
\t\t\tid = "qadXOg-fZWG-fITT-2PTD-1MqS-y5lA-lHnIjs"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tcreation_time = 1796609736\t# 2026-12-07 02:15:36 +0000
\t\t\tcreation_host = "vm"
\t\t\tsegment_count = 1

\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 2\t# 8 Megabytes

\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1\t# linear

\t\t\t\tstripes = [
\t\t\t\t\t"pv0", 0
\t\t\t\t]
\t\t\t}
\t\t}

\t\tst {
\t\t\tid = "edmen1-B4Qv-xDMx-TAvv-iLHi-wMlq-27rpww"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tcreation_time = 1796609740\t# 2026-12-07 02:15:40 +0000
\t\t\tcreation_host = "vm"
\t\t\tsegment_count = 1

\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 4\t# 16 Megabytes

\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 2
\t\t\t\tstripe_size = 128\t# 64 Kilobytes

\t\t\t\tstripes = [
\t\t\t\t\t"pv0", 2,
\t\t\t\t\t"pv1", 0
\t\t\t\t]
\t\t\t}
\t\t}
\t}

}
"""
"""vgcfgbackup's output for a volume group with a linear and a striped LV over two PVs (LVM2 2.03.16)."""


def test_real_metadata_text_parses() -> None:
    vg = parse_metadata(REAL_TEXT)
    assert (vg.name, vg.seqno, vg.extent_size) == ("vgx", 6, 8192)
    assert [(pv.key, pv.pe_start, pv.pe_count) for pv in vg.physical_volumes.values()] == [("pv0", 2048, 15),
                                                                                           ("pv1", 2048, 15)]
    striped = vg.logical_volumes["st"].segments[0]
    assert (striped.stripe_count, striped.stripe_size, [(a.name, a.extent) for a in striped.areas]) == (
        2, 128, [("pv0", 2), ("pv1", 0)])


def _broken(old: bytes, new: bytes) -> bytes:
    assert REAL_TEXT.count(old) >= 1, old
    return REAL_TEXT.replace(old, new, 1)


@pytest.mark.parametrize("text, message", [
    (_broken(b"extent_count = 2\t#", b"extent_count = 99999999999999999999999999\t#"), "digits"),
    (_broken(b"extent_count = 2\t#", b"extent_count = 4294967296\t#"), "extent_count"),
    (_broken(b'"pv0", 0\n', b'"pv0", 14\n'), "extents 14-15 of pv0, which has 15"),
    (_broken(b"pe_count = 15", b"pe_count = -1"), "pe_count"),
    (_broken(b'"pv0", 0\n', b'"lv1", 0\n'), "stacked on itself"),
    (_broken(b'"pv0", 0\n', b'"nowhere", 0\n'), "neither a PV nor an LV"),
    (_broken(b"extent_size = 8192", b"extent_size = 0"), "extent_size"),
    (_broken(b"segment_count = 1", b"segment_count = 2"), "segment_count"),
    (_broken(b"start_extent = 0", b"start_extent = 1"), "expected"),
    (_broken(b"stripe_count = 2", b"stripe_count = 3"), "stripes"),
    (_broken(b'"pv1", 0\n', b""), "pairs"),
    (_broken(b"\tmax_pv = 0", b"\tmax_pv = 0\n\tmax_pv = 1"), "twice"),
    (REAL_TEXT + b'x = "open', "not closed"),
    (_broken(b"flags = []", b"flags = [[]]"), "value expected"),
    (_broken(b"}\n", b""), "not closed"),
    (REAL_TEXT + b"}\n", "closes no section"),
    (_broken(b"version = 1", b"version = 2"), "version"),
    (b"contents = \"Text Format Volume Group\"\nversion = 1\n" + b"a {" * 40 + b"}" * 40, "deeper"),
    (b"x = [" + b"1," * (lvm.MAX_CONFIG_NODES + 1) + b"]", "more than"),
    (b"x" * (lvm.MAX_METADATA_TEXT + 1), "more than"),
    (_broken(b"seqno = 6", b"seqno = 1e9"), "not a number"),
])
def test_hostile_metadata_text_is_corrupt(text: bytes, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(CorruptImage, match=message):
        parse_metadata(text)
    assert time.monotonic() - started < 10


def test_a_cycle_between_two_lvs_is_corrupt() -> None:
    text = _broken(b'"pv0", 0\n', b'"st", 0\n').replace(b'"pv0", 2,', b'"lv1", 0,')
    with pytest.raises(CorruptImage, match="stacked on itself"):
        parse_metadata(text)


def test_extents_past_the_disk_make_the_lv_unreadable() -> None:
    size = 4 * MiB  # lv1's extents 0-1 of pv0 start at 1 MiB and end at 9 MiB
    (group,) = find_volume_groups([(SparseDisk(pv_image(ON_DISK_TEXT), size), 0, size)]).volume_groups
    lv = group.logical_volume("lv1")
    assert lv is not None and "end at byte 9437184" in (lv.unreadable_reason or "")


# -- a PV written by hand around the real text, for the fuzzer -------------------------------------------------

#: the text as LVM2 writes it in a metadata area: the volume group first, the description after, a NUL at the end
_PREAMBLE, _, _VG_SECTION = REAL_TEXT.partition(b"\nvgx {")
ON_DISK_TEXT = b"vgx {" + _VG_SECTION + _PREAMBLE + b"\n\0"
PV_UUID = b"z3ZViYReFn5llLTu4ChljIli1IkRDDwa"


def pv_image(text: bytes, size: int = 64 * MiB) -> bytearray:
    """The first MiB of a PV laid out as pvcreate lays it out (the label in sector 1, one metadata area at
    4 KiB, data from 1 MiB), holding ``text`` as its committed metadata, every checksum right."""
    image = bytearray(1 * MiB)
    label = bytearray(512)
    struct.pack_into("<8sQII8s", label, 0, b"LABELONE", 1, 0, 32, b"LVM2 001")
    struct.pack_into("<32sQQQQQQQQQ", label, 32, PV_UUID, size, 1 * MiB, 0, 0, 0, 4096, 1 * MiB - 4096, 0, 0)
    struct.pack_into("<I", label, 16, lvm_crc(bytes(label[20:])))
    image[512:1024] = label
    header = bytearray(512)
    struct.pack_into("<16sIQQ", header, 4, lvm.FMTT_MAGIC, 1, 4096, 1 * MiB - 4096)
    struct.pack_into("<QQII", header, 40, 512, len(text), lvm_crc(text), 0)
    struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
    image[4096:4608] = header
    image[4608 : 4608 + len(text)] = text
    return image


class SparseDisk:
    """``head`` then zeros up to ``size``, read as a disk is read."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size = bytes(head), size

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = self.head[offset : offset + length]
        return data + bytes(length - len(data))


@needs_lvm
def test_the_fuzzers_seed_is_a_pv_lvm_reads(lvm_tools: LoopLvm, tmp_path: Path) -> None:
    """The hand-made PV is one LVM2 itself reads (so the fuzzing starts from structures LVM accepts)."""
    image = tmp_path / "pv.img"
    image.write_bytes(pv_image(ON_DISK_TEXT))
    os.truncate(image, 64 * MiB)
    device = lvm_tools.attach(image)
    assert "metadata area: offset=4096" in lvm_tools("pvck", device) + lvm_tools("pvck", "-v", device)
    (pv,) = lvm_tools.report("pvs", "pv_uuid,vg_name,vg_uuid", device)
    assert (pv["pv_uuid"].replace("-", ""), pv["vg_name"]) == (PV_UUID.decode(), "vgx")
    (group,) = find_volume_groups([(FileDisk(image), 0, 64 * MiB)]).volume_groups
    assert group.uuid == pv["vg_uuid"]


def _mutated(data: st.DataObject, text: bytes) -> bytes:
    mutable = bytearray(text)
    for _ in range(data.draw(st.integers(0, 3))):  # a number replaced by an edge value
        numbers = [found.span() for found in _NUMBER.finditer(bytes(mutable))]
        if numbers:
            start, end = data.draw(st.sampled_from(numbers))
            mutable[start:end] = str(data.draw(st.one_of(st.sampled_from(_EDGES), st.integers(0, 2**64)))).encode()
    for _ in range(data.draw(st.integers(0, 4))):  # a byte changed, deleted or inserted
        position = data.draw(st.integers(0, len(mutable) - 1))
        byte = data.draw(st.sampled_from(list(b'{}[]=,"#\\\n 09aZ-+.\x00\xff')))
        action = data.draw(st.sampled_from(["change", "delete", "insert"]))
        if action == "change":
            mutable[position] = byte
        elif action == "delete":
            del mutable[position]
        else:
            mutable.insert(position, byte)
    return bytes(mutable)


_EDGES = [0, 1, 2, 14, 15, 16, 127, 128, 511, 512, 2048, 8192, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
_NUMBER = re.compile(rb"(?<== )-?[0-9]+|(?<=\", )[0-9]+")


@settings(deadline=None, max_examples=300)
@given(data=st.data())
def test_fuzz_headers_and_text_only_corrupt_image(data: st.DataObject) -> None:
    text = _mutated(data, ON_DISK_TEXT)
    image = pv_image(text)
    for _ in range(data.draw(st.integers(0, 4))):  # the label and the metadata area header
        position = data.draw(st.sampled_from([*range(512, 700), *range(4096, 4200)]))
        image[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # checksums made right again, so the parsers see the damaged values
        struct.pack_into("<I", image, 512 + 16, lvm_crc(bytes(image[512 + 20 : 1024])))
        struct.pack_into("<I", image, 4096 + 56, lvm_crc(text))
        struct.pack_into("<I", image, 4096, lvm_crc(bytes(image[4096 + 4 : 4608])))
    size = data.draw(st.sampled_from([64 * MiB, 3 * MiB, 1 * MiB, 2048, 700]))
    disk = SparseDisk(bytes(image[:size]), size)
    started = time.monotonic()
    try:
        parse_metadata(text)
    except CorruptImage:
        pass
    scan = find_volume_groups([(disk, 0, size), (disk, 0, size)])
    for group in scan.volume_groups:
        for lv in group.logical_volumes:
            if lv.unreadable_reason is None:
                volume = group.open(lv.name)
                assert len(volume.read_at(0, 4096)) == min(4096, volume.size)
                volume.read_at(max(0, volume.size - 70000), 140000)
    assert time.monotonic() - started < 5


def test_config_syntax_as_libdm_reads_it() -> None:
    """libdm's configuration syntax (libdm-config.c): comments, escapes in double quotes, none in single quotes,
    integers and floats only in value position, bare strings, optional commas in lists, a NUL ends the text."""
    text = (b'# a comment\nsection { key = "a \\"quoted\\" \\\\ word" # trailing\n'
            b"  raw = 'no \\escape'  list = [1, -2 3.5, .5, bare, \"s\"] empty = []\n"
            b"  nested { 42key = +7 } }\ntop = 1\0ignored = {")
    root = parse_config(text)
    assert root.values == {"top": 1}
    section = root.sections["section"]
    assert section.values == {"key": 'a "quoted" \\ word', "raw": "no \\escape",
                              "list": [1, -2, 3.5, 0.5, "bare", "s"], "empty": []}
    assert section.sections["nested"].values == {"42key": 7}


@needs_lvm
def test_a_pv_in_no_volume_group(lvm_tools: LoopLvm, tmp_path: Path) -> None:
    image = blank(tmp_path / "pv.img", 16 * MiB)
    lvm_tools("pvcreate", "-q", lvm_tools.attach(image))
    (report,) = lvm_tools.report("pvs", "pv_uuid,vg_name", *lvm_tools.devices)
    scan = find_volume_groups([(FileDisk(image), 0, 16 * MiB)])
    assert (scan.volume_groups, scan.problems, report["vg_name"]) == ([], [], "")
    (pv,) = scan.physical_volumes
    assert pv.uuid == report["pv_uuid"] and pv.metadata is None
