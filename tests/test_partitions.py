"""Partition tables (diskimg.inspection.partitions) and file-system superblocks (diskimg.inspection.signatures).

Disks are made the way users make them: sfdisk / sgdisk / fdisk on files, mkfs.* on partition-sized
sparse files copied in with ``dd conv=notrunc,sparse``, ESPs populated with mtools. LVM PV labels
and LUKS headers are written from their published on-disk descriptions. The builders are in
tests/support/disks.py, shared with test_validate.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.errors import DiskImageError
from diskimg.inspection.fs import open_filesystem
from diskimg.inspection.fs.fat import find_efi_loaders
from diskimg.inspection.partitions import (
    GUID_BIOS_BOOT,
    GUID_ESP,
    GUID_LINUX_FS,
    identify_boot_code,
    parse_gpt_header,
    parse_mbr,
    read_partition_table,
)
from diskimg.inspection.signatures import probe, probe_boot_sector, probe_bytes

from .support.disks import (
    BytesDisk,
    FileDisk,
    gpt_4k,
    luks1_header,
    luks2_header,
    lvm_pv_label,
    make_esp,
    sfdisk,
    sgdisk,
)
from .support.files import blank, read_at, sparse_copy, write_at
from .support.tools import run
from .support.units import MiB

needs = {tool: shutil.which(tool) is not None for tool in
         ("sfdisk", "sgdisk", "fdisk", "mkfs.ext4", "mkfs.xfs", "mkfs.fat", "mcopy", "mkswap", "mkfs.btrfs",
          "mkntfs", "mkfs.exfat", "blkid")}


def requires(*tools: str):
    missing = [t for t in tools if not needs.get(t, shutil.which(t) is not None)]
    return pytest.mark.skipif(bool(missing), reason=f"missing {', '.join(missing)}")


# -- MBR ------------------------------------------------------------------------------------------


@requires("sfdisk")
def test_mbr_primary_and_logical_partitions(tmp_path):
    disk = blank(tmp_path / "mbr.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,8192,83,*\n,16384,82\n,,5\n,4096,83\n,,8e\n")
    table = read_partition_table(FileDisk(disk))
    assert table.scheme == "mbr"
    assert not table.issues
    assert [(p.number, p.type, p.kind, p.logical) for p in table.partitions] == [
        (1, "0x83", "linux", False), (2, "0x82", "swap", False), (5, "0x83", "linux", True), (6, "0x8e", "lvm", True)]
    assert table.partitions[0].bootable and table.partitions[0].start == 2048 * 512
    assert table.extended is not None and table.extended.number == 3
    # the logical partitions lie inside the extended one
    for part in table.partitions[2:]:
        assert table.extended.first_lba < part.first_lba and part.last_lba <= table.extended.last_lba


@requires("sfdisk")
def test_mbr_partition_past_the_end_of_a_truncated_disk(tmp_path):
    disk = blank(tmp_path / "cut.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,,83\n")
    with open(disk, "r+b") as f:
        f.truncate(40 * MiB)
    table = read_partition_table(FileDisk(disk))
    issue = next(i for i in table.issues if i.code == "partition-out-of-bounds")
    assert issue.evidence["partition"] == 1 and issue.evidence["end"] == 64 * MiB
    assert issue.evidence["disk_size"] == 40 * MiB


@requires("sfdisk")
def test_mbr_overlapping_partitions(tmp_path):
    disk = blank(tmp_path / "overlap.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,40960,83\n43008,20480,83\n")
    # move partition 2 back so that it starts inside partition 1 (sfdisk itself refuses overlaps)
    write_at(disk, 446 + 16 + 8, struct.pack("<I", 30000))
    table = read_partition_table(FileDisk(disk))
    issue = next(i for i in table.issues if i.code == "partition-overlap")
    assert issue.evidence["partition"] == [1, 2]
    assert issue.evidence["overlap_bytes"] == (2048 + 40960 - 30000) * 512


@requires("sfdisk")
def test_ebr_chain_loop_is_stopped(tmp_path):
    disk = blank(tmp_path / "loop.raw", 64 * MiB)
    sfdisk(disk, "label: dos\n2048,,5\n,8192,83\n,8192,83\n")
    table = read_partition_table(FileDisk(disk))
    assert [p.number for p in table.partitions] == [5, 6]
    first_ebr = table.extended.first_lba * 512
    second_ebr = first_ebr + parse_mbr(read_at(disk, first_ebr, 512)).entries[1].start_lba * 512
    # the second EBR's link (entry 2, relative to the extended partition) now points at itself
    link = bytearray(16)
    link[4] = 0x05
    struct.pack_into("<II", link, 8, (second_ebr - first_ebr) // 512, 8192)
    write_at(disk, second_ebr + 446 + 16, bytes(link))
    table = read_partition_table(FileDisk(disk))
    issue = next(i for i in table.issues if i.code == "mbr-ebr-loop")
    assert issue.evidence["lba"] == second_ebr // 512
    assert [p.number for p in table.partitions] == [5, 6]


def test_bare_file_system_boot_sector_is_not_an_mbr(tmp_path):
    if not needs["mkfs.fat"]:
        pytest.skip("mkfs.fat missing")
    image = blank(tmp_path / "fat.img", 32 * MiB)
    run("mkfs.fat", "-F", "16", image)
    assert read_at(image, 510, 2) == b"\x55\xaa"
    table = read_partition_table(FileDisk(image))
    assert table.scheme is None and not table.partitions
    assert probe_boot_sector(read_at(image, 0, 4096)).type == "fat16"


@pytest.mark.parametrize("path, expected", [
    ("/usr/lib/syslinux/mbr/mbr.bin", "syslinux"),  # also says "Missing operating system", as Windows' does
    ("/usr/lib/syslinux/mbr/gptmbr.bin", "syslinux"),
    ("/usr/lib/grub/i386-pc/boot.img", "grub"),
])
def test_mbr_boot_code_identified_by_its_own_markers(path, expected):
    """Boot code as its package ships it (syslinux-common, grub-pc-bin), dd'ed into sector 0."""
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed (packages syslinux-common, grub-pc-bin)")
    assert identify_boot_code(Path(path).read_bytes()[:440]) == expected


