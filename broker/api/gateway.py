"""Gateway routes (OpenAI- and Anthropic-compatible): parse, call :mod:`broker.gateway.calls`, render.

Errors are rendered by :mod:`broker.api.http` in the route's dialect: OpenAI's shape on
``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/responses`` and ``/v1/models``,
Anthropic's on ``/v1/messages``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from broker.api.auth import verify_bearer
from broker.api.batches import batch_routes
from broker.api.http import bearer_token, client_address, json_object, json_response, request_id, services_of
from broker.api.openapi import ApiRoute
from broker.approvals.grants import LIMITS_MESSAGE
from broker.errors import BrokerError
from broker.gateway import counting
from broker.gateway.calls import Gateway, Reply
from broker.gateway.stream import MeteredStream
from broker.plugin import Operation
from broker.services import Services
from broker.tokens.tokens import VerifiedToken

# What the OpenAPI document shows of each body: the fields the gateway itself reads (the rest
# is the provider's wire format, passed through).
_CHAT_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "messages"],
    "properties": {"model": {"type": "string"}, "messages": {"type": "array"},
                   "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"},
                   "max_completion_tokens": {"type": "integer"}},
}
_EMBEDDINGS_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {"model": {"type": "string"}, "input": {}},
}
_RESPONSES_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {"model": {"type": "string"}, "input": {}, "stream": {"type": "boolean"},
                   "max_output_tokens": {"type": "integer"},
                   "previous_response_id": {"type": "string"}},
}
_COUNT_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "messages"],
    "properties": {"model": {"type": "string"}, "messages": {"type": "array"}},
}
_MESSAGES_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "messages", "max_tokens"],
    "properties": {"model": {"type": "string"}, "messages": {"type": "array"},
                   "max_tokens": {"type": "integer"}, "stream": {"type": "boolean"}},
}


# Refusals of a verified token's call that the monitor counts: forbidden models, rate and
# quota limits (a malformed body is the client's bug, not a burst of refusals).
_WATCHED_REFUSALS = frozenset({403, 429})


class _StreamResponse(Response):
    """Sends a :class:`MeteredStream`; the stream itself watches for the client leaving."""

    media_type = "text/event-stream"

    def __init__(self, stream: MeteredStream) -> None:
        self.stream = stream
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache",
                           "x-broker-budget-remaining-micros": str(stream.remaining)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def start() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        await self.stream.run(start, body, disconnected)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _token(request: Request) -> VerifiedToken:
    # The OpenAI SDK sends ``Authorization: Bearer``, the Anthropic SDK ``x-api-key``.
    bearer = bearer_token(request) or request.headers.get("x-api-key")
    return verify_bearer(services_of(request), bearer)


class GatewayRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # The streams being sent, for a shutdown to end them in time (each leaves when sent).
        self._streams: weakref.WeakSet[MeteredStream] = weakref.WeakSet()
        self._ending_by = math.inf

    def drain(self, deadline: float) -> None:
        """The server is shutting down: every stream, running or about to start, ends by
        ``deadline`` (``time.monotonic()``)."""
        self._ending_by = min(self._ending_by, deadline)
        for stream in list(self._streams):
            stream.end_by(deadline)

    async def chat_completions(self, request: Request) -> Response:
        """Create a chat completion (OpenAI wire format), metered against the token's slice."""
        return await self._call(request, "chat")

    async def embeddings(self, request: Request) -> Response:
        """Create embeddings (OpenAI wire format), metered against the token's slice."""
        return await self._call(request, "embeddings")

    async def responses(self, request: Request) -> Response:
        """Create a response (OpenAI Responses API), metered against the token's slice."""
        return await self._call(request, "responses")

    async def messages(self, request: Request) -> Response:
        """Create a message (Anthropic wire format), metered against the token's slice."""
        return await self._call(request, "messages")

    async def count_tokens(self, request: Request) -> Response:
        """Count a message's input tokens (Anthropic wire format): free, but a call of the
        token all the same (its model must be allowed; it counts against the rates)."""
        token = _token(request)
        body = await json_object(request, self.gateway.settings.server.max_body_bytes)
        reply = await counting.count_tokens(self.gateway, token, body, request.headers)
        return Response(reply.content, status_code=reply.status, headers=reply.headers)

    async def models(self, request: Request) -> Response:
        """The models this token may use (OpenAI list; Anthropic's when it sends its version)."""
        token = _token(request)
        models = self.gateway.visible_models(token)
        if request.headers.get("anthropic-version"):
            data = [{"type": "model", "id": name, "display_name": name,
                     "created_at": "1970-01-01T00:00:00Z"} for name, _ in models]
            return json_response({"data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": spec.provider}
            for name, spec in models
        ]})

    async def _call(self, request: Request, op: Operation) -> Response:
        svc = self.gateway.svc
        token = _token(request)
        body = await json_object(request, svc.settings.server.max_body_bytes)
        try:
            call = await self.gateway.begin(token, op, body, request.headers,
                                            request_id=request_id(request),
                                            client_ip=client_address(request))
        except BrokerError as exc:
            if svc.monitor is not None and exc.status in _WATCHED_REFUSALS:
                svc.monitor.refusal(token.sub, exc.code, authenticated=True,
                                    tenant_id=token.tenant, kind=token.kind,
                                    client_ip=client_address(request))
            raise
        result = await self.gateway.forward(call, request.headers)
        if isinstance(result, Reply):
            return Response(result.content, status_code=result.status, headers=result.headers)
        self._streams.add(result)
        result.end_by(self._ending_by)  # a shutdown began while this call waited upstream
        return _StreamResponse(result)


def gateway_extension(svc: Services) -> list[BaseRoute]:
    """Build the gateway and its routes; its HTTP clients close at shutdown."""
    gateway = Gateway(svc)
    svc.gateway = gateway
    svc.closers.append(gateway.aclose)
    if svc.bus is not None:
        # A grant, a throttle or its clearing changed a workload's limits on some replica.
        svc.bus.on(LIMITS_MESSAGE, lambda message: gateway.forget_policy(
            message.get_str("workload_id")))
    routes = GatewayRoutes(gateway)
    svc.drains.append(routes.drain)
    return [
        Route("/v1/models", routes.models, methods=["GET"]),
        ApiRoute("/v1/chat/completions", routes.chat_completions, methods=["POST"], body=_CHAT_BODY),
        ApiRoute("/v1/embeddings", routes.embeddings, methods=["POST"], body=_EMBEDDINGS_BODY),
        ApiRoute("/v1/responses", routes.responses, methods=["POST"], body=_RESPONSES_BODY),
        ApiRoute("/v1/messages", routes.messages, methods=["POST"], body=_MESSAGES_BODY),
        ApiRoute("/v1/messages/count_tokens", routes.count_tokens, methods=["POST"],
                 body=_COUNT_BODY),
        *batch_routes(gateway),
    ]
