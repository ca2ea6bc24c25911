"""The shared context checks read from: one :class:`DiskContext` per image, computed lazily and
cached, so that each structure is read once however many checks look at it.

Later checks (guest inspection: the OS inside, drivers, fstab, boot loader configuration) plug in
here as more lazily computed facts (e.g. a root file system reader) and more check functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..choices import DiskFormat
from ..conversion.spool import spooled
from ..detection.check import CheckResult, check
from ..detection.image import image_info, open_image
from ..detection.probe import detect
from ..errors import BackingFileError, DiskImageError, ImageNotFound, UnsupportedFormat
from ..formats import canonical_format
from ..formats.probing import READABLE_FORMATS, Detection
from ..formats.reader import DiskReader, ExtentKind, ImageInfo
from ..host.files import HostFile
from ..inspection import signatures as fsmod
from ..inspection.biosboot import BiosChain, follow_bios_chain
from ..inspection.fs.fat import find_efi_loaders
from ..inspection.guest import GuestDisk, GuestFacts, GuestVolume, inspect_guest
from ..inspection.guest.stack import MachineDisk, MachineStack, assemble
from ..inspection.partitions import Partition, PartitionTable, read_partition_table
from ..inspection.signatures import FileSystem, fallback_loaders
from ..streams.sources import opens_through_wrapper
from .report import Finding
from .rules import RULES_BY_CODE, SYSTEM, GiB, Profile

WRAPPERS = frozenset({"gzip", "xz", "bzip2", "zstd", "zip", "tar", "7z", "lz4"})
READABLE = frozenset(READABLE_FORMATS)  # the formats diskimg opens: the guest inside is inspected
#: VHD geometry 65535/16/255 means "too big for CHS": its size says nothing
_SATURATED_CHS = 65535 * 16 * 255 * 512


class NotAvailable(Exception):
    """A check's prerequisite is missing (the image could not be opened, has no partition table...).
    The engine records the reason in ``Report.not_checked``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Volume:
    """A partition (or the whole disk when ``partition`` is None) and what it holds."""

    partition: Partition | None
    offset: int
    length: int
    fs: FileSystem | None
    error: str | None = None

    @property
    def name(self) -> str:
        return f"partition {self.partition.number}" if self.partition else "the whole disk"

    @property
    def number(self) -> int | None:
        return self.partition.number if self.partition else None


@dataclass
class BootAnalysis:
    """Which boot modes the disk supports, and why."""

    bios: bool = False
    uefi: bool = False
    bios_evidence: dict[str, Any] = field(default_factory=dict)
    uefi_evidence: dict[str, Any] = field(default_factory=dict)
    esps: list[Volume] = field(default_factory=list)
    loaders: list[str] = field(default_factory=list)
    #: ESP numbers whose FAT could not be walked, with the reason
    unreadable_esps: dict[int, str] = field(default_factory=dict)
    #: what the MBR's boot code loads (``biosboot.follow_bios_chain``)
    chain: BiosChain | None = None
    #: a FAT ESP is there but holds no EFI/BOOT/BOOT<arch>.EFI: a new instance's firmware finds nothing to boot
    esp_without_fallback: bool = False

    @property
    def modes(self) -> list[str]:
        return [mode for mode, ok in (("BIOS", self.bios), ("UEFI", self.uefi)) if ok]

    @property
    def recommended(self) -> str | None:
        if self.uefi:
            return "UEFI"
        return "BIOS" if self.bios else None


