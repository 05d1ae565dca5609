"""A streamed answer, metered event by event (see :mod:`broker.gateway.calls` for the whole call).

The stream is forwarded as the provider sends it, except the usage chunk the client did not ask
for. It ends early, and says so to the client in its wire format, when the provider streams past
the limit the broker set (the hold's wall), when the token is revoked (checked at every chunk
and every :data:`GATE_INTERVAL_S`), when it reaches its time limit (the token's expiry plus the
leeway, or ``gateway.max_stream_s``, or the end of the server's shutdown grace), or when the
provider's stream breaks.

When the client leaves before the provider's final usage, the stream is still read, without
forwarding, for up to ``gateway.drain_s``, so that the charge is the provider's own count rather
than a bound. Whatever ends it, even a cancellation, it settles exactly once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import httpx

from broker.money.outcome import Outcome
from broker.plugin import EndReason, SseParser, StreamMeter

GATE_INTERVAL_S = 0.5  # a revoked token's stream ends within this (plus one chunk)


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's body as it arrives, decoded; without a content encoding, the raw bytes
    (httpx's decoding layer is one more generator hop per chunk)."""
    encoding = response.headers.get("content-encoding", "")
    if encoding.strip().lower() in ("", "identity"):
        return response.aiter_raw()
    return response.aiter_bytes()


def wall_tokens(limit: int) -> int:
    """Streamed output past which the provider is ignoring the limit the broker set. The
    streamed count is a low one, and a small tolerance covers it; the charge is the provider's
    own count (or a bound) either way."""
    return limit + limit // 10 + 2


class MeteredStream:
    """A streamed answer: forwarded event by event, metered, ended at the hold's wall, on
    revocation or at its time limit, drained when the client leaves, and settled whatever
    happens."""

    def __init__(
        self,
        response: httpx.Response,
        meter: StreamMeter,
        *,
        limit: int,
        remaining: int,
        deadline: float,
        drain_s: float,
        is_live: Callable[[], bool],
        settle: Callable[[Outcome, StreamMeter], Awaitable[None]],
    ) -> None:
        self.response = response
        self.meter = meter
        self.wall = wall_tokens(limit)
        self.remaining = remaining  # of the slice, once this stream's worst case is held
        self.deadline = deadline  # time.monotonic() at which the stream must have ended
        self.drain_s = drain_s
        self._live = is_live
        self._settle = settle
        self.status: Outcome | None = None
        self.end: EndReason | None = None
        self.client_gone = False
        self._clock: anyio.CancelScope | None = None  # ends the stream at its deadline

    def end_by(self, deadline: float) -> None:
        """Bring the deadline (``time.monotonic()``) forward to ``deadline``, running or not:
        the server is shutting down. The stream then ends as at any time limit: the client is
        told, and the call is settled with what it used."""
        if deadline >= self.deadline:
            return
        self.deadline = deadline
        if self._clock is not None:
            # The scope counts in the event loop's clock, which need not be time.monotonic().
            self._clock.deadline = anyio.current_time() + (deadline - time.monotonic())

    def _stop(self, status: Outcome, end: EndReason | None) -> None:
        if self.status is None:
            self.status, self.end = status, end

    async def run(
        self,
        start: Callable[[], Awaitable[None]],
        send: Callable[[bytes], Awaitable[None]],
        disconnected: Callable[[], Awaitable[None]],
    ) -> None:
        """``start`` the client's response, pump the stream to ``send`` until it ends;
        ``disconnected`` returns when the client has gone. Settles in a shielded ``finally``."""
        try:
            await start()
            with anyio.move_on_after(max(0.0, self.deadline - time.monotonic())) as clock:
                self._clock = clock
                async with anyio.create_task_group() as tg:

                    async def watch_client() -> None:
                        await disconnected()
                        self.client_gone = True
                        if self.meter.done:
                            # The answer was complete: a client that hangs up after the
                            # provider's last event (the SDKs close at [DONE]) received it all.
                            self._stop(Outcome.UPSTREAM_ERROR if self.meter.failed else Outcome.OK, None)
                            tg.cancel_scope.cancel()
                            return
                        # Keep reading for the provider's own count, a bounded while.
                        await anyio.sleep(self.drain_s)
                        self._stop(Outcome.CLIENT_DISCONNECTED, None)
                        tg.cancel_scope.cancel()

                    async def watch_gate() -> None:
                        while True:
                            await anyio.sleep(GATE_INTERVAL_S)
                            if not self._live():
                                self._stop(Outcome.REVOKED, "revoked")
                                tg.cancel_scope.cancel()

                    tg.start_soon(watch_client)
                    tg.start_soon(watch_gate)
                    await self._pump(send)
                    tg.cancel_scope.cancel()
            self._clock = None
            if clock.cancelled_caught:
                self._stop(Outcome.EXPIRED, "expired")
            if self.end is not None and not self.client_gone:
                await send(self.meter.epilogue(self.end))
        finally:
            with anyio.CancelScope(shield=True):
                await self.response.aclose()
                await self._settle(self.status or Outcome.CANCELLED, self.meter)

    async def _pump(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        meter, wall = self.meter, self.wall
        parser = SseParser()
        try:
            async for chunk in body_chunks(self.response):
                out: list[bytes] = []
                for event in parser.feed(chunk):
                    forward = meter.read(event)
                    if meter.streamed_tokens > wall and not meter.done:
                        self._stop(Outcome.HOLD_EXCEEDED, "limit")  # this event is past the wall
                        break
                    if forward:
                        out.append(event.raw)
                if out and not self.client_gone:
                    await send(b"".join(out))
                if self.status is not None:
                    return
                if not self._live():
                    self._stop(Outcome.REVOKED, "revoked")
                    return
        except httpx.TimeoutException:
            self._stop(Outcome.UPSTREAM_TIMEOUT, "upstream")
            return
        except httpx.HTTPError:
            self._stop(Outcome.STREAM_CUT, "upstream")
            return
        if self.client_gone:
            self._stop(Outcome.CLIENT_DISCONNECTED, None)  # drained to the provider's last event
        elif meter.done:
            self._stop(Outcome.UPSTREAM_ERROR if meter.failed else Outcome.OK, None)
        elif meter.failed:
            self._stop(Outcome.UPSTREAM_ERROR, None)  # the provider's error event reached the client
        else:
            self._stop(Outcome.STREAM_CUT, "upstream")
