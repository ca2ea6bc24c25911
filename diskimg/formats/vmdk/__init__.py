"""VMDK (VMware): the descriptor and its hosted sparse, stream-optimized, flat and zero extents."""

from .reader import VmdkReader
from .writer import VmdkWriter

__all__ = ["VmdkReader", "VmdkWriter"]
