"""The admin API over HTTP, for ``broker admin``: an admin credential from the environment, one
httpx client, every failure turned into an :class:`AdminCliError` that names its exit status,
and lists followed through their cursors.

Like :mod:`broker.client`, which it uses to get tokens, this module is an operator's tool and
imports no server code. No message it makes holds the client secret or a token: the broker's
own answers never carry them, and :meth:`AdminSession.scrub` takes them out of any text anyway.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

import httpx

from broker.client import BrokerAuthError, BrokerClient, BrokerClientError

ENV_URL = "BROKER_URL"
ENV_CLIENT_ID = "BROKER_CLIENT_ID"
ENV_CLIENT_SECRET = "BROKER_CLIENT_SECRET"
ENV_TOKEN = "BROKER_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"

# Exit statuses (docs/cli.md).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# What the broker says is shown, never trusted to be short or printable.
_MAX_DETAIL = 300
# The most the broker serves in one page (API.md, "Conventions").
MAX_PAGE = 1000


class AdminCliError(Exception):
    """A command that could not do its work: the one line to print and the exit status."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class UsageError(AdminCliError):
    """Bad arguments or environment: nothing was sent."""

    exit_code = EXIT_USAGE


class Refused(AdminCliError):
    """The broker answered, and not with success (or not with what the command needs)."""

    exit_code = EXIT_FAILED


class Unreachable(AdminCliError):
    """The broker did not answer: refused connection, DNS, TLS, timeout, a cut stream."""

    exit_code = EXIT_UNREACHABLE


def printable(text: str, limit: int = _MAX_DETAIL) -> str:
    """``text`` on one line: control, format and separator characters (newlines, bidirectional
    overrides) become spaces, and it is cut at ``limit`` characters."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An admin bearer token used as it is, or a client id and secret to get tokens with.
    Their ``repr`` shows neither the token nor the secret."""

    token: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Credentials:
        """``BROKER_TOKEN`` when it is set; else ``BROKER_CLIENT_ID`` and
        ``BROKER_CLIENT_SECRET``, both of them."""
        token = environ.get(ENV_TOKEN, "").strip()
        if token:
            # Checked here so that a bad value is never echoed by the HTTP library's error.
            if not (token.isascii() and token.isprintable()) or " " in token:
                raise UsageError(f"{ENV_TOKEN} is not a bearer token (it holds spaces or "
                                 "characters that cannot go in a header)")
            return cls(token=token)
        client_id = environ.get(ENV_CLIENT_ID, "")
        secret = environ.get(ENV_CLIENT_SECRET, "")
        if client_id and secret:
            return cls(client_id=client_id, client_secret=secret)
        if client_id:
            raise UsageError(f"{ENV_CLIENT_ID} is set but {ENV_CLIENT_SECRET} is not")
        if secret:
            raise UsageError(f"{ENV_CLIENT_SECRET} is set but {ENV_CLIENT_ID} is not")
        raise UsageError(f"no admin credential: set {ENV_TOKEN}, or {ENV_CLIENT_ID} and "
                         f"{ENV_CLIENT_SECRET}")


class _Bearer(httpx.Auth):
    def __init__(self, token: str):
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "_Bearer('**********')"


def _shown_url(url: httpx.URL) -> str:
    """The broker's address without any user:password part."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}{url.path.rstrip('/')}"


def problem_text(resp: httpx.Response) -> str:
    """``<status> <title>: <detail>`` of an error answer: problem+json (RFC 9457), or an OAuth
    error (RFC 6749 §5.2), else the status's reason phrase."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    title = detail = None
    if isinstance(body, dict):
        title, detail = body.get("title"), body.get("detail")
        if not isinstance(title, str) and isinstance(body.get("error"), str):
            title, detail = body["error"], body.get("error_description")
    if not isinstance(title, str) or not title:
        title = resp.reason_phrase or "error"
    text = title if not isinstance(detail, str) or detail in ("", title) else f"{title}: {detail}"
    return f"{resp.status_code} {printable(text)}"


# --- the session -------------------------------------------------------------------------------


