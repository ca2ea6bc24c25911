"""diskimg export and verify, checked with independent tools: sha256sum -c, gzip -t, zstd -t, GNU tar
-xSf (contents equal to qemu-img convert -O raw of each source, sparse), tarfile and bsdtar listings,
xz's CRC-64 of the archive, qemu-img check/compare of qcow2 and VHD members."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .support.digests import content_hash_by_definition, file_sha256
from .support.files import sparse_file
from .support.tools import diskimg_cli, qemu_compare, qemu_img, qemu_io, qemu_raw, requires_qemu, run
from .support.units import GiB, MiB

pytestmark = [requires_qemu, pytest.mark.skipif(
    shutil.which("tar") is None or b"GNU tar" not in subprocess.run(["tar", "--version"], capture_output=True).stdout,
    reason="GNU tar not installed")]

NAME = "test_m-uf66lzx8rzvh3ht5tbz1"


@pytest.fixture(scope="module")
def disk_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A qcow2 system disk, a dynamic VHD data disk and a sparse RAW data disk, made by qemu-img/qemu-io."""
    directory = tmp_path_factory.mktemp("sources")
    system = directory / "system.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", system, "96M")
    qemu_io(system, "qcow2", "write -P 0xab 1M 3M", "write -P 0x00 8M 1M", "write -P 0x5c 50M 300k",
            "write -P 0x11 95M 1M")
    vhd = directory / "data.vhd"
    qemu_img("create", "-q", "-f", "vpc", vhd, "40M")
    qemu_io(vhd, "vpc", "write -P 0x22 0 1M", "write -P 0x33 20M 64k")
    raw = directory / "data.raw"
    with open(raw, "wb") as f:
        f.truncate(30 * MiB + 4096)
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(30 * MiB)
        f.write(b"tail" * 1024)
    return {"system": system, "vhd": vhd, "raw": raw}


def export_cli(out: Path, disk_set: dict[str, Path], *options: object) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    return diskimg_cli("export", "--name", NAME, "--system", disk_set["system"], "--data", disk_set["vhd"],
                       "--data", disk_set["raw"], "--out", out, *options, cwd="/tmp")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, disk_set: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("export")
    proc = export_cli(out, disk_set, "--json", "--progress", "json")
    assert proc.returncode == 0, proc.stderr
    (out / "stdout.json").write_bytes(proc.stdout)
    (out / "stderr.txt").write_bytes(proc.stderr)
    return out


FILES = [f"{NAME}_system.raw.tar.gz", f"{NAME}_data_xvdb.raw.tar.gz", f"{NAME}_data_xvdc.raw.tar.gz"]


