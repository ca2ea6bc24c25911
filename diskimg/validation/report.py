"""What ``validate`` returns: findings, per-disk facts, the ImportImage parameters, and renderings
(``to_dict`` for JSON, ``render_text`` for people)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..units import format_size
from ..words import facts_line
from .rules import RULES_BY_CODE, Severity


@dataclass
class Finding:
    """One broken rule. ``code`` names a :class:`~diskimg.validation.rules.Rule`; ``evidence`` holds
    what was found where (offset, partition, value...); ``hint`` names the fix."""

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None
    category: str = ""
    #: the image the finding is about (None: the disk set as a whole)
    disk: str | None = None
    role: str | None = None

    @property
    def title(self) -> str:
        rule = RULES_BY_CODE.get(self.code)
        return rule.title if rule else self.code

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "category": self.category,
            "message": self.message,
            "evidence": self.evidence,
            "hint": self.hint,
            "disk": self.disk,
            "role": self.role,
        }


@dataclass
class DiskFacts:
    """What was found about one disk of the set."""

    path: str
    role: str
    device: int  # N of DiskDeviceMapping.N: 1 the system disk, 2.. data disks
    format: str | None = None
    description: str | None = None
    subformat: str | None = None
    api_format: str | None = None
    virtual_size: int | None = None
    file_size: int | None = None
    disk_image_size: int | None = None
    partition_table: dict[str, Any] | None = None
    #: the file system of a disk without a partition table
    file_system: dict[str, Any] | None = None
    #: every volume of the disk with the stack it sits on: its partitions (or the whole disk), what a container
    #: partition holds (an LVM PV, LUKS, BitLocker, an md member) and the volumes assembled on it (logical
    #: volumes, md arrays), each as ``GuestVolume.describe()`` gives it
    volumes: list[dict[str, Any]] | None = None
    boot_modes: list[str] | None = None
    recommended_boot_mode: str | None = None
    efi_loaders: list[str] | None = None
    integrity: dict[str, Any] | None = None
    #: the operating system found on a system disk (``GuestFacts.to_dict()``)
    guest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "role": self.role,
            "device": self.device,
            "format": self.format,
            "subformat": self.subformat,
            "description": self.description,
            "api_format": self.api_format,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
            "disk_image_size": self.disk_image_size,
            "partition_table": self.partition_table,
            "file_system": self.file_system,
            "volumes": self.volumes,
            "boot_modes": self.boot_modes,
            "recommended_boot_mode": self.recommended_boot_mode,
            "efi_loaders": self.efi_loaders,
            "integrity": self.integrity,
            "guest": self.guest,
        }


@dataclass
class Report:
    """The answer of ``validate``: ``importable`` is True when no finding is an error (and, with
    ``strict``, none is a warning)."""

    target: str
    strict: bool
    disks: list[DiskFacts]
    findings: list[Finding]
    import_image: dict[str, Any]
    #: checks that could not run, and why: [{"disk", "check", "reason"}]
    not_checked: list[dict[str, Any]] = field(default_factory=list)
    target_title: str = ""

    @property
    def facts(self) -> DiskFacts:
        """The facts of the (first, system) disk: the whole answer for a single image."""
        return self.disks[0]

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity is severity)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def importable(self) -> bool:
        if self.count(Severity.ERROR):
            return False
        return not (self.strict and self.count(Severity.WARNING))

    def codes(self, severity: Severity | None = None) -> set[str]:
        return {f.code for f in self.findings if severity is None or f.severity is severity}

    def find(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "importable": self.importable,
            "strict": self.strict,
            "summary": {
                "errors": self.count(Severity.ERROR),
                "warnings": self.count(Severity.WARNING),
                "info": self.count(Severity.INFO),
            },
            "disks": [disk.to_dict() for disk in self.disks],
            "findings": [finding.to_dict() for finding in self.findings],
            "import_image": self.import_image,
            "not_checked": list(self.not_checked),
        }

    def render_text(self) -> str:
        return render_text(self)


_LABELS = {Severity.ERROR: "ERROR", Severity.WARNING: "WARNING", Severity.INFO: "info"}


def _size(value: int | None) -> str:
    return "?" if value is None else f"{format_size(value)} ({value} bytes)"


def _partition_line(part: dict[str, Any]) -> str:
    fs = part.get("file_system") or {}
    label = f' "{fs["label"]}"' if fs.get("label") else ""
    fs_text = f" {fs['type']}{label}" if fs else ""
    flags = " active" if part.get("bootable") else ""
    return (f"#{part['number']} {part['type_name']}, {format_size(part['size'])} at {part['start']}"
            f"{fs_text}{flags}")


def _guest_lines(guest: dict[str, Any]) -> list[str]:
    root = guest.get("root") or {}
    where = f" on partition {root['partition']}" if root.get("partition") else ""
    if root.get("layer"):  # a logical volume, an md array, a btrfs subvolume
        where = f" on {root['stack']}"
    lines = [f"  guest:         {guest.get('product') or guest.get('distribution') or guest['os_type']}{where} "
             f"({guest.get('architecture') or '?'}; Platform {guest.get('platform') or '?'})"]
    details = guest.get("details") or {}
    if details.get("default_kernel"):
        drivers = details.get("boot_drivers") or {}
        shown = ", ".join(f"{name} {where}" for name, where in drivers.items())
        lines.append(f"  kernel:        {details['default_kernel']}" + (f" ({shown})" if shown else ""))
    cloud_init = details.get("cloud_init") or {}
    if cloud_init.get("installed"):
        sources = ", ".join(cloud_init.get("datasources") or []) or "default datasources"
        lines.append(f"  cloud-init:    {cloud_init.get('version') or 'version unknown'} ({sources})")
    return lines


def render_text(report: Report) -> str:
    """A human-readable report: facts per disk, findings with evidence and fixes, the verdict."""
    lines: list[str] = []
    title = report.target_title or report.target
    for disk in report.disks:
        lines.append(f"{disk.path}: {disk.role} disk (DiskDeviceMapping.{disk.device}) for {title}")
        lines.append(f"  format:        {disk.description or disk.format or '?'}")
        if disk.virtual_size is not None:
            lines.append(f"  virtual size:  {_size(disk.virtual_size)}; file {_size(disk.file_size)}")
        if disk.disk_image_size is not None:
            lines.append(f"  DiskImageSize: {disk.disk_image_size} GiB")
        table = disk.partition_table
        if table is not None:
            scheme = (table.get("scheme") or "none").upper()
            lines.append(f"  partitions:    {scheme}" + ("" if table.get("partitions") else " (no partitions)"))
            for part in table.get("partitions", []):
                lines.append(f"                 {_partition_line(part)}")
        if disk.file_system:
            fs = disk.file_system
            label = f' "{fs["label"]}"' if fs.get("label") else ""
            lines.append(f"  file system:   {fs['type']} on the whole disk{label}")
        volumes = disk.volumes or []
        below = {name for volume in volumes for name in volume["on"]}
        stacked = [volume["stack"] for volume in volumes
                   if volume["layer"] or (volume["holds"] and volume["volume"] not in below)]
        for number, stack in enumerate(stacked):
            lines.append(f"  {'volumes:' if number == 0 else '':<15}{stack}")
        if disk.boot_modes is not None:
            modes = ", ".join(disk.boot_modes) or "none found"
            rec = f" (declare {disk.recommended_boot_mode})" if disk.recommended_boot_mode else ""
            lines.append(f"  boot modes:    {modes}{rec}")
        if disk.efi_loaders:
            lines.append(f"  EFI loaders:   {', '.join(disk.efi_loaders)}")
        if disk.guest:
            lines += _guest_lines(disk.guest)
        lines.append("")
    ordered = sorted(report.findings, key=lambda f: f.severity.rank)
    for finding in ordered:
        where = f" [{finding.disk}]" if finding.disk and len(report.disks) > 1 else ""
        lines.append(f"{_LABELS[finding.severity]:<8} {finding.code}{where}: {finding.message}")
        shown = facts_line(finding.evidence)
        if shown:
            lines.append(f"         evidence: {shown}")
        if finding.hint:
            lines.append(f"         fix: {finding.hint}")
    if report.not_checked:
        lines.append("")
        grouped: dict[tuple[str, str], list[str]] = {}
        for item in report.not_checked:
            where = f"{item['disk']}: " if item.get("disk") and len(report.disks) > 1 else ""
            grouped.setdefault((where, item["reason"]), []).append(item.get("category") or item["check"])
        for (where, reason), checks in grouped.items():
            lines.append(f"not checked: {where}{', '.join(dict.fromkeys(checks))} ({reason})")
    lines.append("")
    params = []
    for n, mapping in enumerate(report.import_image.get("DiskDeviceMapping", []), start=1):
        for key in ("Format", "DiskImageSize"):
            if mapping.get(key) is not None:
                params.append(f"DiskDeviceMapping.{n}.{key}={mapping[key]}")
    for key in ("BootMode", "Platform", "OSType", "Architecture"):
        value = report.import_image.get(key)
        params.append(f"{key}={value if value is not None else '?'}")
    if report.import_image.get("Features.NvmeSupport"):
        params.append(f"Features.NvmeSupport={report.import_image['Features.NvmeSupport']}")
    lines.append("ImportImage: " + " ".join(params))
    errors, warnings = report.count(Severity.ERROR), report.count(Severity.WARNING)
    verdict = "importable" if report.importable else "NOT importable"
    detail = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    if report.strict and not errors and warnings:
        detail += "; --strict counts warnings"
    lines.append(f"verdict: {verdict} into {report.target} ({detail})")
    return "\n".join(lines)
