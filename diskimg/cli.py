"""The ``diskimg`` command: parses arguments, calls the public API, renders text or JSON.

Exit codes: 0 ok; 1 a "no" answer; 2 usage error; 3 the input image cannot be read (missing,
unsupported, corrupt); 4 the output cannot be written; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast, get_args

import click

from .choices import ArchiveKind, Backend, BootMode, CloudTarget, DiskRole, ExportLayout, FormatName, VhdSizeRule
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NO,
    EXIT_OUTPUT,
    EXIT_USAGE,
    DiskImageError,
    UnsupportedFormat,
    UsageError,
    error_line,
    internal_error_line,
)
from .formats.probing import FORMAT_ALIASES
from .units import format_size, parse_size
from .version import __version__
from .words import key_words, words

if TYPE_CHECKING:
    from . import ImageInfo, ProgressCallback
    from .archives.export import VerifiedFile
    from .conversion.sparsify import SparsifiedVolume

# Each command imports the part of the API it calls when it runs: a conversion does not pay for
# loading the validator or the archive compressors (start-up time counts on every invocation).

#: every format diskimg reads and writes, with its aliases (vpc), from the one list of them
FORMAT_CHOICE = click.Choice(list(FORMAT_ALIASES), case_sensitive=False)

#: one definition for every command that opens a VHD
vhd_size_option = click.option(
    "--vhd-size", type=click.Choice(get_args(VhdSizeRule)), default="auto", show_default=True,
    help="Which size of a VHD to use: chosen by the creator application (auto), the CHS geometry's, or the "
    "footer's current_size.")


#: one definition for convert, export and measure
sparsify_option = click.option(
    "--sparsify", is_flag=True,
    help="Leave out what the guest's file systems do not use (free blocks, swap contents, free LVM extents): "
    "it reads as zeros in the output. Volumes that cannot be read safely are kept byte for byte, and the result "
    "says why.")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diskimg")
def cli() -> None:
    """Get VHD, qcow2 and RAW disk images ready for a cloud: detect, inspect, convert, measure, compare
    and check them, validate them against the cloud's import rules, export a machine's disks as
    archives, then verify and unpack those."""


@cli.command()
@click.argument("image")
@click.option("-f", "--format", "fmt", type=FORMAT_CHOICE, help="Skip probing: the image's format.")
@vhd_size_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(image: str, fmt: FormatName | None, vhd_size: VhdSizeRule, as_json: bool) -> None:
    """What IMAGE is: format, sizes, allocation, creator, features, backing file, snapshots."""
    from . import detect, image_info
    from .streams.sources import opens_through_wrapper

    detection = detect(image)
    facts = None
    refusal = None
    if fmt is None and not detection.readable and opens_through_wrapper(detection):
        try:
            facts = image_info(image)  # a disk read through the wrapper: details say how
        except UnsupportedFormat as exc:  # e.g. a qcow2 in a compressed stream: described below
            refusal = exc
    if fmt is None and not detection.readable and facts is None:
        # A format diskimg does not read: say what it is and how to convert it.
        result: dict[str, Any] = {"filename": image, **detection.to_dict()}
        if refusal is not None and refusal.format != detection.inner_format:  # opening saw more (the disk's end)
            result.update(inner_format=refusal.format, description=refusal.message, hint=refusal.hint)
        if as_json:
            _print_json(result)
        else:
            click.echo(f"image: {image}")
            click.echo(f"file format: {detection.format} ({result['description']})")
            if result.get("hint"):
                click.echo(f"diskimg does not read this format: {result['hint']}")
        return
    facts = facts or image_info(image, fmt, vhd_size=vhd_size)
    description = detection.description
    if facts.details.get("inner_format") not in (None, detection.inner_format):  # opening saw more (the disk's end)
        wrapper, compression = facts.details.get("wrapper"), facts.details.get("compression")
        through = f"a {compression}-compressed tar" if wrapper == "tar" and compression else f"a {wrapper} file"
        description = f"{facts.details['inner_description']}, read through {through}"
    result = {"filename": image, **facts.to_dict(), "description": description}
    if detection.starts_with:
        result["starts_with"] = detection.starts_with
    if as_json:
        _print_json(result)
        return
    click.echo("\n".join(_info_lines(image, facts, description)))


def _info_lines(image: str, facts: ImageInfo, description: str) -> list[str]:
    """What a person needs to know about an image, in qemu-img info's order and words; the
    format's internals (checksums, offsets, raw flags) are left to --json."""
    lines = [f"image: {image}", f"file format: {facts.format} ({description})",
             f"virtual size: {_size(facts.virtual_size)}"]
    if facts.allocated_bytes is not None:  # through a wrapper: the data the disk holds, not the file's blocks
        label = "data in the disk" if "wrapper" in facts.details else "disk size"
        lines.append(f"{label}: {format_size(facts.allocated_bytes)}")
    lines.append(f"file size: {_size(facts.file_size)}")
    if facts.cluster_size is not None:
        unit = "block" if facts.format in ("vhd", "vhdx", "vdi") else "cluster"
        lines.append(f"{unit} size: {_size(facts.cluster_size)}")
    if facts.creator:
        lines.append(f"creator: {facts.creator}")
    if facts.backing_file is not None:
        lines.append(f"backing file: {facts.backing_file}")
    if facts.backing_format is not None:
        lines.append(f"backing file format: {facts.backing_format}")
    if facts.snapshots:
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<6}{'TAG':<22}{'SIZE':>10}  DATE")
        lines += [f"{snap.id:<6}{snap.name:<22}{format_size(snap.virtual_size):>10}  {snap.date}"
                  for snap in facts.snapshots]
    specific = {"vhd": _vhd_lines, "qcow2": _qcow2_lines}.get(facts.format, _other_lines)(facts)
    if specific:
        lines.append("Format specific information:")
        lines += [f"    {line}" for line in specific]
    return lines