def test_parse_mbr_needs_a_sector():
    with pytest.raises(DiskImageError):
        parse_mbr(b"\0" * 100)


# -- GPT --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_template(tmp_path_factory):
    if not needs["sgdisk"]:
        pytest.skip("sgdisk missing")
    disk = blank(tmp_path_factory.mktemp("gpt") / "gpt.raw", 64 * MiB)
    sgdisk(disk, "-n1:2048:+1M", "-t1:ef02", "-n2:0:+20M", "-t2:ef00", "-c2:EFI system", "-n3:0:0", "-t3:8300",
           "-A3:set:2")
    return disk


@pytest.fixture()
def gpt_disk(gpt_template, tmp_path):
    return sparse_copy(gpt_template, tmp_path / "gpt.raw")


def test_gpt_partitions_and_crcs(gpt_disk):
    table = read_partition_table(FileDisk(gpt_disk))
    assert table.scheme == "gpt" and table.gpt_source == "primary" and not table.issues
    assert [p.type for p in table.partitions] == [GUID_BIOS_BOOT, GUID_ESP, GUID_LINUX_FS]
    assert [p.kind for p in table.partitions] == ["bios_boot", "esp", "linux"]
    assert table.partitions[1].name == "EFI system"
    assert table.partitions[2].bootable  # attribute bit 2, legacy BIOS bootable
    assert table.partitions[2].last_lba == table.gpt.last_usable_lba
    assert table.mbr.protective_entry is not None and not table.hybrid_mbr
    sgdisk_guid = run("sgdisk", "-p", gpt_disk).stdout.decode().split("Disk identifier (GUID): ")[1].split()[0]
    assert table.disk_guid == sgdisk_guid


