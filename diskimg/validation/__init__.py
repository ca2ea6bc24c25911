"""Validate disk images against a cloud's import rules: ``validate(...) -> Report``.

    import diskimg
    report = diskimg.validate("disk.qcow2")                       # a system disk for ECS
    report = diskimg.validate("disk.vhd", role="data")
    report = diskimg.validate(system="sys.qcow2", data=["d1.raw", "d2.vhd"], boot_mode="UEFI")
    report.importable, report.findings, report.import_image, report.to_dict(), report.render_text()

Every rule is checked in one run (the catalogue is ``rules.RULES``; ``list_rules(target)`` lists
those of a target). Only metadata, partition tables and superblocks are read, never guest data.
A finding is never an exception: ``validate`` raises only :class:`~diskimg.errors.ImageNotFound`
(a file that cannot be opened at all) and :class:`~diskimg.errors.UsageError` (bad arguments).

Layout of this package: ``rules.py`` (the catalogue and per-target profiles, as data),
``context.py`` (what checks share, computed lazily), ``checks.py`` (the checks), ``report.py``
(Report, Finding and their renderings).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..choices import BootMode, CloudTarget, DiskRole
from ..errors import DiskImageError, UsageError
from . import linux_checks, windows_checks  # noqa: F401 - imported for their @disk_check registrations
from .checks import DISK_CHECKS, SET_CHECKS
from .context import DiskContext, NotAvailable
from .report import DiskFacts, Finding, Report, render_text
from .rules import DATA, RULES, SYSTEM, Profile, Rule, Severity, list_rules, profile, render_rules_text

__all__ = [
    "RULES",
    "DiskFacts",
    "Finding",
    "Profile",
    "Report",
    "Rule",
    "Severity",
    "list_rules",
    "render_rules_text",
    "render_text",
    "validate",
]

PathLike = str | os.PathLike[str]


def validate(
    image: PathLike | None = None,
    *,
    role: DiskRole | None = None,
    target: CloudTarget = "ecs",
    boot_mode: BootMode | None = None,
    strict: bool = False,
    system: PathLike | None = None,
    data: Sequence[PathLike] = (),
    allow_backing: bool = False,
) -> Report:
    """Check one image (``image``, as a ``role`` disk: ``system``, the default, or ``data``) or a
    machine's disk set (``system`` plus up to 16 ``data`` disks, whose roles those names give: a
    ``role`` given with them is a usage error) against ``target``'s import rules.

    ``boot_mode`` (BIOS or UEFI) is the mode the system disk will be declared with; without it the
    report says which modes the disk supports and recommends one. ``strict`` makes warnings count
    against ``importable``. ``allow_backing`` lets the content of a qcow2 with a backing file (or a
    differencing VHD) be inspected through its chain, from the image's directory only; such an image
    is still refused for import.
    """
    chosen = profile(target)
    mode = None if boot_mode is None else boot_mode.upper()  # bios is BIOS
    if mode is not None and mode not in chosen.boot_modes:
        raise UsageError(f"boot mode must be one of {', '.join(chosen.boot_modes)}, not {mode!r}")
    disks: list[tuple[str, str]]
    if image is not None:
        if system is not None or data:
            raise UsageError("give either one image (with its role) or a disk set (system and data disks), not both")
        if role not in (None, SYSTEM, DATA):
            raise UsageError(f"role must be 'system' or 'data', not {role!r}")
        disks = [(os.fspath(image), role or SYSTEM)]
    elif role is not None:
        raise UsageError("--role applies to a single IMAGE; in a disk set, --system and --data give each disk's role")
    elif system is not None:
        disks = [(os.fspath(system), SYSTEM)] + [(os.fspath(d), DATA) for d in data]
    elif data:
        raise UsageError("a disk set needs its system disk (system=...)")
    else:
        raise UsageError("no image given")

    contexts: list[DiskContext] = []
    try:
        for device, (path, disk_role) in enumerate(disks, start=1):
            contexts.append(DiskContext(path, disk_role, device, chosen, mode if disk_role == SYSTEM else None,
                                        allow_backing))
        for ctx in contexts:
            ctx.machine = contexts
        for ctx in contexts:
            _run_disk_checks(ctx)
        findings = [finding for ctx in contexts for finding in ctx.findings]
        not_checked = [item for ctx in contexts for item in ctx.not_checked]
        if len(contexts) > 1 or contexts[0].role == SYSTEM:
            findings += _run_set_checks(contexts)
        facts = [_facts(ctx) for ctx in contexts]
        return Report(
            target=chosen.name,
            strict=strict,
            disks=facts,
            findings=findings,
            import_image=_import_image(contexts, facts),
            not_checked=not_checked,
            target_title=chosen.title,
        )
    finally:
        for ctx in contexts:
            ctx.close()


def _run_disk_checks(ctx: DiskContext) -> None:
    for check in DISK_CHECKS:
        try:
            check.function(ctx)
        except NotAvailable as exc:
            ctx.not_checked.append({"disk": ctx.path, "check": check.name, "category": check.category,
                                    "reason": exc.reason})
        except DiskImageError as exc:
            # reading the image failed half-way (a table pointing past the end, ...): a finding
            if not ctx.emitted("image-unreadable"):
                ctx.emit("image-unreadable", f"reading the image failed during the {check.category} checks: "
                         f"{exc.message}", {"offset": getattr(exc, "offset", None),
                                            "structure": getattr(exc, "structure", None)},
                         f"`diskimg check {ctx.path}` reports what is damaged")
            ctx.not_checked.append({"disk": ctx.path, "check": check.name, "category": check.category,
                                    "reason": f"reading the image failed: {exc.message}"})


def _run_set_checks(contexts: list[DiskContext]) -> list[Finding]:
    found: list[Finding] = []
    rules = {rule.code: rule for rule in RULES}

    def emit(code: str, message: str, evidence: dict[str, Any] | None = None, hint: str | None = None) -> None:
        rule = rules[code]
        found.append(Finding(code=code, severity=rule.severity, message=message, evidence=dict(evidence or {}),
                             hint=hint, category=rule.category))

    for check in SET_CHECKS:
        check.function(contexts, emit)
    return found


def _facts(ctx: DiskContext) -> DiskFacts:
    detection = ctx.detection
    facts = DiskFacts(path=ctx.path, role=ctx.role, device=ctx.device, format=detection.format,
                      description=detection.description, subformat=detection.subformat, file_size=ctx.file_size)
    facts.api_format = ctx.profile.formats.get(detection.format) or ctx.profile.preview_formats.get(detection.format)
    try:
        facts.virtual_size = ctx.virtual_size
        facts.disk_image_size = ctx.disk_image_size
    except NotAvailable:
        pass
    if "integrity" in ctx.__dict__:
        result = ctx.integrity
        facts.integrity = {key: value for key, value in result.to_dict().items() if key not in ("problems", "filename")}
    try:
        table = ctx.table
        volumes = {v.number: v for v in ctx.volumes}
        described = table.to_dict()
        for part in described["partitions"]:
            volume = volumes.get(part["number"])
            part["file_system"] = volume.fs.to_dict() if volume and volume.fs else None
        facts.partition_table = described
        whole = ctx.whole_disk_fs
        facts.file_system = whole.to_dict() if whole else None
        facts.volumes = [volume.describe() for volume in ctx.guest_disk.volumes]
    except (NotAvailable, DiskImageError):
        pass
    if ctx.role == SYSTEM:
        try:
            boot = ctx.boot
            facts.boot_modes = boot.modes
            facts.recommended_boot_mode = ctx.boot_mode if ctx.boot_mode in boot.modes else boot.recommended
            facts.efi_loaders = boot.loaders or None
        except (NotAvailable, DiskImageError):
            pass
        if "guest" in ctx.__dict__ and ctx.guest is not None:  # inspected by the guest checks
            facts.guest = ctx.guest.to_dict()
    return facts


def _import_image(contexts: list[DiskContext], facts: list[DiskFacts]) -> dict[str, Any]:
    """The ImportImage parameters this set needs (Platform, OSType, Architecture from the system disk's guest)."""
    mappings = [{"Format": f.api_format, "DiskImageSize": f.disk_image_size} for f in facts]
    system = facts[0] if contexts[0].role == SYSTEM else None
    boot_mode = None
    guest = None
    if system is not None:
        boot_mode = contexts[0].boot_mode or system.recommended_boot_mode
        guest = contexts[0].__dict__.get("guest")
    parameters: dict[str, Any] = {
        "DiskDeviceMapping": mappings,
        "BootMode": boot_mode,
        "Platform": guest.platform if guest else None,
        "OSType": guest.os_type if guest else None,
        "Architecture": guest.import_architecture if guest else None,
    }
    if guest is not None and guest.nvme_support is not None:  # only where the guest's kernel was inspected
        parameters["Features.NvmeSupport"] = guest.nvme_support
    return parameters
