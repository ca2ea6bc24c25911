"""What detection found, and the options that shape how an image is opened.

Kept apart from ``probe.py`` so that format drivers can build these values without importing the
prober (which imports every driver).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, get_args

from ..choices import DiskFormat, VhdSizeRule

#: formats diskimg reads and writes
READABLE_FORMATS: tuple[DiskFormat, ...] = get_args(DiskFormat)
#: names accepted in options for a format (choices.FormatName), mapped to the canonical name
FORMAT_ALIASES: dict[str, DiskFormat] = {"raw": "raw", "vhd": "vhd", "vpc": "vhd", "qcow2": "qcow2", "vmdk": "vmdk",
                                         "vhdx": "vhdx", "vdi": "vdi"}


@dataclass
class Detection:
    """The answer of ``diskimg.detect``. ``readable`` is True only for READABLE_FORMATS."""

    format: str
    description: str
    subformat: str | None = None
    version: str | None = None
    readable: bool = False
    #: for a wrapper (gzip, tar, ...): the format of what it holds, when it could peek
    inner_format: str | None = None
    inner_description: str | None = None
    #: for RAW: what the disk starts with ("mbr", "gpt", "ext4", ... or "unknown")
    starts_with: str | None = None
    #: what to do with a format diskimg does not read
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class OpenOptions:
    """Per-open choices that change what a reader yields."""

    #: qcow2 internal snapshot to read (id or name) instead of the active layer
    snapshot: str | None = None
    #: VHD virtual size: "auto" follows the creator application as current qemu and Hyper-V do
    vhd_size: VhdSizeRule = "auto"


#: Opens a parent image from candidate names recorded in a child (tried in order), or raises.
ParentOpener = Callable[[list[str], "str | None"], Any]