def test_gpt_bad_header_crc_falls_back_to_the_backup(gpt_disk):
    write_at(gpt_disk, 512 + 40, struct.pack("<Q", 40))  # first usable LBA changed without fixing the CRC
    table = read_partition_table(FileDisk(gpt_disk))
    issue = next(i for i in table.issues if i.code == "gpt-header-invalid")
    assert issue.evidence["offset"] == 512 and issue.evidence["backup_usable"] is True
    assert table.gpt_source == "backup" and len(table.partitions) == 3


def test_gpt_bad_entry_array_crc(gpt_disk):
    write_at(gpt_disk, 1024 + 128 * 2 + 56, "tampered".encode("utf-16-le"))
    table = read_partition_table(FileDisk(gpt_disk))
    issue = next(i for i in table.issues if i.code == "gpt-entries-crc")
    assert issue.evidence["offset"] == 1024
    assert issue.evidence["value"] != issue.evidence["expected"]


def test_gpt_missing_backup(gpt_disk):
    size = gpt_disk.stat().st_size
    write_at(gpt_disk, size - 512, bytes(512))
    table = read_partition_table(FileDisk(gpt_disk))
    assert [i.code for i in table.issues] == ["gpt-backup-missing"]
    assert table.issues[0].evidence["lba"] == size // 512 - 1


def test_gpt_disk_enlarged_after_partitioning(gpt_disk):
    with open(gpt_disk, "r+b") as f:
        f.truncate(80 * MiB)
    table = read_partition_table(FileDisk(gpt_disk))
    codes = [i.code for i in table.issues]
    assert "gpt-backup-not-at-end" in codes
    issue = table.issues[codes.index("gpt-backup-not-at-end")]
    assert issue.evidence["value"] == 64 * MiB // 512 - 1 and issue.evidence["expected"] == 80 * MiB // 512 - 1
    assert "gpt-backup-missing" not in codes  # the backup is still where the header says


def test_gpt_truncated_disk(gpt_disk):
    with open(gpt_disk, "r+b") as f:
        f.truncate(48 * MiB)
    table = read_partition_table(FileDisk(gpt_disk))
    codes = {i.code for i in table.issues}
    assert {"partition-out-of-bounds", "gpt-backup-missing", "gpt-backup-not-at-end"} <= codes


def test_gpt_without_protective_mbr(gpt_disk):
    write_at(gpt_disk, 0, bytes(512))
    table = read_partition_table(FileDisk(gpt_disk))
    assert table.scheme == "gpt"
    issue = next(i for i in table.issues if i.code == "gpt-protective-mbr-missing")
    assert issue.evidence["offset"] == 0


def test_gpt_partition_over_the_gpt_structures(gpt_disk):
    header = parse_gpt_header(read_at(gpt_disk, 512, 512))
    entries = bytearray(read_at(gpt_disk, 1024, header.num_entries * header.entry_size))
    struct.pack_into("<Q", entries, 32, 10)  # partition 1 now starts at LBA 10, inside the entry array
    write_at(gpt_disk, 1024, bytes(entries))
    block = bytearray(read_at(gpt_disk, 512, 92))
    struct.pack_into("<I", block, 88, zlib.crc32(bytes(entries)))
    struct.pack_into("<I", block, 16, 0)
    struct.pack_into("<I", block, 16, zlib.crc32(bytes(block)))
    write_at(gpt_disk, 512, bytes(block))
    table = read_partition_table(FileDisk(gpt_disk))
    issue = next(i for i in table.issues if i.code == "partition-out-of-bounds")
    assert issue.evidence["partition"] == 1 and issue.evidence["first_lba"] == 10


