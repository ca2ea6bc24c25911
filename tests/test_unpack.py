"""``diskimg unpack``: archives made by GNU tar (gnu, oldgnu, posix), bsdtar, xz and ECS-style names,
and export manifests, restored sparse and identical (oracles: the original bytes, qemu-img compare
and check, sha256sum, st_blocks); hostile and damaged archives refused with nothing left behind."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import ArchiveError, OutputError

from .support.digests import content_hash_by_definition
from .support.files import sparse_file
from .support.tools import diskimg_cli, qemu_compare, qemu_img, requires_qemu, run
from .support.units import MiB

SIZE = 12 * MiB
ECS_NAME = "test_m-uf66lzx8rzvh3ht5tbz1_system.raw"


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(7)
    runs = [(0, rng.randbytes(8192)), (3 * MiB + 777, rng.randbytes(MiB)), (SIZE - 4096, rng.randbytes(4096))]
    return sparse_file(tmp_path_factory.mktemp("unpack") / ECS_NAME, SIZE, runs)


def gnu_tar(disk: Path, out: Path, *options: str) -> Path:
    run("tar", *options, "-cf", out, "-C", disk.parent, disk.name)
    return out


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.parametrize("options", [("-Sz", "--format=gnu"), ("-Sz", "--format=oldgnu"), ("-Sz", "--format=posix"),
                                     ("-S", "--format=posix", "--sparse-version=0.1"), ("--zstd", "--format=gnu")])
def test_gnu_tar_archives_unpack_sparse_and_identical(disk: Path, tmp_path: Path, options: tuple[str, ...]) -> None:
    archive = gnu_tar(disk, tmp_path / f"{ECS_NAME}.tar.gz", *options)
    out = tmp_path / "out"
    proc = diskimg_cli("unpack", archive, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    restored = out / ECS_NAME
    assert result["disks"][0]["output"] == str(restored) and result["disks"][0]["member"] == ECS_NAME
    assert restored.read_bytes() == disk.read_bytes()
    assert allocated(restored) <= allocated(disk) + 64 * 1024  # holes stay holes
    assert files_in(out) == [ECS_NAME]


@requires_qemu
def test_raw_tar_gz_straight_into_qcow2_in_one_pass(disk: Path, tmp_path: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "x.raw.tar.gz", "-Sz", "--format=gnu")
    result = diskimg.unpack(archive, tmp_path / "out", "qcow2")
    (restored,) = result.disks
    assert restored.output == str(tmp_path / "out" / "test_m-uf66lzx8rzvh3ht5tbz1_system.qcow2")
    assert restored.decompression_passes == 1
    qemu_compare(Path(restored.output), "qcow2", disk, "raw")
    assert json.loads(qemu_img("check", "--output=json", restored.output))["check-errors"] == 0
    assert os.path.getsize(restored.output) < 3 * MiB  # the sparse map kept the holes out


def test_bsdtar_and_bare_xz(disk: Path, tmp_path: Path) -> None:
    run("bsdtar", "--format=pax", "--zstd", "-cf", tmp_path / "b.tar.zst", "-C", disk.parent, disk.name)
    run("bash", "-c", f"xz -T2 -c {disk} > {tmp_path}/disk.raw.xz")
    diskimg.unpack(tmp_path / "b.tar.zst", tmp_path / "out")
    diskimg.unpack(tmp_path / "disk.raw.xz", tmp_path / "out")
    assert files_in(tmp_path / "out") == ["disk.raw", ECS_NAME]
    for name in ("disk.raw", ECS_NAME):
        assert (tmp_path / "out" / name).read_bytes() == disk.read_bytes()


def test_existing_output_needs_force(disk: Path, tmp_path: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "x.tar", "-S")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ECS_NAME).write_bytes(b"keep me")
    proc = diskimg_cli("unpack", archive, "--out", tmp_path / "out")
    assert proc.returncode == 4 and b"--force" in proc.stderr
    assert (tmp_path / "out" / ECS_NAME).read_bytes() == b"keep me"
    assert diskimg_cli("unpack", archive, "--out", tmp_path / "out", "--force").returncode == 0
    assert (tmp_path / "out" / ECS_NAME).read_bytes() == disk.read_bytes()


# -- manifests --------------------------------------------------------------------------------------


def manifest_for(tmp_path: Path, disk: Path, archives: list[Path], **changes: object) -> Path:
    """A manifest as the exporter writes it, its hashes from sha256sum and the content hash
    definition; ``changes`` apply to the last disk."""
    entries = []
    for archive in archives:
        entry = {"role": "system", "device": "xvda", "file": archive.name, "size": archive.stat().st_size,
                 "sha256": run("sha256sum", archive).stdout.split()[0].decode(), "member": disk.name,
                 "format": "raw", "virtual_size": SIZE, "content_hash": content_hash_by_definition(disk.read_bytes()),
                 "source": str(disk), "source_format": "raw"}
        entries.append({**entry, **(changes if archive == archives[-1] else {})})
    path = tmp_path / "m.manifest.json"
    path.write_text(json.dumps({"name": "m", "layout": "ecs", "tool": "diskimg", "version": "0", "disks": entries}))
    return path


def test_manifest_hashes_are_checked_in_the_same_pass(disk: Path, tmp_path: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "m_system.raw.tar.gz", "-Sz", "--format=gnu")
    manifest = manifest_for(tmp_path, disk, [archive])
    proc = diskimg_cli("unpack", manifest, "--out", tmp_path / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    (restored,) = json.loads(proc.stdout)["disks"]
    assert restored["verified"] is True and restored["decompression_passes"] == 1
    assert restored["member"] == ECS_NAME  # named after the manifest's archive, not its member
    assert files_in(tmp_path / "out") == ["m_system.raw"]
    assert (tmp_path / "out" / "m_system.raw").read_bytes() == disk.read_bytes()


@pytest.mark.parametrize("damage", ["flipped byte", "content hash", "size", "format"])
def test_manifest_mismatch_is_refused_and_leaves_nothing(disk: Path, tmp_path: Path, damage: str) -> None:
    archive = gnu_tar(disk, tmp_path / "m_system.raw.tar", "-S", "--format=gnu")
    other = gnu_tar(disk, tmp_path / "m_data_xvdb.raw.tar.gz", "-Sz", "--format=gnu")
    changes: dict[str, object] = {}
    if damage == "content hash":
        changes["content_hash"] = content_hash_by_definition(b"other")
    elif damage == "size":
        changes["size"] = 12345
    elif damage == "format":
        changes["format"] = "qcow2"
    manifest = manifest_for(tmp_path, disk, [other, archive], **changes)
    if damage == "flipped byte":
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 1  # inside the member's data: the archive still reads, its hash differs
        archive.write_bytes(bytes(data))
    proc = diskimg_cli("unpack", manifest, "--out", tmp_path / "out")
    assert proc.returncode == 3, proc.stderr
    assert b"manifest" in proc.stderr
    assert files_in(tmp_path / "out") == []  # the first disk, complete and verified, is not kept either


def test_manifest_pointing_outside_its_folder_is_refused(disk: Path, tmp_path: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "a.tar", "-S")
    manifest = manifest_for(tmp_path, disk, [archive], file="../a.tar")
    with pytest.raises(ArchiveError, match="file name beside the manifest"):
        diskimg.unpack(manifest, tmp_path / "out")


def test_manifest_file_linking_out_of_its_folder_is_refused(disk: Path, tmp_path: Path) -> None:
    """A manifest's file that is a symbolic link in its folder to an archive elsewhere is refused by
    unpack and verify alike (as backing files are), one line, exit 3."""
    (tmp_path / "elsewhere").mkdir()
    archive = gnu_tar(disk, tmp_path / "elsewhere" / "m_system.raw.tar", "-S")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / archive.name).symlink_to(archive)
    manifest = manifest_for(folder, disk, [folder / archive.name])
    for command in (("unpack", manifest, "--out", tmp_path / "out"), ("verify", manifest)):
        proc = diskimg_cli(*command)
        assert proc.returncode == 3, proc.stderr
        assert b"symbolic link leading out of the manifest's folder" in proc.stderr
        assert proc.stderr.count(b"\n") == 1
    assert not (tmp_path / "out").exists()
    inside = gnu_tar(disk, folder / "real.tar", "-S")  # a link to a file inside the folder is followed
    (folder / archive.name).unlink()
    (folder / archive.name).symlink_to(inside.name)
    assert diskimg_cli("unpack", manifest_for(folder, disk, [folder / archive.name]), "--out",
                       tmp_path / "out").returncode == 0


def test_missing_out_folder_is_made_nested_and_removed_after_a_failure(disk: Path, tmp_path: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "x.tar", "-S")
    out = tmp_path / "new" / "nested"
    assert diskimg_cli("unpack", archive, "--out", out).returncode == 0
    assert files_in(out) == [ECS_NAME]
    hostile = crafted(tmp_path, [member("../escaped.raw")])
    assert diskimg_cli("unpack", hostile, "--out", tmp_path / "made" / "by" / "run").returncode == 3
    assert files_in(tmp_path / "made") == [] and not (tmp_path / "made").exists()
    assert diskimg_cli("unpack", hostile, "--out", out / "sub").returncode == 3
    assert files_in(out) == [ECS_NAME]  # what existed before the run stays


def test_two_disks_restored_to_one_name_leave_no_temporary(disk: Path, tmp_path: Path) -> None:
    """Two archives whose disks would land on the same file (and one archive listed twice): refused,
    with no .part file left in the output folder."""
    plain = gnu_tar(disk, tmp_path / "m_system.raw.tar", "-S")
    gzipped = gnu_tar(disk, tmp_path / "m_system.raw.tar.gz", "-Sz")
    out = tmp_path / "out"
    out.mkdir()
    proc = diskimg_cli("unpack", manifest_for(tmp_path, disk, [plain, gzipped]), "--out", out)
    assert proc.returncode == 3 and b"same file" in proc.stderr, proc.stderr
    assert [p.name for p in out.iterdir()] == []
    proc = diskimg_cli("unpack", manifest_for(tmp_path, disk, [plain, plain]), "--out", out)
    assert proc.returncode == 3 and b"more than once" in proc.stderr, proc.stderr
    assert [p.name for p in out.iterdir()] == []


def test_disk_full_names_the_output_not_its_temporary(disk: Path, tmp_path: Path, full_disk: Path) -> None:
    archive = gnu_tar(disk, tmp_path / "x.tar.gz", "-Sz")
    out = full_disk / "restored"
    proc = diskimg_cli("unpack", archive, "--out", out, text=True)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == f"diskimg: error: {out / ECS_NAME}: cannot write: No space left on device\n"
    assert list(full_disk.iterdir()) == []  # neither the disk, its temporary nor the folder the run made


@requires_qemu
def test_unpacks_what_export_wrote(disk: Path, tmp_path: Path) -> None:
    export = pytest.importorskip("diskimg.archives.export")
    qcow2 = tmp_path / "sys.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", disk, qcow2)
    (tmp_path / "e").mkdir()
    (tmp_path / "q").mkdir()
    export.export("m", qcow2, [disk], out=tmp_path / "e")
    export.export("q", qcow2, out=tmp_path / "q", output_format="qcow2", archive="tar.zst")
    raw = diskimg.unpack(tmp_path / "e" / "m.manifest.json", tmp_path / "out")
    assert [Path(d.output).name for d in raw.disks] == ["m_system.raw", "m_data_xvdb.raw"]
    assert all(d.verified for d in raw.disks)
    for restored in raw.disks:
        assert Path(restored.output).read_bytes() == disk.read_bytes()
    member = diskimg.unpack(tmp_path / "q" / "q.manifest.json", tmp_path / "out")
    extracted = run("tar", "--zstd", "-xOf", tmp_path / "q" / "q_system.qcow2.tar.zst").stdout
    assert Path(member.disks[0].output).read_bytes() == extracted  # a qcow2 member is restored byte for byte
    converted = diskimg.unpack(tmp_path / "q" / "q.manifest.json", tmp_path / "out", "vhd")
    qemu_compare(Path(converted.disks[0].output), "vpc", disk, "raw")
    as_vdi = diskimg.unpack(tmp_path / "q" / "q.manifest.json", tmp_path / "out", "vdi")
    qemu_compare(Path(as_vdi.disks[0].output), "vdi", disk, "raw")
    run("qemu-img", "check", "-f", "vdi", as_vdi.disks[0].output)
    (tmp_path / "v").mkdir()
    export.export("v", qcow2, out=tmp_path / "v", output_format="vdi", archive="tar.gz")  # ECS ExportImage's vdi
    from_vdi = diskimg.unpack(tmp_path / "v" / "v.manifest.json", tmp_path / "out", "qcow2")
    qemu_compare(Path(from_vdi.disks[0].output), "qcow2", disk, "raw")
    converted = diskimg.unpack(tmp_path / "q" / "q.manifest.json", tmp_path / "out", "vhdx")
    run("qemu-img", "check", "-f", "vhdx", converted.disks[0].output)
    qemu_compare(Path(converted.disks[0].output), "vhdx", disk, "raw")
    (tmp_path / "g").mkdir()
    export.export("g", qcow2, [disk], out=tmp_path / "g", layout="gce")  # every member is disk.raw
    gce = diskimg.unpack(tmp_path / "g" / "g.manifest.json", tmp_path / "out")
    assert [Path(d.output).name for d in gce.disks] == ["g_system.raw", "g_data_xvdb.raw"]
    for restored in gce.disks:  # rounded up to whole GiB by the export, the tail zeros
        qemu_compare(Path(restored.output), "raw", disk, "raw")
        assert restored.virtual_size == 1 << 30


# -- hostile and damaged archives -------------------------------------------------------------------


def crafted(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], compress: bool = True) -> Path:
    """An archive written by Python's tarfile (an independent producer) with chosen headers."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    path = tmp_path / ("hostile.tar.gz" if compress else "hostile.tar")
    if compress:
        import gzip

        path.write_bytes(gzip.compress(buffer.getvalue()))
    else:
        path.write_bytes(buffer.getvalue())
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4096, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    return info, bytes(info.size)


