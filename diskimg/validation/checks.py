"""The checks: small functions over a :class:`DiskContext` that emit findings by rule code.

Each is registered with ``@disk_check(category)`` (or ``@set_check`` for the disk set) and runs in
registration order; a check whose prerequisite is missing raises ``NotAvailable`` and the engine
notes it in ``Report.not_checked``. Severities and rationales are not here: they come from the rule
catalogue (``rules.py``). Guest inspection will add more checks in the same way (category
``guest``), reading file systems through the shared context.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import BackingFileError, UnsupportedFormat
from ..formats.foreign import output_name
from ..formats.qcow2 import structures as q
from ..inspection.guest import CONTAINERS, GuestVolume
from ..inspection.signatures import FileSystem
from ..streams.compressed import unwrap_command
from ..units import format_size
from .context import WRAPPERS, DiskContext, NotAvailable
from .rules import DATA, SYSTEM, GiB


@dataclass(frozen=True)
class Check:
    name: str
    category: str
    function: Callable[..., None]


DISK_CHECKS: list[Check] = []
SET_CHECKS: list[Check] = []


def disk_check(category: str) -> Callable[[Callable[[DiskContext], None]], Callable[[DiskContext], None]]:
    def register(function: Callable[[DiskContext], None]) -> Callable[[DiskContext], None]:
        DISK_CHECKS.append(Check(function.__name__, category, function))
        return function

    return register


def set_check(function: Callable[..., None]) -> Callable[..., None]:
    SET_CHECKS.append(Check(function.__name__, "set", function))
    return function


def _q(path: str) -> str:
    return shlex.quote(path)


def _out(path: str, suffix: str = ".qcow2", tag: str = "") -> str:
    """An output name beside ``path``: disk.vmdk -> disk.qcow2; disk.qcow2 -> disk-TAG.qcow2."""
    if tag:
        stem, dot, ext = path.rpartition(".")
        base = stem if dot and "/" not in ext and stem else path
        return _q(f"{base}-{tag}{suffix}")
    return _q(output_name(path, suffix))


# =====================================================================================================
# container
# =====================================================================================================

#: diskimg format name -> qemu-img driver, for the formats qemu-img converts
QEMU_DRIVERS = {"vmdk": "vmdk", "vhdx": "vhdx", "vdi": "vdi", "qed": "qed", "qcow": "qcow",
                "parallels": "parallels", "bochs": "bochs", "cloop": "cloop", "dmg": "dmg"}


def convert_hint(ctx: DiskContext, driver: str) -> str:
    """The conversion command: diskimg's own reader where it has one (merging a differencing
    disk with its parent), else qemu-img's driver."""
    if ctx.supported_container and ctx.detection.readable:
        merge = "--allow-backing " if ctx.detection.subformat == "differencing" else ""
        return f"diskimg convert {merge}{_q(ctx.path)} {_out(ctx.path)} -O qcow2"
    return f"diskimg convert --backend qemu-img -f {driver} {_q(ctx.path)} {_out(ctx.path)} -O qcow2"


@disk_check("container")
def container_format(ctx: DiskContext) -> None:
    detection = ctx.detection
    fmt = detection.format
    accepted = ctx.profile.formats
    evidence: dict[str, Any] = {"format": fmt, "subformat": detection.subformat, "description": detection.description}
    if fmt in accepted:
        return  # whether it can actually be read is the next check's business
    if fmt in ctx.profile.preview_formats:
        ctx.emit(
            "format-vmdk",
            f"{detection.description}: {ctx.profile.title} takes VMDK only as an invitation-only preview "
            f"(DiskDeviceMapping.N.Format={ctx.profile.preview_formats[fmt]}); convert it to QCOW2",
            evidence, convert_hint(ctx, QEMU_DRIVERS.get(fmt, fmt)),
        )
        return
    if fmt == "iso9660":
        ctx.emit("format-iso", f"{detection.description}: an optical disc image, not a disk image", evidence,
                 "install the operating system from the ISO into a virtual machine and import that machine's disk")
        return
    if fmt in WRAPPERS:
        command, produced = unwrap_command(fmt, ctx.path)
        inner = detection.inner_description or detection.inner_format
        holding = f" holding {inner}" if inner and inner not in detection.description else ""
        message = f"{detection.description}{holding}"
        follow = f", then `diskimg validate {_q(produced)}`" if produced else ", then validate the image it holds"
        evidence["inner_format"] = detection.inner_format
        ctx.emit("format-wrapped", message + "; the importer reads the image file as is", evidence,
                 f"`{command}`{follow}")
        if ctx.through_wrapper and ctx.open_error is None:  # opening decompresses it (one full pass)
            ctx.emit("wrapped-inspected", f"the disk inside the {fmt} file was decompressed once, in full, into "
                     "a temporary sparse copy: the checks below inspect that disk", {"wrapper": fmt})
        return
    driver = QEMU_DRIVERS.get(fmt)
    hint = convert_hint(ctx, driver) if driver else (detection.hint or "convert it to QCOW2, VHD or RAW")
    ctx.emit("format-refused", f"{detection.description}: {ctx.profile.title} imports "
             f"{', '.join(accepted.values())} only", evidence, hint)