class DiskContext:
    """Everything the checks of one disk share. Properties compute on first use."""

    def __init__(self, path: str, role: str, device: int, profile: Profile, boot_mode: str | None,
                 allow_backing: bool = False) -> None:
        self.path = path
        self.role = role
        self.device = device
        self.profile = profile
        self.boot_mode = boot_mode
        self.allow_backing = allow_backing
        self.findings: list[Finding] = []
        self.not_checked: list[dict[str, Any]] = []
        #: every disk of the machine validated with this one, itself included (``validate`` sets it): the
        #: guest's fstab may mount file systems of its data disks
        self.machine: list[DiskContext] = [self]
        # ImageNotFound (missing, unreadable) escapes from here: the only error validate raises
        self.detect_error: DiskImageError | None = None
        try:
            self.detection: Detection = detect(path)
        except ImageNotFound:
            raise
        except DiskImageError as exc:
            self.detect_error = exc
            self.detection = Detection(format="unknown", description=f"unrecognised file ({exc.message})")
        host = HostFile(path)
        try:
            self.file_size = host.size
        finally:
            host.close()

    # -- findings ------------------------------------------------------------------------------------

    def emit(self, code: str, message: str, evidence: dict[str, Any] | None = None, hint: str | None = None) -> None:
        rule = RULES_BY_CODE[code]  # KeyError: a check emitting a code missing from the catalogue is a bug
        if self.role not in rule.roles or self.profile.name not in rule.targets:
            return
        self.findings.append(
            Finding(code=code, severity=rule.severity, message=message, evidence=dict(evidence or {}), hint=hint,
                    category=rule.category, disk=self.path, role=self.role)
        )

    def emitted(self, code: str) -> bool:
        return any(f.code == code for f in self.findings)

    # -- the container ---------------------------------------------------------------------------------

    @property
    def format(self) -> str:
        return self.detection.format

    @property
    def disk_format(self) -> DiskFormat:
        """The format as the openers take it, for a container diskimg reads (a UsageError otherwise)."""
        return canonical_format(self.format)

    @property
    def supported_container(self) -> bool:
        """A format diskimg opens: what ECS imports, or a VMDK of a create type diskimg reads (the
        guest inside is inspected; container_format reports the format itself)."""
        return self.format in READABLE or (self.format in READABLE_FORMATS and self.detection.readable)

    def require_container(self) -> None:
        if not self.supported_container:
            raise NotAvailable(f"a {self.format} file is not opened; only its container was checked")

    @property
    def through_wrapper(self) -> bool:
        """A compressed file or a tar (sources.py): the container is refused, but the RAW disk
        inside is still inspected, from a temporary copy made in one decompression pass."""
        return opens_through_wrapper(self.detection)

    @cached_property
    def _opened(self) -> tuple[DiskReader | None, DiskImageError | None]:
        if not self.supported_container and not self.through_wrapper:
            return None, None
        try:
            if self.through_wrapper:
                with open_image(self.path) as wrapped:
                    return spooled(wrapped), None
            return open_image(self.path, self.disk_format, allow_backing=self.allow_backing), None
        except DiskImageError as exc:
            return None, exc

    @property
    def open_error(self) -> DiskImageError | None:
        return self._opened[1]

    @property
    def reader(self) -> DiskReader:
        reader, error = self._opened
        if reader is not None:
            return reader
        self.require_container()
        if isinstance(error, BackingFileError):
            raise NotAvailable("the image needs its backing file, which is not opened")
        if isinstance(error, UnsupportedFormat):
            raise NotAvailable(f"the image cannot be read: {error.message}")
        raise NotAvailable(f"the image cannot be read: {error.message if error else 'unknown error'}")

    @cached_property
    def info(self) -> ImageInfo | None:
        """Header facts (works for images with a backing file, where the reader is refused)."""
        if not self.supported_container:
            return None
        reader = self._opened[0]
        if reader is not None:
            return reader.info()
        try:
            return image_info(self.path, self.disk_format)
        except DiskImageError:
            return None

    @cached_property
    def qcow2_header(self) -> Any:
        """(Qcow2Header, HeaderExtensions) parsed straight from the file, for qcow2 images the reader
        refuses (encryption, external data file); None if not qcow2 or unparseable."""
        if self.format != "qcow2":
            return None
        from ..formats.qcow2 import read_first_cluster

        host = HostFile(self.path)
        try:
            first = read_first_cluster(host)
            return first.header, first.extensions  # empty extensions where they could not be read
        except DiskImageError:
            return None
        finally:
            host.close()

    @property
    def virtual_size(self) -> int:
        self.require_container()
        reader = self._opened[0]
        if reader is not None:
            return reader.virtual_size
        if self.info is not None:
            return self.info.virtual_size
        parsed = self.qcow2_header
        if parsed is not None:
            return int(parsed[0].virtual_size)
        raise NotAvailable("the virtual size is unknown: the image cannot be read")

    @cached_property
    def size_for_import(self) -> tuple[int, str]:
        """(bytes, how chosen): the size DiskImageSize must cover."""
        size = self.virtual_size
        how = "virtual size"
        details = self.info.details if self.info is not None else {}
        if self.format == "vhd":
            current = int(details.get("current_size") or 0)
            chs = int(details.get("chs_size") or 0)
            candidates = {"footer current_size": current}
            if chs and chs != _SATURATED_CHS:
                candidates["CHS geometry"] = chs
            if candidates and max(candidates.values()) > size:
                how, size = max(candidates.items(), key=lambda item: item[1])
            elif len(set(v for v in candidates.values() if v)) > 1:
                how = "the larger of footer current_size and CHS geometry"
        elif self.format == "qcow2":
            header_size = int(details.get("header_virtual_size") or 0)
            if header_size > size:
                size, how = header_size, "qcow2 header size"
        return size, how

    @property
    def disk_image_size(self) -> int:
        size, _ = self.size_for_import
        return -(-size // GiB)

    @cached_property
    def integrity(self) -> CheckResult:
        self.require_container()
        if self.format not in ("vhd", "qcow2", "vmdk", "vhdx", "vdi"):
            raise NotAvailable("only VHD, qcow2, VMDK, VHDX and VDI images have metadata to check")
        return check(self.path, self.disk_format)

    @cached_property
    def compressed(self) -> tuple[int, int | None]:
        """(guest bytes in compressed clusters, first such guest offset): from the integrity check's
        table walk when it ran, else from the allocation map, where compressed clusters are DATA
        extents without a host offset."""
        if self.format != "qcow2":
            return 0, None
        try:
            result = self.integrity
        except NotAvailable:
            result = None
        if result is not None and not result.check_errors and self.info is not None and self.info.cluster_size:
            return (result.compressed_clusters or 0) * self.info.cluster_size, result.first_compressed_offset
        total = 0
        first = None
        for extent in self.reader.extents():
            if extent.kind is ExtentKind.DATA and extent.host_offset is None:
                total += extent.length
                if first is None:
                    first = extent.start
        return total, first

    # -- content ------------------------------------------------------------------------------------------

    @cached_property
    def table(self) -> PartitionTable:
        reader = self.reader
        return read_partition_table(reader, reader.virtual_size)

    @cached_property
    def volumes(self) -> list[Volume]:
        reader = self.reader
        size = reader.virtual_size
        table = self.table
        if table.scheme is None:
            return [Volume(None, 0, size, fsmod.probe(reader, 0, size))] if size else []
        volumes = []
        for part in table.partitions:
            length = max(0, min(part.size, size - part.start))
            if length <= 0:
                volumes.append(Volume(part, part.start, 0, None, "lies past the end of the disk"))
                continue
            volumes.append(Volume(part, part.start, length, fsmod.probe(reader, part.start, length)))
        return volumes

    @property
    def whole_disk_fs(self) -> FileSystem | None:
        if self.table.scheme is not None:
            return None
        volumes = self.volumes
        return volumes[0].fs if volumes else None

    @cached_property
    def boot(self) -> BootAnalysis:
        table = self.table
        if table.scheme is None or (not table.partitions and table.extended is None):
            raise NotAvailable("the disk has no partition table" if table.scheme is None
                               else "the disk has no partitions")
        analysis = BootAnalysis()
        mbr = table.mbr
        code = bool(mbr and mbr.signature_ok and mbr.has_boot_code)
        loader = mbr.boot_loader if mbr else None
        bios_boot = table.by_kind("bios_boot")
        reader = self.reader
        analysis.chain = follow_bios_chain(reader, table) if code else None
        analysis.bios_evidence = {"mbr_boot_code": code, "boot_code": loader,
                                  "bios_boot_partition": [p.number for p in bios_boot] or None,
                                  "chain": analysis.chain.to_dict() if analysis.chain else None}
        analysis.bios = (code or bool(bios_boot)) if table.scheme == "gpt" else code
        if analysis.chain is not None and analysis.chain.problem:
            analysis.bios = False
        fat_esp = False
        for volume in self.volumes:
            if volume.partition is None or volume.partition.kind != "esp":
                continue
            analysis.esps.append(volume)
            if volume.fs is None or not volume.fs.is_fat:
                continue
            fat_esp = True
            try:
                analysis.loaders += find_efi_loaders(reader, volume.offset, volume.length)
            except DiskImageError as exc:
                analysis.unreadable_esps[volume.partition.number] = exc.message
        # firmware with empty NVRAM boots only the removable-media path; an unreadable ESP is given the benefit
        analysis.uefi = fat_esp and bool(fallback_loaders(analysis.loaders) or analysis.unreadable_esps)
        analysis.esp_without_fallback = fat_esp and not analysis.uefi
        analysis.uefi_evidence = {
            "esp": [v.partition.number for v in analysis.esps if v.partition] or None,
            "esp_file_system": [v.fs.type if v.fs else None for v in analysis.esps] or None,
            "efi_loaders": analysis.loaders or None,
        }
        return analysis

    # -- the guest operating system ------------------------------------------------------------------------

    @cached_property
    def base_volumes(self) -> list[GuestVolume]:
        """The partitions (or the whole disk) as the guest names them: UUID, LABEL, PARTUUID, PARTLABEL; what a
        container among them holds (``holds``) is known once ``stack`` is assembled."""
        table = self.table
        signature = table.mbr.disk_signature if table.scheme == "mbr" and table.mbr else None
        label = self.path if len(self.machine) > 1 else None
        volumes = []
        for volume in self.volumes:
            part = volume.partition
            partuuid = partlabel = None
            if part is not None and part.scheme == "gpt":
                partuuid, partlabel = part.guid, part.name
            elif part is not None and signature:
                partuuid = f"{signature:08x}-{part.number:02x}"
            volumes.append(GuestVolume(volume.name, volume.number, volume.offset, volume.length, volume.fs,
                                       partuuid, partlabel, disk_label=label))
        return volumes

    @cached_property
    def stack(self) -> MachineStack:
        """The volumes assembled on the disks of the machine (LVM volume groups across them), found once for
        the machine and shared by its disks."""
        first = self.machine[0]
        if first is not self:
            return first.stack
        disks: list[MachineDisk | None] = []
        for ctx in self.machine:
            try:
                disks.append(MachineDisk(ctx.path, ctx.reader, ctx.base_volumes))
            except (NotAvailable, DiskImageError):
                disks.append(None)
        return assemble(disks)

    @property
    def assembled(self) -> list[GuestVolume]:
        """The volumes assembled on this disk (the logical volumes of the volume groups it holds)."""
        return self.stack.volumes[self.machine.index(self)]

    @cached_property
    def guest_disk(self) -> GuestDisk:
        """The volumes as the guest names them (UUID, LABEL, PARTUUID, PARTLABEL, device-mapper names),
        partitions first, file systems opened lazily."""
        return GuestDisk(self.reader, self.base_volumes + self.assembled)

    @cached_property
    def guest(self) -> GuestFacts | None:
        """The operating system on the disk (its root file system, with the /boot and /usr its fstab
        mounts), None when no volume holds one."""
        return inspect_guest(self.guest_disk)

    def guest_inspection(self, os_type: str) -> Any:
        """The inspector's result when the system disk holds an ``os_type`` guest, else None: the
        OS-specific checks return at once on other disks (``guest_found`` reports a missing guest)."""
        if self.role != SYSTEM or self.guest is None or self.guest.os_type != os_type:
            return None
        return self.guest.inspection

    def find_on_other_disk(self, spec: str) -> tuple[DiskContext, GuestVolume] | None:
        """The other disk of the machine, and its volume, that a UUID=, LABEL=, PARTUUID= or PARTLABEL=
        spec names (a disk whose volumes cannot be read names none)."""
        for other in self.machine:
            if other is self:
                continue
            try:
                volume = other.guest_disk.find(spec)
            except (NotAvailable, DiskImageError):
                continue
            if volume is not None:
                return other, volume
        return None

    def require_guest(self) -> GuestFacts:
        """The guest, or NotAvailable saying why none was found."""
        if self.role != SYSTEM:
            raise NotAvailable("guest inspection runs on the system disk")
        found = self.guest
        if found is None:
            unread = self.guest_disk.unreadable
            reasons = "; ".join(f"{name}: {why}" for name, why in unread.items())
            raise NotAvailable(f"no operating system found{f' ({reasons})' if reasons else ''}")
        return found

    def close(self) -> None:
        reader = self._opened[0] if "_opened" in self.__dict__ else None
        if reader is not None:
            reader.close()
