"""Names of tenants and workloads: what is accepted, how it is stored, and when two are the same.

(Being rewritten: NFKC normalisation, look-alike refusal and a uniqueness key.)
"""

from __future__ import annotations

import unicodedata

_BIDI = {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"}


def normalize_name(value: str) -> str:
    """The name as stored, or ValueError saying what is wrong with it."""
    if not 1 <= len(value) <= 128:
        raise ValueError("must be 1 to 128 characters")
    for ch in value:
        if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            raise ValueError("must not contain control or bidirectional-override characters")
    return value


def name_key(name: str) -> str:
    """The key two names of one scope must not share (of a name already normalised)."""
    return name