def _size(size: int) -> str:
    return f"{format_size(size)} ({size} bytes)"


def _vhd_lines(facts: ImageInfo) -> list[str]:
    details = facts.details
    lines = [f"disk type: {details['disk_type']}", f"version: {facts.version}"]
    geometry = details["geometry"]
    chs = (f"{geometry['cylinders']} cylinders, {geometry['heads']} heads, "
           f"{geometry['sectors_per_track']} sectors per track")
    if details["size_source"] == "chs":
        lines.append(f"virtual size taken from: the CHS geometry ({chs})")
        if details["current_size"] != facts.virtual_size:
            lines.append(f"size in the footer (current size, not used): {_size(details['current_size'])}")
    else:
        lines.append("virtual size taken from: the size in the footer (current size)")
        if details["chs_size"] != facts.virtual_size:
            lines.append(f"CHS geometry (not used): {chs}, which describe {_size(details['chs_size'])}")
    lines += [f"unique ID: {details['unique_id']}", f"timestamp: {details['timestamp']}"]
    if details.get("saved_state"):
        lines.append("saved state: yes (the image was saved with a running machine's state)")
    if details["footer_source"] != "tail":
        lines.append(f"footer: read from its copy at the start of the file; the one at the end is damaged "
                     f"({details['tail_footer_problem']})")
    if details.get("head_copy_problem"):
        lines.append(f"footer copy at the start of the file: damaged ({details['head_copy_problem']})")
    elif details.get("footer_copy_matches") is False:
        lines.append("footer copy at the start of the file: differs from the footer at the end")
    if "allocated_blocks" in details:
        lines.append(f"allocated blocks: {details['allocated_blocks']} of {details['max_table_entries']}")
    for key in ("parent_name", "parent_unique_id", "parent_timestamp"):
        if details.get(key):
            lines.append(f"{key_words(key)}: {details[key]}")
    if "parent_opened" in details:
        lines.append(f"parent opened: {words(details['parent_opened'])}")
    return lines


