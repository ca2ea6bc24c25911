"""The VHDX writer: every subformat and option to a file and to a pipe, checked by qemu-img
(check, compare) and read back; options refused as qemu-img would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import diskimg

from .support.digests import file_sha256
from .support.files import sparse_file
from .support.tools import ROOT, diskimg_cli, qemu_img, qemu_raw, requires_qemu
from .support.units import MiB

SIZE = 70 * MiB + 3584  # not a multiple of any block size

OPTION_SETS = [
    "",
    "subformat=dynamic,block_size=1M",
    "subformat=dynamic,block_size=8M,block_state_zero=off",
    "subformat=dynamic,log_size=4M,block_size=256M",
    "subformat=fixed",
    "subformat=fixed,block_size=2M,block_state_zero=off",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vhdx-writer")
    return sparse_file(directory / "source.raw", SIZE, [
        (0, b"\x5a" * 65536), (3 * MiB + 17, b"\xa5" * 3 * MiB), (40 * MiB, b"\x01" * 512),
        (SIZE - 4096, b"\x77" * 4096),
    ])


def _check_written(source, out) -> None:
    qemu_img("check", "-f", "vhdx", out)
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vhdx", source, out], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(qemu_img("info", "--output=json", "-f", "vhdx", out))
    assert info["virtual-size"] == SIZE


@requires_qemu
@pytest.mark.parametrize("options", OPTION_SETS, ids=[o or "default" for o in OPTION_SETS])
def test_written_images_pass_qemu_check_and_compare(source, tmp_path, options):
    flags = ["-O", "vhdx"] + (["-o", options] if options else [])
    out = tmp_path / "out.vhdx"
    proc = diskimg_cli("convert", source, out, *flags)
    assert proc.returncode == 0, proc.stderr
    _check_written(source, out)
    with diskimg.open_image(out) as reader:
        info = reader.info()
        assert info.subformat == ("fixed" if "subformat=fixed" in options else "dynamic")
        block = {"block_size=1M": MiB, "block_size=8M": 8 * MiB, "block_size=256M": 256 * MiB,
                 "block_size=2M": 2 * MiB}
        assert info.cluster_size == next((v for k, v in block.items() if k in options), 32 * MiB)
    assert file_sha256(qemu_raw(out, "vhdx", tmp_path)) == file_sha256(source)

    piped = tmp_path / "piped.vhdx"
    command = f"'{sys.executable}' -m diskimg convert --progress none '{source}' - {' '.join(flags)} | cat > '{piped}'"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    _check_written(source, piped)
    # the pipe gets exactly the planned blocks: the size measure announces
    measured = json.loads(diskimg_cli("measure", "--json", source, *flags).stdout)
    assert piped.stat().st_size == measured["required"]


@pytest.mark.parametrize("options", [
    "cluster_size=1M", "block_size=3M", "block_size=512K", "block_size=512M", "log_size=1536K", "log_size=0",
    "subformat=differencing", "block_state_zero=maybe",
])
def test_bad_options_are_usage_errors(source, tmp_path, options):
    out = tmp_path / "out.vhdx"
    proc = diskimg_cli("convert", source, out, "-O", "vhdx", "-o", options, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


@requires_qemu
def test_over_64_tib_is_refused(tmp_path):
    """MS-VHDX caps the virtual size at 64 TiB."""
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, str(64 * 1024**4 + MiB))
    proc = diskimg_cli("convert", big, tmp_path / "out.vhdx", "-O", "vhdx", text=True)
    assert proc.returncode == 2 and "64 TiB" in proc.stderr, proc.stderr
