"""The converter end to end: every source format to every target format, to files and to real pipes,
each output checked by qemu-img (check, compare, info); hypothesis round trips through every pair of
formats; a 2000 GiB sparse disk in seconds; checksums, progress, JSON, atomic outputs, interrupts and
the qemu-img backend."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import diskimg
from diskimg.conversion.pipeline import scan_for_zeroes
from diskimg.errors import UsageError
from diskimg.formats import WRITERS
from diskimg.formats.writer import parse_options

from .support.digests import content_hash_by_definition, file_sha256
from .support.files import leftovers, sparse_file
from .support.tools import (
    ROOT,
    default_sigint,
    diskimg_cli,
    diskimg_to_pipe,
    qemu_img,
    qemu_io,
    qemu_raw,
    requires_qemu,
    run,
)
from .support.units import GiB, KiB, MiB

pytestmark = requires_qemu

#: the matrix's disk: whole sectors, but neither a multiple of 1 MiB (so --align 1M grows it), nor of
#: a 64 KiB cluster, nor of a 2 MiB VHD block / qcow2 cluster
SIZE = 9 * MiB + 2560


def qfmt(fmt: str) -> str:
    """qemu's name of a format."""
    return "vpc" if fmt == "vhd" else fmt


def rounded(size: int, step: int = 512) -> int:
    return -(-size // step) * step


def base_runs(rng: random.Random) -> list[tuple[int, bytes]]:
    """Data at unaligned offsets: a boot sector, runs inside and across clusters and 2 MiB blocks,
    explicitly written zeros (allocated, not holes), compressible data, one byte, the last bytes."""
    return [
        (0, rng.randbytes(512)),
        (12345, rng.randbytes(70000)),
        (2 * MiB - 1000, rng.randbytes(5000)),
        (3 * MiB, bytes(MiB)),
        (5 * MiB + 1, b"\x01"),
        (6 * MiB + 777, b"diskimg! " * 30000),
        (SIZE - 2000, rng.randbytes(2000)),
    ]


# -- the sources -----------------------------------------------------------------------------------

#: name -> (qemu format, qemu-img convert options, compressed, qemu-io commands applied afterwards)
SOURCES: dict[str, tuple[str, list[str], list[str]]] = {
    "raw": ("raw", [], []),
    "vhd-fixed": ("vpc", ["-o", "subformat=fixed,force_size=on"], ["write -P 0 3M 1M"]),
    "vhd-dynamic": ("vpc", ["-o", "subformat=dynamic,force_size=on"], ["write -P 0 3M 1M"]),
    "vdi-dynamic": ("vdi", [], ["write -P 0 3M 1M"]),
    "vdi-static": ("vdi", ["-o", "static=on"], []),
    "qcow2-v2": ("qcow2", ["-o", "compat=0.10"], ["write -P 0 3M 1M"]),
    "qcow2-v2-compressed": ("qcow2", ["-o", "compat=0.10", "-c"], ["write -P 0x44 4M 100k"]),
    "qcow2-v3": ("qcow2", ["-o", "compat=1.1"], ["write -P 0 3M 1M"]),
    "qcow2-v3-zlib": ("qcow2", ["-c"], ["write -P 0x44 4M 100k"]),
    "qcow2-v3-zstd": ("qcow2", ["-o", "compression_type=zstd", "-c"], ["write -P 0x44 4M 100k"]),
    # extended L2 entries: 2 KiB subclusters written, zeroed and left unallocated within clusters
    "qcow2-subclusters": ("qcow2", ["-o", "extended_l2=on"], [
        f"write -P 0x5a {6 * MiB + 8 * KiB} 4k", f"write -z {6 * MiB + 12 * KiB} 4k", "write -P 0x33 100001 3",
        "write -z 7M 8k", f"write -z {2 * MiB - 2048} 2048",
    ]),
    # zero clusters over data, over nothing, and with the clusters unmapped
    "vhdx-dynamic": ("vhdx", ["-o", "block_size=1M"], ["write -P 0 3M 1M", "write -z 5M 1M"]),
    "vhdx-fixed": ("vhdx", ["-o", "subformat=fixed"], ["write -P 0 3M 1M"]),
    "qcow2-zero-clusters": ("qcow2", [], ["write -z 64k 64k", "write -z 7M 128k", "write -z -u 2M 64k",
                                          "write -P 0 3M 1M"]),
    "vmdk-sparse": ("vmdk", ["-o", "subformat=monolithicSparse"], ["write -P 0 3M 1M", "write -z 5M 64k"]),
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"], []),
}
SNAPSHOTS = "qcow2-snapshots"


def make_source(directory: Path, name: str, base: Path) -> tuple[Path, str]:
    if name == SNAPSHOTS:
        path = directory / f"{name}.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, path)
        run("qemu-img", "snapshot", "-c", "first", path)
        qemu_io(path, "qcow2", "write -P 0x77 12000 1000", "write -z 2M 64k", "write -P 0x78 8M 64k")
        run("qemu-img", "snapshot", "-c", "second", path)
        qemu_io(path, "qcow2", "write -P 0x79 1M 4k", "write -z 0 4k")
        return path, "qcow2"
    fmt, options, commands = SOURCES[name]
    if fmt == "raw":
        return base, "raw"
    path = directory / f"{name}.{'vhd' if fmt == 'vpc' else fmt}"
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, base, path)
    if commands:
        qemu_io(path, fmt, *commands)
    return path, fmt


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    directory = tmp_path_factory.mktemp("sources")
    base = directory / "raw.raw"
    sparse_file(base, SIZE, base_runs(random.Random(1)))
    made = {name: make_source(directory, name, base) for name in [*SOURCES, SNAPSHOTS]}
    for path, fmt in made.values():  # every source is what it claims, at the exact size
        info = json.loads(qemu_img("info", "--output=json", "-f", fmt, path))
        assert info["virtual-size"] == SIZE, (path, info)
    return made


