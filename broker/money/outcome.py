"""How a gateway call ended: the ``status`` of its usage event (``docs/api.md``, "Usage event
statuses").

The values are stored in ``usage_event.status`` and read by operators, reports and alerts, so they
never change; a new way for a call to end is a new member.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """The status a settlement writes. What each one charges is in ``docs/api.md``."""

    # The call completed; the provider's usage (or a bound when it reported none).
    OK = "ok"
    # The provider billed more than the hold: charged in full, and the token is revoked.
    OVERRUN = "overrun"

    # A stream the broker ended, or that ended early; the provider's count, else the bound.
    HOLD_EXCEEDED = "hold_exceeded"
    CLIENT_DISCONNECTED = "client_disconnected"
    STREAM_CUT = "stream_cut"
    REVOKED = "revoked"
    EXPIRED = "expired"

    # The provider failed, refused or could not be reached.
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_REJECTED = "upstream_rejected"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"

    # Cancelled once the request was sent: the provider may bill all of it.
    CANCELLED = "cancelled"
    # Refused after the hold, or failed before sending: nothing reached the provider.
    REFUSED = "refused"
    NOT_SENT = "not_sent"
    # A hold a crash left behind, settled by the sweeper at the full amount.
    ORPHANED = "orphaned"