def _qcow2_lines(facts: ImageInfo) -> list[str]:
    details = facts.details
    # the fields qemu-img info shows, then what is worth knowing only when it is set
    lines = [f"{key_words(key)}: {words(details[key])}"
             for key in ("compat", "compression_type", "lazy_refcounts", "refcount_bits", "corrupt", "extended_l2")]
    for key in ("dirty", "encrypted", "data_file", "bitmaps", "snapshot"):
        if details.get(key):
            lines.append(f"{key_words(key)}: {words(details[key])}")
    lines += [note for key, note in details.items() if key.startswith("note_")]
    return lines


def _other_lines(facts: ImageInfo) -> list[str]:
    """RAW, or a disk read through a wrapper: facts worth showing only when set."""
    return [f"{key_words(key)}: {words(value)}" for key, value in facts.details.items() if value not in (None, False)]


@cli.command("map")
@click.argument("image")
@click.option("-f", "--format", "fmt", type=FORMAT_CHOICE, help="Skip probing: the image's format.")
@click.option("--allow-backing", is_flag=True, help="Open backing files / parents (inside the image's directory).")
@click.option("-l", "--snapshot", help="Map an internal qcow2 snapshot (id or name).")
@vhd_size_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of extents.")
def map_command(image: str, fmt: FormatName | None, allow_backing: bool, snapshot: str | None, vhd_size: VhdSizeRule,
                as_json: bool) -> None:
    """The allocation map of IMAGE: DATA and ZERO extents, from metadata only."""
    from . import open_image

    with open_image(image, fmt, allow_backing=allow_backing, snapshot=snapshot,
                    vhd_size=vhd_size) as reader:
        if as_json:
            # streamed: a map may have millions of extents
            click.echo("[", nl=False)
            for index, extent in enumerate(reader.extents()):
                click.echo(("," if index else "") + "\n  " + json.dumps(extent.to_dict()), nl=False)
            click.echo("\n]")
            return
        click.echo(f"{'Offset':<20}  {'Length':<20}  {'Kind':<5}  Host offset")
        for extent in reader.extents():
            host = "" if extent.host_offset is None else f"0x{extent.host_offset:x}"
            click.echo(f"0x{extent.start:<18x}  0x{extent.length:<18x}  {extent.kind.value:<5}  {host}")


@cli.command("convert")
@click.argument("source")
@click.argument("target")
@click.option("-f", "--format", "fmt", help="Skip probing: the source's format (raw, vhd/vpc, qcow2; with the "
              "qemu-img backend any format qemu-img reads).")
@click.option("-O", "--output-format", "output_format", type=FORMAT_CHOICE,
              help="Format of TARGET [default: from its extension (.qcow2; .vhd or .vpc; .vdi; .raw or .img), else "
              "raw].")
@click.option("-o", "--options", "options", help="Target format options, k=v,k2=v2 (as qemu-img -o).")
@click.option("-c", "--compress", is_flag=True, help="Compress data clusters (qcow2).")
@click.option("--align", help="Round the virtual size up to a multiple of this size, itself a multiple of 512 "
              "(1M for Azure, 1G for GCE).")
@click.option("--backend", type=click.Choice(get_args(Backend)), default="auto", show_default=True,
              help="native reads raw, vhd, vhdx and qcow2; qemu-img converts what diskimg detects but does not read; "
              "auto picks native where it can.")
@click.option("--allow-backing", is_flag=True, help="Open backing files / parents (inside the source's directory).")
@click.option("-l", "--snapshot", help="Convert an internal qcow2 snapshot (id or name) instead of the active layer.")
@vhd_size_option
@click.option("-S", "--sparse-size", default="4k", show_default=True,
              help="Zero ranges of at least this size are left unwritten (holes); 0 writes every byte.")
@click.option("--checksum", is_flag=True, help="Compute the output's SHA-256 and the guest content hash.")
@sparsify_option
@click.option("--force", is_flag=True, help="Replace TARGET if it exists.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]), default="auto",
              show_default=True, help="Progress on stderr: a bar (auto: when stderr is a terminal) or JSON lines.")