# -- the targets -----------------------------------------------------------------------------------

#: name -> keyword arguments of diskimg.convert (the CLI flags are derived from them)
TARGETS: dict[str, dict] = {
    "raw": dict(output_format="raw"),
    "qcow2": dict(output_format="qcow2"),
    "qcow2-v2": dict(output_format="qcow2", options="compat=0.10"),
    "qcow2-2M": dict(output_format="qcow2", options="cluster_size=2M"),
    "qcow2-zlib": dict(output_format="qcow2", compress=True),
    "qcow2-zstd": dict(output_format="qcow2", options="compression_type=zstd", compress=True),
    "vhd-dynamic": dict(output_format="vhd"),
    "vhd-fixed": dict(output_format="vhd", options="subformat=fixed"),
    "vhd-fixed-1M": dict(output_format="vhd", options="subformat=fixed", align=MiB),
    "vhd-dynamic-1M": dict(output_format="vhd", align=MiB),
    "vdi-dynamic": dict(output_format="vdi"),
    "vdi-static": dict(output_format="vdi", options="static=on"),
    "vhdx-dynamic": dict(output_format="vhdx", options="block_size=1M"),
    "vhdx-fixed": dict(output_format="vhdx", options="subformat=fixed,block_state_zero=off"),
    "vmdk-sparse": dict(output_format="vmdk"),
    "vmdk-stream": dict(output_format="vmdk", options="subformat=streamOptimized"),
}


def cli_flags(target: dict) -> list[str]:
    flags = ["-O", target["output_format"]]
    if target.get("options"):
        flags += ["-o", target["options"]]
    if target.get("compress"):
        flags.append("-c")
    if target.get("align"):
        flags += ["--align", str(target["align"])]
    return flags


def convert_to_pipe(source, out: Path, **kwargs) -> diskimg.ConvertResult:
    """``diskimg.convert(source, "-")`` with standard output a real pipe, drained into ``out``."""
    read_end, write_end = os.pipe()
    received: list[int] = []

    def drain() -> None:
        with open(out, "wb") as sink:
            while chunk := os.read(read_end, 1 << 20):
                sink.write(chunk)
                received.append(len(chunk))

    thread = threading.Thread(target=drain)
    thread.start()
    saved = sys.stdout
    # convert() writes to sys.stdout.fileno(); closed in the finally below, before the drain thread is joined
    sys.stdout = open(write_end, "w", closefd=True)  # noqa: SIM115
    try:
        return diskimg.convert(source, "-", **kwargs)
    finally:
        sys.stdout.close()
        sys.stdout = saved
        thread.join()
        os.close(read_end)


