"""Cursors of paginated lists. A list ordered by id pages with the last id as its cursor; a list
ordered by ``(ts, id)`` pages with that position, encoded opaquely. A cursor the broker did not
make is a 400, never read as "past the end": that would end a client's paging silently."""

from __future__ import annotations

import base64
import binascii
import json
import re

from starlette.requests import Request

from broker.api.http import ID_PATTERN, query_int, query_str
from broker.errors import InvalidRequest

_CURSOR = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")
_MAX_TS = 2**62


def page_limit(request: Request) -> int:
    """``limit``: how many items a page holds, 100 unless asked (1 to 1000)."""
    return query_int(request, "limit", 100, 1, 1000)


def id_page_params(request: Request) -> tuple[str | None, int]:
    """``cursor`` (the last id of the page before) and ``limit`` of a list ordered by id."""
    cursor = query_str(request, "cursor", 64)
    if cursor is not None and not ID_PATTERN.match(cursor):
        raise InvalidRequest("cursor is not valid")
    return cursor, page_limit(request)


def decode_number_cursor(cursor: str, prefix: str) -> int:
    """The number in a cursor that is an id of the form ``<prefix><digits>`` (the bare digits
    are accepted too)."""
    raw = cursor.removeprefix(prefix)
    # ASCII only: str.isdigit() also takes digits such as "²" that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest("cursor is not valid")
    return int(raw)


def encode_position(ts: int, item_id: str) -> str:
    raw = json.dumps([ts, item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_position(cursor: str) -> tuple[int, str]:
    """The ``(ts, id)`` position a cursor names."""
    invalid = InvalidRequest("cursor is not valid")
    if not _CURSOR.match(cursor):
        raise invalid
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid from None
    if not (isinstance(value, list) and len(value) == 2):
        raise invalid
    ts, item_id = value
    if type(ts) is not int or not -_MAX_TS <= ts <= _MAX_TS:
        raise invalid
    if not isinstance(item_id, str) or not 1 <= len(item_id) <= 64 or not item_id.isprintable():
        raise invalid
    return ts, item_id


def position_page_params(request: Request) -> tuple[tuple[int, str] | None, int]:
    """``cursor`` (decoded) and ``limit`` of a list ordered by ``(ts, id)``."""
    cursor = query_str(request, "cursor", 256)
    position = decode_position(cursor) if cursor is not None else None
    return position, page_limit(request)