@click.option("--no-progress", is_flag=True, help="Same as --progress none.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object on stdout.")
def convert_command(source: str, target: str, fmt: str | None, output_format: FormatName | None,
                    options: str | None, compress: bool, align: str | None, backend: Backend, allow_backing: bool,
                    snapshot: str | None, vhd_size: VhdSizeRule, sparse_size: str, checksum: bool, sparsify: bool,
                    force: bool, progress_mode: str, no_progress: bool, as_json: bool) -> None:
    """Convert SOURCE to TARGET ("-" for standard output)."""
    from . import convert

    if target == "-" and as_json:
        raise UsageError("--json prints on stdout, which is taken by the image when TARGET is '-'")
    granularity = parse_size(sparse_size)
    if granularity and (granularity % 512 or granularity > 1 << 30):
        raise UsageError("-S must be 0 or a multiple of 512 up to 1G")
    progress, close_progress = _progress("none" if no_progress else progress_mode)
    try:
        result = convert(source, target, output_format, options=options, compress=compress,
                         align=parse_size(align) if align else None, zero_granularity=granularity,
                         checksum=checksum, backend=backend, source_format=fmt, allow_backing=allow_backing,
                         snapshot=snapshot, vhd_size=vhd_size, force=force,
                         progress=progress, sparsify=sparsify)
    finally:
        close_progress()
    if as_json:
        _print_json(result.to_dict())
        return
    summary = (f"{source} ({result.source_format}) -> {target} ({result.target_format}, {result.backend}): "
               f"{format_size(result.virtual_size)} in {result.seconds:.2f} s")
    if result.decompression_passes:
        summary += f" ({_passes(result.decompression_passes)} of the compressed source)"
    click.echo(summary, err=True)
    if result.sparsified is not None:
        click.echo("\n".join(_sparsified_lines(result.sparsified, "left out of the output")), err=True)
    if result.sha256:
        click.echo(f"sha256: {result.sha256}\ncontent hash: {result.content_hash}", err=target == "-")


@cli.command("measure")
@click.argument("source")
@click.option("-f", "--format", "fmt", type=FORMAT_CHOICE, help="Skip probing: the source's format.")
@click.option("-O", "--output-format", "output_format", type=FORMAT_CHOICE, required=True, help="Target format.")
@click.option("-o", "--options", "options", help="Target format options, k=v,k2=v2 (as qemu-img -o).")
@click.option("-c", "--compress", is_flag=True, help="Compressed qcow2 (the figure is then an upper bound).")
@click.option("--align", help="Round the virtual size up to a multiple of this size, itself a multiple of 512.")
@click.option("-S", "--sparse-size", default="0", show_default=True,
              help="Also read the data to find zero ranges of this size (0: the allocation map only).")
@click.option("--allow-backing", is_flag=True, help="Open backing files / parents (inside the source's directory).")
@click.option("-l", "--snapshot", help="Measure an internal qcow2 snapshot (id or name).")
@vhd_size_option
@sparsify_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def measure_command(source: str, fmt: FormatName | None, output_format: FormatName, options: str | None,
                    compress: bool,
                    align: str | None, sparse_size: str, allow_backing: bool, snapshot: str | None,
                    vhd_size: VhdSizeRule, sparsify: bool, as_json: bool) -> None:
    """The size of the file that convert would write, computed without writing it."""
    from . import measure

    result = measure(source, output_format, options=options, compress=compress,
                     align=parse_size(align) if align else None, zero_granularity=parse_size(sparse_size),
                     source_format=fmt, allow_backing=allow_backing, snapshot=snapshot,
                     vhd_size=vhd_size, sparsify=sparsify)
    if as_json:
        _print_json(result.to_dict())
        return
    click.echo(f"required size: {result.required}")
    click.echo(f"fully allocated size: {result.fully_allocated}")
    source = "content scanned" if result.scanned else "from the allocation map"
    click.echo(f"data: {result.data_bytes} bytes ({source})")
    if result.sparsified is not None and result.required_unsparsified is not None:
        saved = result.required_unsparsified - result.required
        click.echo(f"required size without --sparsify: {result.required_unsparsified} "
                   f"({format_size(saved)} more than with it)")
        click.echo("\n".join(_sparsified_lines(result.sparsified, "freed")))


