"""Bounds for JSON read from untrusted input (an export manifest, a LUKS2 header's metadata area).

Python's JSON parser recurses once per nested array or object, so a document of a few KiB of ``[``
exhausts the interpreter's recursion limit: a reader measures ``nesting`` first and refuses
documents deeper than its format allows.
"""

from __future__ import annotations

import itertools
import re

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting(data: bytes) -> int:
    """The deepest nesting of JSON arrays and objects in ``data``, brackets inside strings aside
    (measured with C-level passes: string literals removed, then only brackets kept)."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(_NESTING[b] for b in brackets), default=0)
