"""Structural checks of an image file, like ``qemu-img check``: ``check(path) -> CheckResult``.

qcow2: every reference of every host cluster counted and compared with the stored refcounts, as
``qemu-img check`` does (``formats/qcow2/check.py``).

VHD (which qemu-img cannot check): the rules of ``formats/vhd/structures.py`` (footer and its copy
at offset 0, dynamic header, BAT, blocks, parent locators), reported by ``formats/vhd/check.py``.

VDI: the rules of ``formats/vdi/structures.py`` over the header and the whole block map, and the
header's allocated count (``formats/vdi/check.py``).

RAW has no metadata: it is always clean.

Only metadata is read (tables, refcount blocks), never guest data. The structures are parsed with
the pure functions of each format's ``structures.py``; this module only dispatches to each format's check.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from ..choices import FormatName
from ..errors import DiskImageError, UnsupportedFormat
from ..formats import canonical_format
from ..formats.check_result import CheckProblem, CheckResult
from ..formats.qcow2.check import check_qcow2
from ..formats.vdi.check import check_vdi
from ..formats.vhd.check import check_vhd
from ..formats.vmdk.check import check_vmdk
from ..host.files import HostFile
from .image import source_name
from .probe import check_forced, detect

#: ``check`` and the result it returns (defined with the formats' checks that fill it)
__all__ = ["CheckProblem", "CheckResult", "check"]


def check(source: str | os.PathLike[str] | BinaryIO, source_format: FormatName | None = None) -> CheckResult:
    """Check the structure of a RAW, VHD, VHDX or qcow2 image (``source_format`` forces one).

    Problems in the image are in the result; DiskImageError is raised only when the file cannot
    be opened (ImageNotFound), is not one of the three formats or uses a feature diskimg does not
    take (UnsupportedFormat), or contradicts the forced format (FormatMismatch, as ``open_image``).
    """
    detection = detect(source)
    name = canonical_format(source_format) if source_format else detection.format
    unread_vmdk = name == "vmdk" and not source_format and not detection.readable  # seSparse, COWD, a lone extent
    if source_format:
        check_forced(detection, name, source_name(source))
    if name not in ("raw", "vhd", "qcow2", "vmdk", "vhdx", "vdi") or unread_vmdk:
        raise UnsupportedFormat(
            f"{detection.description}: diskimg checks VHD, VHDX, qcow2, VMDK, VDI and RAW images",
            path=source_name(source), format=detection.format, hint=detection.hint,
        )
    host = HostFile(source)
    try:
        result = CheckResult(filename=host.name, format=name)
        try:
            if name == "qcow2":
                check_qcow2(host, result)
            elif name == "vhd":
                check_vhd(host, result)
            elif name == "vdi":
                check_vdi(host, result)
            elif name == "vhdx":
                from ..formats.vhdx.check import check_vhdx

                check_vhdx(host, result)
            elif name == "vmdk":
                counts = check_vmdk(host, result.add)
                result.total_clusters = counts.total_grains
                result.allocated_clusters = counts.allocated_grains
                result.compressed_clusters = counts.compressed_grains
                result.image_end_offset = host.size
            else:
                result.image_end_offset = host.size
        except UnsupportedFormat as exc:
            exc.path = exc.path or host.name
            raise
        except DiskImageError as exc:
            result.add("error", f"the check could not go on: {exc.message if hasattr(exc, 'message') else exc}",
                       getattr(exc, "offset", None), getattr(exc, "structure", None))
        return result
    finally:
        host.close()

