"""Batch routes (OpenAI Files and Batch APIs, chat-completion lines): parse, call
:mod:`broker.gateway.batches`, render. Errors are in OpenAI's shape, as on every gateway route.

The upload is multipart (``purpose`` and ``file``), refused with 413 as soon as the body passes
``batches.max_file_bytes`` (plus room for the multipart framing): never read whole first.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api.auth import verify_bearer
from broker.api.http import bearer_token, json_object, path_id, services_of
from broker.api.openapi import ApiRoute
from broker.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from broker.gateway.batches import Batches
from broker.gateway.calls import Gateway, Reply
from broker.tokens.tokens import VerifiedToken

# The multipart framing around the file (boundaries, part headers, the purpose field).
MULTIPART_ROOM = 64 * 1024
MAX_FILENAME = 256

_BATCH_BODY: dict[str, Any] = {
    "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
    "properties": {"input_file_id": {"type": "string"},
                   "endpoint": {"const": "/v1/chat/completions"},
                   "completion_window": {"const": "24h"},
                   "metadata": {"type": "object",
                                "additionalProperties": {"type": "string"}}},
}


def _token(request: Request) -> VerifiedToken:
    return verify_bearer(services_of(request), bearer_token(request))


def _response(reply: Reply) -> Response:
    return Response(reply.content, status_code=reply.status, headers=reply.headers)


async def _upload(request: Request, max_file_bytes: int) -> tuple[str, str, bytes]:
    """(purpose, file name, content) of a multipart upload."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data with purpose and file")
    limit = max_file_bytes + MULTIPART_ROOM
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and len(declared) < 19 \
            and int(declared) > limit:
        raise PayloadTooLarge(f"the file exceeds {max_file_bytes} bytes")

    async def capped() -> AsyncGenerator[bytes, None]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the file exceeds {max_file_bytes} bytes")
            yield chunk

    parser = MultiPartParser(request.headers, capped(), max_files=1, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException:
        raise InvalidRequest("malformed multipart body") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file is required", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("purpose is required", param="purpose")
        content = await upload.read(max_file_bytes + 1)
        if len(content) > max_file_bytes:
            raise PayloadTooLarge(f"the file exceeds {max_file_bytes} bytes")
        name = upload.filename or "batch.jsonl"
        return purpose, name if name.isprintable() else "batch.jsonl", content
    finally:
        await form.close()


class BatchRoutes:
    def __init__(self, batches: Batches) -> None:
        self.batches = batches
        self.settings = batches.settings

    async def upload_file(self, request: Request) -> Response:
        """Upload a batch input file (OpenAI Files API, purpose batch): every line checked and
        bounded like a live chat completion, then uploaded to the provider."""
        token = _token(request)
        purpose, filename, content = await _upload(request, self.settings.batches.max_file_bytes)
        if purpose != "batch":
            raise InvalidRequest("only purpose 'batch' is supported", param="purpose")
        return _response(await self.batches.upload(token, filename[:MAX_FILENAME], content))

    async def create_batch(self, request: Request) -> Response:
        """Create a batch (OpenAI Batch API): its worst case held in a job slice carved out of
        the token's, then created at the provider."""
        token = _token(request)
        body = await json_object(request, self.settings.server.max_body_bytes)
        return _response(await self.batches.create(token, body))

    async def retrieve_batch(self, request: Request) -> Response:
        """A batch of the token's tenant, as the provider reports it."""
        token = _token(request)
        return _response(await self.batches.retrieve(token, path_id(request)))

    async def cancel_batch(self, request: Request) -> Response:
        """Cancel a batch of the token's tenant; what the provider billed is settled."""
        token = _token(request)
        return _response(await self.batches.cancel(token, path_id(request)))


def batch_routes(gateway: Gateway) -> list[BaseRoute]:
    routes = BatchRoutes(Batches(gateway))
    return [
        Route("/v1/files", routes.upload_file, methods=["POST"]),
        ApiRoute("/v1/batches", routes.create_batch, methods=["POST"], body=_BATCH_BODY),
        Route("/v1/batches/{id}", routes.retrieve_batch, methods=["GET"]),
        Route("/v1/batches/{id}/cancel", routes.cancel_batch, methods=["POST"]),
    ]
