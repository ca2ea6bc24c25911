"""The command line: JSON outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .support.files import blank
from .support.tools import FIXTURES, diskimg_cli, diskimg_to_pipe, qemu_compare, qemu_img, qemu_io, requires_qemu, run
from .support.units import MiB


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert fragment in lines[0]


@requires_qemu
def test_info_json_agrees_with_qemu_img():
    example = FIXTURES / "example.qcow2"
    ours = json.loads(diskimg_cli("info", "--json", example).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", example))
    assert ours["format"] == "qcow2"
    assert ours["virtual_size"] == theirs["virtual-size"]
    assert ours["cluster_size"] == theirs["cluster-size"]
    assert ours["file_size"] == example.stat().st_size


@requires_qemu
def test_map_json_covers_the_disk():
    example = FIXTURES / "example.qcow2"
    extents = json.loads(diskimg_cli("map", "--json", example).stdout)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == json.loads(qemu_img("info", "--output=json", example))["virtual-size"]
    assert {e["kind"] for e in extents} == {"data", "zero"}


def test_quick_start_example_is_importable():
    """The README's first command chains `validate` of the shipped example with `&&`: it must pass.
    The example is an Ubuntu-shaped system made by scripts/make_example.py from the test builders."""
    proc = diskimg_cli("validate", "--json", FIXTURES / "example.qcow2")
    assert proc.returncode == 0, proc.stdout[-2000:]
    report = json.loads(proc.stdout)
    assert report["importable"]
    assert report["import_image"]["Platform"] == "Ubuntu" and report["import_image"]["BootMode"] == "BIOS"


def test_missing_file_is_exit_3(tmp_path):
    assert_one_error_line(diskimg_cli("info", tmp_path / "nope.qcow2"), 3, "no such file")


def test_usage_errors_are_exit_2(tmp_path):
    assert diskimg_cli("info").returncode == 2
    assert diskimg_cli("convert", "a", "b", "-O", "qed").returncode == 2
    assert_one_error_line(diskimg_cli("convert", FIXTURES / "example.qcow2", tmp_path / "x", "-S", "3"), 2, "-S")


def test_unwritable_output_is_exit_4(tmp_path):
    proc = diskimg_cli("convert", FIXTURES / "example.qcow2", tmp_path / "no" / "dir" / "out.raw")
    assert_one_error_line(proc, 4, "cannot create")


@pytest.mark.parametrize("garbage", [b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 200, b"conectix" + b"\x00" * 504])
def test_corrupt_headers_are_exit_3_without_traceback(tmp_path, garbage):
    image = tmp_path / "bad.img"
    image.write_bytes(garbage)
    proc = diskimg_cli("convert", image, tmp_path / "out.raw")
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert not (tmp_path / "out.raw").exists()


def test_public_names_resolve_after_every_module_is_loaded():
    """The API is imported lazily: each public name is what it says even once the modules of the
    same stem (conversion, validation, ...) are loaded, which sets attributes on the package."""
    code = (
        "import importlib, pkgutil, diskimg\n"
        "for m in pkgutil.walk_packages(diskimg.__path__, 'diskimg.'):\n"
        "    if m.name != 'diskimg.__main__': importlib.import_module(m.name)\n"
        "import types\n"
        "bad = [n for n in diskimg.__all__ if isinstance(getattr(diskimg, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert all(callable(getattr(diskimg, n)) for n in ('convert', 'compare', 'check', 'validate', 'export',"
        " 'verify', 'unpack', 'detect', 'open_image', 'measure'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_convert_does_not_load_the_validator_or_the_archivers(tmp_path):
    """Start-up time counts on every run: converting loads neither validation, guest inspection,
    nor the archive and compression modules."""
    source = tmp_path / "d.raw"
    source.write_bytes(b"\1" * 4096 + bytes(1 << 20))
    code = (
        "import sys\nfrom diskimg.cli import main\n"
        f"try: main(['convert', '--no-progress', {str(source)!r}, {str(tmp_path / 'o.qcow2')!r}, '-O', 'qcow2'])\n"
        "except SystemExit as exit: assert exit.code == 0, exit.code\n"
        "loaded = [m for m in ('diskimg.validation', 'diskimg.inspection.guest', 'diskimg.inspection.fs', 'diskimg.archives.export',"
        " 'diskimg.archives.unpack', 'diskimg.streams.sources', 'zlib_ng', 'lz4', 'tqdm') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- issue 12: options and messages -----------------------------------------------------------------------


@requires_qemu
@pytest.mark.parametrize("command", ["convert", "measure"])
def test_align_must_be_whole_sectors(tmp_path, command):
    """An --align that is not a multiple of 512 would make a disk ending in a partial sector (an
    odd-length RAW file that validate then refuses): a usage error, in the API too."""
    from diskimg import convert, measure
    from diskimg.errors import UsageError

    source = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "1M")
    target = tmp_path / "out.raw"
    args = [source, target] if command == "convert" else [source, "-O", "raw"]
    assert_one_error_line(diskimg_cli(command, *args, "--align", "1000"), 2, "multiple of 512")
    assert not target.exists()
    with pytest.raises(UsageError):
        convert(source, target, "raw", align=1000) if command == "convert" else measure(source, "raw", align=1000)
    proc = diskimg_cli(command, *args, "--align", "3k", "--json")
    assert proc.returncode == 0, proc.stderr
    aligned = 342 * 3 * 1024  # 1 MiB rounded up to a multiple of 3 KiB
    assert json.loads(proc.stdout)["virtual_size"] == aligned
    if command == "convert":
        assert json.loads(qemu_img("info", "--output=json", "-f", "raw", target))["virtual-size"] == aligned


@requires_qemu
def test_scan_progress_reaches_the_total(tmp_path):
    """A streamed qcow2 output is planned by a scan of the source's data; its last progress line
    reaches the total even when the disk ends in zeros that the scan skips."""
    source = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "64M")
    qemu_io(source, "qcow2", "write -P 0x5a 0 3M")
    proc = diskimg_to_pipe(tmp_path / "out.qcow2", "convert", "--progress", "json", source, "-", "-O", "qcow2")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.startswith("{")]
    scans = [record for record in records if record["phase"] == "scan"]
    assert scans and scans[-1]["done"] == scans[-1]["total"] == 64 * MiB
    qemu_compare(source, "qcow2", tmp_path / "out.qcow2", "qcow2")


def test_role_with_a_disk_set_is_a_usage_error(tmp_path):
    from diskimg import validate
    from diskimg.errors import UsageError

    disk = blank(tmp_path / "d.raw", MiB)
    for role in ("system", "data"):
        assert_one_error_line(diskimg_cli("validate", "--system", disk, "--role", role), 2, "--role")
        with pytest.raises(UsageError):
            validate(system=disk, role=role)
    assert diskimg_cli("validate", disk, "--role", "data").returncode in (0, 1)


@requires_qemu
def test_forced_format_errors_name_the_file(tmp_path):
    """A format forced against the header names the file it is about: with compare -f/-F the
    user must see which of the two it was."""
    vhd, qcow2 = tmp_path / "dyn.vhd", tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "vpc", vhd, "8M")
    qemu_img("create", "-q", "-f", "qcow2", qcow2, "8M")
    assert_one_error_line(diskimg_cli("map", "-f", "qcow2", vhd), 3, f"{vhd}: forced format qcow2")
    assert_one_error_line(diskimg_cli("compare", "-f", "qcow2", vhd, qcow2), 3, f"{vhd}: forced format qcow2")
    assert_one_error_line(diskimg_cli("compare", "-F", "vhd", vhd, qcow2), 3, f"{qcow2}: forced format vhd")


@requires_qemu
def test_dynamic_vhd_limit_names_the_file(tmp_path):
    source = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "3T")  # qemu-img refuses a dynamic VHD this large too
    target = tmp_path / "big.vhd"
    assert_one_error_line(diskimg_cli("convert", source, target, "-O", "vhd"), 2, f"{target}: a dynamic VHD")
    assert not target.exists()
    assert_one_error_line(diskimg_cli("measure", source, "-O", "vhd"), 2, f"{source}: a dynamic VHD")


@requires_qemu
@pytest.mark.parametrize(("name", "expected"), [("out.qcow2", "qcow2"), ("out.VHD", "vpc"), ("out.vpc", "vpc"),
                                                ("out.img", "raw"), ("out.raw", "raw"), ("out.bin", "raw")])
def test_output_format_from_the_target_extension(tmp_path, name, expected):
    """Without -O, a target named .qcow2 (or .vhd/.vpc) gets that format, as its name promises
    (qemu-img writes RAW there); other names get RAW. The oracle: qemu-img's probe of the output."""
    source = tmp_path / "d.raw"
    source.write_bytes(os.urandom(64 * 1024) + bytes(MiB))
    target = tmp_path / name
    proc = diskimg_cli("convert", "--no-progress", source, target)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(qemu_img("info", "--output=json", target))["format"] == expected
    qemu_compare(source, "raw", target, expected)


