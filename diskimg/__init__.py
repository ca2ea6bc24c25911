"""diskimg: detect, read and convert VHD, qcow2 and RAW disk images, ready for a cloud.

The public API::

    import diskimg
    diskimg.detect("disk.vhd")              # Detection: what the file is
    with diskimg.open_image("disk.qcow2") as disk:   # DiskReader
        disk.virtual_size, disk.read(0, 512), list(disk.extents())
    diskimg.convert("disk.vhd", "disk.raw", "raw")
    diskimg.batch("fleet.jsonl", journal="fleet.journal")   # many jobs, resumable

Every error is a :class:`DiskImageError`.

The names are imported on first use (PEP 562): a command that converts does not pay for loading
the validator, the guest inspectors or the archive compressors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArchiveError,
    BackingFileError,
    CorruptImage,
    DiskImageError,
    FormatMismatch,
    ImageNotFound,
    OutputError,
    UnsupportedFormat,
    UsageError,
)

if TYPE_CHECKING:
    from .fleet import BatchResult, batch
    from .conversion.compare import CompareResult, compare
    from .detection.check import CheckResult, check
    from .conversion.pipeline import ConvertResult, MeasureResult, ProgressCallback, convert, measure
    from .detection.probe import detect
    from .formats.probing import Detection, OpenOptions
    from .archives.export import ExportResult, VerifyResult, export, verify
    from .detection.image import image_info, open_image
    from .formats.reader import DiskReader, Extent, ExtentKind, ImageInfo, Snapshot
    from .archives.unpack import UnpackResult, unpack
    from .validation import Finding, Report, validate
    from .formats.writer import DiskWriter

from .version import __version__ as __version__

#: public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("BatchResult", "batch"), "fleet"),
    **dict.fromkeys(("CompareResult", "compare"), "conversion.compare"),
    **dict.fromkeys(("CheckResult", "check"), "detection.check"),
    **dict.fromkeys(("ConvertResult", "MeasureResult", "ProgressCallback", "convert", "measure"), "conversion.pipeline"),
    "detect": "detection.probe",
    **dict.fromkeys(("Detection", "OpenOptions"), "formats.probing"),
    **dict.fromkeys(("ExportResult", "VerifyResult", "export", "verify"), "archives.export"),
    **dict.fromkeys(("image_info", "open_image"), "detection.image"),
    **dict.fromkeys(("DiskReader", "Extent", "ExtentKind", "ImageInfo", "Snapshot"), "formats.reader"),
    **dict.fromkeys(("UnpackResult", "unpack"), "archives.unpack"),
    **dict.fromkeys(("Finding", "Report", "validate"), "validation"),
    "DiskWriter": "formats.writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diskimg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted([
    "ArchiveError", "BackingFileError", "CorruptImage", "DiskImageError", "FormatMismatch", "ImageNotFound",
    "OutputError", "UnsupportedFormat", "UsageError", "__version__", *_LAZY,
])