def test_files_named_like_ecs_and_sums_accepted_by_sha256sum(exported: Path) -> None:
    names = sorted(p.name for p in exported.iterdir() if p.suffix != ".json" and p.suffix != ".txt")
    assert names == sorted([*FILES, f"{NAME}.SHA256SUMS"])
    assert (exported / f"{NAME}.manifest.json").is_file()
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no temporary left
    checked = subprocess.run(["sha256sum", "-c", f"{NAME}.SHA256SUMS"], cwd=exported, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == 3


def test_archives_pass_gzip_t_and_list_one_member(exported: Path) -> None:
    for file in FILES:
        run("gzip", "-t", exported / file)
        member = file.removesuffix(".tar.gz")
        with tarfile.open(exported / file) as archive:
            assert archive.getnames() == [member]
        listing = run("bsdtar", "-tvf", exported / file).stdout.decode().splitlines()
        assert len(listing) == 1 and listing[0].endswith(" " + member)


def test_gnu_tar_restores_sparse_files_equal_to_qemu_img(exported: Path, disk_set: dict[str, Path],
                                                         tmp_path: Path) -> None:
    sources = [(disk_set["system"], "qcow2"), (disk_set["vhd"], "vpc"), (disk_set["raw"], "raw")]
    for file, (source, fmt) in zip(FILES, sources):
        run("tar", "-xSzf", exported / file, "-C", tmp_path)
        restored = tmp_path / file.removesuffix(".tar.gz")
        oracle = qemu_raw(source, fmt, tmp_path)
        assert file_sha256(restored) == file_sha256(oracle), file
        assert restored.stat().st_size == oracle.stat().st_size
        assert restored.stat().st_blocks * 512 < restored.stat().st_size / 4, f"{file} was not restored sparse"
        oracle.unlink()


def test_manifest_records_hashes_of_what_was_written(exported: Path, disk_set: dict[str, Path],
                                                     tmp_path: Path) -> None:
    manifest = json.loads((exported / f"{NAME}.manifest.json").read_text())
    assert manifest["name"] == NAME and manifest["layout"] == "ecs" and manifest["tool"] == "diskimg"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", manifest["created"])
    disks = manifest["disks"]
    assert [(d["role"], d["device"], d["file"]) for d in disks] == [
        ("system", "xvda", FILES[0]), ("data", "xvdb", FILES[1]), ("data", "xvdc", FILES[2])]
    sources = [(disk_set["system"], "qcow2"), (disk_set["vhd"], "vpc"), (disk_set["raw"], "raw")]
    for disk, (source, fmt) in zip(disks, sources):
        path = exported / disk["file"]
        assert disk["size"] == path.stat().st_size
        assert disk["sha256"] == file_sha256(path)
        assert disk["member"] == disk["file"].removesuffix(".tar.gz") and disk["format"] == "raw"
        assert disk["source"] == str(source) and disk["source_format"] == ("vhd" if fmt == "vpc" else fmt)
        oracle = qemu_raw(source, fmt, tmp_path)
        assert disk["virtual_size"] == oracle.stat().st_size
        assert disk["content_hash"] == content_hash_by_definition(oracle.read_bytes())
        oracle.unlink()
        # xz stores the CRC-64 of what it compresses: the CRC OSS reports (ECMA-182, reflected, ~0)
        xz_file = tmp_path / "archive.xz"
        xz_file.write_bytes(run("xz", "-c", "-0", "--check=crc64", path).stdout)
        listing = run("xz", "-lvv", xz_file).stdout.decode()
        check_value = re.search(r"CRC64\s+([0-9a-f]{16})\s", listing.split("Blocks:")[-1]).group(1)
        assert int(disk["crc64ecma"]) == int(check_value, 16)
    result = json.loads((exported / "stdout.json").read_text())
    assert [d["sha256"] for d in result["disks"]] == [d["sha256"] for d in disks]


def test_progress_json_covers_the_whole_set(exported: Path, disk_set: dict[str, Path]) -> None:
    lines = [json.loads(line) for line in (exported / "stderr.txt").read_text().splitlines() if line.startswith("{")]
    total = sum(json.loads((exported / f"{NAME}.manifest.json").read_text())["disks"][i]["virtual_size"]
                for i in range(3))
    assert {line["phase"] for line in lines} == {"scan", "export"}
    assert all(line["total"] == total for line in lines)
    final = [line for line in lines if line["phase"] == "export"][-1]
    assert final["done"] == total
    assert [line["done"] for line in lines if line["phase"] == "export"] == \
        sorted(line["done"] for line in lines if line["phase"] == "export")


def test_verify_intact_then_catches_a_flipped_byte_and_a_missing_file(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    for deep in ([], ["--deep"]):
        proc = diskimg_cli("verify", copy, *deep, cwd="/tmp")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(diskimg_cli("verify", copy / f"{NAME}.manifest.json", "--deep", "--json", cwd="/tmp").stdout)
    assert result["intact"] and all(f["status"] == "ok" and f["content_checked"] for f in result["files"])
    target = copy / FILES[1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(data)
    (copy / FILES[2]).unlink()
    for deep in ([], ["--deep"]):
        proc = diskimg_cli("verify", copy, *deep, cwd="/tmp", text=True)
        assert proc.returncode == 1
        assert f"{FILES[1]}: DIFFERS" in proc.stdout and f"{FILES[2]}: MISSING" in proc.stdout
        assert f"{FILES[0]}: OK" in proc.stdout


@pytest.mark.parametrize("fmt, archive", [("qcow2", "tar.zst"), ("vhd", "tar"), ("vdi", "tar.gz"), ("vhdx", "tar")])
def test_qcow2_and_vhd_members(tmp_path: Path, disk_set: dict[str, Path], fmt: str, archive: str) -> None:
    out = tmp_path / "out"
    proc = export_cli(out, disk_set, "--format", fmt, "--archive", archive, "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    suffix = f".{fmt}.{archive}"
    files = sorted(out.glob(f"*{suffix}"))
    assert len(files) == 3
    (tmp_path / "x").mkdir()
    sources = {"system": (disk_set["system"], "qcow2"), "xvdb": (disk_set["vhd"], "vpc"),
               "xvdc": (disk_set["raw"], "raw")}
    for file in files:
        if archive == "tar.zst":
            run("zstd", "-q", "-t", file)
        run("tar", "-xf", file, "-C", tmp_path / "x")
        member = tmp_path / "x" / file.name.removesuffix("." + archive)
        if fmt in ("qcow2", "vdi", "vhdx"):
            run("qemu-img", "check", "-f", fmt, member)
        source, source_format = next(v for k, v in sources.items() if f"_{k}." in file.name)
        qemu_compare(source, source_format, member, {"vhd": "vpc"}.get(fmt, fmt))
    verified = diskimg_cli("verify", out, "--deep", "--json", cwd="/tmp")
    assert verified.returncode == 0
    # in a plain tar a qcow2 or VHD member is read in place; in a compressed one only the stream is checked
    assert [f["content_checked"] for f in json.loads(verified.stdout)["files"]] == [archive == "tar"] * 3


def test_gce_layout_rounds_disk_raw_up_to_whole_gib(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = diskimg_cli("export", "--name", "img", "--system", disk_set["system"], "--out", out, "--layout", "gce",
                       "--threads", "1", cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out / "img_system.raw.tar.gz") as archive:
        (info,) = archive.getmembers()
        assert info.name == "disk.raw" and info.size == GiB
    run("tar", "-xSzf", out / "img_system.raw.tar.gz", "-C", tmp_path)
    assert (tmp_path / "disk.raw").stat().st_size == GiB
    qemu_compare(disk_set["system"], "qcow2", tmp_path / "disk.raw", "raw")
    refused = diskimg_cli("export", "--name", "img", "--system", disk_set["system"], "--out", out, "--layout", "gce",
                          "--format", "qcow2", "--force", cwd="/tmp", text=True)
    assert refused.returncode == 2 and "gce" in refused.stderr


def test_bare_files_and_compressed_qcow2(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    out = tmp_path / "out"
    proc = export_cli(out, disk_set, "--archive", "none")
    assert proc.returncode == 0, proc.stderr
    raw = out / f"{NAME}_data_xvdc.raw"
    assert file_sha256(raw) == file_sha256(disk_set["raw"])
    assert raw.stat().st_blocks * 512 < raw.stat().st_size / 4
    out = tmp_path / "compressed"
    out.mkdir()
    proc = diskimg_cli("export", "--name", "c", "--system", disk_set["system"], "--out", out, "--format", "qcow2",
                       "--archive", "none", "-c", cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    checked = run("qemu-img", "check", out / "c_system.qcow2").stdout.decode()
    assert float(re.search(r"([\d.]+)% compressed clusters", checked).group(1)) > 0
    qemu_compare(disk_set["system"], "qcow2", out / "c_system.qcow2", "qcow2")
    assert diskimg_cli("verify", out / "c.manifest.json", "--deep", cwd="/tmp").returncode == 0
    refused = diskimg_cli("export", "--name", "d", "--system", disk_set["system"], "--out", out, "--format", "qcow2",
                          "-c", cwd="/tmp", text=True)
    assert refused.returncode == 2 and "compressed qcow2" in refused.stderr
    assert not list(out.glob("d*"))


def test_a_failing_disk_leaves_none_of_the_outputs(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    broken = tmp_path / "broken.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", broken, "64M")
    qemu_io(broken, "qcow2", "write -P 0x44 0 8M")
    os.truncate(broken, broken.stat().st_size - 4 * MiB)  # the last data clusters are cut off
    out = tmp_path / "out"
    out.mkdir()
    proc = diskimg_cli("export", "--name", "x", "--system", disk_set["system"], "--data", disk_set["raw"],
                       "--data", broken, "--out", out, cwd="/tmp", text=True)
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "broken.qcow2" in proc.stderr
    assert list(out.iterdir()) == []


def test_existing_outputs_need_force(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.SHA256SUMS").write_text("old\n")
    args = ("export", "--name", "x", "--system", disk_set["raw"], "--out", out)
    proc = diskimg_cli(*args, cwd="/tmp", text=True)
    assert proc.returncode == 4 and "--force" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x.SHA256SUMS"]
    assert diskimg_cli(*args, "--force", cwd="/tmp").returncode == 0
    assert "x_system.raw.tar.gz" in (out / "x.SHA256SUMS").read_text()


def test_ecs_limits_are_warnings(tmp_path: Path) -> None:
    disks = []
    for index, size in enumerate(["1M", "1M", "1M", "1M", "501G"]):
        disk = tmp_path / f"d{index}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", disk, size)
        disks += ["--data", disk]
    out = tmp_path / "out"
    out.mkdir()
    proc = diskimg_cli("export", "--name", "w", "--system", tmp_path / "d0.qcow2", *disks, "--out", out,
                       "--archive", "tar.zst", cwd="/tmp", text=True)
    assert proc.returncode == 0, proc.stderr
    assert "at most 4 data disks" in proc.stderr and "501 GiB" in proc.stderr
    listing = run("bash", "-c", f"zstd -dc {out / 'w_data_xvdf.raw.tar.zst'} | tar -tvf -").stdout.decode()
    assert f" {501 * GiB} " in listing


def test_an_exported_archive_is_a_source(exported: Path, disk_set: dict[str, Path], tmp_path: Path) -> None:
    """A .raw.tar.gz (read through the compressed stream, its sparse map as the plan) exported again
    as a qcow2 member holds the original disk."""
    out = tmp_path / "out"
    out.mkdir()
    proc = diskimg_cli("export", "--name", "again", "--system", exported / FILES[0], "--out", out,
                       "--format", "qcow2", "--archive", "tar", cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    run("tar", "-xf", out / "again_system.qcow2.tar", "-C", tmp_path)
    qemu_compare(disk_set["system"], "qcow2", tmp_path / "again_system.qcow2", "qcow2")


def test_verify_refuses_a_manifest_naming_files_outside_its_folder(tmp_path: Path) -> None:
    entry = {"file": "../secret", "size": 1, "sha256": "0" * 64, "format": "raw", "virtual_size": 1}
    (tmp_path / "x.manifest.json").write_text(json.dumps({"disks": [entry]}))
    proc = diskimg_cli("verify", tmp_path, cwd="/tmp", text=True)
    assert proc.returncode == 3 and "file name beside the manifest" in proc.stderr
    (tmp_path / "x.manifest.json").write_text("{not json")
    proc = diskimg_cli("verify", tmp_path / "x.manifest.json", cwd="/tmp", text=True)
    assert proc.returncode == 3 and "cannot read the manifest" in proc.stderr


def truncated_qcow2(path: Path) -> Path:
    """A qcow2 whose last data clusters are cut off: it opens, and reading it fails midway."""
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "qcow2", "write -P 0x44 0 8M")
    os.truncate(path, path.stat().st_size - 4 * MiB)
    return path


def test_out_folder_is_made_nested_and_removed_after_a_failure(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    out = tmp_path / "new" / "nested"
    proc = diskimg_cli("export", "--name", "x", "--system", disk_set["raw"], "--out", out, cwd="/tmp", text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x.SHA256SUMS", "x.manifest.json", "x_system.raw.tar.gz"]
    broken = truncated_qcow2(tmp_path / "broken.qcow2")
    for folder in (tmp_path / "made" / "by" / "run", out / "sub"):
        proc = diskimg_cli("export", "--name", "y", "--system", broken, "--out", folder, cwd="/tmp", text=True)
        assert proc.returncode == 3 and "broken.qcow2" in proc.stderr, proc.stderr
    assert not (tmp_path / "made").exists()
    assert sorted(p.name for p in out.iterdir()) == ["x.SHA256SUMS", "x.manifest.json", "x_system.raw.tar.gz"]


def test_two_exports_share_a_folder(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    """Each export's sums are its own (sha256sum -c accepts both), and verify DIR checks every
    manifest of the folder: exit 0, then 1 naming the damaged file of the second export."""
    out = tmp_path / "out"
    for name, source in (("a", disk_set["raw"]), ("b", disk_set["vhd"])):
        proc = diskimg_cli("export", "--name", name, "--system", source, "--out", out, "--archive", "tar",
                           cwd="/tmp", text=True)
        assert proc.returncode == 0, proc.stderr
    for name in ("a", "b"):
        checked = subprocess.run(["sha256sum", "-c", f"{name}.SHA256SUMS"], cwd=out, capture_output=True, text=True)
        assert checked.returncode == 0 and checked.stdout == f"{name}_system.raw.tar: OK\n", checked.stderr
    proc = diskimg_cli("verify", out, "--json", cwd="/tmp", text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["manifests"] == [str(out / "a.manifest.json"), str(out / "b.manifest.json")]
    assert [(f["manifest"], f["file"], f["status"]) for f in result["files"]] == [
        (str(out / "a.manifest.json"), "a_system.raw.tar", "ok"),
        (str(out / "b.manifest.json"), "b_system.raw.tar", "ok")]
    with open(out / "b_system.raw.tar", "r+b") as f:  # a byte of the member's data (a's archive is left intact)
        f.seek(1024 + 5)
        byte = f.read(1)
        f.seek(1024 + 5)
        f.write(bytes([byte[0] ^ 1]))
    proc = diskimg_cli("verify", out, cwd="/tmp", text=True)
    assert proc.returncode == 1
    first, second = proc.stdout.splitlines()
    assert first.startswith("a_system.raw.tar: OK") and second.startswith("b_system.raw.tar: DIFFERS (sha256 differs")
    assert diskimg_cli("verify", out / "a.manifest.json", cwd="/tmp").returncode == 0


def manifest_entry(archive: Path) -> dict:
    return {"file": archive.name, "size": archive.stat().st_size,
            "sha256": run("sha256sum", archive).stdout.split()[0].decode(), "format": "raw", "virtual_size": 4096}


HOSTILE_MANIFESTS = {
    # JSON nested 100,000 levels deep (Python's parser recursion ends at about 1,000)
    "nested": (lambda entry: '{"disks": [' + json.dumps(entry) + '], "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
               "nested deeper than 16"),
    "65 disks": (lambda entry: json.dumps({"disks": [{**entry, "file": f"d{i}"} for i in range(65)]}),
                 "1 to 64 entries"),
    "2 MiB": (lambda entry: json.dumps({"disks": [entry]}) + " " * (2 << 20), "larger than 1 MiB"),
    "listed twice": (lambda entry: json.dumps({"disks": [entry, entry]}), "more than once"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_export_manifests_have_the_same_caps_in_verify_and_unpack(tmp_path: Path, case: str) -> None:
    disk = sparse_file(tmp_path / "d.raw", 4096, [(0, b"data")])
    archive = tmp_path / "d.raw.tar"
    run("tar", "-cf", archive, "-C", tmp_path, "d.raw")
    build, message = HOSTILE_MANIFESTS[case]
    manifest = tmp_path / "m.manifest.json"
    manifest.write_text(build(manifest_entry(archive)))
    commands = (["verify", manifest], ["verify", "--deep", tmp_path], ["unpack", manifest, "--out", tmp_path / "o"])
    for command in commands:
        proc = diskimg_cli(*command, cwd="/tmp", text=True)
        assert proc.returncode == 3, (command, proc.stderr)
        assert proc.stderr.startswith(f"diskimg: error: {manifest}: ") and message in proc.stderr
        assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists() and disk.exists()


def test_disk_full_names_the_output_not_its_temporary(tmp_path: Path, disk_set: dict[str, Path],
                                                      full_disk: Path) -> None:
    out = full_disk / "export"
    proc = diskimg_cli("export", "--name", "x", "--system", disk_set["raw"], "--out", out, "--archive", "none",
                       cwd="/tmp", text=True)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == f"diskimg: error: {out / 'x_system.raw'}: cannot write: No space left on device\n"
    assert list(full_disk.iterdir()) == []


def test_verify_deep_says_what_it_covered_per_file(tmp_path: Path, disk_set: dict[str, Path]) -> None:
    """`verify --deep` in text names, per file, whether the guest content hash was recomputed; what
    it says is true: a wrong content hash in the manifest is caught exactly for the files it says
    were decoded (the RAW member of a tar.gz), not for a qcow2 member of one."""
    said = {}
    for name, fmt in (("r", "raw"), ("q", "qcow2")):
        out = tmp_path / name
        out.mkdir()
        proc = diskimg_cli("export", "--name", name, "--system", disk_set["system"], "--format", fmt,
                           "--out", out, "--progress", "none", cwd="/tmp")
        assert proc.returncode == 0, proc.stderr
        proc = diskimg_cli("verify", out / f"{name}.manifest.json", "--deep", cwd="/tmp", text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [line] = proc.stdout.splitlines()
        said[name] = "guest content hash matches" in line
        assert said[name] or "content hash was not recomputed" in line, line
        manifest = out / f"{name}.manifest.json"
        document = json.loads(manifest.read_text())
        for entry in document["disks"]:
            entry["content_hash"] = "sha256c1:" + "0" * 64
        manifest.write_text(json.dumps(document))
        caught = diskimg_cli("verify", manifest, "--deep", cwd="/tmp").returncode == 1
        assert caught == said[name], (name, said[name])
    assert said == {"r": True, "q": False}
