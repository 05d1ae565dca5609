"""A client for workloads: it gets broker tokens, keeps one live, and hands it to the model SDKs.

This module runs inside workloads, not inside the broker: it depends on httpx alone (the official
``openai`` and ``anthropic`` SDKs are imported only by the methods that return their clients) and
never imports server code.

One client logs in one way:

* ``client_id`` + ``client_secret``: the ``client_credentials`` grant, the credentials sent in HTTP
  Basic (each part form-url-encoded, RFC 6749 §2.3.1);
* ``subject_token_file``: RFC 8693 token exchange with a credential the platform already gave the
  workload (a Kubernetes projected service-account token, a GitHub Actions OIDC token, ...). The
  file is read again at every refresh, because the platform rotates it in place;
* :meth:`BrokerClient.delegate`: token exchange with the parent client's current token, for a
  sub-agent that must get less than its parent.

When a token is refreshed (see :func:`refresh_after`): at 80 % of its lifetime, or earlier so that a
token handed out has at least ``refresh_margin_s`` left (the margin is capped at half the
lifetime, so a very short-lived token is not fetched again on every call). Concurrent callers wait
for one refresh; none fetches a second. Every refresh is a new token with a new slice reserved from
the budgets: the previous token's unspent slice returns to the budgets when it expires.

Nothing here puts a client secret or a whole token into a message, a ``repr`` or a log line.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    # Aliased: inside BrokerClient the bare names are its methods.
    import anthropic as _anthropic
    import openai as _openai

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "JWT_TOKEN_TYPE",
    "TOKEN_EXCHANGE",
    "BrokerAuth",
    "BrokerAuthError",
    "BrokerClient",
    "BrokerClientError",
    "BrokerUnavailable",
    "TokenInfo",
    "refresh_after",
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"

# The distribution that carries this module, for the message of a missing optional SDK.
_DISTRIBUTION = "ai-secrets-broker"
# What the SDKs send as their own credential; the auth flow replaces it on every request.
_PLACEHOLDER_KEY = "set-per-request-by-broker-client"
# The share of a token's lifetime after which it is refreshed.
_REFRESH_AT = 0.8
# An error description from the server is shown, never trusted to be short or printable.
_MAX_DESCRIPTION = 300


# A token with less life than this left is never handed out when a refresh fails.
_LAST_SECONDS = 5.0


def refresh_after(lifetime_s: float, margin_s: float) -> float:
    """Seconds after issuance at which a token of ``lifetime_s`` is refreshed: at 80 % of its
    lifetime, or earlier so that it still has ``margin_s`` left, but never before half of it.

    With the default margin of 60 s: a 300 s token is refreshed after 240 s, a 900 s one after
    720 s, a 100 s one after 50 s, a 3 s one after 2.4 s.
    """
    lifetime_s = max(lifetime_s, 0.0)
    early = max((1 - _REFRESH_AT) * lifetime_s, min(margin_s, lifetime_s / 2))
    return lifetime_s - early


# --- errors ----------------------------------------------------------------------------------


class BrokerClientError(Exception):
    """Getting a broker token failed. Messages never hold a secret or a token."""


class BrokerAuthError(BrokerClientError):
    """The token endpoint refused: its OAuth error (RFC 6749 §5.2), e.g. ``invalid_client`` for a
    wrong secret, ``invalid_scope``, ``budget_exhausted``, ``slow_down``."""

    def __init__(self, status: int, error: str, error_description: str | None = None):
        self.status = status
        self.error = error
        self.error_description = error_description
        text = f"{error}: {error_description}" if error_description else error
        super().__init__(f"{text} (HTTP {status})")


class BrokerUnavailable(BrokerClientError):
    """The token endpoint could not be reached, or did not answer in OAuth's shape."""


def _printable(text: str, limit: int) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _auth_error(resp: httpx.Response) -> BrokerClientError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        description = body.get("error_description")
        return BrokerAuthError(
            resp.status_code,
            _printable(body["error"], 64),
            _printable(description, _MAX_DESCRIPTION) if isinstance(description, str) else None,
        )
    return BrokerUnavailable(f"the token endpoint answered HTTP {resp.status_code} without an OAuth error")