def check_output(source: Path, source_fmt: str, out: Path, target: dict) -> None:
    """What qemu-img says of an output: check (qcow2), compare with the source, info."""
    fmt = target["output_format"]
    size = rounded(SIZE, target.get("align") or 1)
    info = json.loads(qemu_img("info", "--output=json", "-f", qfmt(fmt), out))
    assert info["virtual-size"] == size, info
    if fmt == "qcow2":
        proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", out], capture_output=True)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        report = json.loads(proc.stdout)
        assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0
        specific = info["format-specific"]["data"]
        options = dict(item.split("=") for item in target.get("options", "").split(",") if item)
        assert specific["compat"] == options.get("compat", "1.1")
        assert info["cluster-size"] == (2 * MiB if options.get("cluster_size") == "2M" else 64 * KiB)
        if target.get("compress"):
            assert report["compressed-clusters"] > 0
            assert specific["compression-type"] == options.get("compression_type", "zlib")
        else:
            assert report.get("compressed-clusters", 0) == 0
    elif fmt == "vhd":
        subformat = "fixed" if "subformat=fixed" in target.get("options", "") else "dynamic"
        if subformat == "fixed":
            assert "cluster-size" not in info and out.stat().st_size == size + 512
        else:
            assert info["cluster-size"] == 2 * MiB  # the block size: qemu shows it for dynamic VHDs only
        assert diskimg.detect(out).subformat == subformat
    elif fmt == "vdi":
        run("qemu-img", "check", "-f", "vdi", out)
        static = "static=on" in target.get("options", "")
        assert diskimg.detect(out).subformat == ("fixed" if static else "dynamic")
        assert info["cluster-size"] == MiB and (not static or out.stat().st_size == 1024 + rounded(size, MiB))
    elif fmt == "vhdx":
        qemu_img("check", "-f", "vhdx", out)
        subformat = "fixed" if "subformat=fixed" in target.get("options", "") else "dynamic"
        assert diskimg.detect(out).subformat == subformat
    elif fmt == "vmdk":
        qemu_img("check", "-f", "vmdk", out)
        subformat = "streamOptimized" if "streamOptimized" in target.get("options", "") else "monolithicSparse"
        assert info["format-specific"]["data"]["create-type"] == subformat
    else:
        assert out.stat().st_size == size
    # not -s: qemu's strict mode also fails on a different allocation (holes for written zeros); the
    # sizes are checked above, and the tail --align added must read as zeros
    proc = subprocess.run(["qemu-img", "compare", "-f", source_fmt, "-F", qfmt(fmt), source, out],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def target_name(out_dir: Path, target: str) -> Path:
    return out_dir / f"out-{target}.{TARGETS[target]['output_format']}"


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("source", [*SOURCES, SNAPSHOTS])
def test_every_source_to_every_target(sources, tmp_path, source, target):
    path, fmt = sources[source]
    kwargs = TARGETS[target]
    out = target_name(tmp_path, target)
    result = diskimg.convert(path, out, **kwargs)
    assert result.backend == "native" and result.virtual_size == rounded(SIZE, kwargs.get("align") or 1)
    assert result.source_format == {"vpc": "vhd"}.get(fmt, fmt) and result.target_format == kwargs["output_format"]
    check_output(path, fmt, out, kwargs)
    assert not list(tmp_path.glob("*.part"))

    piped = tmp_path / f"piped-{out.name}"
    if kwargs.get("compress"):
        # the compressed sizes must be known before the tables that precede the data: refused, nothing sent
        with pytest.raises(UsageError, match="pipe"):
            convert_to_pipe(path, piped, **kwargs)
        assert piped.stat().st_size == 0
        return
    result = convert_to_pipe(path, piped, **kwargs)
    assert result.target == "-"
    check_output(path, fmt, piped, kwargs)
    if kwargs["output_format"] != "qcow2":  # raw and VHD (whose timestamp and id differ) have the same size
        assert piped.stat().st_size == out.stat().st_size


# Through the command line and a shell pipe: every target from one source, every source to the
# targets that are most used on pipes.
CLI_PIPE_CASES = [("qcow2-snapshots", target) for target in TARGETS] + [
    (source, target) for source in SOURCES for target in ("qcow2", "vhd-dynamic") if source != "qcow2-snapshots"
]


@pytest.mark.parametrize(("source", "target"), CLI_PIPE_CASES)
def test_cli_to_a_shell_pipe(sources, tmp_path, source, target):
    path, fmt = sources[source]
    kwargs = TARGETS[target]
    out = tmp_path / "piped.out"
    command = " ".join([f"'{sys.executable}'", "-m", "diskimg", "convert", "--progress", "none", f"'{path}'", "-",
                        *cli_flags(kwargs)])
    # the exit status of diskimg itself; stderr kept apart from the image
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | cat > '{out}'"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if kwargs.get("compress"):
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "pipe" in proc.stderr and "Traceback" not in proc.stderr
        assert out.stat().st_size == 0  # nothing reached standard output
        return
    assert proc.returncode == 0, proc.stderr
    check_output(path, fmt, out, kwargs)


@pytest.mark.parametrize("target", ["raw", "qcow2", "vhd-dynamic"])
def test_internal_snapshot_conversion(sources, tmp_path, target):
    path, _ = sources[SNAPSHOTS]
    kwargs = TARGETS[target]
    for snapshot in ("first", "2"):  # by name and by id
        oracle = tmp_path / f"oracle-{snapshot}.raw"
        run("qemu-img", "convert", "-f", "qcow2", "-l", snapshot if snapshot != "2" else "snapshot.id=2", "-O", "raw",
            path, oracle)
        out = target_name(tmp_path, f"{target}")
        diskimg.convert(path, out, snapshot=snapshot, force=True, **kwargs)
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", qfmt(kwargs["output_format"]), oracle, out],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # the snapshots and the active layer do differ
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", oracle, path], capture_output=True)
    assert proc.returncode == 1


# -- hypothesis: random sparse disks through every pair of formats ---------------------------------

#: name -> keyword arguments of diskimg.convert; small clusters and blocks so that small disks span many
ROUND_TRIP_FORMATS: dict[str, dict] = {
    "raw": dict(output_format="raw"),
    "vhd-dynamic": dict(output_format="vhd", options="block_size=512K"),
    "vhd-fixed": dict(output_format="vhd", options="subformat=fixed"),
    "vdi": dict(output_format="vdi"),
    "qcow2": dict(output_format="qcow2"),
    "qcow2-v2-512": dict(output_format="qcow2", options="compat=0.10,cluster_size=512"),
    "qcow2-zstd-4k": dict(output_format="qcow2", options="compression_type=zstd,cluster_size=4k", compress=True),
}

EDGE_SIZES = [0, 1, 511, 512, 513, 4095, 65535, 65536, 65537, 512 * KiB + 1, 2 * MiB - 1, 2 * MiB + 512, 3 * MiB + 3]


@st.composite
def sparse_disks(draw) -> tuple[int, list[tuple[int, int, str]], int]:
    size = draw(st.one_of(st.sampled_from(EDGE_SIZES), st.integers(1, 4 * MiB)))
    runs = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 300 * KiB),
                                   st.sampled_from(["random", "zeros", "byte"])), max_size=6)) if size else []
    return size, runs, draw(st.integers(0, 2**32 - 1))


