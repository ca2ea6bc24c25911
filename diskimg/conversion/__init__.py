"""The conversion pipeline: the feed engine, ``measure`` and the qemu-img backend (``pipeline``),
where outputs go (``outputs``), guest-content comparison (``compare``) and hashing (``hashing``),
zero detection (``zeroes``). Built on detection and formats."""
