"""Provider tokens of federated providers (``credential = "federated"``): no provider key is
stored anywhere; the broker signs an assertion (:mod:`broker.credentials.assertions`) and
exchanges it at the provider's ``token_url`` for a token that lives minutes.

:meth:`ProviderTokens.get` is what :class:`broker.gateway.provider_keys.ProviderKeys` answers
for such a provider, on every upstream call. The first call exchanges; once ``refresh_at`` of a
token's life has passed (at the latest ``refresh_margin_s`` before it expires) one call starts
a refresh in the background while the token it holds keeps serving. One exchange per provider
is in flight at a time, across every event loop of the process (the server's, and the
scheduler's batch polls): concurrent callers wait for the same one. A failed exchange is not
retried before :data:`RETRY_S` has passed, so a dead token endpoint is not hammered: meanwhile a
held token keeps serving, and without one the call answers 503, before anything reaches the
provider.

Tokens live in this process's memory only: they are never logged, stored, counted or put in an
error; errors and the status name the provider and the step that failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread
import httpx

from broker.credentials.assertions import AssertionKeys
from broker.credentials.contract import (
    ExchangeRequest,
    Federated,
    FederationTarget,
    ProviderAdminError,
    ProviderToken,
)
from broker.errors import BrokerError, Unavailable
from broker.metrics import Metrics
from broker.settings import Settings

log = logging.getLogger("broker.provider_tokens")

# After a failed exchange, the next one waits this long.
RETRY_S = 5.0
# A token this close to its expiry is not handed out: the call would reach the provider with a
# token that died on the way.
EXPIRY_SKEW_S = 5.0
# A token endpoint's answer is a few hundred bytes; a larger one is refused unread.
MAX_ANSWER_BYTES = 65_536
_ERROR_MAX = 200


class _ExchangeFailed(Exception):
    """The exchange failed; its message is the short, secret-free description."""


@dataclass(frozen=True)
class TokenStatus:
    """A federated provider's token, as the admin listing shows it (never the token).

    ``last_exchange_at``: when the last exchange ended, whether it succeeded or failed
    (``last_error`` says). ``healthy``: a valid token is held, or the last exchange did not
    fail (an idle provider whose token expired gets a new one at its next call). A failed
    refresh while a token still serves is healthy, with ``last_error`` set."""

    expires_at: float | None
    last_exchange_at: float | None
    last_error: str | None
    healthy: bool


@dataclass
class _State:
    token: ProviderToken | None = None
    refresh_after: float = 0.0
    last_exchange_at: float | None = None
    last_error: str | None = None
    retry_after: float = float("-inf")
    inflight: concurrent.futures.Future[ProviderToken] | None = None


class _TooLarge(Exception):
    pass


def _describe(exc: Exception, timeout_s: float) -> str:
    """What failed, short and without secrets: a plugin's error names the step and the
    status (its contract); anything else is named by its type only, since its text could hold
    what was sent."""
    if isinstance(exc, ProviderAdminError):
        return exc.detail[:_ERROR_MAX]
    if isinstance(exc, _TooLarge):
        return f"the token endpoint's answer is larger than {MAX_ANSWER_BYTES} bytes"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"the token endpoint did not answer within {timeout_s:g} s"
    if isinstance(exc, httpx.HTTPError):
        return f"the token endpoint cannot be reached ({type(exc).__name__})"
    if isinstance(exc, BrokerError):
        return f"the assertion cannot be signed ({type(exc).__name__})"
    return f"the token exchange failed ({type(exc).__name__})"


class ProviderTokens:
    """The token of each federated provider, by provider name.

    ``providers`` maps each federated provider to its plugin's provider object; its settings
    (``providers.<name>.*``) say where and as whom to exchange. ``transport`` replaces the
    network (tests); ``metrics`` returns the registry to count exchanges in (the app replaces
    the services' registry at start, so it is looked up at each count)."""

    def __init__(
        self,
        settings: Settings,
        keys: AssertionKeys,
        providers: Mapping[str, Federated],
        *,
        metrics: Callable[[], Metrics | None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        retry_s: float = RETRY_S,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._providers = dict(providers)
        for name in self._providers:
            p = settings.providers.get(name)
            if p is None or p.credential != "federated" or not p.token_url or not p.audience:
                raise ValueError(f"providers.{name}: not a federated provider with a token_url "
                                 "and an audience")
        self._metrics = metrics
        self._transport = transport
        self._clock = clock
        self._retry_s = retry_s
        self._states = {name: _State() for name in self._providers}
        # Guards the states' in-flight futures and the task set, which callers on several
        # event loops (threads) touch; never held across an await.
        self._lock = threading.Lock()
        self._tasks: set[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = set()
        self._closed = False

    @property
    def providers(self) -> frozenset[str]:
        return frozenset(self._providers)

    async def get(self, provider: str) -> str:
        """A valid token of ``provider``; :class:`Unavailable` (503) when none can be had."""
        state = self._states.get(provider)
        if state is None:
            raise Unavailable(f"provider {provider!r} has no federated credential")
        if self._closed:
            raise Unavailable(f"provider {provider!r}: the broker is shutting down")
        now = self._clock()
        held = state.token
        if held is not None and now < held.expires_at - EXPIRY_SKEW_S:
            if now >= state.refresh_after and now >= state.retry_after and state.inflight is None:
                self._start(provider, state)
            return held.token
        if state.inflight is None and now < state.retry_after:
            raise self._unavailable(provider, state)
        try:
            token = await asyncio.wrap_future(self._start(provider, state))
        except _ExchangeFailed:
            raise self._unavailable(provider, state) from None
        return token.token

    def status(self, provider: str) -> TokenStatus:
        """The state of ``provider``'s token (``KeyError`` for a provider not federated)."""
        state = self._states[provider]
        held = state.token
        valid = held is not None and self._clock() < held.expires_at - EXPIRY_SKEW_S
        return TokenStatus(
            expires_at=held.expires_at if held is not None else None,
            last_exchange_at=state.last_exchange_at,
            last_error=state.last_error,
            healthy=valid or state.last_error is None,
        )

    async def aclose(self) -> None:
        """Stop the exchanges running and forget every token."""
        self._closed = True
        with self._lock:
            tasks = list(self._tasks)
        here = asyncio.get_running_loop()
        for loop, task in tasks:
            if loop is here:
                task.cancel()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        ours = [task for loop, task in tasks if loop is here]
        if ours:
            await asyncio.gather(*ours, return_exceptions=True)
        for state in self._states.values():
            state.token = None

    # --- the exchange ---------------------------------------------------------------------

    def _unavailable(self, provider: str, state: _State) -> Unavailable:
        why = state.last_error or "no token could be obtained"
        return Unavailable(f"provider {provider!r}: no provider token is available ({why})")

    def _start(self, provider: str, state: _State) -> concurrent.futures.Future[ProviderToken]:
        """The exchange in flight for ``provider``, started here (as a task of this event loop)
        unless one already runs. Its result is a :class:`concurrent.futures.Future`, so that
        callers on other event loops can wait for it too."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if state.inflight is not None:
                return state.inflight
            future: concurrent.futures.Future[ProviderToken] = concurrent.futures.Future()
            # Running, so that a waiter whose call is cancelled cannot cancel it for the others.
            future.set_running_or_notify_cancel()
            state.inflight = future
            task = loop.create_task(self._run(provider, state, future))
            entry = (loop, task)
            self._tasks.add(entry)
        task.add_done_callback(lambda _task: self._forget(entry))
        return future

    def _forget(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]) -> None:
        with self._lock:
            self._tasks.discard(entry)

    async def _run(self, provider: str, state: _State,
                   future: concurrent.futures.Future[ProviderToken]) -> None:
        try:
            token = await self._exchange(provider)
        except Exception as exc:
            message = _describe(exc, self._settings.federation.timeout_s)
            now = self._clock()
            with self._lock:
                state.last_error = message
                state.last_exchange_at = now
                state.retry_after = now + self._retry_s
                state.inflight = None
            future.set_exception(_ExchangeFailed(message))
            self._count(provider, "failed")
            held = state.token is not None and now < state.token.expires_at - EXPIRY_SKEW_S
            log.warning("provider %s: token exchange failed: %s%s", provider, message,
                        "; the token held keeps serving" if held else "")
            return
        except BaseException:
            # Cancelled (shutdown, or the end of the event loop that started it): no fault of
            # the endpoint, so no backoff; whoever waits is told, and the next call exchanges.
            with self._lock:
                state.inflight = None
            future.set_exception(_ExchangeFailed("the exchange was cancelled"))
            raise
        now = self._clock()
        with self._lock:
            state.token = token
            state.last_exchange_at = now
            state.last_error = None
            state.retry_after = float("-inf")
            state.refresh_after = self._refresh_after(now, token.expires_at)
            state.inflight = None
        future.set_result(token)
        self._count(provider, "ok")
        log.info("provider %s: new provider token, valid for %d s", provider,
                 int(token.expires_at - now))

    def _refresh_after(self, obtained: float, expires: float) -> float:
        fed = self._settings.federation
        life = expires - obtained
        due = min(obtained + life * fed.refresh_at, expires - fed.refresh_margin_s)
        # A token living less than the margin would otherwise start a refresh at every call.
        return max(due, obtained + life * fed.refresh_at / 2)

    def _count(self, provider: str, result: str) -> None:
        metrics = self._metrics() if self._metrics is not None else None
        if metrics is not None:
            metrics.provider_token_exchanges.labels(provider, result).inc()

    def _target(self, provider: str) -> FederationTarget:
        p = self._settings.providers[provider]
        assert p.token_url is not None  # checked in __init__
        return FederationTarget(
            token_url=p.token_url, identity_provider_id=p.identity_provider_id,
            service_account_id=p.service_account_id, federation_rule_id=p.federation_rule_id,
            organization_id=p.organization_id, workspace_id=p.workspace_id)

    async def _exchange(self, provider: str) -> ProviderToken:
        p = self._settings.providers[provider]
        assert p.audience is not None  # checked in __init__
        sign = functools.partial(
            self._keys.sign, issuer=self._settings.issuer.url,
            subject=p.assertion_subject or f"provider:{provider}", audience=p.audience)
        # Signing may read Vault (the keys' first use, a periodic re-read).
        assertion = await anyio.to_thread.run_sync(sign)
        plugin = self._providers[provider]
        request = plugin.exchange_request(assertion, self._target(provider))
        status, body = await self._post(request)
        now = self._clock()
        token = plugin.read_exchange(status, body, now)
        if not token.token:
            raise ProviderAdminError("token exchange: the answer holds no token")
        if token.expires_at - EXPIRY_SKEW_S <= now:
            raise ProviderAdminError("token exchange: the token the provider issued has expired")
        return token

    async def _post(self, request: ExchangeRequest) -> tuple[int, bytes]:
        timeout = self._settings.federation.timeout_s
        # httpx's timeout bounds each read; this bounds the whole exchange.
        with anyio.fail_after(timeout):
            # A client per exchange: exchanges are minutes apart, and one client could not
            # serve the several event loops that call.
            async with (
                httpx.AsyncClient(transport=self._transport, timeout=timeout,
                                  follow_redirects=False) as client,
                client.stream("POST", request.url, headers=request.headers,
                              json=request.body) as response,
            ):
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise _TooLarge()
                return response.status_code, bytes(body)