@requires("fdisk")
def test_gpt_for_4096_byte_sectors(tmp_path):
    disk = tmp_path / "4kn.raw"
    gpt_4k(disk, 64 * MiB)
    table = read_partition_table(FileDisk(disk))
    assert table.scheme == "gpt" and table.sector_size == 4096
    assert [i.code for i in table.issues] == ["gpt-4k-sectors"]
    assert table.partitions[0].start == table.partitions[0].first_lba * 4096


@requires("sfdisk", "sgdisk")
def test_stale_gpt_under_an_mbr(tmp_path):
    disk = blank(tmp_path / "stale.raw", 64 * MiB)
    sgdisk(disk, "-n1:2048:+8M")
    sfdisk(disk, "label: dos\n2048,,83\n")  # sfdisk wipes the GPT signature by default...
    write_at(disk, 512, b"EFI PART")  # ...so leave a stale header behind, as old tools did
    table = read_partition_table(FileDisk(disk))
    assert table.scheme == "mbr"
    assert [i.code for i in table.issues] == ["gpt-stale"]


def test_empty_and_tiny_disks():
    assert read_partition_table(BytesDisk(b"")).scheme is None
    assert read_partition_table(BytesDisk(bytes(100))).scheme is None
    assert read_partition_table(BytesDisk(bytes(1 << 20))).scheme is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096), st.integers(0, 5), st.binary(min_size=16, max_size=16))
def test_partition_table_parsing_never_raises_on_garbage(noise, where, sig):
    """Random bytes around MBR and GPT signatures: a table with issues, never an exception."""
    base = bytearray(64 * 1024)
    base[510:512] = b"\x55\xaa"
    base[446 + 4] = 0xEE
    struct.pack_into("<II", base, 446 + 8, 1, 127)
    base[512:520] = b"EFI PART"
    offset = [0, 446, 512, 1024, 4096, 8192][where]
    base[offset : offset + len(noise)] = noise
    base[600:616] = sig
    table = read_partition_table(BytesDisk(bytes(base)))
    assert table.scheme in (None, "mbr", "gpt")
    for part in table.partitions:
        assert part.size >= 0


# -- file systems ---------------------------------------------------------------------------------


def blkid_value(path: Path, key: str) -> str | None:
    proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", key, str(path)], capture_output=True)
    return proc.stdout.decode().strip() or None


FS_CASES = [
    ("ext4", ["mkfs.ext4", "-q", "-F", "-L", "rootfs"], 64, "ext4", "rootfs"),
    ("ext3", ["mkfs.ext4", "-q", "-F", "-t", "ext3"], 64, "ext3", None),
    ("ext2", ["mkfs.ext4", "-q", "-F", "-t", "ext2"], 64, "ext2", None),
    ("xfs", ["mkfs.xfs", "-q", "-f", "-L", "data"], 300, "xfs", "data"),
    ("xfs-v4", ["mkfs.xfs", "-q", "-f", "-m", "crc=0"], 300, "xfs", None),
    ("fat32", ["mkfs.fat", "-F", "32", "-n", "BOOT"], 64, "fat32", "BOOT"),
    ("fat16", ["mkfs.fat", "-F", "16"], 32, "fat16", None),
    ("fat12", ["mkfs.fat", "-F", "12"], 4, "fat12", None),
    ("swap", ["mkswap", "-L", "swp"], 16, "swap", "swp"),
    ("btrfs", ["mkfs.btrfs", "-q", "-f", "-L", "bt"], 128, "btrfs", "bt"),
    ("ntfs", ["mkntfs", "-Q", "-F", "-q"], 16, "ntfs", None),
    ("exfat", ["mkfs.exfat"], 16, "exfat", None),
]


