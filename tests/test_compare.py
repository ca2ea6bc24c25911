"""diskimg compare against qemu-img compare: identical images across formats, size mismatches,
one-byte differences, sparse 2000 GiB images, unreadable inputs.

Where the two tools report a difference, diskimg names the first differing *byte* and qemu-img
compare the start of the first differing 512-byte *sector* ("Content mismatch at offset N!"),
counted from the start of the region it was comparing (regions split where either image's block
status changes): N is ``ours // 512 * 512`` for images of whole sectors, and in general
``N <= ours < N + 512``.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import diskimg
import diskimg.conversion.compare as compare_module

from .support.files import sparse_file
from .support.tools import ROOT, diskimg_cli, qemu_img, qemu_io, requires_qemu, run
from .support.units import GiB, KiB, MiB

pytestmark = requires_qemu

SIZE = 10 * MiB + 1536  # whole sectors, not whole clusters or VHD blocks

#: name -> (qemu format, qemu-img convert options)
FORMATS = {
    "raw": ("raw", []),
    "qcow2": ("qcow2", []),
    "qcow2-v2-zlib": ("qcow2", ["-o", "compat=0.10", "-c"]),
    "qcow2-zstd": ("qcow2", ["-o", "compression_type=zstd", "-c"]),
    "vhd-dynamic": ("vpc", ["-o", "subformat=dynamic,force_size=on"]),
    "vhd-fixed": ("vpc", ["-o", "subformat=fixed,force_size=on"]),
}


def cli(*args) -> subprocess.CompletedProcess:
    return diskimg_cli(*args, text=True, timeout=120)


def qemu_compare(a: Path, fmt_a: str, b: Path, fmt_b: str, *flags: str) -> tuple[int, int | None]:
    """qemu-img compare's exit status and the offset it reports, if any."""
    proc = subprocess.run(["qemu-img", "compare", *flags, "-f", fmt_a, "-F", fmt_b, a, b], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    found = re.search(r"Content mismatch at offset (\d+)!", proc.stdout)
    return proc.returncode, int(found.group(1)) if found else None


def ours(a: Path, b: Path, *, strict: bool = False, through_cli: bool = False) -> tuple[int, dict]:
    """diskimg compare's exit status and result: from the API, and with ``through_cli`` from the
    command line too (text and --json), checked to agree."""
    result = diskimg.compare(a, b, strict=strict).to_dict()
    assert set(result) == {"identical", "first_difference", "size_a", "size_b", "message"}
    code = 0 if result["identical"] else 1
    if through_cli:
        flags = ["--strict"] if strict else []
        text = cli("compare", *flags, a, b)
        as_json = cli("compare", "--json", *flags, a, b)
        assert text.returncode == as_json.returncode == code, text.stderr + as_json.stderr
        assert json.loads(as_json.stdout) == result
        assert text.stdout.strip() == result["message"][0].upper() + result["message"][1:] + "."
    return code, result


def make_raw(path: Path, size: int = SIZE, seed: int = 3) -> Path:
    """Data at odd offsets, explicitly written zeros, holes."""
    rng = random.Random(seed)
    return sparse_file(path, size, [(0, rng.randbytes(4096)), (12345, rng.randbytes(70000)),
                                    (2 * MiB - 7, rng.randbytes(99)), (4 * MiB, bytes(MiB)),
                                    (6 * MiB + 3, b"z" * 300000), (size - 1000, rng.randbytes(1000))])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    directory = tmp_path_factory.mktemp("compare")
    base = make_raw(directory / "raw.raw")
    made = {"raw": (base, "raw")}
    for name, (fmt, options) in FORMATS.items():
        if name != "raw":
            made[name] = (directory / f"{name}.img", fmt)
            run("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, base, made[name][0])
    return made


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(FORMATS, 2)))
def test_identical_images_across_formats(images, a, b):
    (path_a, fmt_a), (path_b, fmt_b) = images[a], images[b]
    assert qemu_compare(path_a, fmt_a, path_b, fmt_b) == (0, None)
    code, result = ours(path_a, path_b, through_cli=a == "raw")
    assert code == 0 and result["message"] == "images are identical" and result["first_difference"] is None
    assert result["size_a"] == result["size_b"] == SIZE
    # the API, both ways round
    assert diskimg.compare(path_b, path_a).identical


def flipped_copy(source: Path, fmt: str, out: Path, offset: int, value: int = 0x5A) -> Path:
    """A copy of an image with the byte at ``offset`` set to ``value`` (written with qemu-io)."""
    run("qemu-img", "convert", "-f", fmt, "-O", fmt, source, out)
    qemu_io(out, fmt, f"write -P {value} {offset} 1")
    return out