HOSTILE = {
    "path traversal": ([member("../../escaped.raw")], "climbs out"),
    "traversal inside": ([member("d/../../escaped.raw")], "climbs out"),
    "absolute name": ([member("/tmp/escaped.raw")], "absolute"),
    "symlink": ([member("disk.raw", tarfile.SYMTYPE, linkname="/etc/shadow")], "symlink"),
    "hardlink": ([member("disk.raw"), member("other.raw", tarfile.LNKTYPE, linkname="disk.raw")], "hardlink"),
    "character device": ([member("disk.raw", tarfile.CHRTYPE)], "character"),
    "block device": ([member("disk.raw", tarfile.BLKTYPE)], "block"),
    "two disks": ([member("a.raw"), member("b.raw")], "more than one disk"),
    "member named '.'": ([member(".")], "no file name"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_with_nothing_written(tmp_path: Path, case: str) -> None:
    members, message = HOSTILE[case]
    archive = crafted(tmp_path, members)
    out = tmp_path / "out"
    proc = diskimg_cli("unpack", archive, "--out", out)
    assert proc.returncode == 3, proc.stderr
    assert message.encode() in proc.stderr and proc.stderr.count(b"\n") == 1  # one clear line
    assert files_in(out) == []
    assert not (tmp_path / "escaped.raw").exists() and not Path("/tmp/escaped.raw").exists()
    with pytest.raises(ArchiveError):
        diskimg.unpack(archive, out)


def test_oversized_member_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A header declaring 65 TiB (base-256 size field) with no data behind it: refused by the cap,
    not by running out of data after writing a huge sparse file."""
    info = tarfile.TarInfo("huge.raw")
    info.size = 65 << 40
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    path = tmp_path / "huge.tar"
    path.write_bytes(header + bytes(4096))
    proc = diskimg_cli("unpack", path, "--out", tmp_path / "out")
    assert proc.returncode == 3 and b"TiB" in proc.stderr
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("damage", ["truncated tar", "truncated gzip", "corrupt gzip"])
def test_damaged_archives_leave_no_partial_file(disk: Path, tmp_path: Path, damage: str) -> None:
    plain = gnu_tar(disk, tmp_path / "d.tar", "-S", "--format=gnu")
    if damage == "truncated tar":
        # a whole, valid gzip stream of a tar cut inside its member's data
        data = run("gzip", "-c", "-", input=plain.read_bytes()[: MiB // 2 + 7]).stdout
    else:
        data = bytearray(run("gzip", "-c", plain).stdout)
        if damage == "truncated gzip":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
    archive = tmp_path / "d.tar.gz"
    archive.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = diskimg_cli("unpack", archive, "--out", out, "-O", "qcow2")
    assert proc.returncode == 3, proc.stderr
    assert files_in(out) == []  # no partial output, no temporary left behind
    with pytest.raises(ArchiveError):
        diskimg.unpack(archive, out)


def test_unsafe_output_name_never_escapes(disk: Path, tmp_path: Path) -> None:
    """Members in subdirectories are restored by their base name, inside the output directory."""
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    os.link(disk, tmp_path / "sub" / "dir" / "nested.raw")
    run("tar", "-Scf", tmp_path / "n.tar", "-C", tmp_path, "sub")  # directories, then the file
    result = diskimg.unpack(tmp_path / "n.tar", tmp_path / "out")
    assert files_in(tmp_path / "out") == ["nested.raw"] and result.disks[0].member == "sub/dir/nested.raw"
    with pytest.raises(OutputError):
        diskimg.unpack(tmp_path / "n.tar", tmp_path / "out")
