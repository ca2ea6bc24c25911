"""diskimg: detect, read and convert VHD, qcow2 and RAW disk images, ready for a cloud.

The public API::

    import diskimg
    diskimg.detect("disk.vhd")              # Detection: what the file is
    with diskimg.open_image("disk.qcow2") as disk:   # DiskReader
        disk.virtual_size, disk.read_at(0, 512), list(disk.extents())
    diskimg.convert("disk.vhd", "disk.raw", "raw")
    diskimg.batch("fleet.jsonl", journal="fleet.journal")   # many jobs, resumable

Every error is a :class:`DiskImageError`.

The names are imported on first use (PEP 562): a command that converts does not pay for loading
the validator, the guest inspectors or the archive compressors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .choices import (
    ArchiveKind as ArchiveKind,
    Backend as Backend,
    BootMode as BootMode,
    CloudTarget as CloudTarget,
    DiskFormat as DiskFormat,
    DiskRole as DiskRole,
    ExportLayout as ExportLayout,
    FormatName as FormatName,
    VhdSizeRule as VhdSizeRule,
)
from .errors import (
    ArchiveError as ArchiveError,
    BackingFileError as BackingFileError,
    CorruptImage as CorruptImage,
    DiskImageError as DiskImageError,
    FormatMismatch as FormatMismatch,
    ImageNotFound as ImageNotFound,
    OutputError as OutputError,
    UnsupportedFormat as UnsupportedFormat,
    UsageError as UsageError,
)

if TYPE_CHECKING:  # what __getattr__ imports on first use, named for type checkers
    from .archives.export import (
        ExportResult as ExportResult,
        VerifyResult as VerifyResult,
        export as export,
        verify as verify,
    )
    from .archives.unpack import UnpackResult as UnpackResult, unpack as unpack
    from .conversion.compare import CompareResult as CompareResult, compare as compare
    from .conversion.pipeline import (
        ConvertResult as ConvertResult,
        MeasureResult as MeasureResult,
        ProgressCallback as ProgressCallback,
        convert as convert,
        measure as measure,
    )
    from .detection.check import CheckResult as CheckResult, check as check
    from .detection.image import image_info as image_info, open_image as open_image
    from .detection.probe import detect as detect
    from .fleet import BatchResult as BatchResult, batch as batch
    from .formats.probing import Detection as Detection, OpenOptions as OpenOptions
    from .formats.reader import (
        DiskReader as DiskReader,
        Extent as Extent,
        ExtentKind as ExtentKind,
        ImageInfo as ImageInfo,
        Snapshot as Snapshot,
    )
    from .formats.writer import DiskWriter as DiskWriter
    from .validation import Finding as Finding, Report as Report, validate as validate

from .version import __version__ as __version__

#: public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("BatchResult", "batch"), "fleet"),
    **dict.fromkeys(("CompareResult", "compare"), "conversion.compare"),
    **dict.fromkeys(("CheckResult", "check"), "detection.check"),
    **dict.fromkeys(("ConvertResult", "MeasureResult", "ProgressCallback", "convert", "measure"),
                    "conversion.pipeline"),
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


# spelled out (not computed) so that type checkers and linters read it
__all__ = [
    "ArchiveError", "ArchiveKind", "Backend", "BackingFileError", "BatchResult", "BootMode", "CheckResult",
    "CloudTarget", "CompareResult", "ConvertResult", "CorruptImage", "Detection", "DiskFormat", "DiskImageError",
    "DiskReader", "DiskRole", "DiskWriter", "ExportLayout", "ExportResult", "Extent", "ExtentKind", "Finding",
    "FormatMismatch", "FormatName", "ImageInfo", "ImageNotFound", "MeasureResult", "OpenOptions", "OutputError",
    "ProgressCallback", "Report", "Snapshot", "UnpackResult", "UnsupportedFormat", "UsageError", "VerifyResult",
    "VhdSizeRule", "__version__", "batch", "check", "compare", "convert", "detect", "export", "image_info",
    "measure", "open_image", "unpack", "validate", "verify",
]