def _sparsified_lines(volumes: list[SparsifiedVolume], freed: str) -> list[str]:
    """Each volume of a sparsified disk in words: what its file system does not use and how much of the
    source's data that frees, or why it was kept byte for byte."""
    if not volumes:
        return ["sparsify: no volume found (the disk is kept byte for byte)"]
    lines = []
    for volume in volumes:
        held = f" ({volume.file_system})" if volume.file_system else ""
        if volume.sparsified:
            lines.append(f"sparsify: {volume.name}{held}: {format_size(volume.unused_bytes)} unused, "
                         f"{format_size(volume.sparsified_bytes)} of data {freed}")
        else:
            lines.append(f"sparsify: {volume.name}{held}: kept byte for byte: {volume.reason}")
    return lines


@cli.command("compare")
@click.argument("first")
@click.argument("second")
@click.option("-f", "format_a", type=FORMAT_CHOICE, help="Skip probing: FIRST's format.")
@click.option("-F", "format_b", type=FORMAT_CHOICE, help="Skip probing: SECOND's format.")
@click.option("--strict", "-s", is_flag=True, help="Images of different virtual sizes differ.")
@click.option("--allow-backing", is_flag=True, help="Open backing files / parents (inside each image's directory).")
@vhd_size_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object.")
@click.pass_context
def compare_command(ctx: click.Context, first: str, second: str, format_a: FormatName | None,
                    format_b: FormatName | None, strict: bool, allow_backing: bool, vhd_size: VhdSizeRule,
                    as_json: bool) -> None:
    """Whether FIRST and SECOND hold the same guest content (exit 0 same, 1 different)."""
    from . import compare

    result = compare(first, second, format_a=format_a, format_b=format_b, strict=strict,
                     allow_backing=allow_backing, vhd_size=vhd_size)
    if as_json:
        _print_json(result.to_dict())
    else:
        click.echo(result.message[0].upper() + result.message[1:] + ".")
    ctx.exit(0 if result.identical else EXIT_NO)


@cli.command("validate")
@click.argument("image", required=False)
@click.option("--target", default="ecs", show_default=True, help="The cloud whose import rules apply.")
@click.option("--role", type=click.Choice(get_args(DiskRole)),
              help="What IMAGE will be: the system disk (the default) or a data disk; not with --system.")
@click.option("--boot-mode", type=click.Choice(get_args(BootMode), case_sensitive=False),
              help="The boot mode the image will be declared with (default: report what the disk supports).")
@click.option("--system", "system_image", help="Disk set form: the system disk.")
@click.option("--data", "data_images", multiple=True, help="Disk set form: a data disk (repeatable, up to 16).")
@click.option("--allow-backing", is_flag=True, help="Inspect through a backing chain (inside the image's directory).")
@click.option("--strict", is_flag=True, help="Warnings also make the image not importable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as a JSON object.")
@click.option("--list-rules", is_flag=True, help="List the rules checked for --target and exit.")
@click.pass_context
def validate_command(ctx: click.Context, image: str | None, target: str, role: DiskRole | None,
                     boot_mode: BootMode | None,
                     system_image: str | None, data_images: tuple[str, ...], allow_backing: bool, strict: bool,
                     as_json: bool, list_rules: bool) -> None:
    """Check IMAGE (or --system IMG [--data IMG]...) against a cloud's import rules
    (exit 0 importable, 1 not importable, 3 a file cannot be opened)."""
    from .validation import list_rules as rules_of, render_rules_text, validate

    if list_rules:
        rules = rules_of(target)
        click.echo(json.dumps([r.to_dict() for r in rules], indent=2) if as_json else render_rules_text(rules))
        return
    if image is None and system_image is None:
        raise UsageError("give an IMAGE, or --system IMAGE [--data IMAGE]...")
    # validate checks the target (a usage error naming the known ones)
    report = validate(image, role=role, target=cast(CloudTarget, target), boot_mode=boot_mode, strict=strict,
                      system=system_image, data=data_images, allow_backing=allow_backing)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render_text())
    ctx.exit(0 if report.importable else EXIT_NO)


