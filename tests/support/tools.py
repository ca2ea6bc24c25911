"""The programs the tests run: qemu-img and qemu-io (the oracle), any other tool, and the ``diskimg``
command itself."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"

requires_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


#: runs of a qemu-img command that made LUKS keys, before its PBKDF timing failure counts
PBKDF_ATTEMPTS = 20


def run(*args: str | os.PathLike, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a tool; fail the test with its stderr if it fails."""
    for _ in range(PBKDF_ATTEMPTS):
        proc = subprocess.run([str(a) for a in args], input=input, capture_output=True)
        # qemu's LUKS key setup times its first PBKDF round on the thread's CPU clock and gives up when
        # that clock has not moved (a coarse clock on a busy machine): nothing wrong with the command
        if b"Unable to get accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


def default_sigint() -> None:
    """For subprocess ``preexec_fn``: the child takes SIGINT as a terminal's Ctrl-C, whatever the suite inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- qemu-img and qemu-io -------------------------------------------------------------------------------


def qemu_img(*args: str | os.PathLike) -> str:
    return run("qemu-img", *args).stdout.decode()


def qemu_compare(first: os.PathLike, first_format: str, second: os.PathLike, second_format: str) -> None:
    """Fail unless ``qemu-img compare`` finds the two images' guest contents identical."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", first_format, "-F", second_format, first, second], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def qemu_io(image: os.PathLike, fmt: str, *commands: str) -> None:
    """Write into an image with qemu-io, e.g. qemu_io(p, "qcow2", "write -P 0xab 0 64k")."""
    args: list[str | os.PathLike] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, image)


def qemu_raw(image: os.PathLike, fmt: str, tmp_path: Path, image_opts: str | None = None) -> Path:
    """``qemu-img convert -O raw`` of an image, the oracle for what a reader yields (a sparse file)."""
    out = tmp_path / f"oracle-{hashlib.md5(f'{image}{image_opts}'.encode()).hexdigest()}.raw"
    if image_opts:
        run("qemu-img", "convert", "--image-opts", image_opts, "-O", "raw", out)
    else:
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, out)
    return out


def qemu_info(image: os.PathLike, fmt: str | None, force_share: bool = False) -> dict:
    """``qemu-img info --output=json`` of an image (``fmt`` None: as qemu-img probes it; ``force_share``:
    -U, the image may be open elsewhere)."""
    return json.loads(qemu_img("info", "--output=json", *(["-U"] if force_share else []),
                               *(["-f", fmt] if fmt else []), image))


def qemu_map(image: os.PathLike, fmt: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", "-f", fmt, image))


def assert_extents_sound(reader, oracle_raw: os.PathLike) -> None:
    """extents() covers the disk in order with no gaps, and every ZERO extent reads as zeros in
    qemu's reading of the image (so every non-zero byte qemu yields lies in one of our DATA
    extents; our map may be finer than ``qemu-img map``)."""
    position = 0
    with open(oracle_raw, "rb") as oracle:
        for extent in reader.extents():
            assert extent.start == position and extent.length > 0, f"gap or overlap at {extent}"
            position = extent.end
            if extent.kind.value == "zero":
                oracle.seek(extent.start)
                remaining = extent.length
                while remaining:
                    chunk = oracle.read(min(remaining, 1 << 22))
                    assert chunk and chunk == bytes(len(chunk)), f"ZERO extent {extent} is not zero in qemu's reading"
                    remaining -= len(chunk)
    assert position == reader.virtual_size


# -- the diskimg command ------------------------------------------------------------------------------


def diskimg_cli(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """``python -m diskimg ARGS`` with the checkout's package, output captured unless ``stdout`` is
    given; ``kwargs`` go to subprocess.run (``text``, ``input``, ``timeout``...)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "diskimg", *map(str, args)], env=env, **kwargs)


def diskimg_to_pipe(out: os.PathLike, *args: object, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``diskimg ARGS | cat > OUT`` through a shell: standard output is a real pipe. With ``check``,
    a failure fails the test with diskimg's error output."""
    command = shlex.join([sys.executable, "-m", "diskimg", *map(str, args)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | cat > {shlex.quote(str(out))}"], env=env,
                          capture_output=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"diskimg {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr!r}")
    return proc
