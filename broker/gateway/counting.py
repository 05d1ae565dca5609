"""Anthropic's token counting (``POST /v1/messages/count_tokens``), passed through.

The provider does not bill it, so nothing is held or charged; but it is a call of a verified
token for a model its policy allows, and it counts against the workload's request rate and
concurrency like any other call (an agent looping on it is still throttled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from broker.errors import RateLimited, UpstreamError, UpstreamTimeout
from broker.gateway.calls import Gateway, Reply
from broker.gateway.charges import read_capped
from broker.tokens.tokens import VerifiedToken

COUNT_PATH = "/count_tokens"


async def count_tokens(gateway: Gateway, token: VerifiedToken, body: dict[str, Any],
                       client_headers: Mapping[str, str]) -> Reply:
    model, spec, provider, policy = await gateway.admit_model(token, body.get("model"),
                                                              "messages")
    key = await gateway.keys.get(spec.provider)
    async with gateway.counted(token, policy):
        body["model"] = spec.upstream_model or model
        upstream = provider.build_request("messages", body, key=key,
                                          client_headers=client_headers)
        up = gateway.pool(provider)
        # The Messages API's free sibling lives under its path.
        request = up.request(upstream.url + COUNT_PATH, upstream.headers, upstream.content)
        try:
            response = await up.send(request)
            raw = await read_capped(response)
        except httpx.TimeoutException:
            raise UpstreamTimeout() from None
        except httpx.HTTPError:
            raise UpstreamError("the provider could not be reached") from None
    status = response.status_code
    if status == 429:
        raise RateLimited("the provider is rate limiting this model")
    if status in (401, 403, 407) or status >= 500:
        raise UpstreamError("the provider refused the call")
    return Reply(status, raw, {"content-type": "application/json"})
