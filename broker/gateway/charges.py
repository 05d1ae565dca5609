"""How a gateway call ended, and what it is charged: the provider never took it (nothing),
took it and reported usage (that), or took it and went silent (the whole hold).

:class:`Ended` carries a failure's charge to the settlement and its error to the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from broker.errors import RateLimited, UpstreamError, UpstreamTimeout
from broker.gateway.quote import Quote
from broker.gateway.stream import body_chunks
from broker.gateway.upstream_http import Upstream
from broker.money.outcome import Outcome
from broker.money.pricing import NOTHING, Usage

log = logging.getLogger("broker.gateway")

MAX_RESPONSE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Charge:
    """How a call ended and what it used: what settlement charges."""

    outcome: Outcome
    usage: Usage
    estimated: bool = False


def nothing(outcome: Outcome) -> Charge:
    """The provider never took the request (or refused it): nothing to pay."""
    return Charge(outcome, NOTHING)


def whole_hold(outcome: Outcome, quote: Quote) -> Charge:
    """The request went out and no usage came back: the provider may bill all of it."""
    return Charge(outcome, quote.worst, estimated=True)


class Ended(Exception):
    """A call that failed after its request was built: what it is charged, and the error the
    client sees."""

    def __init__(self, charge: Charge, error: Exception) -> None:
        super().__init__(charge.outcome)
        self.charge = charge
        self.error = error


async def send(up: Upstream, request: httpx.Request, quote: Quote) -> httpx.Response:
    try:
        return await up.send(request)
    except (httpx.ConnectTimeout, httpx.PoolTimeout):
        # No connection was made: the provider never saw the request.
        raise Ended(nothing(Outcome.UPSTREAM_TIMEOUT), UpstreamTimeout()) from None
    except httpx.TimeoutException:
        raise Ended(whole_hold(Outcome.UPSTREAM_TIMEOUT, quote), UpstreamTimeout()) from None
    except httpx.HTTPError:
        raise Ended(nothing(Outcome.UPSTREAM_ERROR),
                     UpstreamError("the provider could not be reached")) from None


async def read(response: httpx.Response, quote: Quote) -> bytes:
    """The whole body of a non-stream answer, the response closed after. A 200 cut off may be
    billed in full; an error status took nothing."""

    def charge(outcome: Outcome) -> Charge:
        return whole_hold(outcome, quote) if response.status_code == 200 else nothing(outcome)

    try:
        return await read_capped(response)
    except httpx.TimeoutException:
        raise Ended(charge(Outcome.UPSTREAM_TIMEOUT), UpstreamTimeout()) from None
    except httpx.HTTPError:
        raise Ended(charge(Outcome.UPSTREAM_ERROR),
                     UpstreamError("the provider's answer was cut off")) from None
    except UpstreamError as exc:
        raise Ended(charge(Outcome.UPSTREAM_ERROR), exc) from None
    finally:
        await response.aclose()


def unfinished(quote: Quote, request: httpx.Request | None,
                response: httpx.Response | None) -> Charge:
    """The charge of a call stopped by anything but a named failure (a cancellation, a failure
    before sending): nothing until the request goes out, then the whole hold, unless the
    provider answered an error status."""
    if request is None:
        return nothing(Outcome.NOT_SENT)
    if response is not None and response.status_code != 200:
        return nothing(Outcome.UPSTREAM_ERROR)
    return whole_hold(Outcome.CANCELLED, quote)


def refusal(response: httpx.Response) -> tuple[Charge, Exception | None]:
    """How an upstream error status reaches the client; the provider took nothing."""
    status = response.status_code
    if status == 429:
        retry = response.headers.get("retry-after", "")
        headers = {"retry-after": retry} if retry.isdigit() else {}
        return nothing(Outcome.UPSTREAM_RATE_LIMITED), RateLimited(
            "the provider is rate limiting this model", headers=headers)
    if status in (401, 403, 407):
        log.error("provider refused the broker's credentials (HTTP %d)", status)
        return nothing(Outcome.UPSTREAM_ERROR), UpstreamError("the provider refused the call")
    if 400 <= status < 500:
        # The client's request is at fault: its own provider error, in its own wire format.
        return nothing(Outcome.UPSTREAM_REJECTED), None
    return nothing(Outcome.UPSTREAM_ERROR), UpstreamError(f"the provider answered {status}")


async def read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(response):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise UpstreamError("the provider's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)