@cli.command("export")
@click.option("--name", required=True, help="Name of the set: files are NAME_system.<fmt>.tar.gz, NAME_data_xvdb...")
@click.option("--system", "system_image", required=True, help="The system disk (any image diskimg reads).")
@click.option("--data", "data_images", multiple=True, help="A data disk (repeatable, in device order).")
@click.option("--devices", help="The data disks' device names, comma-separated (default xvdb,xvdc,...).")
@click.option("--out", "out_dir", default=".", show_default=True,
              help="Folder of the archives and manifest (created if missing).")
@click.option("--format", "output_format", type=FORMAT_CHOICE, default="raw", show_default=True,
              help="Format of the disks inside the archives.")
@click.option("--archive", type=click.Choice(get_args(ArchiveKind)), default="tar.gz",
              show_default=True, help="Archive type; none writes the bare disk files.")
@click.option("--layout", type=click.Choice(get_args(ExportLayout)), default="ecs", show_default=True,
              help="ecs: ECS export names; gce: disk.raw rounded up to whole GiB (RAW, tar.gz).")
@click.option("-c", "--compress", is_flag=True, help="Compressed qcow2 clusters (with --archive none only).")
@click.option("-S", "--sparse-size", default="4k", show_default=True,
              help="Zero ranges of at least this size are left out (0: the source's allocation map only).")
@click.option("--threads", type=int, help="Compression threads (default: every core).")
@click.option("--allow-backing", is_flag=True, help="Open backing files / parents (inside each image's directory).")
@sparsify_option
@click.option("--force", is_flag=True, help="Replace existing files of the same names.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]), default="auto",
              show_default=True, help="Progress on stderr: a bar (auto: when stderr is a terminal) or JSON lines.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object on stdout.")
def export_command(name: str, system_image: str, data_images: tuple[str, ...], devices: str | None, out_dir: str,
                   output_format: FormatName, archive: ArchiveKind, layout: ExportLayout, compress: bool,
                   sparse_size: str, threads: int | None, allow_backing: bool, sparsify: bool, force: bool,
                   progress_mode: str, as_json: bool) -> None:
    """Pack a machine's disks into one archive each, with NAME.manifest.json and NAME.SHA256SUMS."""
    from . import export

    progress, close_progress = _progress(progress_mode)
    try:
        result = export(name, system_image, data_images, out=out_dir, output_format=output_format, archive=archive,
                        layout=layout, devices=devices.split(",") if devices else None, threads=threads,
                        zero_granularity=parse_size(sparse_size), compress=compress, allow_backing=allow_backing,
                        force=force, progress=progress, sparsify=sparsify)
    finally:
        close_progress()
    for warning in result.warnings:
        click.echo(f"diskimg: warning: {warning}", err=True)
    if as_json:
        _print_json(result.to_dict())
        return
    for disk in result.disks:
        click.echo(f"{disk.file}: {disk.role} {disk.device}, {disk.format} {format_size(disk.virtual_size)} "
                   f"from {disk.source} ({disk.source_format}), {format_size(disk.size)}")
    for sparsified in result.sparsified or ():
        click.echo("\n".join(f"{sparsified.file}: {line}"
                             for line in _sparsified_lines(sparsified.volumes, "left out of the archive")))
    click.echo(f"manifest: {result.manifest} ({result.seconds:.2f} s)")