def materialize(path: Path, size: int, runs: list[tuple[int, int, str]], seed: int) -> bytes:
    """Write the disk (a sparse file) and return its content padded to whole sectors."""
    rng = random.Random(seed)
    image = bytearray(size)
    pieces = []
    make = {"random": rng.randbytes, "zeros": bytes, "byte": lambda length: bytes([rng.randrange(1, 256)]) * length}
    for offset, length, kind in runs:
        length = min(length, size - offset)
        data = make[kind](length)
        image[offset : offset + length] = data
        pieces.append((offset, data))
    sparse_file(path, size, pieces)
    return bytes(image) + bytes(rounded(size) - size)


@pytest.mark.parametrize("middle", list(ROUND_TRIP_FORMATS))
@settings(max_examples=30, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(disk=sparse_disks())
def test_round_trips_through_every_pair(tmp_path, middle, disk):
    """raw -> MIDDLE -> every format -> raw gives the original bytes (padded to 512, as diskimg and
    qemu read a raw file that is not whole sectors)."""
    size, runs, seed = disk
    for stale in tmp_path.iterdir():
        stale.unlink()
    original = tmp_path / "original.raw"
    expected = materialize(original, size, runs, seed)
    first = tmp_path / "first"
    diskimg.convert(original, first, **ROUND_TRIP_FORMATS[middle])
    for name, kwargs in ROUND_TRIP_FORMATS.items():
        second, back = tmp_path / f"second-{name}", tmp_path / f"back-{name}.raw"
        diskimg.convert(first, second, **kwargs)
        diskimg.convert(second, back, "raw")
        assert back.read_bytes() == expected, f"raw -> {middle} -> {name} -> raw (size {size}, seed {seed})"


# -- 2000 GiB: cost grows with the data, not the virtual size ---------------------------------------

BIG = 2000 * GiB
#: (offset, bytes) written with qemu-io, at the start, the middle, across a 2 MiB boundary and the end
BIG_WRITES = [(0, 64 * KiB), (1000 * GiB + 12345 * 512, MiB), (1500 * GiB - 4 * KiB, 8 * KiB), (BIG - 4 * KiB, 4 * KiB)]
BIG_TARGETS = {"raw": TARGETS["raw"], "vhd-dynamic": TARGETS["vhd-dynamic"], "vhd-fixed": TARGETS["vhd-fixed"],
               "qcow2": TARGETS["qcow2"]}


BIG_ORIGINAL: list[Path] = []


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("big")
    source = directory / "big.qcow2"
    qemu_img("create", "-f", "qcow2", source, str(BIG))
    qemu_io(source, "qcow2",
            *(f"write -P {0x10 + i} {offset} {length}" for i, (offset, length) in enumerate(BIG_WRITES)))
    made = {"qcow2": source}
    BIG_ORIGINAL[:] = [source]
    for name, kwargs in BIG_TARGETS.items():
        if name != "qcow2":
            made[name] = directory / f"big-{name}"
            diskimg.convert(source, made[name], **kwargs)
    return made


def check_big(out: Path, fmt: str, dynamic_vhd: bool) -> None:
    """qemu agrees on the size and the content, and the output took space only for the data."""
    info = json.loads(qemu_img("info", "--output=json", "-f", qfmt(fmt), out))
    assert info["virtual-size"] == BIG
    assert out.stat().st_blocks * 512 < 64 * MiB
    if fmt == "qcow2":
        qemu_img("check", "-f", "qcow2", out)
    if dynamic_vhd:
        # qemu-img compare takes some 40 s over a 2000 GiB dynamic VHD (block status block by block):
        # read the data and the zeros around it with qemu-io instead
        commands = []
        for i, (offset, length) in enumerate(BIG_WRITES):
            commands.append(f"read -P {0x10 + i} {offset} {length}")
            if offset:
                commands.append(f"read -P 0 {offset - 4096} 4096")
            if offset + length < BIG:
                commands.append(f"read -P 0 {offset + length} 4096")
        proc = subprocess.run(["qemu-io", "-f", "vpc", *(x for c in commands for x in ("-c", c)), out],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "verification failed" not in proc.stdout, proc.stdout + proc.stderr
        return
    proc = subprocess.run(["qemu-img", "compare", BIG_ORIGINAL[0], "-F", qfmt(fmt), out], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sparse_map(path: Path) -> bool:
    with diskimg.open_image(path) as reader:
        return sum(e.length for e in reader.extents() if e.kind.value == "data") < GiB


@pytest.mark.parametrize("target", list(BIG_TARGETS))
@pytest.mark.parametrize("source", list(BIG_TARGETS))
def test_2000_gib_sparse_between_every_pair(big_sources, tmp_path, source, target):
    kwargs = BIG_TARGETS[target]
    if source == "vhd-fixed":
        assert sparse_map(big_sources[source])  # holes of a fixed VHD are known from the file system
    out = tmp_path / f"out-{target}"
    proc = subprocess.run([sys.executable, "-m", "diskimg", "convert", "--json", big_sources[source], out,
                           *cli_flags(kwargs)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["virtual_size"] == BIG and result["bytes_read"] <= 4 * MiB
    check_big(out, kwargs["output_format"], target == "vhd-dynamic")
    if target in ("qcow2", "vhd-dynamic"):
        # on a pipe the writer plans the exact layout from a scan of the data: its size is the measure
        # of that plan, and holds the same image
        writer = WRITERS[kwargs["output_format"]]
        with diskimg.open_image(big_sources[source]) as reader:
            measured = writer.measure(BIG, list(scan_for_zeroes(reader, 4096, None)),
                                      parse_options(kwargs.get("options")))
        command = " ".join([f"'{sys.executable}'", "-m", "diskimg", "convert", "--progress", "none",
                            f"'{big_sources[source]}'", "-", *cli_flags(kwargs)])
        piped = tmp_path / f"piped-{target}"
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | tee '{piped}' | wc -c"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout) == measured == piped.stat().st_size
        check_big(piped, kwargs["output_format"], target == "vhd-dynamic")


# -- --checksum: the output's SHA-256 and the guest content hash -----------------------------------


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return diskimg_cli(*args, text=True, timeout=120, **kwargs)


def pipe_cli(out: Path, *args) -> subprocess.CompletedProcess:
    return diskimg_to_pipe(out, *args, text=True, timeout=120)


CHECKSUM_TARGETS = ["raw", "qcow2", "qcow2-v2", "qcow2-zlib", "vhd-dynamic", "vhd-fixed"]


def test_checksum_matches_the_bytes_and_the_content(sources, tmp_path):
    path, _ = sources["qcow2-zero-clusters"]
    oracle = tmp_path / "oracle.raw"
    run("qemu-img", "convert", "-O", "raw", path, oracle)
    expected = content_hash_by_definition(oracle.read_bytes(), SIZE)
    hashes = set()
    for name in CHECKSUM_TARGETS:
        flags = cli_flags(TARGETS[name])
        out = tmp_path / f"out-{name}"
        proc = cli("convert", "--checksum", "--json", path, out, *flags)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["sha256"] == file_sha256(out), name
        hashes.add(result["content_hash"])
        # the output itself, read back, holds that content
        hashes.add(diskimg.convert(out, tmp_path / f"back-{name}.raw", "raw", checksum=True).content_hash)
        if TARGETS[name].get("compress"):
            continue  # refused on a pipe (see the matrix)
        # on a pipe: the digest of the bytes that went through it, printed on stderr
        piped = tmp_path / f"piped-{name}"
        proc = pipe_cli(piped, "convert", "--checksum", "--progress", "none", path, "-", *flags)
        assert proc.returncode == 0, proc.stderr
        lines = dict(line.split(": ", 1) for line in proc.stderr.splitlines() if ": " in line)
        assert lines["sha256"] == file_sha256(piped), name
        hashes.add(lines["content hash"])
    # the same guest content in every format: one content hash, the one the definition gives
    assert hashes == {expected}
    # and reading the outputs back (the qemu-img backend hashes the file it made) gives it too
    proc = cli("convert", "--backend", "qemu-img", "--checksum", "--json", path, tmp_path / "by-qemu.qcow2",
               "-O", "qcow2")
    assert json.loads(proc.stdout)["content_hash"] == expected

    # one byte different (at an odd offset, inside a zero region): another content hash
    changed = tmp_path / "changed.raw"
    data = bytearray(oracle.read_bytes())
    data[7 * MiB + 4097] = 1
    changed.write_bytes(data)
    result = diskimg.convert(changed, tmp_path / "changed.qcow2", "qcow2", checksum=True)
    assert result.content_hash != expected
    assert result.content_hash == content_hash_by_definition(bytes(data), SIZE)


def test_checksum_of_a_raw_disk_that_is_not_whole_sectors(tmp_path):
    source = tmp_path / "odd.raw"
    sparse_file(source, 100000, [(99990, b"0123456789")])
    result = diskimg.convert(source, tmp_path / "out.vhd", "vhd", checksum=True)
    assert result.virtual_size == 100352
    assert result.content_hash == content_hash_by_definition(source.read_bytes(), 100352)


# -- --progress json and --json --------------------------------------------------------------------

RESULT_KEYS = {"source", "target", "source_format", "target_format", "virtual_size", "bytes_read", "bytes_written",
               "allocated_bytes", "seconds", "backend", "sha256", "content_hash", "decompression_passes", "sparsified",
               "sparsified_bytes"}


@pytest.mark.parametrize("target", ["raw", "qcow2", "vhd-dynamic"])
@pytest.mark.parametrize("route", ["file", "pipe"])
def test_progress_json_and_result_json(sources, tmp_path, target, route):
    path, _ = sources["vhd-dynamic"]
    flags = cli_flags(TARGETS[target])
    out = tmp_path / "out"
    if route == "file":
        proc = cli("convert", "--progress", "json", "--json", path, out, *flags)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert set(result) == RESULT_KEYS
        assert result["virtual_size"] == SIZE and result["backend"] == "native"
        assert result["source_format"] == "vhd" and result["target_format"] == TARGETS[target]["output_format"]
        assert result["sha256"] is None and result["content_hash"] is None  # without --checksum
        assert 0 < result["bytes_read"] <= result["allocated_bytes"] and result["bytes_written"] > 0
        progress_lines = proc.stderr.splitlines()
    else:
        proc = pipe_cli(out, "convert", "--progress", "json", path, "-", *flags)
        assert proc.returncode == 0, proc.stderr
        progress_lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
        assert len(progress_lines) == len(proc.stderr.splitlines()) - 1  # and the one summary line
    records = [json.loads(line) for line in progress_lines]
    assert records
    for record in records:
        assert set(record) == {"phase", "done", "total", "elapsed"}
        assert record["phase"] in ("scan", "convert") and 0 <= record["done"] <= record["total"] == SIZE
    assert records[-1]["phase"] == "convert" and records[-1]["done"] == records[-1]["total"]
    assert [r["elapsed"] for r in records] == sorted(r["elapsed"] for r in records)
    if route == "pipe" and target != "raw":
        assert records[0]["phase"] == "scan"  # an exact plan is made first on a pipe


def test_json_refused_on_a_pipe(sources, tmp_path):
    path, _ = sources["raw"]
    proc = pipe_cli(tmp_path / "out", "convert", "--json", path, "-", "-O", "qcow2")
    assert proc.returncode == 2 and (tmp_path / "out").stat().st_size == 0
    assert len(proc.stderr.strip().splitlines()) == 1


# -- atomic outputs --------------------------------------------------------------------------------


def test_existing_target_refused_without_force(sources, tmp_path):
    path, _ = sources["qcow2-v3"]
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"precious")
    proc = cli("convert", path, out, "-O", "qcow2")
    assert proc.returncode == 4
    assert len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr
    assert out.read_bytes() == b"precious" and not leftovers(tmp_path)
    proc = cli("convert", "--force", path, out, "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    qemu_img("compare", path, out)
    # never over the source itself, even with --force
    proc = cli("convert", "--force", path, path, "-O", "qcow2")
    assert proc.returncode == 4 and "source" in proc.stderr
    qemu_img("check", path)


def test_failure_midway_leaves_nothing(tmp_path):
    # a qcow2 whose last data cluster was cut off: found only when the conversion reaches it
    source = tmp_path / "cut.qcow2"
    qemu_img("create", "-f", "qcow2", source, "64M")
    qemu_io(source, "qcow2", "write -P 1 0 1M", "write -P 2 60M 1M")
    os.truncate(source, source.stat().st_size - 512 * KiB)
    for target in ("raw", "qcow2", "vhd-dynamic", "vhd-fixed"):
        out = tmp_path / f"out-{target}"
        proc = cli("convert", source, out, *cli_flags(TARGETS[target]))
        assert proc.returncode == 3, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not out.exists() and not leftovers(tmp_path), target


def test_unwritable_output_directory(sources, tmp_path):
    path, _ = sources["raw"]
    proc = cli("convert", path, tmp_path / "missing" / "out.qcow2", "-O", "qcow2")
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1


def test_interrupt_leaves_nothing(tmp_path):
    # compressed qcow2 of 256 MiB of incompressible data: long enough to be interrupted mid-way
    source = tmp_path / "big.raw"
    block = random.Random(5).randbytes(MiB)
    with open(source, "wb") as f:
        for _ in range(256):
            f.write(block)
    out = tmp_path / "out.qcow2"
    proc = subprocess.Popen([sys.executable, "-m", "diskimg", "convert", "--progress", "json", source, out, "-O",
                             "qcow2", "-c"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first progress line: the conversion is under way
    assert json.loads(first)["phase"] == "convert", first
    assert leftovers(tmp_path)  # the temporary output exists beside the target
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "diskimg: interrupted" and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


def test_interrupt_while_threads_convert_leaves_nothing(sources, tmp_path, ctrl_c):
    """Ctrl-C reaches the main thread while it waits for the worker threads of a file conversion:
    the workers finish the window in hand and stop, the partial output is removed, the call raises
    KeyboardInterrupt, and no worker runs on after it returned (on Python 3.11 an interrupted
    Thread.join would let the caller believe it had stopped)."""
    path, _ = sources["qcow2-v3"]
    out = tmp_path / "out.raw"
    main = threading.main_thread().ident
    assert main is not None
    interrupted = threading.Event()
    returned = threading.Event()
    reports_after_return = []

    def interrupt(phase, done, total):
        if returned.is_set():
            reports_after_return.append(done)
        elif not interrupted.is_set():
            interrupted.set()
            signal.pthread_kill(main, signal.SIGINT)  # as a terminal's Ctrl-C reaches the main thread
            time.sleep(0.2)  # the worker is still busy when the main thread takes the signal

    with pytest.raises(KeyboardInterrupt):
        diskimg.convert(path, out, "raw", progress=interrupt)
    returned.set()
    assert not out.exists() and not leftovers(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    time.sleep(0.5)  # a worker still running would have finished its window and reported it
    assert not reports_after_return


@pytest.mark.parametrize("stop", ["callback raises", "ctrl-c"])
def test_stopped_compression_leaves_no_thread(tmp_path, stop, ctrl_c):
    """A compressed conversion cancelled by its progress callback, or interrupted: the compression
    and write threads are stopped before the call returns, not when the writer is collected."""
    source = tmp_path / "random.raw"
    source.write_bytes(random.Random(7).randbytes(16 * MiB))
    out = tmp_path / "out.qcow2"

    class Cancelled(Exception):
        pass

    def cancel(phase, done, total):
        if done >= total // 2:  # the writer's threads run by then
            if stop == "ctrl-c":
                signal.raise_signal(signal.SIGINT)
            else:
                raise Cancelled

    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else Cancelled) as raised:
        diskimg.convert(source, out, "qcow2", compress=True, progress=cancel)
    assert raised.value.__traceback__ is not None  # the frames, and the writer in them, are still alive
    assert not [t.name for t in threading.enumerate() if t.name.startswith("qcow2-")]
    assert not out.exists() and not leftovers(tmp_path)


# -- --backend -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, sources) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("foreign")
    base, _ = sources["raw"]
    made = {}
    for name, fmt, options in [("vmdk", "vmdk", []), ("vmdk-stream", "vmdk", ["-o", "subformat=streamOptimized"]),
                               ("qed", "qed", [])]:
        made[name] = directory / f"{name}.{fmt}"
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, base, made[name])
    made["vmdk-empty"] = directory / "empty.vmdk"
    qemu_img("create", "-f", "vmdk", made["vmdk-empty"], "10M")
    return made


@pytest.mark.parametrize("name", ["vmdk", "vmdk-stream", "vmdk-empty", "qed"])
def test_auto_backend_converts_foreign_formats_with_qemu_img(foreign, tmp_path, name):
    out = tmp_path / "out.qcow2"
    proc = cli("convert", "--json", "--checksum", foreign[name], out, "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == RESULT_KEYS
    backend = "native" if name.startswith("vmdk") else "qemu-img"  # diskimg reads VMDK itself
    assert result["backend"] == backend and result["target_format"] == "qcow2"
    assert result["source_format"] == name.split("-")[0]
    assert result["sha256"] == file_sha256(out)
    qemu_img("check", out)
    qemu_img("compare", foreign[name], out)
    # without --json the summary says which backend did it
    proc = cli("convert", "--force", foreign[name], out, "-O", "vhd")
    assert proc.returncode == 0 and backend in proc.stderr
    qemu_img("compare", foreign[name], "-F", "vpc", out)


def test_native_backend_refuses_foreign_formats_with_the_hint(foreign, tmp_path):
    out = tmp_path / "out.qcow2"
    proc = cli("convert", "--backend", "native", foreign["qed"], out, "-O", "qcow2")
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "QED" in proc.stderr and "--backend qemu-img" in proc.stderr and "qemu-img convert" in proc.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_qemu_img_backend_on_a_raw_source(sources, tmp_path):
    path, _ = sources["raw"]
    out = tmp_path / "out.vhd"
    proc = cli("convert", "--json", "--backend", "qemu-img", path, out, "-O", "vhd", "-o", "subformat=fixed")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == "qemu-img" and result["source_format"] == "raw" and result["virtual_size"] >= SIZE
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vpc", path, out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("granularity", [4096, 0])
@pytest.mark.parametrize("output_format", ["qcow2", "raw"])
def test_result_figures_mean_the_same_on_both_backends(tmp_path, output_format, granularity):
    """One conversion through the native path and through the qemu-img backend gives the same
    bytes_read and allocated_bytes, each what it is defined as: allocated_bytes the data qemu-img map
    reports for the source; bytes_read its granules of the -S size that hold a non-zero byte, counted
    in qemu's own RAW image of the disk (all of the data with -S 0)."""
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "64M")
    qemu_io(source, "qcow2", "write -P 0x11 0 100k", "write -P 0 1M 256k", "write -P 0x22 1100k 5000",
            "write -z 8M 1M", "write -P 0x33 20M 2M", "discard 21M 64k", "write -P 0x44 63M 1M")
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", source))
    allocated = sum(entry["length"] for entry in mapped if entry["data"])
    content = qemu_raw(source, "qcow2", tmp_path).read_bytes()
    if granularity:
        carried = granularity * sum(any(content[i : i + granularity]) for i in range(0, len(content), granularity))
    else:
        carried = allocated
    assert 0 < carried <= allocated and (carried < allocated) == bool(granularity)  # zeros written as data
    results = {}
    for backend in ("native", "qemu-img"):
        out = tmp_path / f"{backend}.{output_format}"
        results[backend] = diskimg.convert(source, out, output_format, backend=backend, zero_granularity=granularity)
        assert results[backend].backend == backend
        qemu_img("compare", "-f", "qcow2", "-F", output_format, source, out)
    for result in results.values():
        assert (result.allocated_bytes, result.bytes_read) == (allocated, carried)


def test_qemu_img_backend_errors_are_one_line(foreign, tmp_path):
    out = tmp_path / "out.qcow2"
    # an option qemu-img rejects
    proc = cli("convert", "--backend", "qemu-img", foreign["vmdk"], out, "-O", "qcow2", "-o", "cluster_size=3")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "qemu-img convert failed" in lines[0] and "Cluster size" in lines[0]
    assert ".part" not in lines[0]  # the target's name, not the temporary file's
    # a VMDK that qemu-img cannot open
    broken = tmp_path / "broken.vmdk"
    data = bytearray(foreign["vmdk"].read_bytes()[: 1 << 20])
    data[4:512] = b"\xff" * 508
    broken.write_bytes(data)
    proc = cli("convert", "--backend", "qemu-img", broken, out, "-O", "qcow2")
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
    assert "qemu-img convert failed" in proc.stderr
    # and to a pipe: qemu-img needs a seekable output
    proc = pipe_cli(tmp_path / "piped", "convert", "--backend", "qemu-img", foreign["vmdk"], "-", "-O", "qcow2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "piped").stat().st_size == 0
    assert not out.exists() and not leftovers(tmp_path)