@requires_qemu
def test_vhd_size_rule_on_every_command_that_opens_a_vhd(tmp_path):
    """--vhd-size, one option on info, map, convert, measure and compare, picks the VHD size that
    qemu picks with force_size_calc (the oracle): a qemu-img force_size VHD whose CHS geometry
    describes less than its current_size (Virtual PC's geometry for that size written into it)."""
    from diskimg.formats.vhd.structures import chs_geometry

    from .support.images import rewrite_footers

    vhd = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", vhd, "1000M")
    qemu_io(vhd, "vpc", "write -P 0x33 0 1M")
    cylinders, heads, sectors = chs_geometry(1000 * MiB // 512)
    rewrite_footers(vhd, cylinders=cylinders, heads=heads, sectors_per_track=sectors)
    for rule in ("chs", "current_size"):
        expected = json.loads(qemu_img("info", "--output=json", "--image-opts",
                                       f"driver=vpc,force_size_calc={rule},file.filename={vhd}"))["virtual-size"]
        option = ("--vhd-size", rule)
        assert json.loads(diskimg_cli("info", "--json", *option, vhd).stdout)["virtual_size"] == expected
        extents = json.loads(diskimg_cli("map", "--json", *option, vhd).stdout)
        assert sum(extent["length"] for extent in extents) == expected
        measured = json.loads(diskimg_cli("measure", "--json", "-O", "raw", *option, vhd).stdout)
        assert measured["virtual_size"] == expected
        target = tmp_path / f"{rule}.raw"
        assert diskimg_cli("convert", "--no-progress", *option, vhd, target).returncode == 0
        assert target.stat().st_size == expected
        assert diskimg_cli("compare", "--strict", *option, vhd, target).returncode == 0
    sizes = {rule: (tmp_path / f"{rule}.raw").stat().st_size for rule in ("chs", "current_size")}
    assert sizes["chs"] != sizes["current_size"]
    assert diskimg_cli("compare", "--strict", "--vhd-size", "chs", vhd, tmp_path / "current_size.raw").returncode == 1


# -- issue 12: text a person reads ------------------------------------------------------------------------


def test_help_is_plain_text_and_names_every_job():
    top = diskimg_cli("--help").stdout.decode()
    for job in ("detect", "convert", "check", "validate", "export", "verify", "unpack"):
        assert job in top.split("Options:")[0].lower(), job
    for command in ("info", "map", "convert", "measure", "compare", "validate", "export", "verify", "unpack",
                    "check"):
        text = diskimg_cli(command, "--help").stdout.decode()
        assert "``" not in text and ":class:" not in text, command


@requires_qemu
def test_map_header_is_aligned_with_its_values(tmp_path):
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "qcow2", "write -P 1 1M 1M")
    header, *rows = diskimg_cli("map", image).stdout.decode().splitlines()
    for column in ("Offset", "Length", "Kind", "Host offset"):
        start = header.index(column)
        assert all(row[start] != " " and (start == 0 or row[start - 1] == " ") for row in rows
                   if len(row) > start), (column, rows)