@cli.command("verify")
@click.argument("path", metavar="MANIFEST|DIR")
@click.option("--deep", is_flag=True, help="Also decompress each archive and recompute the guest content hash.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object.")
@click.pass_context
def verify_command(ctx: click.Context, path: str, deep: bool, as_json: bool) -> None:
    """Re-hash an export's files against its manifest, or every export's in DIR (exit 0 all intact, 1
    naming what differs or is missing)."""
    from . import verify

    result = verify(path, deep=deep)
    if as_json:
        _print_json(result.to_dict())
    else:
        for checked in result.files:
            click.echo(f"{checked.file}: {checked.status.upper()} ({_verified(checked, deep)})")
    ctx.exit(0 if result.intact else EXIT_NO)


def _verified(checked: VerifiedFile, deep: bool) -> str:
    """What the check of one file covered, or what it found wrong."""
    if checked.status != "ok":
        return checked.message
    if not deep:
        return "its size and hashes match the manifest"
    if checked.content_checked:
        return "its size and hashes match the manifest; the disk was decoded and its guest content hash matches too"
    return ("its size and hashes match the manifest; the archive decodes to its one disk member, whose guest "
            "content hash was not recomputed (a qcow2 or VHD inside a compressed archive needs random access)")


@cli.command("unpack")
@click.argument("source", metavar="ARCHIVE|MANIFEST")
@click.option("--out", "out_dir", required=True, help="Directory the disks are restored into (created if missing).")
@click.option("-O", "--output-format", "output_format", type=FORMAT_CHOICE,
              help="Convert on the fly to this format (default: the disk's own format).")
@click.option("--force", is_flag=True, help="Replace disks that already exist in the directory.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]), default="auto",
              show_default=True, help="Progress on stderr: a bar (auto: when stderr is a terminal) or JSON lines.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object on stdout.")
def unpack_command(source: str, out_dir: str, output_format: FormatName | None, force: bool, progress_mode: str,
                   as_json: bool) -> None:
    """Restore the disk of ARCHIVE (a tar, tar.gz, tar.zst, tar.xz, or a compressed disk), or every
    disk of an export's MANIFEST, verifying the manifest's hashes, into --out."""
    from . import unpack

    progress, close_progress = _progress(progress_mode)
    try:
        result = unpack(source, out_dir, output_format, force=force, progress=progress)
    finally:
        close_progress()
    if as_json:
        _print_json(result.to_dict())
        return
    for disk in result.disks:
        member = f" ({disk.member})" if disk.member else ""
        checked = ", verified against the manifest" if disk.verified else ""
        click.echo(f"{disk.archive}{member} -> {disk.output} ({disk.format}, "
                   f"{format_size(disk.virtual_size)}{checked})")


@cli.command("check")
@click.argument("image")
@click.option("-f", "--format", "fmt", type=FORMAT_CHOICE, help="Skip probing: the image's format.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result object.")
@click.pass_context
def check_command(ctx: click.Context, image: str, fmt: FormatName | None, as_json: bool) -> None:
    """Check the structure of IMAGE like qemu-img check (exit 0 clean, 1 problems found, 3 unreadable)."""
    from . import check

    result = check(image, fmt)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render_text())
    ctx.exit(0 if result.clean else EXIT_NO)


@cli.command("batch")
@click.argument("plan")
@click.option("--journal", help="JSON Lines file of finished jobs: appended to as jobs finish; the jobs it holds "
              "are not run again.")
@click.option("--jobs", "-j", "parallel", type=click.IntRange(min=1),
              help="Jobs at a time [default: one per core, fewer if memory is short].")
@click.option("--scheduler", help="Run each job as a task of this Dask cluster (tcp://host:8786), whose workers "
              "see the same (absolute) paths.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]), default="auto",
              show_default=True, help="Progress on stderr: a bar over the batch (auto: when stderr is a terminal) "
              "or JSON lines with the job ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as a JSON object.")