# --- what a token response says ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """One answer of ``POST /v1/token``. ``expires_at`` is this machine's clock (epoch seconds),
    counted from when the request was sent, so it is never later than the token's ``exp``."""

    access_token: str = field(repr=False)
    expires_in: int
    expires_at: float
    scope: str | None
    budget_micros: int | None
    token_type: str
    issued_token_type: str | None
    # The whole JSON body, as the broker sent it (with the token: never log it).
    response: dict[str, Any] = field(repr=False)
    # time.monotonic() when the request was sent: the refresh clock, immune to clock changes.
    _sent_monotonic: float = field(repr=False, compare=False)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.scope.split()) if self.scope else ()


def _token_info(resp: httpx.Response, sent_wall: float, sent_monotonic: float) -> TokenInfo:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BrokerUnavailable("the token endpoint answered 200 without a JSON object")
    token, expires_in = body.get("access_token"), body.get("expires_in")
    if not isinstance(token, str) or not token:
        raise BrokerUnavailable("the token endpoint answered 200 without an access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise BrokerUnavailable("the token endpoint answered 200 without a positive expires_in")
    scope, budget = body.get("scope"), body.get("budget_micros")
    return TokenInfo(
        access_token=token,
        expires_in=expires_in,
        expires_at=sent_wall + expires_in,
        scope=scope if isinstance(scope, str) else None,
        budget_micros=budget if isinstance(budget, int) and not isinstance(budget, bool) else None,
        token_type=str(body.get("token_type", "Bearer")),
        issued_token_type=body.get("issued_token_type") if isinstance(
            body.get("issued_token_type"), str) else None,
        response=body,
        _sent_monotonic=sent_monotonic,
    )


# --- how a client proves itself ----------------------------------------------------------------


class _Secret:
    """A client secret: its ``repr`` and ``str`` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "_Secret('**********')"

    __str__ = __repr__


class _Login(Protocol):
    def grant(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """The grant's form fields, and the HTTP Basic credentials if any."""
        ...


class _SecretLogin:
    def __init__(self, client_id: str, secret: str):
        self.client_id = client_id
        self._secret = _Secret(secret)

    def grant(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        return {"grant_type": "client_credentials"}, (self.client_id, self._secret.reveal())

    def __repr__(self) -> str:
        return f"client_credentials(client_id={self.client_id!r})"


class _SubjectTokenFileLogin:
    def __init__(self, path: Path, token_type: str):
        self.path = path
        self.token_type = token_type

    def grant(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        # Read at every exchange: Kubernetes and friends rotate the file in place.
        try:
            subject = self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise BrokerClientError(f"cannot read the subject token file {self.path}: {reason}") from None
        if not subject:
            raise BrokerClientError(f"the subject token file {self.path} is empty")
        return {"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
                "subject_token_type": self.token_type}, None

    def __repr__(self) -> str:
        return f"subject_token_file({str(self.path)!r})"


class _DelegatedLogin:
    def __init__(self, parent: BrokerClient):
        self.parent = parent

    def grant(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        return {"grant_type": TOKEN_EXCHANGE, "subject_token": self.parent.token(),
                "subject_token_type": ACCESS_TOKEN_TYPE}, None

    def __repr__(self) -> str:
        return f"delegated(parent={self.parent!r})"


# --- the auth flow that the HTTP clients and SDKs run -----------------------------------------


class _BearerFlow:
    """Sets ``Authorization: Bearer <live token>`` (and ``x-api-key`` where the request carries
    one, as the Anthropic SDK's does) on every request; on a 401 it gets a new token once and
    sends the request once more (the token may have been revoked, or this host's clock be late).

    Written against what httpx and its fork httpx2 share, so that the same flow serves either
    library, whichever an SDK is built on.
    """

    # The body is read before sending, so that the request can be sent again after a 401.
    requires_request_body = True

    def __init__(self, client: BrokerClient):
        self._broker = client

    @staticmethod
    def _apply(request: Any, token: str) -> None:
        request.headers["Authorization"] = f"Bearer {token}"
        if "x-api-key" in request.headers:
            request.headers["x-api-key"] = token

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        if self.requires_request_body:
            request.read()
        token = self._broker.token()
        self._apply(request, token)
        response = yield request
        if response.status_code == 401:
            self._apply(request, self._broker._replace(token))
            yield request

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        if self.requires_request_body:
            await request.aread()
        token = await self._broker.async_token()
        self._apply(request, token)
        response = yield request
        if response.status_code == 401:
            import anyio.to_thread

            self._apply(request, await anyio.to_thread.run_sync(self._broker._replace, token))
            yield request


class BrokerAuth(_BearerFlow, httpx.Auth):
    """An :class:`httpx.Auth` for ``httpx.Client(auth=...)`` and ``httpx.AsyncClient(auth=...)``
    that authenticates each request with the client's live broker token."""


_AUTH_CLASSES: dict[str, type[Any]] = {}


def _auth_for(client: BrokerClient, http_lib: ModuleType) -> Any:
    """The bearer flow as an ``Auth`` of ``http_lib`` (httpx or httpx2: each accepts only its own)."""
    if http_lib is httpx:
        return BrokerAuth(client)
    cls = _AUTH_CLASSES.get(http_lib.__name__)
    if cls is None:
        cls = type("BrokerAuth", (_BearerFlow, http_lib.Auth), {"__module__": __name__})
        _AUTH_CLASSES[http_lib.__name__] = cls
    return cls(client)


def _sdk(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name != name:  # installed but broken: its own error says more
            raise
        raise ImportError(
            f"the {name!r} SDK is not installed: pip install '{_DISTRIBUTION}[{name}]'", name=name
        ) from None


def _http_lib_of(sdk: ModuleType) -> ModuleType:
    """The HTTP library the SDK is built on: recent SDKs use httpx2, older ones httpx."""
    base = sys.modules.get(f"{sdk.__name__}._base_client")
    lib = getattr(base, "httpx2", None)
    return lib if isinstance(lib, ModuleType) else httpx


# --- the client --------------------------------------------------------------------------------


class BrokerClient:
    """Broker tokens for one workload, kept live, and the SDK clients that use them.

    ``scope`` (model names or globs), ``budget_micros`` and ``ttl_s`` narrow every token this
    client gets, as the token endpoint's parameters of the same names do. ``http`` is an
    :class:`httpx.Client` to reuse for the token endpoint (it is not closed by :meth:`close`).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        subject_token_file: str | Path | None = None,
        subject_token_type: str = JWT_TOKEN_TYPE,
        scope: str | Sequence[str] | None = None,
        budget_micros: int | None = None,
        ttl_s: int | None = None,
        refresh_margin_s: float = 60.0,
        http: httpx.Client | None = None,
        timeout_s: float = 10.0,
    ):
        login: _Login
        if subject_token_file is not None:
            if client_id is not None or client_secret is not None:
                raise ValueError("log in with a client secret or a subject token file, not both")
            login = _SubjectTokenFileLogin(Path(subject_token_file), subject_token_type)
        elif client_id is not None and client_secret is not None:
            login = _SecretLogin(client_id, client_secret)
        else:
            raise ValueError("give client_id and client_secret, or subject_token_file")
        self._setup(url, login, scope=scope, budget_micros=budget_micros, ttl_s=ttl_s,
                    refresh_margin_s=refresh_margin_s, http=http, timeout_s=timeout_s)

    def _setup(self, url: str, login: _Login, *, scope: str | Sequence[str] | None,
               budget_micros: int | None, ttl_s: int | None, refresh_margin_s: float,
               http: httpx.Client | None, timeout_s: float) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must be the broker's http:// or https:// address")
        self.url = url.rstrip("/")
        self._login = login
        self._scope = scope if scope is None or isinstance(scope, str) else " ".join(scope)
        self._budget_micros = budget_micros
        self._ttl_s = ttl_s
        self._margin_s = refresh_margin_s
        self._timeout_s = timeout_s
        self._http = http
        self._owns_http = http is None
        self._lock = threading.Lock()
        self._info: TokenInfo | None = None
        self._auth: BrokerAuth | None = None

    def __repr__(self) -> str:
        return f"BrokerClient(url={self.url!r}, login={self._login!r})"

    # --- tokens --------------------------------------------------------------------------------

    def token(self) -> str:
        """A token to use now: the cached one while it is fresh, else a new one (see
        :func:`refresh_after`). Raises :class:`BrokerAuthError` when the broker refuses."""
        with self._lock:
            info = self._info
            if info is None or not self._stale(info):
                return (info or self._fetch()).access_token
            try:
                return self._fetch().access_token
            except (BrokerUnavailable, BrokerAuthError) as exc:
                # A refresh is early by design: while the broker is briefly away (or asks to
                # slow down), the token in hand still works until its last seconds.
                transient = isinstance(exc, BrokerUnavailable) or exc.status == 429 or exc.status >= 500
                if not transient or info.expires_at - time.time() < _LAST_SECONDS:
                    raise
                return info.access_token

    async def async_token(self) -> str:
        """:meth:`token` for async code: a fresh cached token is returned at once; a refresh runs
        the blocking request in a worker thread, so the event loop is never blocked."""
        if self._lock.acquire(blocking=False):
            try:
                info = self._info
                if info is not None and not self._stale(info):
                    return info.access_token
            finally:
                self._lock.release()
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.token)

    def _replace(self, rejected: str) -> str:
        """A token other than ``rejected`` (which the gateway refused): a new one, unless another
        caller has already replaced it."""
        with self._lock:
            info = self._info
            if info is None or info.access_token == rejected or self._stale(info):
                info = self._fetch()
            return info.access_token

    def _stale(self, info: TokenInfo) -> bool:
        age = time.monotonic() - info._sent_monotonic
        return age >= refresh_after(info.expires_in, self._margin_s)

    def _fetch(self) -> TokenInfo:
        data, basic = self._login.grant()
        if self._scope:
            data["scope"] = self._scope
        if self._budget_micros is not None:
            data["budget_micros"] = str(self._budget_micros)
        if self._ttl_s is not None:
            data["ttl_s"] = str(self._ttl_s)
        headers = {"accept": "application/json"}
        # The no-op Auth, not None: an ``http`` client we were given must not add its own.
        auth = httpx.Auth()
        if basic is not None:
            # RFC 6749 §2.3.1: each part form-url-encoded before Basic joins them.
            auth = httpx.BasicAuth(quote(basic[0], safe=""), quote(basic[1], safe=""))
        sent_wall, sent_monotonic = time.time(), time.monotonic()
        try:
            resp = self._http_client().post(
                self.url + "/v1/token", data=data, headers=headers, auth=auth,
                timeout=self._timeout_s, follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"the token endpoint {self.url}/v1/token did not answer ({type(exc).__name__})"
            ) from None
        if resp.status_code != 200:
            raise _auth_error(resp)
        info = _token_info(resp, sent_wall, sent_monotonic)
        self._info = info
        return info

    def _http_client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=self._timeout_s, follow_redirects=False)
        return self._http

    @property
    def token_info(self) -> TokenInfo | None:
        """The last token response (``None`` before the first)."""
        return self._info

    @property
    def budget_micros(self) -> int | None:
        """The slice reserved for the current token."""
        return self._info.budget_micros if self._info else None

    @property
    def expires_at(self) -> float | None:
        """When the current token expires, in epoch seconds of this machine's clock."""
        return self._info.expires_at if self._info else None

    @property
    def scope(self) -> str | None:
        """The models the current token may use, space-separated, as the broker granted them."""
        return self._info.scope if self._info else None

    # --- HTTP clients and SDKs ------------------------------------------------------------------

    @property
    def auth(self) -> BrokerAuth:
        """An :class:`httpx.Auth` that sends the live token and retries once on a 401.

        In an ``httpx.AsyncClient`` a refresh runs in a worker thread (see :meth:`async_token`).
        """
        if self._auth is None:
            self._auth = BrokerAuth(self)
        return self._auth

    def openai(self, **kwargs: Any) -> _openai.OpenAI:
        """An ``openai.OpenAI`` client pointed at the gateway, each request with the live token.

        ``kwargs`` go to the SDK's constructor. A given ``http_client`` gets this client's auth.
        A refusal of the token endpoint raises :class:`BrokerAuthError` from the SDK call
        (SDK versions that wrap their HTTP client's errors raise their connection error, with
        the :class:`BrokerAuthError` as its ``__cause__``).
        """
        sdk = _sdk("openai")
        client: _openai.OpenAI = sdk.OpenAI(**self._sdk_kwargs(sdk, kwargs, "/v1", asynchronous=False))
        return client

    def async_openai(self, **kwargs: Any) -> _openai.AsyncOpenAI:
        """:meth:`openai` for asyncio: an ``openai.AsyncOpenAI``."""
        sdk = _sdk("openai")
        client: _openai.AsyncOpenAI = sdk.AsyncOpenAI(
            **self._sdk_kwargs(sdk, kwargs, "/v1", asynchronous=True))
        return client

    def anthropic(self, **kwargs: Any) -> _anthropic.Anthropic:
        """An ``anthropic.Anthropic`` client pointed at the gateway, each request with the live
        token (in ``Authorization`` and in the ``x-api-key`` the SDK sends)."""
        sdk = _sdk("anthropic")
        client: _anthropic.Anthropic = sdk.Anthropic(
            **self._sdk_kwargs(sdk, kwargs, "", asynchronous=False))
        return client

    def async_anthropic(self, **kwargs: Any) -> _anthropic.AsyncAnthropic:
        """:meth:`anthropic` for asyncio: an ``anthropic.AsyncAnthropic``."""
        sdk = _sdk("anthropic")
        client: _anthropic.AsyncAnthropic = sdk.AsyncAnthropic(
            **self._sdk_kwargs(sdk, kwargs, "", asynchronous=True))
        return client

    def _sdk_kwargs(self, sdk: ModuleType, kwargs: dict[str, Any], path: str, *,
                    asynchronous: bool) -> dict[str, Any]:
        lib = _http_lib_of(sdk)
        auth = _auth_for(self, lib)
        http_client = kwargs.pop("http_client", None)
        if http_client is None:
            cls = lib.AsyncClient if asynchronous else lib.Client
            # The SDKs' own default: their requests can be slow (long completions).
            http_client = cls(auth=auth, timeout=lib.Timeout(600.0, connect=5.0),
                              follow_redirects=False)
        else:
            http_client.auth = auth
        return {"base_url": self.url + path, "api_key": _PLACEHOLDER_KEY,
                "http_client": http_client, **kwargs}

    # --- delegation ----------------------------------------------------------------------------

    def delegate(self, models: Sequence[str] | None = None, budget_micros: int | None = None,
                 ttl_s: int | None = None) -> BrokerClient:
        """A client for a sub-agent: its tokens are exchanged for this client's current token,
        so they never allow more models, money or time than this client's token.

        A child token expires no later than the parent token it came from; the child then gets
        a new one from the parent's current token, which carves a NEW slice of ``budget_micros``
        out of the parent's (the old child slice's unspent part returns to the parent's slice, or
        to the budgets above once that has expired). The child shares this client's HTTP
        connection pool; close the parent last.
        """
        child = BrokerClient.__new__(BrokerClient)
        child._setup(self.url, _DelegatedLogin(self),
                     scope=list(models) if models is not None else None,
                     budget_micros=budget_micros, ttl_s=ttl_s, refresh_margin_s=self._margin_s,
                     http=self._http_client(), timeout_s=self._timeout_s)
        return child

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client this client made for itself (never one it was given)."""
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

