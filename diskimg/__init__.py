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
    from .comparison import CompareResult, compare
    from .consistency import CheckResult, check
    from .conversion import ConvertResult, MeasureResult, ProgressCallback, convert, measure
    from .probe import detect
    from .detection import Detection, OpenOptions
    from .exporter import ExportResult, VerifyResult, export, verify
    from .image import image_info, open_image
    from .reader import DiskReader, Extent, ExtentKind, ImageInfo, Snapshot
    from .unpacker import UnpackResult, unpack
    from .validation import Finding, Report, validate
    from .writer import DiskWriter

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("BatchResult", "batch"), "fleet"),
    **dict.fromkeys(("CompareResult", "compare"), "comparison"),
    **dict.fromkeys(("CheckResult", "check"), "consistency"),
    **dict.fromkeys(("ConvertResult", "MeasureResult", "ProgressCallback", "convert", "measure"), "conversion"),
    "detect": "probe",
    **dict.fromkeys(("Detection", "OpenOptions"), "detection"),
    **dict.fromkeys(("ExportResult", "VerifyResult", "export", "verify"), "exporter"),
    **dict.fromkeys(("image_info", "open_image"), "image"),
    **dict.fromkeys(("DiskReader", "Extent", "ExtentKind", "ImageInfo", "Snapshot"), "reader"),
    **dict.fromkeys(("UnpackResult", "unpack"), "unpacker"),
    **dict.fromkeys(("Finding", "Report", "validate"), "validation"),
    "DiskWriter": "writer",
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
