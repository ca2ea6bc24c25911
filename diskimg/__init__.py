"""diskimg: detect, read and convert VHD, qcow2 and RAW disk images, ready for a cloud.

The public API::

    import diskimg
    diskimg.detect("disk.vhd")              # Detection: what the file is
    with diskimg.open_image("disk.qcow2") as disk:   # DiskReader
        disk.virtual_size, disk.read(0, 512), list(disk.extents())
    diskimg.convert("disk.vhd", "disk.raw", "raw")

Every error is a :class:`DiskImageError`.
"""

from .compare import CompareResult, compare
from .convert import ConvertResult, MeasureResult, ProgressCallback, convert, measure
from .detect import detect
from .detection import Detection, OpenOptions
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
from .image import image_info, open_image
from .reader import DiskReader, Extent, ExtentKind, ImageInfo, Snapshot
from .writer import DiskWriter

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "BackingFileError",
    "CompareResult",
    "ConvertResult",
    "CorruptImage",
    "Detection",
    "DiskImageError",
    "DiskReader",
    "DiskWriter",
    "Extent",
    "ExtentKind",
    "FormatMismatch",
    "ImageInfo",
    "ImageNotFound",
    "MeasureResult",
    "OpenOptions",
    "OutputError",
    "ProgressCallback",
    "Snapshot",
    "UnsupportedFormat",
    "UsageError",
    "__version__",
    "compare",
    "convert",
    "detect",
    "image_info",
    "measure",
    "open_image",
]

from .check import CheckResult, check  # noqa: E402  (after the names above: it uses them)
from .validate import Finding, Report, validate  # noqa: E402

__all__ += ["CheckResult", "Finding", "Report", "check", "validate"]

from .export import ExportResult, VerifyResult, export, verify  # noqa: E402

__all__ += ["ExportResult", "VerifyResult", "export", "verify"]

from .unpack import UnpackResult, unpack  # noqa: E402

__all__ += ["UnpackResult", "unpack"]