@pytest.mark.parametrize("name,command,size_mib,expected,label", FS_CASES, ids=[c[0] for c in FS_CASES])
def test_file_system_identified_like_blkid(tmp_path, name, command, size_mib, expected, label):
    if not needs.get(command[0], False) or not needs["blkid"]:
        pytest.skip(f"{command[0]} or blkid missing")
    image = blank(tmp_path / f"{name}.img", size_mib * MiB)
    run(*command, image)
    found = probe(FileDisk(image), 0, image.stat().st_size)
    assert found is not None and found.type == expected
    expected_uuid = blkid_value(image, "UUID")
    if found.uuid is not None or expected_uuid is not None:
        assert (found.uuid or "").lower() == (expected_uuid or "").lower()
    if label:
        assert found.label == label == blkid_value(image, "LABEL")
    if found.size is not None and expected != "ntfs":
        assert 0 < found.size <= size_mib * MiB
    if expected == "xfs":
        assert found.version == ("V4" if name == "xfs-v4" else "V5")
    # diskimg.inspection.disk_start (what detect says a RAW disk starts with) names file systems the same way
    from diskimg.inspection.disk_start import identify_start

    assert identify_start(read_at(image, 0, 128 * 1024)) == found.type


def _tool_fields(command: list, separator: str) -> dict[str, str]:
    """``name<separator>value`` lines a file system's own tool prints, as a dict."""
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(separator) for line in out.splitlines()) if v}


#: (mkfs command, MiB, the tool that reads the superblock back: its block size and block count)
SUPERBLOCK_CASES = {
    "ext4": (["mkfs.ext4", "-q", "-F", "-O", "64bit"], 64, "dumpe2fs"),
    "xfs": (["mkfs.xfs", "-q", "-f"], 300, "xfs_db"),
    "fat32": (["mkfs.fat", "-F", "32"], 64, "minfo"),
    "ntfs": (["mkntfs", "-Q", "-F", "-q"], 16, "ntfsinfo"),
}


def _oracle_geometry(tool: str, image: Path) -> tuple[int, int]:
    """(block or cluster size, blocks or clusters of the volume), as the file system's tool reads them."""
    if tool == "dumpe2fs":
        fields = _tool_fields(["dumpe2fs", "-h", image], ":")
        return int(fields["Block size"]), int(fields["Block count"])
    if tool == "xfs_db":
        fields = _tool_fields(["xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize dblocks", image], "=")
        return int(fields["blocksize"]), int(fields["dblocks"])
    if tool == "minfo":
        fields = _tool_fields(["minfo", "-i", image, "::"], ":")
        sector = int(fields["sector size"].split()[0])
        per_cluster = int(fields["cluster size"].split()[0])
        return sector * per_cluster, int(fields["big size"].split()[0]) // per_cluster
    fields = _tool_fields(["ntfsinfo", "-m", image], ":")
    return int(fields["Cluster Size"]), int(fields["Volume Size in Clusters"])


