"""Where outputs go and what inputs are refused: devices and FIFOs written in place (never replaced
by a file), directories refused, symbolic links followed as cp does, existing files replaced by a
rename onto a free name; FIFOs, sockets, character devices and standard input refused as images
without blocking. Oracles: qemu-img convert -O raw, qemu-img compare, mkfifo, mknod, losetup, GNU tar.

Every command that could block runs with a timeout, so a regression fails instead of hanging."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import diskimg

from .support.digests import file_sha256
from .support.disks import loop_device
from .support.files import leftovers
from .support.tools import ROOT, diskimg_cli, qemu_compare, qemu_img, qemu_io, qemu_raw, requires_qemu, run
from .support.units import MiB

pytestmark = requires_qemu

TIMEOUT = 60  # seconds: far above what any command here takes; a hang fails the test


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8 MiB qcow2 with data at the start, in the middle and at the end, made by qemu-img/qemu-io."""
    path = tmp_path_factory.mktemp("outputs") / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(path, "qcow2", "write -P 0x5a 0 1M", "write -P 0x11 3M 64k", "write -P 0xc3 8128k 64k")
    return path


@pytest.fixture(scope="module")
def oracle(source: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return qemu_raw(source, "qcow2", tmp_path_factory.mktemp("oracle")).read_bytes()


def cli(*args: object) -> subprocess.CompletedProcess:
    return diskimg_cli(*args, text=True, timeout=TIMEOUT)


def one_error_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def fifo_reader(path: Path):
    """A thread reading the FIFO ``path`` to its end, as ``cat`` would; yields the list it fills."""
    received: list[bytes] = []

    def drain() -> None:
        with open(path, "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        if thread.is_alive():  # the writer failed before opening: open the other end to free the thread
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(TIMEOUT)


def null_device(path: Path) -> Path:
    """A character device node like /dev/null (1,3), made with mknod; skips where that is not allowed."""
    proc = subprocess.run(["mknod", path, "c", "1", "3"], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mknod is not allowed here (needs root): {proc.stderr.decode().strip()}")
    return path


def is_null_device(path: Path) -> bool:
    status = os.lstat(path)
    return stat.S_ISCHR(status.st_mode) and (os.major(status.st_rdev), os.minor(status.st_rdev)) == (1, 3)


# -- item 6: devices and FIFOs are written in place ------------------------------------------------


def test_convert_into_a_fifo_writes_the_stream_in_order(source: Path, oracle: bytes, tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as received:
        proc = cli("convert", source, fifo, "-O", "raw")  # no --force: a FIFO is not replaced
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received == [oracle]
    assert leftovers(tmp_path) == []


def test_convert_qcow2_into_a_fifo_is_a_valid_image(source: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    with fifo_reader(fifo) as received:
        assert cli("convert", source, fifo, "-O", "qcow2").returncode == 0
    written = tmp_path / "received.qcow2"
    written.write_bytes(received[0])
    qemu_compare(written, "qcow2", source, "qcow2")


@pytest.mark.parametrize("force", [False, True])
def test_convert_onto_a_character_device_keeps_the_device(source: Path, tmp_path: Path, force: bool) -> None:
    device = null_device(tmp_path / "null")
    proc = cli("convert", source, device, *(["--force"] if force else []))
    assert proc.returncode == 0, proc.stderr
    assert is_null_device(device)
    assert leftovers(tmp_path) == []


def test_convert_onto_a_block_device_writes_the_exact_bytes(source: Path, oracle: bytes, tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    before = os.urandom(12 * MiB)  # the device's old contents: the zeros of the image must replace them
    backing.write_bytes(before)
    with loop_device(backing) as device:
        proc = cli("convert", source, device, "-O", "raw")
        assert proc.returncode == 0, proc.stderr
        assert stat.S_ISBLK(os.stat(device).st_mode)
        with open(device, "rb") as f:
            assert f.read(len(oracle)) == oracle
            assert f.read() == before[len(oracle):]  # past the image: untouched
        # and read back as an input, a block device is an image like a file
        copy = tmp_path / "copy.raw"
        assert cli("convert", "-f", "raw", device, copy).returncode == 0
        assert copy.read_bytes() == oracle + before[len(oracle):]
        # a qcow2 written onto the device is an image qemu-img reads as the source
        assert cli("convert", source, device, "-O", "qcow2").returncode == 0
        qemu_compare(device, "qcow2", source, "qcow2")


def test_a_block_device_too_small_is_refused_untouched(source: Path, tmp_path: Path) -> None:
    backing = tmp_path / "small.img"
    backing.write_bytes(os.urandom(4 * MiB))
    digest = file_sha256(backing)
    with loop_device(backing) as device:
        line = one_error_line(cli("convert", source, device), 4, str(device), "block device")
        assert "--force" not in line
        # the device onto itself, named directly or by another node of the same disk: refused
        rdev = os.stat(device).st_rdev
        alias = tmp_path / "alias"
        run("mknod", alias, "b", str(os.major(rdev)), str(os.minor(rdev)))
        for target in (device, alias):
            one_error_line(cli("convert", "-f", "raw", device, target, "-O", "qcow2"), 4, "source image")
    assert file_sha256(backing) == digest


def test_qemu_img_backend_never_replaces_a_device(source: Path, tmp_path: Path) -> None:
    device = null_device(tmp_path / "null")
    qed = tmp_path / "source.qed"  # a format diskimg hands to qemu-img
    qemu_img("convert", "-f", "qcow2", "-O", "qed", source, qed)
    one_error_line(cli("convert", qed, device, "--force"), 4, str(device), "character device")
    assert is_null_device(device)


def test_export_never_replaces_a_device_or_fifo(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    device = null_device(out / "x_system.raw.tar.gz")
    os.mkfifo(out / "x.manifest.json")
    proc = cli("export", "--name", "x", "--system", source, "--out", out, "--force")
    one_error_line(proc, 4)
    assert is_null_device(device) and stat.S_ISFIFO(os.lstat(out / "x.manifest.json").st_mode)
    assert leftovers(out) == []


def test_unpack_never_replaces_a_device(source: Path, oracle: bytes, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(oracle)
    archive = tmp_path / "disk.tar"
    run("tar", "-cf", archive, "-C", tmp_path, "disk.raw")
    out = tmp_path / "out"
    out.mkdir()
    device = null_device(out / "disk.raw")
    one_error_line(cli("unpack", archive, "--out", out, "--force"), 4, "character device")
    assert is_null_device(device)
    assert leftovers(out) == []


# -- item 7: a directory as the target ----------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_target_is_an_output_error(source: Path, tmp_path: Path, force: bool) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    line = one_error_line(cli("convert", source, target, *(["--force"] if force else [])), 4, str(target),
                          "directory")
    assert "--force" not in line
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


# -- item 8: symbolic links are followed, as cp follows them ---------------------------------------


def test_a_link_to_a_file_replaces_the_file_and_keeps_the_link(source: Path, oracle: bytes, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "disk.raw"
    real.write_bytes(b"old")
    link = tmp_path / "link.raw"
    link.symlink_to(real)
    one_error_line(cli("convert", source, link), 4, "--force")
    assert real.read_bytes() == b"old"
    assert cli("convert", source, link, "--force").returncode == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == oracle
    assert leftovers(tmp_path) == [] and leftovers(elsewhere) == []


def test_a_dangling_link_creates_the_file_it_names(source: Path, oracle: bytes, tmp_path: Path) -> None:
    link = tmp_path / "link.raw"
    link.symlink_to("named.raw")
    assert cli("convert", source, link).returncode == 0  # nothing existed: no --force needed
    assert link.is_symlink() and (tmp_path / "named.raw").read_bytes() == oracle


def test_a_link_to_a_device_writes_into_the_device(source: Path, tmp_path: Path) -> None:
    device = null_device(tmp_path / "null")
    link = tmp_path / "link"
    link.symlink_to(device)
    assert cli("convert", source, link).returncode == 0
    assert link.is_symlink() and is_null_device(device)


def test_a_link_to_the_source_is_refused(source: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to(source)
    digest = file_sha256(source)
    one_error_line(cli("convert", source, link, "--force"), 4, "source")
    assert file_sha256(source) == digest


# -- item 25: an existing target is replaced by a rename onto a free name ---------------------------


def test_an_existing_target_is_unlinked_before_the_rename(source: Path, oracle: bytes, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Renaming over an existing file is what costs (ext4 auto_da_alloc): every rename must find its
    target name free (the old file is first renamed aside, then the new one into place). The old
    file is replaced, neither the temporary nor the old file is left beside it."""
    target = tmp_path / "out.raw"
    target.write_bytes(b"old contents")
    renames = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        renames.append((os.path.basename(src), os.path.lexists(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(importlib.import_module("diskimg.conversion.outputs").os, "replace", replace)
    diskimg.convert(source, target, "raw", force=True)
    assert renames and all(name.startswith(".out.raw.") and not existed for name, existed in renames)
    assert target.read_bytes() == oracle
    assert leftovers(tmp_path) == []


def test_a_failed_conversion_leaves_nothing_at_the_target(source: Path, tmp_path: Path) -> None:
    """The file being replaced is gone once the run starts (as qemu-img truncates it); a failure
    leaves nothing under the target's name and nothing beside it, neither the temporary nor the old
    file set aside."""
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(source.read_bytes()[: 3 * 65536 + 4096])  # its data clusters cut short
    target = tmp_path / "out.raw"
    target.write_bytes(b"old contents")
    proc = cli("convert", truncated, target, "--force")
    assert proc.returncode == 3, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.qcow2"]


def test_a_failed_rename_leaves_neither_file(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented state when the rename after the unlink fails: the old file is gone (it was
    being replaced), and no temporary is left; never a partial file under the final name."""
    target = tmp_path / "out.raw"
    target.write_bytes(b"old contents")

    def replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importlib.import_module("diskimg.conversion.outputs").os, "replace", replace)
    with pytest.raises(diskimg.OutputError, match="cannot replace"):
        diskimg.convert(source, target, "raw", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- item 14: inputs that are not images are refused without blocking --------------------------------


COMMANDS = {
    "info": ["info", "{x}"],
    "map": ["map", "{x}"],
    "check": ["check", "{x}"],
    "measure": ["measure", "{x}", "-O", "qcow2"],
    "convert": ["convert", "{x}", "{tmp}/out.raw"],
    "compare first": ["compare", "{x}", "{source}"],
    "compare second": ["compare", "{source}", "{x}"],
    "validate": ["validate", "{x}"],
    "validate --system": ["validate", "--system", "{x}"],
    "export --system": ["export", "--name", "x", "--system", "{x}", "--out", "{tmp}"],
    "unpack": ["unpack", "{x}", "--out", "{tmp}/out"],
}


def command(name: str, x: Path, source: Path, tmp_path: Path) -> list[str]:
    return [a.format(x=x, source=source, tmp=tmp_path) for a in COMMANDS[name]]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_fifo_without_a_writer_is_refused_at_once(name: str, source: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.img"
    os.mkfifo(fifo)
    one_error_line(cli(*command(name, fifo, source, tmp_path)), 3, str(fifo), "FIFO")
    assert not (tmp_path / "out.raw").exists()  # (an empty folder unpack creates is issue 12 item 9's)


@pytest.mark.parametrize("name", ["info", "convert", "compare second", "validate"])
def test_a_character_device_or_socket_is_not_an_image(name: str, source: Path, tmp_path: Path) -> None:
    device = null_device(tmp_path / "null")
    one_error_line(cli(*command(name, device, source, tmp_path)), 3, str(device), "character device")
    with socket.socket(socket.AF_UNIX) as listening:
        path = tmp_path / "sock"
        listening.bind(str(path))
        one_error_line(cli(*command(name, path, source, tmp_path)), 3, str(path), "socket")


def test_standard_input_is_not_supported(source: Path) -> None:
    """``cat IMG | diskimg info -``: standard input is refused as a usage error, not looked up as a file."""
    command = f"cat {shlex.quote(str(source))} | {shlex.join([sys.executable, '-m', 'diskimg', 'info', '-'])}"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = one_error_line(proc, 2, "standard input")
    assert "no such file" not in line


def test_a_fifo_named_by_a_manifest_is_refused_at_once(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    assert cli("export", "--name", "x", "--system", source, "--out", out, "--archive", "tar").returncode == 0
    manifest = out / "x.manifest.json"
    archive = out / json.loads(manifest.read_text())["disks"][0]["file"]
    archive.unlink()
    os.mkfifo(archive)
    one_error_line(cli("unpack", manifest, "--out", tmp_path / "restored"), 3, "FIFO")
    proc = cli("verify", manifest)
    assert proc.returncode == 1 and f"{archive.name}: MISSING (is a FIFO" in proc.stdout, proc
    # the manifest itself a FIFO
    manifest.unlink()
    os.mkfifo(manifest)
    one_error_line(cli("unpack", manifest, "--out", tmp_path / "restored"), 3, "FIFO")
    one_error_line(cli("verify", manifest), 3, "FIFO")
