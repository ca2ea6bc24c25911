"""The version of diskimg, at the bottom of the layers: the outputs that record their creator (an export
manifest, a VHD footer's creator version, a VHDX file identifier) read it from here."""

from __future__ import annotations

__version__ = "0.1.0"
