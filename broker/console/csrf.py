"""Cross-site request forgery: every console POST must come from the console's own page.

Three checks, each enough on its own against a browser's cross-site POST: the session cookie
is ``SameSite=Strict``; every form carries a token derived from the session id (or, before
sign-in, from a pre-session cookie) by HMAC with the pepper, so a page that cannot read the
cookie cannot write the token; and ``Origin`` and ``Sec-Fetch-Site``, when the browser sends
them, must name this very site.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

FIELD = "csrf"


def derive(pepper: bytes, purpose: str, value: str) -> str:
    """A keyed digest of ``value`` for one ``purpose`` (each purpose its own key space, so a
    session id's hash can never serve as its CSRF token or the other way round)."""
    message = purpose.encode() + b"\x00" + value.encode("utf-8", "surrogatepass")
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()


def session_token(pepper: bytes, session_id: str) -> str:
    return derive(pepper, "console-csrf", session_id)


def pre_session_token(pepper: bytes, pre_id: str) -> str:
    return derive(pepper, "console-pre-csrf", pre_id)


def token_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another site. Headers a browser did
    not send (a script, an old browser) leave the token check to decide.

    ``Sec-Fetch-Site`` is the browser's own verdict (scheme, host and port) and decides when
    present. Without it, ``Origin`` is compared by host and port with ``Host`` (behind a proxy
    that ends TLS the scheme the broker sees may differ from the browser's). A browser sends
    ``Origin: null`` for a form on a page whose policy is ``Referrer-Policy: no-referrer``
    (the console's), so "null" is only taken as foreign when nothing else vouches."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    host = request.headers.get("host", "").lower()
    return bool(netloc) and netloc == host