@click.pass_context
def batch_command(ctx: click.Context, plan: str, journal: str | None, parallel: int | None, scheduler: str | None,
                  progress_mode: str, as_json: bool) -> None:
    """Run every job of PLAN (JSON Lines: validate, convert, export, verify, unpack) in parallel; one
    bad image does not stop the others (exit 0 all succeeded, 1 any said no or failed)."""
    from . import batch

    progress, close_progress = _batch_progress(progress_mode)
    try:
        result = batch(plan, journal=journal, jobs=parallel, scheduler=scheduler, progress=progress)
    finally:
        close_progress()
    if as_json:
        _print_json(result.to_dict())
    else:
        counts = ", ".join(f"{count} {outcome}" for outcome, count in result.outcomes.items())
        skipped = f" ({result.skipped} journaled before)" if result.skipped else ""
        click.echo(f"{result.jobs} jobs: {counts}{skipped}")
        if result.failed:
            click.echo(f"failed or said no: {', '.join(result.failed)}")
        click.echo(f"read {format_size(result.read_bytes)}, written {format_size(result.written_bytes)}; "
                   f"{result.seconds:.2f} s, {result.jobs_per_second:.2f} jobs/s, "
                   f"{format_size(int(result.bytes_per_second))}/s")
    ctx.exit(0 if result.succeeded else EXIT_NO)


def _batch_progress(mode: str) -> tuple[Callable[[str, str, int, int], None] | None, Callable[[], None]]:
    """Progress over a batch: one bar over the jobs with the running ids, or a JSON line per event."""
    mode = _progress_mode(mode)
    if mode == "none":
        return None, lambda: None
    started = time.monotonic()
    if mode == "json":
        def emit(event: str, job_id: str, finished: int, total: int) -> None:
            _progress_line({"event": event, "id": job_id, "finished": finished, "total": total,
                            "elapsed": round(time.monotonic() - started, 3)})

        return emit, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="job", file=sys.stderr, desc="batch")
    running: list[str] = []

    def update(event: str, job_id: str, finished: int, total: int) -> None:
        if event == "start":
            running.append(job_id)
        elif job_id in running:
            running.remove(job_id)
        bar.total = total
        bar.update(finished - bar.n)
        shown = ", ".join(running[:4]) + (f" and {len(running) - 4} more" if len(running) > 4 else "")
        bar.set_postfix_str(shown, refresh=True)

    return update, bar.close


def _passes(count: int) -> str:
    return "one decompression pass" if count == 1 else f"{count} decompression passes"


def _progress_mode(mode: str) -> str:
    """``auto``: a bar when a person watches standard error (a terminal), else none."""
    return ("bar" if sys.stderr.isatty() else "none") if mode == "auto" else mode


def _progress_line(line: dict[str, Any]) -> None:
    """One JSON progress line on standard error, flushed: a program reads it as it comes."""
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()


def _progress(mode: str) -> tuple[ProgressCallback | None, Callable[[], None]]:
    """A progress callback for the mode and a function that closes it."""
    mode = _progress_mode(mode)
    if mode == "none":
        return None, lambda: None
    started = time.monotonic()
    if mode == "json":
        last = [0.0]

        def emit(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 0.5:
                last[0] = now
                _progress_line({"phase": phase, "done": done, "total": total, "elapsed": round(now - started, 3)})

        return emit, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="convert")

    def update(phase: str, done: int, total: int) -> None:
        if bar.desc != phase or done < bar.n:
            bar.reset()
            bar.set_description(phase)
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def main(argv: list[str] | None = None) -> None:
    """Entry point: one error line and a documented exit code, never a traceback."""
    try:
        code = cli.main(args=argv, prog_name="diskimg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("diskimg: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except DiskImageError as exc:
        click.echo(error_line(exc), err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("diskimg: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our standard output went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OUTPUT
    except Exception as exc:  # a bug: still one line, with a way to see more
        if os.environ.get("DISKIMG_DEBUG"):
            raise
        click.echo(internal_error_line(exc), err=True)
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)
