"""What the tests share, one home for each: the tools they run and trust as oracles, builders of
files, images, disks, file systems and guests, digests, the third-party corpus and fuzz drivers.
``tests/conftest.py`` keeps only pytest fixtures, which call into this package."""