@disk_check("container")
def self_contained(ctx: DiskContext) -> None:
    if not ctx.supported_container:
        return  # container_format said why
    info = ctx.info
    error = ctx.open_error
    if ctx.format == "qcow2":
        parsed = ctx.qcow2_header
        if parsed is not None:
            header, extensions = parsed
            if header.backing_file_offset:
                backing = info.backing_file if info else None
                ctx.emit("backing-file", f"the qcow2 image depends on the backing file {backing!r}: only this "
                         "file would be imported, without the data of its backing chain",
                         {"offset": 8, "value": backing},
                         f"merge the chain into one image: diskimg convert --allow-backing {_q(ctx.path)} "
                         f"{_out(ctx.path, tag='full')} -O qcow2")
            if header.crypt_method:
                method = {q.CRYPT_AES: "AES", q.CRYPT_LUKS: "LUKS"}.get(header.crypt_method,
                                                                       f"method {header.crypt_method}")
                ctx.emit("encrypted", f"the qcow2 image is encrypted ({method})",
                         {"offset": 32, "value": header.crypt_method},
                         "decrypt it: qemu-img convert --object secret,id=sec0,file=PASSPHRASE_FILE --image-opts "
                         f"driver=qcow2,file.filename={_q(ctx.path)},encrypt.key-secret=sec0 -O qcow2 "
                         f"{_out(ctx.path, tag='decrypted')}")
            if header.incompatible_features & q.INCOMPAT_DATA_FILE:
                ctx.emit("external-data-file", f"the guest data lives in the external file "
                         f"{extensions.data_file!r}, which is not part of the upload",
                         {"offset": 72, "value": extensions.data_file},
                         f"make a self-contained copy (from the image's folder): qemu-img convert -O qcow2 "
                         f"{_q(ctx.path)} {_out(ctx.path, tag='standalone')}")
    elif ctx.format == "vhd" and info is not None and info.subformat == "differencing":
        parent = info.backing_file
        ctx.emit("vhd-differencing", f"a differencing VHD: it holds only the changes against its parent {parent!r}",
                 {"offset": ctx.file_size - 512 + 60, "value": 4, "parent": parent},
                 f"merge it with its parent (kept beside it): diskimg convert --allow-backing {_q(ctx.path)} "
                 f"{_out(ctx.path, tag='merged')} -O qcow2")
    if error is not None and not isinstance(error, BackingFileError):
        explained = isinstance(error, UnsupportedFormat) and any(
            ctx.emitted(code) for code in ("encrypted", "external-data-file"))
        if not explained:
            ctx.emit("image-unreadable", f"the {ctx.format} image cannot be read: {error.message}",
                     {"offset": getattr(error, "offset", None), "structure": getattr(error, "structure", None)},
                     getattr(error, "hint", None) or f"`diskimg check {_q(ctx.path)}` reports what is damaged; "
                     "re-copy the file if it was cut short")


@disk_check("container")
def qcow2_flags(ctx: DiskContext) -> None:
    if ctx.format != "qcow2":
        return
    parsed = ctx.qcow2_header
    if parsed is None:
        raise NotAvailable("the qcow2 header cannot be parsed")
    header, _ = parsed
    incompat = header.incompatible_features
    if incompat & q.INCOMPAT_DIRTY:
        ctx.emit("qcow2-dirty", "the qcow2 dirty bit is set: the image was not closed cleanly (refcounts may be "
                 "stale; the VM may have been running when it was copied)",
                 {"offset": 72, "value": f"0x{incompat:x}"},
                 "shut the VM down cleanly and copy again, or repair the refcounts: "
                 f"qemu-img check -r all {_q(ctx.path)}")
    if incompat & q.INCOMPAT_CORRUPT:
        ctx.emit("qcow2-corrupt", "the qcow2 corrupt bit is set: QEMU found its metadata inconsistent",
                 {"offset": 72, "value": f"0x{incompat:x}"},
                 f"repair a copy with qemu-img check -r all, check the guest file systems, then write a clean image: "
                 f"diskimg convert {_q(ctx.path)} {_out(ctx.path, tag='repaired')} -O qcow2")
    newer = []
    if header.compression_type:
        newer.append("zstd compression")
    if incompat & q.INCOMPAT_EXTENDED_L2:
        newer.append("extended L2 entries")
    if newer:
        ctx.emit("qcow2-newer-features", f"the image uses {' and '.join(newer)}, which qemu-img before 5.1/5.2 "
                 "cannot read", {"offset": 72, "value": f"0x{incompat:x}", "compression_type": header.compression_type},
                 f"write a plain image: diskimg convert {_q(ctx.path)} {_out(ctx.path, tag='compat')} -O qcow2")
    if header.nb_snapshots:
        ctx.emit("qcow2-snapshots", f"{header.nb_snapshots} internal snapshot(s); only the active layer is imported",
                 {"offset": 60, "value": header.nb_snapshots},
                 f"drop them from the upload: diskimg convert {_q(ctx.path)} {_out(ctx.path, tag='active')} -O qcow2")