@pytest.mark.parametrize("kind", SUPERBLOCK_CASES)
def test_probe_and_driver_read_one_superblock(tmp_path, kind):
    """The signature probe and the file system driver read the superblock through one parser
    (superblocks.py): the block size and the volume's blocks both see are what the file system's
    own tool reads (dumpe2fs, xfs_db, mtools' minfo, ntfsinfo)."""
    command, size_mib, tool = SUPERBLOCK_CASES[kind]
    if not needs.get(command[0], False) or not shutil.which(tool):
        pytest.skip(f"{command[0]} or {tool} missing")
    image = blank(tmp_path / f"{kind}.img", size_mib * MiB)
    run(*command, image)
    block_size, blocks = _oracle_geometry(tool, image)
    disk = FileDisk(image)
    found = probe(disk, 0, size_mib * MiB)
    fs = open_filesystem(disk, 0, size_mib * MiB)
    assert found is not None and fs is not None and fs.type == found.type
    assert found.block_size == block_size
    if kind == "ntfs":  # the probe counts the sectors and the backup boot sector after them
        assert (fs.boot.cluster_size, fs.boot.total_sectors * fs.boot.bytes_per_sector // block_size) == (
            block_size, blocks)
        assert found.size == (fs.boot.total_sectors + 1) * fs.boot.bytes_per_sector
        return
    assert found.size == blocks * block_size
    driver = {"ext4": lambda: (fs.sb.block_size, fs.sb.blocks_count),
              "xfs": lambda: (fs.geometry.block_size, fs.geometry.dblocks),
              "fat32": lambda: (fs.bpb.cluster_size, fs.bpb.total_sectors // fs.bpb.sectors_per_cluster)}[kind]
    assert driver() == (block_size, blocks)


@requires("mkfs.ext4")
def test_ext4_features_and_state(tmp_path):
    image = blank(tmp_path / "e.img", 64 * MiB)
    run("mkfs.ext4", "-q", "-F", "-O", "quota,project,64bit", "-I", "256", image)
    fs = probe(FileDisk(image), 0, 64 * MiB)
    assert {"64bit", "quota", "project", "has_journal", "extent"} <= set(fs.features)
    assert fs.state == "clean" and fs.block_size in (1024, 4096) and fs.size == 64 * MiB
    assert 0 < fs.free < fs.size
    # needs_recovery (incompat 0x4), as a crashed or running system leaves it
    sb = bytearray(read_at(image, 1024, 1024))
    struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] | 0x4)
    write_at(image, 1024, bytes(sb))
    assert probe(FileDisk(image), 0, 64 * MiB).state == "needs_recovery"
    struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] & ~0x4)
    struct.pack_into("<H", sb, 0x3A, 0x3)  # valid + errors
    write_at(image, 1024, bytes(sb))
    assert probe(FileDisk(image), 0, 64 * MiB).state == "errors"


def test_lvm2_label_from_the_on_disk_format():
    data = bytearray(64 * 1024)
    data[512:1024] = lvm_pv_label()
    fs = probe_bytes(bytes(data))
    assert fs.type == "lvm2"
    assert fs.uuid == "abcdef-0123-4567-89AB-CDEF-0123-456789"
    assert fs.details == {"label_sector": 1, "label_crc_ok": True} and fs.size == 64 * MiB
    data[600] ^= 0xFF
    assert probe_bytes(bytes(data)).details["label_crc_ok"] is False


def test_luks_headers_from_the_on_disk_format():
    uid = str(uuid.uuid4())
    one = probe_bytes(luks1_header(uid) + bytes(4096))
    assert (one.type, one.version, one.uuid) == ("luks", "1", uid)
    assert one.details["cipher"] == "aes-xts-plain64"
    two = probe_bytes(luks2_header(uid, "cryptroot") + bytes(4096))
    assert (two.type, two.version, two.uuid, two.label) == ("luks", "2", uid, "cryptroot")


@requires("mkfs.fat", "mcopy")
def test_efi_loaders_listed_from_the_fat(tmp_path):
    esp = make_esp(tmp_path / "esp.img", 64 * MiB, {
        "EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(100),
        "EFI/debian/shimx64.efi": b"MZ",
        "EFI/Microsoft/Boot/bootmgfw.efi": b"MZ",
        "EFI/debian/grub.cfg": b"set root",
    })
    loaders = find_efi_loaders(FileDisk(esp), 0, esp.stat().st_size)
    assert sorted(loaders) == ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/shimx64.efi"]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=70000))
def test_superblock_probing_never_raises(data):
    probe_bytes(data)
    probe_boot_sector(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=512, max_size=512), st.binary(min_size=0, max_size=8192))
def test_fat_walk_raises_only_disk_image_errors(boot, rest):
    sector = bytearray(boot)
    sector[11:17] = struct.pack("<HBHB", 512, 1, 1, 2)
    sector[82:90] = b"FAT32   "
    disk = BytesDisk(bytes(sector) + rest + bytes(64 * 1024))
    try:
        find_efi_loaders(disk, 0, disk.virtual_size)
    except DiskImageError:
        pass

