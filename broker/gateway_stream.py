"""A streamed answer, metered event by event (see :mod:`broker.gateway` for the whole call).

The stream is forwarded as the provider sends it, except the usage chunk the client did not ask
for. It ends early, and says so to the client in its wire format, when the provider streams past
the limit the broker set (the hold's wall), when the token is revoked (checked at every chunk
and every :data:`GATE_INTERVAL_S`), or when the provider's stream breaks; it stops when the
client leaves. Whatever ends it, even a cancellation, it settles exactly once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx

from broker.providers import EndReason, SseParser, StreamMeter, Usage

GATE_INTERVAL_S = 0.5  # a revoked token's stream ends within this (plus one chunk)


@dataclass(frozen=True)
class Outcome:
    """How a call ended and what it used: what settlement charges."""

    status: str
    usage: Usage
    estimated: bool = False


NOTHING = Usage(0, 0)


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's body as it arrives, decoded; without a content encoding, the raw bytes
    (httpx's decoding layer is one more generator hop per chunk)."""
    encoding = response.headers.get("content-encoding", "")
    if encoding.strip().lower() in ("", "identity"):
        return response.aiter_raw()
    return response.aiter_bytes()


def wall_tokens(limit: int) -> int:
    """Streamed output past which the provider is ignoring the limit the broker set: a small
    tolerance covers the streamed-token estimate, the hold caps the charge either way."""
    return limit + limit // 10 + 2


class MeteredStream:
    """A streamed answer: forwarded event by event, metered, ended at the hold's wall, on
    revocation or when the client leaves, and settled whatever happens."""

    def __init__(
        self,
        response: httpx.Response,
        meter: StreamMeter,
        *,
        limit: int,
        prompt_estimate: int,
        remaining: int,
        is_live: Callable[[], bool],
        settle: Callable[[Outcome], Awaitable[None]],
    ) -> None:
        self.response = response
        self.meter = meter
        self.wall = wall_tokens(limit)
        self.prompt_estimate = prompt_estimate
        self.remaining = remaining  # of the slice, once this stream's worst case is held
        self._live = is_live
        self._settle = settle
        self.status: str | None = None
        self.end: EndReason | None = None

    def _stop(self, status: str, end: EndReason | None) -> None:
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
            async with anyio.create_task_group() as tg:

                async def watch_client() -> None:
                    await disconnected()
                    if self.meter.done:
                        # The answer was complete: a client that hangs up after the provider's
                        # last event (the SDKs close at [DONE]) received everything.
                        self._stop("upstream_error" if self.meter.failed else "ok", None)
                    else:
                        self._stop("client_disconnected", None)
                    tg.cancel_scope.cancel()

                async def watch_gate() -> None:
                    while True:
                        await anyio.sleep(GATE_INTERVAL_S)
                        if not self._live():
                            self._stop("revoked", "revoked")
                            tg.cancel_scope.cancel()

                tg.start_soon(watch_client)
                tg.start_soon(watch_gate)
                await self._pump(send)
                tg.cancel_scope.cancel()
            if self.end is not None:
                await send(self.meter.epilogue(self.end))
        finally:
            with anyio.CancelScope(shield=True):
                await self.response.aclose()
                await self._settle(self._outcome())

    async def _pump(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        meter, wall = self.meter, self.wall
        parser = SseParser()
        try:
            async for chunk in body_chunks(self.response):
                out: list[bytes] = []
                for event in parser.feed(chunk):
                    forward = meter.read(event)
                    if meter.streamed_tokens > wall and not meter.done:
                        self._stop("hold_exceeded", "limit")  # this event is past the wall
                        break
                    if forward:
                        out.append(event.raw)
                if out:
                    await send(b"".join(out))
                if self.status is not None:
                    return
                if not self._live():
                    self._stop("revoked", "revoked")
                    return
        except httpx.TimeoutException:
            self._stop("upstream_timeout", "upstream")
            return
        except httpx.HTTPError:
            self._stop("stream_cut", "upstream")
            return
        if meter.done:
            self._stop("upstream_error" if meter.failed else "ok", None)
        elif meter.failed:
            self._stop("upstream_error", None)  # the provider's error event reached the client
        else:
            self._stop("stream_cut", "upstream")

    def _outcome(self) -> Outcome:
        meter = self.meter
        status = self.status or "cancelled"
        if meter.final and meter.usage is not None:
            return Outcome(status, meter.usage)
        reported = meter.usage
        prompt = reported.prompt_tokens if reported is not None else self.prompt_estimate
        completion = max(meter.streamed_tokens, reported.completion_tokens if reported else 0)
        return Outcome(status, Usage(prompt, completion), estimated=True)
