"""Exported machines: ``export`` (archives, manifest and checksums written in one pass) and
``verify``, ``unpack`` (archives or a manifest restored), the manifest itself (``manifest``).
Built on the conversion pipeline."""
