"""How the console answers: Jinja templates, the security headers of every answer, error pages,
form bodies and the small formatting helpers the templates use."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from broker.api.http import ID_PATTERN, read_body
from broker.errors import BrokerError, InvalidRequest, NotFound, UnsupportedMediaType

log = logging.getLogger("broker.console")

PREFIX = "/console"
_HERE = Path(__file__).resolve().parent

# No inline script or style anywhere: the pages load one script and one style sheet of their
# own, so an injected <script> or style attribute would be refused by the browser even if the
# escaping ever failed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
# Pages may show a new client secret or an identity's details: never kept by a cache.
PAGE_HEADERS = {**SECURITY_HEADERS, "cache-control": "no-store"}


def money(micros: int | None) -> str:
    """Micro-dollars as dollars: cents when whole, else every significant digit."""
    if micros is None:
        return "—"
    sign = "-" if micros < 0 else ""
    micros = abs(int(micros))
    if micros % 10_000 == 0:
        return f"{sign}${micros / 1_000_000:,.2f}"
    whole, frac = divmod(micros, 1_000_000)
    return f"{sign}${whole:,}.{frac:06d}".rstrip("0")


def when(ts: int | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts: int | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_env = Environment(
    loader=FileSystemLoader(str(_HERE / "templates")),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["money"] = money
_env.filters["when"] = when
_env.filters["iso"] = iso
_env.globals["prefix"] = PREFIX


def html(template: str, context: dict[str, Any], status: int = 200,
         headers: dict[str, str] | None = None) -> Response:
    body = _env.get_template(template).render(**context)
    return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def redirect(path: str) -> Response:
    """303: the browser follows with a GET (Post/Redirect/Get), so a reload repeats nothing."""
    return RedirectResponse(path, status_code=303, headers=dict(PAGE_HEADERS))


def error_page(exc: BrokerError, base: dict[str, Any] | None = None) -> Response:
    """A refusal as a page: its status, title and the domain's own message (written for API
    callers, so it never holds a secret)."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "retry-after"}
    context = {**(base or _anonymous()), "title": exc.title, "status": exc.status,
               "detail": exc.detail}
    return html("error.html", context, status=exc.status, headers=headers)


def _anonymous() -> dict[str, Any]:
    return {"actor": None, "csrf": "", "nav": "", "notice": None}


def not_found_page() -> Response:
    return error_page(NotFound("There is no such page in the console."))


def internal_error_page(request: Request, exc: Exception) -> Response:
    # Logged by its shape only, as the API's last-resort handler does: a driver's message may
    # carry values from the request.
    template = getattr(request.scope.get("route"), "path", "?")
    log.error("console: unhandled %s on %s %s", type(exc).__name__, request.method, template)
    err = BrokerError("Something went wrong on the broker's side; nothing was shown to anyone "
                      "else. Try again, and tell the operator if it persists.")
    return error_page(err)


# --- request values ---------------------------------------------------------------------


async def form(request: Request, max_bytes: int) -> dict[str, str]:
    """A form body (``application/x-www-form-urlencoded``), strictly: bounded, UTF-8, no
    repeated field, no NUL."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("The console accepts only its own forms.")
    raw = await read_body(request, max_bytes)
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                          max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read.") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidRequest(f"The field {key[:40]!r} was sent twice.")
        if "\x00" in key or "\x00" in value:
            raise InvalidRequest("The form holds a NUL character.")
        out[key] = value
    return out


def query_id(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not ID_PATTERN.match(raw):
        raise InvalidRequest(f"The {name} in the address is not valid.")
    return raw


def query_int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest(f"The {name} in the address must be a whole number.")
    return int(raw)
