"""VMDK (VMware): the descriptor and its hosted sparse, stream-optimized, flat and zero extents."""

from .reader import VmdkReader

__all__ = ["VmdkReader"]