@disk_check("container")
def qcow2_compressed(ctx: DiskContext) -> None:
    if ctx.format != "qcow2":
        return
    total, first = ctx.compressed
    if total:
        cluster = ctx.info.cluster_size if ctx.info and ctx.info.cluster_size else None
        ctx.emit("qcow2-compressed", f"{format_size(total)} of guest data lie in compressed clusters",
                 {"compressed_bytes": total, "first_guest_offset": first,
                  "clusters": total // cluster if cluster else None},
                 f"diskimg convert {_q(ctx.path)} {_out(ctx.path, tag='uncompressed')} -O qcow2")


# =====================================================================================================
# integrity
# =====================================================================================================


@disk_check("integrity")
def integrity(ctx: DiskContext) -> None:
    ctx.require_container()
    if ctx.format == "raw":
        return  # no metadata to check
    result = ctx.integrity
    truncated = [p for p in result.problems if p.kind == "truncated"]
    corrupt = [p for p in result.problems if p.kind == "corruption"]
    errors = [p for p in result.problems if p.kind == "error"]
    if truncated:
        first = truncated[0]
        ctx.emit("image-truncated", f"the file ends before data its metadata references: {first.message}",
                 {"offset": first.offset, "structure": first.structure, "file_size": ctx.file_size,
                  "problems": len(truncated)},
                 "copy or download the image again (compare its size and checksum with the source)")
    if corrupt or (errors and not ctx.emitted("image-unreadable")):
        shown = corrupt or errors
        ctx.emit("integrity-corruption", f"{result.corruptions or len(shown)} corruption(s) in the {ctx.format} "
                 f"metadata; first: {shown[0].message}",
                 {"offset": shown[0].offset, "structure": shown[0].structure, "corruptions": result.corruptions,
                  "problems": [p.message for p in shown[:5]]},
                 f"see `diskimg check {_q(ctx.path)}`; repair a copy with `qemu-img check -r all` and check the "
                 "guest data, or export the disk again from its source")
    if result.leaks:
        ctx.emit("integrity-leaks", f"{result.leaks} leaked cluster(s): allocated in the file, used by nothing",
                 {"leaks": result.leaks,
                  "first_cluster": result.leaked_clusters[0] if result.leaked_clusters else None},
                 f"harmless; reclaim the space with qemu-img check -r leaks {_q(ctx.path)}")


# =====================================================================================================
# size
# =====================================================================================================


@disk_check("size")
def sizes(ctx: DiskContext) -> None:
    profile = ctx.profile
    virtual = ctx.virtual_size
    size, how = ctx.size_for_import
    gib = -(-size // GiB)
    evidence = {"virtual_size": virtual, "size_for_import": size, "chosen_from": how, "value": gib}
    if ctx.info is not None and ctx.format == "vhd":
        evidence["current_size"] = ctx.info.details.get("current_size")
        evidence["chs_size"] = ctx.info.details.get("chs_size")
    if size == 0:
        ctx.emit("size-empty", "the disk's virtual size is 0 bytes", evidence,
                 "check that the right file was given (an empty file is not an image)")
        return
    if gib > profile.max_disk_gib:
        ctx.emit("size-too-large", f"the disk needs DiskImageSize={gib} GiB, above the limit of "
                 f"{profile.max_disk_gib} GiB", evidence,
                 "shrink the file systems and partitions first, then the image (qemu-img resize --shrink), or split "
                 "the data over several data disks")
    else:
        legacy = profile.legacy_max_gib.get(ctx.role)
        if legacy and gib > legacy:
            ctx.emit("size-legacy-limit", f"DiskImageSize={gib} GiB is above the {legacy} GiB that {ctx.role} disks "
                     "were limited to before 2025", {**evidence, "legacy_limit_gib": legacy},
                     "fine in current regions; if the import is refused with InvalidImageSize, shrink the disk")
    if ctx.role == SYSTEM and gib < profile.recommended_system_gib:
        ctx.emit("size-system-small", f"the system disk is {format_size(virtual)}, below the recommended "
                 f"{profile.recommended_system_gib} GiB", evidence,
                 f"declare DiskImageSize={profile.recommended_system_gib} (or more) at import: the disk is created "
                 "that large and cloud-init/growpart extend the root partition at first boot")
    stored = ctx.file_size if ctx.format == "raw" else size  # a RAW file is read rounded up to sectors
    if stored % 512:
        ctx.emit("size-unaligned", f"the {'file' if ctx.format == 'raw' else 'virtual'} size {stored} is not a "
                 "multiple of 512 bytes: readers pad or drop the partial last sector", {**evidence, "value": stored},
                 f"pad it to whole sectors: truncate -s {-(-stored // 512) * 512} {_q(ctx.path)}"
                 if ctx.format == "raw" else None)
    if gib <= profile.max_disk_gib:
        note = "" if how == "virtual size" else f" ({how})"
        ctx.emit("disk-image-size", f"declare DiskDeviceMapping.{ctx.device}.DiskImageSize={gib} (GiB, at least "
                 f"the disk's {size} bytes{note}); more is allowed", evidence)
    if ctx.file_size > profile.multipart_upload_above:
        ctx.emit("upload-multipart", f"the file is {format_size(ctx.file_size)}: upload it to OSS with multipart "
                 "upload", {"file_size": ctx.file_size, "threshold": profile.multipart_upload_above},
                 f"ossutil cp {_q(ctx.path)} oss://BUCKET/{_q(os.path.basename(ctx.path))} (multipart by itself)")


# =====================================================================================================
# partitions
# =====================================================================================================

_TABLE_HINTS = {
    "gpt-header-invalid": "on a RAW copy, gdisk's recovery menu rebuilds the primary header from the backup "
                          "(gdisk disk.raw: r, b, then w)",
    "gpt-entries-crc": "on a RAW copy, gdisk's recovery menu loads the backup partition table (gdisk disk.raw: r, c, "
                       "then w); check the result with sgdisk -v",
    "gpt-protective-mbr-missing": "write a protective MBR on a RAW copy (gdisk disk.raw: x, n, then w)",
    "gpt-stale": "remove the stale GPT and keep the MBR: sgdisk --zap on a RAW copy",
    "gpt-4k-sectors": "re-create the disk with 512-byte logical sectors (cloud disks are 512e)",
    "partition-overlap": "fix the partition bounds with fdisk/gdisk (on a RAW copy): overlapping partitions corrupt "
                         "each other",
    "partition-invalid": "delete or fix the entry with fdisk/gdisk",
    "mbr-ebr-loop": "rebuild the logical partitions (testdisk, or fdisk on a RAW copy)",
    "mbr-ebr-invalid": "rebuild the logical partitions (testdisk, or fdisk on a RAW copy)",
}


def _raw_copy(ctx: DiskContext) -> str:
    if ctx.format == "raw":
        return _q(ctx.path)
    return f"{_out(ctx.path, '.raw')} (made with diskimg convert {_q(ctx.path)} {_out(ctx.path, '.raw')} -O raw)"


@disk_check("partitions")
def partition_table(ctx: DiskContext) -> None:
    table = ctx.table
    if table.scheme is None:
        fs = ctx.whole_disk_fs
        if fs is not None:
            what = f"a bare file system ({fs.description}) on the whole disk"
            found = fs.type
        else:
            head_empty = not any(ctx.reader.read_at(0, min(ctx.reader.virtual_size, 1 << 20)))
            what = "nothing: the start of the disk is all zeros" if head_empty else \
                "no partition table and no file system signature"
            found = "empty" if head_empty else "unknown"
        ctx.emit("no-partition-table", f"the system disk has no partition table: it holds {what}",
                 {"offset": 0, "value": found},
                 "image the whole disk (e.g. /dev/vda, not the partition /dev/vda1), or import this file as a "
                 "data disk (--role data)")
        ctx.emit("data-disk-unpartitioned", f"the data disk has no partition table: it holds {what}",
                 {"offset": 0, "value": found})
        return
    if not table.partitions and not table.issues and table.extended is None:
        what = f"an {table.scheme.upper()} partition table with no partitions" if table.scheme == "mbr" else \
            f"a {table.scheme.upper()} partition table with no partitions"
        ctx.emit("no-partition-table", f"the system disk has no partitions: it holds {what}",
                 {"offset": 0, "value": f"{table.scheme}-empty"},
                 "image the whole disk of the machine, with its partitions, or import this file as a data disk")
        ctx.emit("data-disk-unpartitioned", f"the data disk has no partitions: it holds {what}",
                 {"offset": 0, "value": f"{table.scheme}-empty"})
    for issue in table.issues:
        hint = _TABLE_HINTS.get(issue.code)
        if issue.code in ("gpt-backup-missing", "gpt-backup-not-at-end"):
            hint = f"rewrite the backup GPT at the end of the disk: sgdisk -e {_raw_copy(ctx)}"
        elif issue.code == "partition-out-of-bounds":
            end = issue.evidence.get("end")
            if end and end > table.disk_size:
                needed = -(-end // (1 << 20)) << 20
                hint = (f"the disk is smaller than its partitions (truncated copy?): copy it again, or grow the image "
                        f"to at least {needed} bytes: qemu-img resize -f {ctx.format} {_q(ctx.path)} {needed}")
            else:
                hint = "fix the partition bounds with gdisk/fdisk on a RAW copy"
        ctx.emit(issue.code, issue.message, issue.evidence, hint)


# =====================================================================================================
# file systems
# =====================================================================================================

_SPECIAL = {"bios_boot", "msr", "extended", "ldm", "protective"}


@disk_check("filesystems")
def file_systems(ctx: DiskContext) -> None:
    assembled = ctx.assembled  # first: assembling says what each container volume holds
    guest_volumes = ctx.base_volumes
    for volume, guest_volume in zip(ctx.volumes, guest_volumes, strict=True):
        fs = volume.fs
        part = volume.partition
        evidence: dict[str, Any] = {"partition": volume.number, "offset": volume.offset}
        kind = part.kind if part else None
        if fs is None:
            if volume.error:
                continue  # reported by the partition checks
            if kind in ("lvm", "swap"):
                pass
            elif kind not in _SPECIAL and part is not None:
                ctx.emit("fs-unknown", f"{volume.name} ({part.type_name}) holds no recognised file system",
                         {**evidence, "type": part.type})
        if fs is not None:
            evidence.update({"file_system": fs.type, "uuid": fs.uuid, "label": fs.label})
        # LVM and swap, by partition type or by signature
        if (fs is not None and fs.type == "lvm2") or kind == "lvm":
            inside, facts = _lvm_contents(ctx, guest_volume)
            ctx.emit("fs-lvm", f"{volume.name} is an LVM physical volume{inside}",
                     {**evidence, "type": part.type if part else None, **facts},
                     "use plain partitions for the system disk (Alibaba's image specification); the import itself "
                     "accepts LVM")
        if (fs is not None and fs.type == "swap") or kind == "swap":
            ctx.emit("fs-swap-partition", f"{volume.name} is a swap partition",
                     {**evidence, "type": part.type if part else None},
                     "remove the swap partition and its /etc/fstab line (a swap file can replace it)")
        if fs is None:
            continue
        if fs.type in ("luks", "bitlocker"):
            holds = guest_volume.holds
            facts = {key: holds.facts.get(key) for key in ("uuid", "cipher", "version")} if holds else {}
            shown = f" ({holds.name})" if holds else ""
            ctx.emit("fs-encrypted", f"{volume.name} is {fs.description}{shown}: ECS cannot import an encrypted "
                     "system disk, and nothing inside it can be checked", {**evidence, **facts},
                     "decrypt the volume before importing a system disk (the instance cannot ask for a passphrase)")
        whole = part is None or volume.length == part.size
        _file_system(ctx, volume.name, fs, evidence, volume.length, "partition" if part else "disk", whole)
    for guest_volume in assembled:
        fs = guest_volume.fs
        if fs is not None:
            evidence = {"volume": guest_volume.name, "stack": guest_volume.stack, "file_system": fs.type,
                        "uuid": fs.uuid, "label": fs.label}
            _file_system(ctx, guest_volume.name, fs, evidence, guest_volume.length, "volume", True)


def _file_system(ctx: DiskContext, name: str, fs: FileSystem, evidence: dict[str, Any], length: int,
                 container: str, whole: bool) -> None:
    """The findings about one file system, on a partition, the whole disk or an assembled volume (``length``
    bytes; ``whole``: the container is as large as its table says)."""
    profile = ctx.profile
    if fs.state in ("needs_recovery", "not_clean"):
        what = "its journal needs recovery" if fs.state == "needs_recovery" else "it was not cleanly unmounted"
        ctx.emit("fs-needs-recovery", f"{fs.type} on {name}: {what}", {**evidence, "value": fs.state},
                 "shut the VM down cleanly before copying its disk, or repair the file system on a copy "
                 f"({'e2fsck -f' if fs.type.startswith('ext') else 'xfs_repair' if fs.type == 'xfs' else 'fsck'}"
                 " through qemu-nbd or a loop device)")
    elif fs.state in ("errors", "needs_repair"):
        ctx.emit("fs-errors", f"{fs.type} on {name} " + (
            "has errors recorded by the kernel" if fs.state == "errors" else "is marked as needing repair"),
            {**evidence, "value": fs.state},
            f"repair it on a copy ({'e2fsck -f' if fs.type.startswith('ext') else 'xfs_repair'} through "
            "qemu-nbd or a loop device)")
    if fs.size is not None and fs.size > length and whole:
        ctx.emit("fs-larger-than-partition", f"the {fs.type} file system on {name} spans {fs.size} bytes "
                 f"but the {container} has {length}", {**evidence, "fs_size": fs.size, "container_size": length},
                 f"grow the {container} back to the file system's size (or shrink the file system first, e.g. "
                 f"resize2fs, then the {container})")
    if fs.type == "ext4" and "64bit" in fs.features:
        ctx.emit("fs-ext4-64bit", f"ext4 on {name} has the '64bit' feature (mke2fs's default), which "
                 "only Alibaba's 2019-2020 import instructions forbade",
                 {**evidence, "value": "64bit"},
                 "nothing to do; should an old image check still refuse it: resize2fs -s on the unmounted "
                 "file system")
    if fs.type.startswith("ext") and "project" in fs.features and "quota" in fs.features:
        ctx.emit("fs-ext4-project-quota", f"{fs.type} on {name} enables both 'project' and 'quota'",
                 {**evidence, "value": ["project", "quota"]},
                 "tune2fs -O ^project on the unmounted file system (or ^quota)")
    if fs.type not in profile.system_file_systems and fs.type not in ("swap", *CONTAINERS):
        ctx.emit("fs-not-listed", f"{name} holds {fs.description}, not among the file systems "
                 f"{profile.title} documents for a system disk", evidence,
                 "ext4 or XFS for a Linux root file system, NTFS for Windows")
    if ctx.role == SYSTEM and fs.size and fs.free is not None and fs.type in ("ext2", "ext3", "ext4", "xfs"):
        share = fs.free / fs.size
        if share < profile.min_free_fraction:
            ctx.emit("fs-full", f"{fs.type} on {name} has {format_size(fs.free)} free "
                     f"({share:.0%} of {format_size(fs.size)})",
                     {**evidence, "free": fs.free, "size": fs.size},
                     f"free at least {profile.min_free_fraction:.0%} of the file system before imaging: drivers "
                     "and agents are installed at first boot")


def _lvm_contents(ctx: DiskContext, volume: GuestVolume) -> tuple[str, dict[str, Any]]:
    """What an LVM physical volume holds, in words (after "is an LVM physical volume") and facts: its UUID, its
    volume group and the group's logical volumes with their kinds, sizes and file systems."""
    holds = volume.holds
    if holds is None:  # an LVM partition type without a PV label
        return "", {}
    group = ctx.stack.pv_groups.get(id(volume))
    facts: dict[str, Any] = {"pv_uuid": holds.facts["uuid"], "vg": None, "logical_volumes": []}
    if group is None:
        problems = "; ".join(ctx.stack.problems[ctx.machine.index(ctx)])
        return (f" ({holds.facts['uuid']}) in no volume group that could be read" + (f": {problems}" if problems
                                                                                       else ""), facts)
    assembled = {volume.layer.facts["path"]: volume for disk in ctx.stack.volumes for volume in disk
                 if volume.layer is not None and volume.layer.kind == "lvm-lv"}
    shown = []
    for lv in group.logical_volumes:
        if not lv.visible:
            continue
        found = assembled.get(lv.path)
        fs_type = found.fs_type if found is not None else None
        facts["logical_volumes"].append({"lv": lv.path, "type": lv.kind, "size": lv.size, "file_system": fs_type,
                                         "unreadable": lv.unreadable_reason})
        shown.append(f"{lv.name} ({lv.kind}, {format_size(lv.size)}" + (f", {fs_type}" if fs_type else "") + ")")
    facts["vg"] = group.name
    inside = f" holding {', '.join(shown)}" if shown else " holding no logical volume"
    return f" ({holds.facts['uuid']}) of volume group {group.name},{inside}", facts


@disk_check("filesystems")
def volume_groups(ctx: DiskContext) -> None:
    for group in ctx.stack.volume_groups[ctx.machine.index(ctx)]:
        for missing in group.missing:
            ctx.emit("fs-lvm-pv-missing", missing.message,
                     {"vg": group.name, "uuid": missing.uuid, "device": missing.device,
                      "logical_volumes": list(missing.logical_volumes), "marked_missing": missing.marked_missing,
                      "value": missing.uuid},
                     "validate the disks of the machine together (--system DISK --data DISK...) and import the one "
                     "holding this physical volume as a data disk, or drop it from the volume group inside the "
                     "guest (vgreduce --removemissing) after moving what it holds")


# =====================================================================================================
# boot
# =====================================================================================================


class BootFailure(NamedTuple):
    """The finding (as ``ctx.emit`` takes it) that says why a boot path the disk sets up ends in nothing."""

    code: str
    message: str
    evidence: dict[str, Any]
    hint: str


def _boot_failures(ctx: DiskContext) -> dict[str, BootFailure]:
    """Boot mode -> why it ends in nothing: the BIOS chain after the MBR code, an ESP without the
    removable-media loader."""
    boot = ctx.boot
    failures = {}
    chain = boot.chain
    if chain is not None and chain.problem:
        evidence = {"offset": chain.offset, "partition": chain.partition, "value": chain.loader,
                    "steps": chain.steps}
        if chain.kind == "no-active-partition":
            failures["BIOS"] = BootFailure("mbr-no-active-partition", chain.problem, {**evidence, "offset": 446},
                                           f"mark the boot partition active, e.g. sfdisk --activate {_raw_copy(ctx)} 1")
        else:
            failures["BIOS"] = BootFailure(
                "bios-boot-chain-broken", chain.problem, evidence,
                "reinstall the boot loader inside the guest: grub-install --target=i386-pc /dev/DISK (or, for "
                "syslinux/extlinux, install it into the active partition), or boot with UEFI")
    if boot.esp_without_fallback:
        arm64 = ctx.guest is not None and ctx.guest.architecture == "arm64"
        fallback = "BOOTAA64.EFI" if arm64 else "BOOTX64.EFI"
        failures["UEFI"] = BootFailure(
            "esp-no-loader", f"the ESP has no removable-media boot loader EFI/BOOT/{fallback}, the only one a new "
            "instance's firmware (empty NVRAM) boots" + (f" (it holds {', '.join(boot.loaders)})" if boot.loaders
                                                          else " (no .efi file at all)"),
            {"partition": boot.uefi_evidence.get("esp"), "value": boot.loaders or None},
            f"install the removable-media path in the guest: grub-install --target={'arm64' if arm64 else 'x86_64'}"
            f"-efi --removable (or --force-extra-removable), or copy the distribution's shim and grub to "
            f"EFI/BOOT/{fallback} and beside it")
    return failures


@disk_check("boot")
def boot_mode(ctx: DiskContext) -> None:
    if ctx.role != SYSTEM:
        return
    boot = ctx.boot
    table = ctx.table
    wanted = ctx.boot_mode
    evidence = {"bios": boot.bios_evidence, "uefi": boot.uefi_evidence, "supported": boot.modes}
    for volume in boot.esps:
        if volume.fs is None or not volume.fs.is_fat:
            ctx.emit("esp-not-fat", f"EFI system partition {volume.number} holds "
                     f"{volume.fs.description if volume.fs else 'no FAT file system'}",
                     {"partition": volume.number, "offset": volume.offset,
                      "value": volume.fs.type if volume.fs else None},
                     "format the ESP as FAT32 and reinstall the boot loader (grub-install / bootctl install)")
    for number, reason in boot.unreadable_esps.items():
        ctx.emit("esp-unreadable", f"the FAT file system of EFI system partition {number} cannot be read: {reason}",
                 {"partition": number}, "run fsck.vfat on the ESP (on a copy) and reinstall the boot loader")
    failures = _boot_failures(ctx)
    if wanted is not None:
        if wanted in failures:
            ctx.emit(*failures[wanted])
        elif wanted not in boot.modes:
            found = ", ".join(boot.modes) or "neither"
            need = ("no EFI system partition (GPT type C12A7328-F81F-11D2-BA4B-00A0C93EC93B or MBR type 0xEF) with "
                    "a FAT file system") if wanted == "UEFI" else (
                "no boot code in the MBR" + (" and no BIOS boot partition (GPT type "
                                             "21686148-6449-6E6F-744E-656564454649)" if table.scheme == "gpt" else ""))
            other = [m for m in boot.modes if m != wanted]
            ctx.emit("boot-mode-unsupported", f"BootMode={wanted} was asked for, but the disk has {need}; it "
                     f"supports: {found}", {**evidence, "value": wanted},
                     f"import with BootMode={other[0]}" if other else
                     ("install a UEFI boot loader into an ESP (grub-install --target=x86_64-efi --removable)"
                      if wanted == "UEFI" else "install a BIOS boot loader (grub-install --target=i386-pc /dev/DISK)"))
        else:
            ctx.emit("boot-mode", f"the disk can boot with BootMode={wanted} (supports {', '.join(boot.modes)})",
                     {**evidence, "value": wanted})
        chosen = wanted if wanted in boot.modes else None
    else:
        chosen = boot.recommended
        if chosen is None and failures:
            for failure in failures.values():
                ctx.emit(*failure)
        elif chosen is None:
            ctx.emit("boot-none", "no boot loader found: no boot code in the MBR"
                     + (", no BIOS boot partition" if table.scheme == "gpt" else "")
                     + " and no EFI system partition with a FAT file system", evidence,
                     "install a boot loader in the image (grub-install for BIOS, or an ESP with "
                     "EFI/BOOT/BOOTX64.EFI for UEFI) before importing")
        elif boot.bios and boot.uefi:
            ctx.emit("boot-mode", "the disk boots with both BIOS and UEFI: declare BootMode=UEFI; after import the "
                     "image can be marked UEFI-Preferred (boots either way)", {**evidence, "value": "UEFI"})
        else:
            other_mode = "UEFI" if chosen == "BIOS" else "BIOS"
            why_not = f" ({other_mode} would not: {failures[other_mode].message})" if other_mode in failures else ""
            ctx.emit("boot-mode", f"the disk boots with {chosen} only: declare BootMode={chosen}{why_not}",
                     {**evidence, "value": chosen})
    if chosen == "BIOS" and table.scheme == "gpt":
        code = boot.bios_evidence.get("mbr_boot_code")
        bios_parts = boot.bios_evidence.get("bios_boot_partition")
        if code and not bios_parts and not table.hybrid_mbr and not any(p.bootable for p in table.partitions):
            ctx.emit("gpt-bios-no-bios-boot-partition", "the GPT disk has MBR boot code but no BIOS boot partition "
                     "for GRUB's core image", {"value": boot.bios_evidence.get("boot_code")},
                     "add a 1 MiB partition of type ef02 (sgdisk -n 0:0:+1M -t 0:ef02) and re-run grub-install, or "
                     "boot with UEFI")
    if boot.bios and table.scheme == "gpt" and chosen is not None:
        code = boot.bios_evidence.get("mbr_boot_code")
        bios_parts = boot.bios_evidence.get("bios_boot_partition")
        if bios_parts and not code:
            ctx.emit("bios-boot-code-missing", f"BIOS boot partition {bios_parts[0]} is there, but sector 0 has no "
                     "boot code to reach it", {"partition": bios_parts[0], "offset": 0},
                     "re-run grub-install --target=i386-pc on the disk (inside the guest)")
    if chosen == "BIOS" and table.scheme == "mbr" and boot.bios:
        loader = boot.bios_evidence.get("boot_code")
        if loader not in ("grub", "lilo") and table.partitions and not any(p.bootable for p in table.partitions):
            ctx.emit("mbr-no-active-partition", f"the MBR boot code ({loader}) boots the active partition, but none "
                     "is marked active", {"offset": 446, "value": loader},
                     f"mark the boot partition active, e.g. sfdisk --activate {_raw_copy(ctx)} 1")


# =====================================================================================================
# the disk set
# =====================================================================================================


@set_check
def disk_count(contexts: list[DiskContext], emit: Callable[..., None]) -> None:
    data = [c for c in contexts if c.role == DATA]
    profile = contexts[0].profile
    if len(data) > profile.max_data_disks:
        emit("too-many-data-disks", f"{len(data)} data disks; {profile.title} takes at most {profile.max_data_disks}",
             {"value": len(data), "limit": profile.max_data_disks},
             "import the remaining disks separately (as images of their own, or attach them after creating the "
             "instance)")
    seen: dict[str, str] = {}
    for ctx in contexts:
        key = os.path.realpath(ctx.path)
        if key in seen:
            emit("duplicate-disk", f"{ctx.path} is given twice (also as {seen[key]})", {"value": ctx.path}, None)
        seen[key] = ctx.path