#: odd offsets: in data, in explicit zeros, in a hole, in a compressible run, the very first and last byte
ODD_OFFSETS = [12345 + 1001, 4 * MiB + 77777, 8 * MiB + 3, 6 * MiB + 100001, 0, SIZE - 1]


@pytest.mark.parametrize("offset", ODD_OFFSETS)
@pytest.mark.parametrize(("a", "b"), [("raw", "qcow2"), ("qcow2-zstd", "vhd-dynamic"), ("vhd-fixed", "qcow2-v2-zlib")])
def test_one_byte_difference_reports_its_offset(images, tmp_path, a, b, offset):
    (path_a, fmt_a), (path_b, fmt_b) = images[a], images[b]
    changed = flipped_copy(path_b, fmt_b, tmp_path / "changed.img", offset)
    code, result = ours(path_a, changed, through_cli=offset == ODD_OFFSETS[0])
    assert code == 1 and result["first_difference"] == offset
    assert result["message"] == f"content mismatch at offset {offset}"
    # qemu-img names the sector holding the byte
    assert qemu_compare(path_a, fmt_a, changed, fmt_b) == (1, offset // 512 * 512)
    # and the other way round
    assert diskimg.compare(changed, path_a).first_difference == offset


def test_first_of_several_differences(images, tmp_path):
    path, fmt = images["qcow2"]
    changed = tmp_path / "changed.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", path, changed)
    qemu_io(changed, "qcow2", "write -P 1 9000001 1", "write -P 1 3000001 1", "write -z 5M 64k")
    _, result = ours(path, changed)
    assert result["first_difference"] == 3000001
    assert qemu_compare(path, fmt, changed, "qcow2") == (1, 3000001 // 512 * 512)


# -- different sizes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resized(images, tmp_path_factory) -> dict[str, Path]:
    """The qcow2 image grown by 2 MiB + 512 bytes: once with zeros, once with a byte in the new area."""
    directory = tmp_path_factory.mktemp("resized")
    path, _ = images["qcow2"]
    zero_tail, data_tail = directory / "zero-tail.qcow2", directory / "data-tail.qcow2"
    for out in (zero_tail, data_tail):
        run("qemu-img", "convert", "-O", "qcow2", path, out)
        qemu_img("resize", out, str(SIZE + 2 * MiB + 512))
    qemu_io(data_tail, "qcow2", f"write -P 9 {SIZE + MiB + 1001} 1")
    return {"zero": zero_tail, "data": data_tail}


@pytest.mark.parametrize("smaller", ["raw", "vhd-dynamic", "vhd-fixed"])
def test_size_mismatch_with_a_zero_extra_area(images, resized, smaller):
    path, fmt = images[smaller]
    for a, fmt_a, b, fmt_b in [(path, fmt, resized["zero"], "qcow2"), (resized["zero"], "qcow2", path, fmt)]:
        assert qemu_compare(a, fmt_a, b, fmt_b) == (0, None)
        code, result = ours(a, b, through_cli=smaller == "raw")
        assert code == 0 and "identical" in result["message"] and "extra area" in result["message"]
        assert {result["size_a"], result["size_b"]} == {SIZE, SIZE + 2 * MiB + 512}
        # --strict: any size difference is a difference (qemu-img compare -s agrees)
        assert qemu_compare(a, fmt_a, b, fmt_b, "-s")[0] == 1
        code, result = ours(a, b, strict=True, through_cli=smaller == "raw")
        assert code == 1 and result["first_difference"] is None and "sizes differ" in result["message"]


@pytest.mark.parametrize("smaller", ["raw", "qcow2-zstd"])
def test_size_mismatch_with_data_in_the_extra_area(images, resized, smaller):
    path, fmt = images[smaller]
    offset = SIZE + MiB + 1001
    for a, fmt_a, b, fmt_b in [(path, fmt, resized["data"], "qcow2"), (resized["data"], "qcow2", path, fmt)]:
        assert qemu_compare(a, fmt_a, b, fmt_b) == (1, offset // 512 * 512)
        code, result = ours(a, b)
        assert code == 1 and result["first_difference"] == offset


def test_strict_with_equal_sizes_is_content_only(images):
    """Unlike qemu-img compare -s, --strict does not compare allocation: a hole and written zeros
    are the same content (qemu -s fails on them: "block status mismatch")."""
    (raw, _), (vhd, _) = images["raw"], images["vhd-dynamic"]
    code, _ = ours(raw, vhd, strict=True, through_cli=True)
    assert code == 0


def test_unaligned_raw_sizes(tmp_path):
    """A raw file that is not whole sectors reads as a disk rounded up to 512 bytes (as in qemu)."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 1000 + bytes(24))
    # (qemu-img compare -s fails here: "block status mismatch", the 24 bytes are a hole in one file only)
    assert qemu_compare(a, "raw", b, "raw") == (0, None)
    assert ours(a, b, strict=True)[0] == 0
    b.write_bytes(b"x" * 1000 + b"\0\1")
    assert ours(a, b)[1]["first_difference"] == 1001
    # qemu compares region by region (split where block status changes: here at the end of a's
    # 1000 stored bytes) and names the first differing sector *of the region*
    assert qemu_compare(a, "raw", b, "raw") == (1, 1000)


# -- zero regions are not read -----------------------------------------------------------------------

BIG = 2000 * GiB


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("big")
    a = directory / "a.qcow2"
    qemu_img("create", "-f", "qcow2", a, str(BIG))
    qemu_io(a, "qcow2", "write -P 1 0 64k", f"write -P 2 {1000 * GiB} 1M", f"write -P 3 {BIG - 4096} 4096")
    made = {"qcow2": a}
    for name, options in [("raw", ["-O", "raw"]), ("vhd-dynamic", ["-O", "vhd"])]:
        made[name] = directory / name
        diskimg.convert(a, made[name], options[1])
    made["changed"] = directory / "changed.raw"
    run("cp", "--sparse=always", made["raw"], made["changed"])
    qemu_io(made["changed"], "raw", f"write -P 7 {1500 * GiB + 12345} 1")
    return made


@pytest.mark.parametrize(("a", "b"), [("qcow2", "raw"), ("raw", "vhd-dynamic"), ("vhd-dynamic", "qcow2")])
def test_2000_gib_sparse_images_compare_from_their_maps(big_pair, monkeypatch, a, b):
    read = []
    opened = compare_module.open_image

    def counting_open(*args, **kwargs):
        reader = opened(*args, **kwargs)
        original = reader.read_at

        def counted(offset, length):
            read.append(length)
            return original(offset, length)

        reader.read_at = counted
        return reader

    monkeypatch.setattr(compare_module, "open_image", counting_open)
    result = diskimg.compare(big_pair[a], big_pair[b])
    assert result.identical and result.size_a == result.size_b == BIG
    assert sum(read) <= 2 * (64 * KiB + 8 * MiB + 8 * MiB)  # the data (and chunk rounding), not 2000 GiB
    read.clear()
    result = diskimg.compare(big_pair[a], big_pair["changed"])
    assert not result.identical and result.first_difference == 1500 * GiB + 12345
    assert sum(read) <= 2 * (64 * KiB + 8 * MiB + 8 * MiB)


def test_2000_gib_through_the_command_line(big_pair):
    # a generous bound, as a timeout only
    proc = subprocess.run([sys.executable, "-m", "diskimg", "compare", big_pair["qcow2"], big_pair["vhd-dynamic"]],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "Images are identical."
    proc = subprocess.run([sys.executable, "-m", "diskimg", "compare", big_pair["changed"], big_pair["qcow2"]],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and proc.stdout.strip() == f"Content mismatch at offset {1500 * GiB + 12345}."
    assert qemu_compare(big_pair["changed"], "raw", big_pair["qcow2"], "qcow2") == (1, (1500 * GiB + 12345) // 512 * 512)


# -- unreadable inputs -------------------------------------------------------------------------------


def test_unreadable_inputs_exit_3(images, tmp_path):
    good, _ = images["qcow2"]
    vmdk = tmp_path / "disk.vmdk"  # an ESX COWD extent: a VMDK diskimg does not read
    vmdk.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(4088))
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(good.read_bytes()[:300])  # a qcow2 header whose tables lie past the end
    truncated = tmp_path / "truncated.qcow2"
    run("qemu-img", "create", "-f", "qcow2", truncated, "10M")
    qemu_io(truncated, "qcow2", "write -P 1 8M 64k")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 32 * KiB])  # the data cluster cut in half
    for bad in (tmp_path / "missing.raw", vmdk, corrupt, truncated, tmp_path):
        for args in ((good, bad), (bad, good)):
            with pytest.raises(diskimg.DiskImageError) as caught:
                diskimg.compare(*args)
            assert caught.value.exit_code == 3, (bad, caught.value)
    for bad in (tmp_path / "missing.raw", vmdk, truncated):
        proc = cli("compare", good, bad)
        assert proc.returncode == 3, (bad, proc.stdout, proc.stderr)
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)
        assert proc.stderr.startswith("diskimg: error: ") and "Traceback" not in proc.stderr
        if bad == vmdk:
            assert "VMDK" in proc.stderr and "qemu-img" in proc.stderr  # the hint to convert it


def test_forced_formats(images):
    (raw, _), (vhd, _) = images["raw"], images["vhd-fixed"]
    proc = cli("compare", "-f", "raw", "-F", "vpc", raw, vhd)
    assert proc.returncode == 0
    # a forced format that contradicts the header is an error, not a reinterpretation
    proc = cli("compare", "-f", "qcow2", raw, vhd)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
