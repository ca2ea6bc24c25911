"""VHDX (Hyper-V): structures, reader, writer and structural check, split by concern."""

from .reader import VhdxReader, probe
from .writer import VhdxWriter

__all__ = ["VhdxReader", "VhdxWriter", "probe"]
