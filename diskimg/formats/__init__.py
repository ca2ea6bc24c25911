"""The format drivers: one module per format, each with pure parse/pack functions, a reader and a
writer. This registry maps format names to them."""

from __future__ import annotations

from ..choices import DiskFormat
from ..errors import UsageError
from .probing import FORMAT_ALIASES
from .qcow2 import Qcow2Reader, Qcow2Writer
from .raw import RawReader, RawWriter
from .reader import DiskReader
from .vdi import VdiReader, VdiWriter
from .vhd import VhdReader, VhdWriter
from .vhdx import VhdxReader, VhdxWriter
from .vmdk import VmdkReader, VmdkWriter
from .writer import DiskWriter

READERS: dict[str, type[DiskReader]] = {"raw": RawReader, "vhd": VhdReader, "qcow2": Qcow2Reader, "vmdk": VmdkReader,
                                        "vhdx": VhdxReader, "vdi": VdiReader}
WRITERS: dict[str, type[DiskWriter]] = {"raw": RawWriter, "vhd": VhdWriter, "qcow2": Qcow2Writer, "vmdk": VmdkWriter,
                                        "vhdx": VhdxWriter, "vdi": VdiWriter}


def canonical_format(name: str) -> DiskFormat:
    """The canonical name of a format diskimg reads (``vpc`` is ``vhd``), or a UsageError."""
    try:
        return FORMAT_ALIASES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; diskimg reads and writes raw, vhd (alias vpc), qcow2, vmdk, "
                         "vhdx and vdi") from None
