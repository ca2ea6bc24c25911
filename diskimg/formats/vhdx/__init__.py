"""VHDX (Hyper-V): structures, reader, writer and structural check, split by concern."""

from .reader import VhdxReader, probe

__all__ = ["VhdxReader", "probe"]
