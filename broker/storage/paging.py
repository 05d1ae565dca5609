"""Keyset pagination: a page is read as ``limit + 1`` rows ordered by a total key, so whether
another page follows is known without counting, and the next page starts after the last row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def page(rows: Sequence[T], limit: int) -> tuple[list[T], T | None]:
    """The first ``limit`` of ``rows`` (read with ``LIMIT limit + 1``), and the last of them
    when more follow (the position the next page starts after), else None."""
    if len(rows) > limit:
        return list(rows[:limit]), rows[limit - 1]
    return list(rows), None