def _qemu_info_text(image) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in qemu_img("info", image).splitlines()
                if ": " in line and not line.startswith(" "))


@requires_qemu
@pytest.mark.parametrize("kind", ["qcow2", "vhd-dynamic", "vhd-fixed", "vhd-force-size"])
def test_info_text_agrees_with_qemu_img_and_shows_no_internals(tmp_path, kind):
    """info's text: qemu-img info's labels and values for the fields both show, the rest in words,
    never a Python value or a raw key (the JSON keeps every fact)."""
    image = tmp_path / ("d.qcow2" if kind == "qcow2" else "d.vhd")
    options = {"qcow2": [], "vhd-dynamic": ["-o", "subformat=dynamic"], "vhd-fixed": ["-o", "subformat=fixed"],
               "vhd-force-size": ["-o", "force_size=on"]}[kind]
    qemu_img("create", "-q", "-f", "qcow2" if kind == "qcow2" else "vpc", *options, image, "20G")
    ours = diskimg_cli("info", image).stdout.decode()
    theirs = _qemu_info_text(image)
    fields = dict(line.split(": ", 1) for line in ours.splitlines() if ": " in line and not line.startswith(" "))
    assert fields["image"] == theirs["image"]
    assert fields["virtual size"] == theirs["virtual size"] == "20 GiB (21474836480 bytes)" or kind != "qcow2"
    if kind != "vhd-fixed":  # qemu-img reads a fixed VHD as raw: it counts the footer in the size
        assert fields["virtual size"] == theirs["virtual size"]
    assert fields["disk size"] == theirs["disk size"]
    if "cluster_size" in theirs:
        label = "cluster size" if kind == "qcow2" else "block size"
        assert fields[label].endswith(f"({theirs['cluster_size']} bytes)")
    if kind == "qcow2":
        specific = qemu_img("info", image).split("Format specific information:\n")[1]
        for line in specific.splitlines():
            key, value = line.strip().split(": ", 1)
            assert f"    {key}: {dict(true='yes', false='no').get(value, value)}" in ours.lower(), line
    for internal in ("None", "True", "False", "{", "'", "_", "problem", "format version", "sector bitmap"):
        assert internal not in ours.replace(str(image), ""), internal
    assert json.loads(diskimg_cli("info", "--json", image).stdout)["details"]  # the JSON keeps the details
    if kind == "vhd-force-size":  # qemu writes the largest CHS geometry (127 GiB): said to be unused
        [line] = [line for line in ours.splitlines() if "127 GiB" in line]
        assert "CHS geometry (not used)" in line and "65535 cylinders, 16 heads, 255 sectors" in line


