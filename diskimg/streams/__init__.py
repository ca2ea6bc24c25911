"""Disks read through a stream: compressed wrappers (``compressed``), tar members (``tar``), and the
forward-only DiskReader over either (``sources``). Above the formats, below detection."""
