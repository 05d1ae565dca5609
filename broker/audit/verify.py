"""Verification of the audit chain and its signed checkpoints (``broker audit verify``).

:func:`verify` is pure: it takes entries as the API shows them, checkpoints and public keys,
so the same code checks the database directly and the output of ``GET /v1/admin/audit`` (which
is what ``broker admin audit verify`` does). It stops at the first problem and names it:

* **edited**: an entry's content no longer matches its hash, or its hash was recomputed (the
  next entry no longer links to it), or the chain differs from a signed checkpoint;
* **deleted**: a ``seq`` is missing, or the entries after a deletion were renumbered;
* **inserted**: a second entry with a ``seq``, or an entry the next one does not link past;
* **reordered**: an entry was written at another position than the one it now holds;
* **truncated**: the chain ends before a signed checkpoint;
* **checkpoint**: a checkpoint's signature does not verify (forged, or a key not published).

Entries are read as a stream; a window of recent entries and a look-ahead are kept to tell
these cases apart, so a chain of millions of entries needs little memory.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection

from broker.audit import checkpoints
from broker.audit.checkpoints import AuditKeys, read_file, signature_ok, stored
from broker.audit.checkpoints import keys_from_jwks as keys_from_jwks
from broker.settings import Settings
from broker.storage import audit
from broker.storage.db import Database, Sql, make_engine
from broker.storage.vault import Vault

if TYPE_CHECKING:
    from broker.services import Services

_WINDOW = 1024
_WALK = Sql("""
    SELECT id, seq, ts, actor, action, target, tenant_id, detail, prev_hash, hash FROM audit_event
    WHERE seq > :seq OR (seq = :seq AND id > :id) ORDER BY seq, id LIMIT :limit""")


@dataclass(frozen=True)
class Report:
    ok: bool
    entries: int
    checkpoints: int
    head_seq: int
    problem: str | None = None
    seq: int | None = None
    kind: str | None = None

    def line(self) -> str:
        if self.ok:
            return (f"audit chain ok: {self.entries} entries, {self.checkpoints} checkpoints, "
                    f"head seq {self.head_seq}")
        return f"audit chain broken: {self.problem}"


def _hash_as(entry: dict[str, Any], seq: int) -> str:
    return audit.entry_hash({**entry, "seq": seq})


def _self_ok(entry: dict[str, Any]) -> bool:
    try:
        return audit.entry_hash(entry) == entry.get("hash")
    except (KeyError, TypeError, ValueError):
        return False  # a field an editor broke (a non-JSON value, a missing key)


def _original_seq(entry: dict[str, Any], near: int, known: dict[str, int]) -> int | None:
    """The position an entry was written at, when its hash says so: after the entry whose hash
    it links to, else anywhere near ``near``."""
    guesses = []
    if entry.get("prev_hash") == audit.GENESIS:
        guesses.append(1)
    if entry.get("prev_hash") in known:
        guesses.append(known[entry["prev_hash"]] + 1)
    guesses.extend(range(max(1, near - _WINDOW), near + _WINDOW))
    for seq in guesses:
        try:
            if seq != entry.get("seq") and _hash_as(entry, seq) == entry.get("hash"):
                return seq
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _classify(entry: dict[str, Any], expected: int, prev: str, window: deque[dict[str, Any]],
              ahead: list[dict[str, Any]]) -> tuple[str, int, str]:
    """(kind, seq, sentence) for the first entry that does not continue the chain."""
    seq = entry.get("seq")
    if not isinstance(seq, int):
        return "edited", expected, f"entry {expected} was edited: its seq is not a number"
    if seq > expected:
        missing = expected if seq == expected + 1 else f"{expected} to {seq - 1}"
        return "deleted", expected, f"entry {missing} was deleted (the chain jumps to {seq})"
    if seq < expected:
        return "inserted", seq, f"an entry was inserted: a second entry has seq {seq}"
    if _self_ok(entry):
        # Intact itself, but it does not link to the entry before it.
        if len(window) >= 2 and entry.get("prev_hash") == window[-2]["hash"]:
            return ("inserted", expected - 1,
                    f"entry {expected - 1} was inserted: entry {expected} links past it")
        if expected == 1:
            return "edited", 1, "entry 1 was edited: it does not start the chain"
        return ("edited", expected - 1, f"entry {expected - 1} was edited and re-hashed: "
                f"entry {expected} no longer links to it")
    if entry.get("prev_hash") == prev:
        return "edited", expected, f"entry {expected} was edited: its content no longer matches its hash"
    known = {e["hash"]: e["seq"] for e in itertools.chain(window, ahead)
             if isinstance(e.get("seq"), int)}
    original = _original_seq(entry, expected, known)
    if original is not None and original > expected:
        # An entry from further on now holds this position: either the one written here
        # still exists further on (a reordering) or it was deleted and the rest renumbered.
        if any(_self_hash_as(e, expected) for e in ahead):
            return ("reordered", expected, f"entry {expected} is out of order: the entry now at "
                    f"seq {expected} was written as entry {original}")
        return ("deleted", expected, f"entry {expected} was deleted and the entries after it "
                "renumbered")
    if original is not None:
        return ("inserted", original, f"entry {original} was inserted: the entry written as "
                f"{original} now has seq {expected}")
    if ahead and ahead[0].get("prev_hash") == prev and _self_hash_as(ahead[0], expected):
        return "inserted", expected, f"entry {expected} was inserted: entry {expected + 1} links past it"
    return "edited", expected, f"entry {expected} was edited: its content no longer matches its hash"


def _self_hash_as(entry: dict[str, Any], seq: int) -> bool:
    try:
        return _hash_as(entry, seq) == entry.get("hash")
    except (KeyError, TypeError, ValueError):
        return False


def verify(entries: Iterable[dict[str, Any]], checkpoints: Iterable[dict[str, Any]],
           keys: Mapping[str, Ed25519PublicKey]) -> Report:
    """Walk ``entries`` (in ``seq`` order) and ``checkpoints``; the first problem, or ok."""
    key_map = dict(keys)
    by_seq: dict[int, dict[str, Any]] = {}
    for cp in checkpoints:
        if not signature_ok(cp, key_map):
            return Report(False, 0, len(by_seq), 0, f"checkpoint at seq {cp.get('seq')} has no "
                          "valid signature by a published audit key", _int(cp.get("seq")),
                          "checkpoint")
        earlier = by_seq.get(cp["seq"])
        if earlier is not None and earlier["hash"] != cp["hash"]:
            return Report(False, 0, len(by_seq), 0, f"two signed checkpoints at seq {cp['seq']} "
                          "disagree", cp["seq"], "checkpoint")
        by_seq[cp["seq"]] = cp
    marks = sorted(by_seq)
    window: deque[dict[str, Any]] = deque(maxlen=_WINDOW)
    stream: Iterator[dict[str, Any]] = iter(entries)
    expected, prev, last_good_mark = 1, audit.GENESIS, 0
    for entry in stream:
        if (entry.get("seq") != expected or entry.get("prev_hash") != prev
                or not _self_ok(entry)):
            ahead = list(itertools.islice(stream, _WINDOW))
            window.append(entry)
            kind, seq, sentence = _classify(entry, expected, prev, window, ahead)
            return Report(False, expected - 1, len(marks), expected - 1, sentence, seq, kind)
        mark = by_seq.get(expected)
        if mark is not None and mark["hash"] != entry["hash"]:
            first = last_good_mark + 1
            return Report(False, expected, len(marks), expected,
                          f"an entry from {first} to {expected} was edited and the chain re-hashed "
                          f"after it: entry {expected} differs from the checkpoint signed at seq "
                          f"{expected}", first, "edited")
        if mark is not None:
            last_good_mark = expected
        window.append(entry)
        prev, expected = entry["hash"], expected + 1
    head = expected - 1
    beyond = [m for m in marks if m > head]
    if beyond:
        return Report(False, head, len(marks), head,
                      f"entries after {head} were deleted: a checkpoint is signed at seq "
                      f"{beyond[-1]}", head + 1, "truncated")
    return Report(True, head, len(marks), head)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


# --- against the database --------------------------------------------------------------------


def _walk_all(conn: Connection, batch: int = audit.PAGE) -> Iterator[dict[str, Any]]:
    """Every stored entry ordered by ``(seq, id)``: duplicates of a ``seq`` (inserted after
    the unique index was dropped) are read, not skipped at a page edge."""
    after_seq, after_id = -1, -1
    while True:
        rows = _WALK.run(conn, seq=after_seq, id=after_id, limit=batch).all()
        for row in rows:
            yield audit.entry_view(row)
        if len(rows) < batch:
            return
        after_seq, after_id = int(rows[-1].seq), int(rows[-1].id)


def _all_checkpoints(conn: Connection) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        batch = stored(conn, out[-1]["seq"] if out else 0)
        out.extend(batch)
        if len(batch) < checkpoints.PAGE:
            return out


def verify_stored(conn: Connection, keys: Mapping[str, Ed25519PublicKey],
                  extra_checkpoints: Iterable[dict[str, Any]] = ()) -> Report:
    """The chain and checkpoints in the database (plus checkpoints kept elsewhere)."""
    checkpoints = [*_all_checkpoints(conn), *extra_checkpoints]
    report = verify(_walk_all(conn), checkpoints, keys)
    head_seq, _ = audit.head(conn)
    if report.ok and head_seq > report.head_seq:
        # The head row is the database's too, but a deletion that forgot it shows here even
        # before a checkpoint covers the lost entries.
        return Report(False, report.entries, report.checkpoints, report.head_seq,
                      f"entries after {report.head_seq} were deleted: the chain's head is at "
                      f"seq {head_seq}", report.head_seq + 1, "truncated")
    return report


_STATUS_TTL_S = 30.0
_status_cache: dict[int, tuple[float, tuple[int, str], Report]] = {}


async def chain_status(svc: Services) -> Report:
    """The stored chain's state, for the console and ``GET /v1/admin/audit/status``. A walk of
    the whole chain costs a second per few tens of thousands of entries, so a result is reused
    for 30 s while the head has not moved (``broker audit verify`` always walks it all)."""
    head = await svc.db.read(audit.head)
    cached = _status_cache.get(id(svc.db))
    if cached is not None and cached[1] == head and time.monotonic() - cached[0] < _STATUS_TTL_S:
        return cached[2]
    public = await anyio.to_thread.run_sync(svc.audit_keys.public_keys)
    report = await svc.db.read(lambda conn: verify_stored(conn, public))
    _status_cache[id(svc.db)] = (time.monotonic(), head, report)
    return report


def verify_command(settings: Settings, *, checkpoints_file: str | None = None) -> int:
    """``broker audit verify``: 0 and one line when the chain verifies, else 1 naming the
    first problem."""
    path = checkpoints_file or settings.audit.checkpoint_file
    extra: list[dict[str, Any]] = []
    if path:
        try:
            extra = read_file(path)
        except FileNotFoundError:
            if checkpoints_file:  # named on the command line: its absence is an error
                print(f"broker: {path}: no such checkpoint file", file=sys.stderr)
                return 2
        except (OSError, ValueError) as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
    keys = AuditKeys(Vault(settings.vault), settings.audit).public_keys()
    db = Database(make_engine(settings.database.url, 2))
    try:
        report = db.read_transaction(lambda conn: verify_stored(conn, keys, extra))
    finally:
        db.dispose()
    print(report.line(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