def test_validate_text_renders_evidence_in_words(tmp_path):
    """No Python reprs in the evidence lines: nested facts in words, paths as they are."""
    disk = blank(tmp_path / "d.raw", 64 * MiB)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk, input=b"label: dos\n2048,,83\n")
    text = diskimg_cli("validate", disk).stdout.decode()
    evidence = [line for line in text.splitlines() if line.strip().startswith("evidence:")]
    assert evidence
    for line in evidence:
        assert not re.search(r"[{}\[\]']|=|\bNone\b|\bTrue\b|\bFalse\b", line), line
    assert "MBR boot code: no" in text or "MBR boot code no" in text


def test_validate_text_shows_windows_paths_as_written():
    """A Windows path in evidence keeps its single backslashes (a repr doubled them)."""
    from diskimg.validation import DiskFacts, Finding, Report, Severity

    evidence = {"missing": ["\\bootmgr", "\\Boot\\BCD"], "uefi": {"loader": "\\EFI\\Microsoft\\Boot\\bootmgfw.efi"}}
    finding = Finding("windows-boot-files-missing", Severity.ERROR, "the boot manager is missing", evidence)
    text = Report("ecs", False, [DiskFacts("w.vhd", "system", 1)], [finding], {}).render_text()
    assert "missing: \\bootmgr, \\Boot\\BCD; UEFI: loader \\EFI\\Microsoft\\Boot\\bootmgfw.efi" in text
    assert "\\\\" not in text


@requires_qemu
def test_info_says_which_vhd_footer_was_read(tmp_path):
    """A dynamic VHD whose footer at the end is damaged is read from its copy at the start (as qemu
    reads it): info says so in words, with the problem found, and no 'None' for the copy."""
    image = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", image, "64M")
    with open(image, "r+b") as f:
        f.seek(-512 + 64, os.SEEK_END)  # the footer's checksum field
        f.write(b"\0\0\0\0")
    text = diskimg_cli("info", image).stdout.decode()
    assert "footer: read from its copy at the start of the file; the one at the end is damaged (" in text
    assert "None" not in text
    assert f"virtual size: {_qemu_info_text(image)['virtual size']}" in text