class AdminSession:
    """Calls of the admin API with one credential. ``what`` in every call says, for an error
    message, what was being done ("could not suspend workload wl_…")."""

    def __init__(self, url: str, credentials: Credentials, *, timeout_s: float):
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise UsageError(f"{ENV_URL} must be the broker's http:// or https:// address")
        self.url = str(parsed).rstrip("/")
        self.shown_url = _shown_url(parsed)
        self._credentials = credentials
        # TLS certificates are always verified (SSL_CERT_FILE or SSL_CERT_DIR name other CAs).
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False, verify=True)
        self._client: BrokerClient | None = None
        self._auth: httpx.Auth
        if credentials.token is not None:
            self._auth = _Bearer(credentials.token)
        else:
            assert credentials.client_id is not None and credentials.client_secret is not None
            self._client = BrokerClient(self.url, client_id=credentials.client_id,
                                        client_secret=credentials.client_secret, http=self._http,
                                        timeout_s=timeout_s)
            # Gets a token at the first call, a new one when it ages, and again once on a 401.
            self._auth = self._client.auth

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def scrub(self, text: str) -> str:
        """``text`` without the secret, the token given, or any token this session got."""
        values = [self._credentials.token, self._credentials.client_secret]
        if self._client is not None and self._client.token_info is not None:
            values.append(self._client.token_info.access_token)
        for value in values:
            if value:
                text = text.replace(value, "[redacted]")
        return text

    # --- one call ------------------------------------------------------------------------------

    @contextmanager
    def _answers(self, what: str) -> Iterator[None]:
        """Turns what can go wrong on the wire into :class:`AdminCliError`."""
        try:
            yield
        except BrokerAuthError as exc:
            # The token endpoint refused the client id and secret (or asked to slow down).
            detail = exc.error if not exc.error_description else \
                f"{exc.error}: {exc.error_description}"
            raise Refused(f"{what}: no admin token for {ENV_CLIENT_ID} ({exc.status} "
                          f"{printable(detail)})") from None
        except BrokerClientError as exc:
            # BrokerUnavailable: raised ``from None``, but its context is the transport's error.
            if isinstance(exc.__context__, httpx.TransportError):
                raise self._unreachable(what, exc.__context__) from None
            raise Refused(f"{what}: no admin token ({printable(str(exc))})") from None
        except httpx.TransportError as exc:
            raise self._unreachable(what, exc) from None
        except httpx.HTTPError as exc:
            raise Refused(f"{what}: the answer could not be read ({type(exc).__name__})") from None

    def _unreachable(self, what: str, exc: Exception) -> Unreachable:
        kind = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else \
            "could not be reached"
        return Unreachable(f"{what}: the broker at {self.shown_url} {kind} ({type(exc).__name__})")

    def call(self, method: str, path: str, *, what: str, params: Mapping[str, Any] | None = None,
             body: Any = None) -> Any:
        """The JSON answer of one call (``None`` for 204), or :class:`AdminCliError`."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        with self._answers(what):
            resp = self._http.request(
                method, self.url + path, params=query, auth=self._auth,
                headers={"accept": "application/json"},
                **({"json": body} if body is not None else {}))
        if not resp.is_success:
            raise Refused(f"{what} ({problem_text(resp)})")
        if resp.status_code == 204:
            return None
        try:
            return resp.json()
        except ValueError:
            raise Refused(f"{what}: the broker answered {resp.status_code} without JSON") from None

    def page(self, path: str, *, what: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One page of a list: ``{"data": [...], "next_cursor": ...}`` (checked)."""
        answer = self.call("GET", path, what=what, params=params)
        if not (isinstance(answer, dict) and isinstance(answer.get("data"), list)):
            raise Refused(f"{what}: the broker's answer is not a list")
        nxt = answer.get("next_cursor")
        if nxt is not None and not (isinstance(nxt, str) and nxt):
            raise Refused(f"{what}: the broker's answer has an invalid next_cursor")
        return answer

    def collect(self, path: str, *, what: str, params: Mapping[str, Any] | None = None,
                limit: int | None = None, page_size: int = MAX_PAGE, cursor: str | None = None,
                sized: bool = True) -> dict[str, Any]:
        """Up to ``limit`` items of a list (``None``: every one), following ``next_cursor`` from
        ``cursor``, as one document: the first page's members, ``data`` holding every item and
        ``next_cursor`` where the list goes on (null at its end).

        Pages are asked for at most what is still wanted, so no page is cut and the cursor
        returned continues exactly after the last item. ``sized=False``: the route takes no
        ``limit`` (its pages are its own).
        """
        items: list[Any] = []
        first: dict[str, Any] | None = None
        seen: set[str] = set()
        nxt = cursor
        while True:
            query = dict(params or {})
            if sized:
                query["limit"] = page_size if limit is None else min(page_size, limit - len(items))
            query["cursor"] = nxt
            answer = self.page(path, what=what, params=query)
            first = first or answer
            items.extend(answer["data"])
            nxt = answer.get("next_cursor")
            if nxt is None or (limit is not None and len(items) >= limit):
                break
            if nxt in seen or not answer["data"]:
                raise Refused(f"{what}: the broker's pages do not advance")
            seen.add(nxt)
        return {**first, "data": items, "next_cursor": nxt}

    def download(self, path: str, *, what: str, params: Mapping[str, Any], sink: IO[bytes]) -> int:
        """Stream a non-JSON answer into ``sink``; the bytes written."""
        query = {k: v for k, v in params.items() if v is not None}
        written = 0
        with self._answers(what), self._http.stream(
                "GET", self.url + path, params=query, auth=self._auth) as resp:
            if not resp.is_success:
                resp.read()
                raise Refused(f"{what} ({problem_text(resp)})")
            for chunk in resp.iter_bytes():
                sink.write(chunk)
                written += len(chunk)
        return written


def dumps(document: Any) -> str:
    """A JSON document as ``--json`` prints it (ASCII only: no character of an answer can
    steer the terminal)."""
    return json.dumps(document, indent=2)
