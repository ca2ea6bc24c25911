"""VDI: VirtualBox Disk Image version 1.1, dynamic and static (structures, reader, writer, check)."""

from .reader import VdiReader
from .structures import NAME
from .writer import VdiWriter

__all__ = ["NAME", "VdiReader", "VdiWriter"]
