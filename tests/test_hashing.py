"""The guest content hash against a direct transcription of its documented definition."""

from __future__ import annotations

import random

import pytest

from diskimg.conversion.hashing import ContentHasher

from .support.digests import content_hash_by_definition


@pytest.mark.parametrize("seed", range(40))
def test_any_feeding_gives_the_defined_digest(seed):
    rng = random.Random(seed)
    size = rng.choice([0, 1, 65535, 65536, 65537, rng.randint(0, 600_000)])
    data = bytearray(size)
    for _ in range(rng.randint(0, 4)):
        start = rng.randrange(size + 1)
        data[start : start + 3000] = rng.randbytes(len(data[start : start + 3000]))
    data = bytes(data)
    hasher = ContentHasher(size)
    position = 0
    while position < size:
        chunk = data[position : position + rng.randint(1, 150_000)]
        if chunk == bytes(len(chunk)) and rng.random() < 0.5:
            hasher.skip_zeros(len(chunk))  # as from a ZERO extent
        else:
            hasher.update(chunk)
        position += len(chunk)
    assert hasher.hexdigest() == content_hash_by_definition(data)


def test_size_is_part_of_the_hash():
    a, b = ContentHasher(65536), ContentHasher(131072)
    a.skip_zeros(65536)
    b.skip_zeros(131072)
    assert a.hexdigest() != b.hexdigest()


def test_incomplete_feeding_is_refused():
    hasher = ContentHasher(100)
    hasher.update(b"x" * 10)
    with pytest.raises(ValueError):
        hasher.hexdigest()
