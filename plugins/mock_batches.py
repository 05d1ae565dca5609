"""The fake provider's OpenAI Files and Batch APIs (see :mod:`plugins.mock_upstream`).

Routes (registered by `create_mock_upstream`; the key check and the request-level faults --
`status`, `delay_s` -- apply as on every route; an unknown id is a 404 in OpenAI's error shape):

* `POST /v1/files`, multipart (`file`, `purpose`): a FileObject `{"id": "file-<hex>", "object":
  "file", "bytes", "created_at", "filename", "purpose", "status": "processed", "expires_at":
  null, "status_details": null}`. The content goes to `MockState.files[id]`, the object to
  `MockState.file_objects[id]`. `GET /v1/files/{id}` answers the object, `GET
  /v1/files/{id}/content` the bytes, `DELETE /v1/files/{id}` `{"id", "object": "file",
  "deleted": true}`.
* `POST /v1/batches` `{"input_file_id", "endpoint", "completion_window": "24h", "metadata"?}`,
  the endpoint being `/v1/chat/completions`, `/v1/responses` or `/v1/embeddings` and the file one
  uploaded with purpose "batch": a Batch `{"id": "batch_<hex>", "object": "batch", "status":
  "in_progress", "request_counts": {"total": <the file's non-blank lines>, "completed": 0,
  "failed": 0}, "created_at", "in_progress_at" (both the clock's whole seconds), "expires_at":
  created_at + 86400, ...}`, every other field null. The job works on the file as it was then.
* `GET /v1/batches/{id}` answers the batch; `POST /v1/batches/{id}/cancel` too, after the cancel.

Time: a job follows the test's clock, `MockState.clock` (None: `time.time()`), and nothing runs
in the background: a job is looked at when it is retrieved or cancelled, and a job still
"in_progress" whose `created + faults.batch_duration_s` has come (at once by default) then
finishes, as `faults.batch_outcome` says -- the faults in force at that moment decide. Its
`finalizing_at` and `completed_at` / `failed_at` / `expired_at` are `created + batch_duration_s`
(when it finished on the provider's timeline, not when the test looked).

* "completed": each input line `{"custom_id", "method": "POST", "url": <the endpoint>, "body"}`
  is answered by the route's own code -- exactly the non-stream body that route returns for that
  body, with the same usage, limits, billing mode and faults (`cache_read_tokens`,
  `answer_tokens`, `omit_usage`...) -- as the output file line `{"id": "batch_req_<hex>",
  "custom_id", "response": {"status_code": 200, "request_id": "req_<hex>", "body": {...}},
  "error": null}`. A line whose custom_id is in `faults.batch_failed_lines`, or that the route
  refuses (a 400: no model, a bad limit, `"stream": true`...), goes to the error file instead,
  the same shape with the error's status and `{"error": {...}}` body, and is not billed.
  `output_file_id` / `error_file_id` name the two files (purpose "batch_output"; null when
  empty), `request_counts` counts the lines, and `usage` `{"input_tokens",
  "input_tokens_details": {"cached_tokens"}, "output_tokens", "output_tokens_details":
  {"reasoning_tokens"}, "total_tokens"}` sums the billed lines.
* "failed": status "failed", `errors` `{"object": "list", "data": [{"code", "message", "line",
  "param"}]}`, nothing answered nor billed, no file. An invalid input file fails the same way,
  whatever the outcome asked, one error per bad line (codes "invalid_json_line",
  "invalid_method", "mismatched_endpoint", "duplicate_custom_id"; "empty_file" when it has no
  line at all).
* "expired": status "expired"; the first `faults.batch_done_lines` lines (None: all) are answered
  as above, each other one goes to the error file as `{"id", "custom_id", "response": null,
  "error": {"code": "batch_expired", "message"}}`, and counts as failed.

Cancel: a job still in progress answers (and bills) its first `faults.batch_done_lines` lines
(None: none) at once and turns "cancelling" (`cancelling_at`: now); the next retrieve shows it
"cancelled" (`cancelled_at`: then), the output file holding the answered lines, the others never
run. Cancelling a finished job is a 409; a cancelling one answers as it is.
`MockState.forget_batches()` drops every job: retrieving one then answers 404, a provider that
no longer knows the job.

Bills: each answered line appends the route's own `Bill` to `MockState.bills` (route "chat",
"responses" or "embeddings", not a stream), with `batch_id` set to its batch's id, so a test can
price the provider's invoice -- at the batch prices it passes (OpenAI's are half the usual ones).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugins.mock_billing import Bill
from plugins.mock_upstream import MockState, _error

if TYPE_CHECKING:
    from plugins.mock_responses import ResponsesApi
    from plugins.mock_upstream import _Upstream

BATCH_WINDOW_S = 86_400  # "24h", the only completion window
FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def now(state: MockState) -> float:
    """The batches' time: the test's clock, else the real one."""
    return time.time() if state.clock is None else state.clock


def _id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class _Results:
    """The lines a job answered: the output file's, the error file's, and what they billed."""

    output: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    bills: list[Bill] = field(default_factory=list)


@dataclass
class BatchJob:
    """One batch: its wire object, as retrieve answers it, and what the fake needs to run it."""

    batch: dict[str, Any]
    created: float  # the clock when it was created (`created_at` is its whole seconds)
    content: bytes  # the input file as it was then
    answered: _Results | None = None  # what a cancelled job answered before the cancel


def _lines(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The requests of an input file, and a BatchError for each invalid line (1-based)."""
    requests: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not (isinstance(line, dict) and isinstance(line.get("custom_id"), str)
                and isinstance(line.get("body"), dict)):
            code, message, param = "invalid_json_line", "Not a JSON object with a custom_id and a body.", None
        elif line.get("method") != "POST":
            code, message, param = "invalid_method", "The method must be POST.", "method"
        elif line.get("url") != endpoint:
            code, message, param = "mismatched_endpoint", f"The url must be the batch's {endpoint}.", "url"
        elif line["custom_id"] in seen:
            code, message, param = "duplicate_custom_id", "The custom_id is not unique.", "custom_id"
        else:
            seen.add(line["custom_id"])
            requests.append(line)
            continue
        errors.append({"code": code, "message": message, "line": number, "param": param})
    if not requests and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no request.",
                       "line": None, "param": None})
    return requests, errors


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _usage(bills: list[Bill]) -> dict[str, Any]:
    cached = sum(b.cache_read_tokens for b in bills)
    inputs = cached + sum(b.prompt_tokens + b.cache_write_tokens + b.cache_write_1h_tokens for b in bills)
    outputs = sum(b.completion_tokens for b in bills)
    return {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": sum(b.reasoning_tokens for b in bills)},
            "total_tokens": inputs + outputs}


def _form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (file name, content)."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields[name] = (part.get_filename(), payload)
    return fields


class BatchesApi:
    """The Files and Batch routes, bound to one `_Upstream` (and its `MockState`)."""

    def __init__(self, upstream: _Upstream, responses: ResponsesApi) -> None:
        self.upstream = upstream
        self.state = upstream.state
        self.handlers: dict[str, Callable[[dict[str, Any]], Response]] = {
            "/v1/chat/completions": upstream.chat,
            "/v1/responses": responses.respond,
            "/v1/embeddings": upstream.embed,
        }

    # --- files -------------------------------------------------------------------------------

    def _store(self, content: bytes, filename: str, purpose: str, at: int) -> dict[str, Any]:
        file_id = _id("file-")
        self.state.files[file_id] = content
        self.state.file_objects[file_id] = {
            "id": file_id, "object": "file", "bytes": len(content), "created_at": at,
            "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
            "status_details": None,
        }
        return self.state.file_objects[file_id]

    async def _file_id(self, request: Request) -> str | Response:
        """The admitted request's known file id, or the error to answer."""
        admitted = await self.upstream._admit(request, "openai", has_body=False)
        if isinstance(admitted, Response):
            return admitted
        file_id = str(request.path_params["file_id"])
        if file_id not in self.state.files:
            return _error("openai", 404, f"No such File object: {file_id}")
        return file_id

    async def upload(self, request: Request) -> Response:
        admitted = await self.upstream._admit(request, "openai", has_body=False)
        if isinstance(admitted, Response):
            return admitted
        fields = _form(request.headers.get("content-type", ""), await request.body())
        filename, content = fields.get("file", (None, b""))
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
        if filename is None:
            return _error("openai", 400, "Missing required parameter: 'file' (a multipart file).")
        if purpose not in FILE_PURPOSES:
            return _error("openai", 400, f"Invalid value for 'purpose': {purpose!r}.")
        return JSONResponse(self._store(content, filename, purpose, int(now(self.state))))

    async def file(self, request: Request) -> Response:
        file_id = await self._file_id(request)
        if isinstance(file_id, Response):
            return file_id
        return JSONResponse(self.state.file_objects[file_id])

    async def content(self, request: Request) -> Response:
        file_id = await self._file_id(request)
        if isinstance(file_id, Response):
            return file_id
        return Response(self.state.files[file_id], media_type="application/octet-stream")

    async def delete_file(self, request: Request) -> Response:
        file_id = await self._file_id(request)
        if isinstance(file_id, Response):
            return file_id
        del self.state.files[file_id], self.state.file_objects[file_id]
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # --- batches -----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await self.upstream._admit(request, "openai")
        if isinstance(body, Response):
            return body
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not isinstance(file_id, str) or file_id not in self.state.files:
            return _error("openai", 404, f"No such File object: {file_id}")
        if self.state.file_objects[file_id]["purpose"] != "batch":
            return _error("openai", 400, "The input file must be uploaded with purpose 'batch'.")
        if endpoint not in self.handlers:
            return _error("openai", 400, f"Invalid value for 'endpoint': {endpoint!r}.")
        if body.get("completion_window") != "24h":
            return _error("openai", 400, "Invalid value for 'completion_window': only '24h'.")
        created = now(self.state)
        content = self.state.files[file_id]
        batch = dict.fromkeys((
            "errors", "output_file_id", "error_file_id", "finalizing_at", "completed_at",
            "failed_at", "expired_at", "cancelling_at", "cancelled_at", "model", "usage"))
        batch.update({
            "id": _id("batch_"), "object": "batch", "endpoint": endpoint, "input_file_id": file_id,
            "completion_window": "24h", "status": "in_progress", "created_at": int(created),
            "in_progress_at": int(created), "expires_at": int(created) + BATCH_WINDOW_S,
            "request_counts": {"total": sum(1 for raw in content.splitlines() if raw.strip()),
                               "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        })
        self.state.batches[str(batch["id"])] = BatchJob(batch, created, content)
        return JSONResponse(batch)

    async def _job(self, request: Request, *, retrieving: bool) -> BatchJob | Response:
        """The admitted request's known batch, brought up to the clock, or the error to answer."""
        admitted = await self.upstream._admit(request, "openai", has_body=False)
        if isinstance(admitted, Response):
            return admitted
        batch_id = str(request.path_params["batch_id"])
        job = self.state.batches.get(batch_id)
        if job is None:
            return _error("openai", 404, f"No batch found with id '{batch_id}'.")
        self._advance(job, retrieving)
        return job

    async def retrieve(self, request: Request) -> Response:
        job = await self._job(request, retrieving=True)
        return job if isinstance(job, Response) else JSONResponse(job.batch)

    async def cancel(self, request: Request) -> Response:
        job = await self._job(request, retrieving=False)
        if isinstance(job, Response):
            return job
        status = job.batch["status"]
        if status == "in_progress":
            requests, invalid = _lines(job.content, job.batch["endpoint"])
            done = self.state.faults.batch_done_lines
            job.answered = self._run(job, [] if invalid else requests[: max(done or 0, 0)])
            job.batch.update(status="cancelling", cancelling_at=int(now(self.state)))
        elif status != "cancelling":
            return _error("openai", 409, f"Cannot cancel a batch with status '{status}'.")
        return JSONResponse(job.batch)

    # --- running a job -----------------------------------------------------------------------

    def _advance(self, job: BatchJob, retrieving: bool) -> None:
        """Finish the job if its time has come, or (`retrieving`) its cancel (see the module's doc)."""
        faults = self.state.faults
        status = job.batch["status"]
        if status == "cancelling" and retrieving:
            self._finish(job, "cancelled", int(now(self.state)), job.answered or _Results())
            return
        duration = max(faults.batch_duration_s, 0.0)
        if status != "in_progress" or now(self.state) < job.created + duration:
            return
        at = int(job.created + duration)
        requests, invalid = _lines(job.content, job.batch["endpoint"])
        if invalid or faults.batch_outcome == "failed":
            job.batch.update(status="failed", failed_at=at, errors={"object": "list", "data": invalid or [
                {"code": "batch_failed", "message": "Injected fault: the batch failed.", "line": None,
                 "param": None}]})
        elif faults.batch_outcome == "expired":
            done = len(requests) if faults.batch_done_lines is None else max(faults.batch_done_lines, 0)
            results = self._run(job, requests[:done])
            results.errors += [{"id": _id("batch_req_"), "custom_id": line["custom_id"], "response": None,
                                "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE}}
                               for line in requests[done:]]
            self._finish(job, "expired", at, results)
        else:
            self._finish(job, "completed", at, self._run(job, requests))

    def _run(self, job: BatchJob, requests: list[dict[str, Any]]) -> _Results:
        """Answer the requests, each by its route's code; bill the answered ones to the batch."""
        results = _Results()
        for line in requests:
            body = line["body"]
            reply: Response
            if line["custom_id"] in self.state.faults.batch_failed_lines:
                reply = _error("openai", 400, f"Injected fault: request {line['custom_id']!r} failed.")
            elif body.get("stream"):
                reply = _error("openai", 400, "Streaming is not supported in a batch.")
            else:
                before = len(self.state.bills)
                reply = self.handlers[job.batch["endpoint"]](body)
                for bill in self.state.bills[before:]:
                    bill.batch_id = job.batch["id"]
                    results.bills.append(bill)
            response = {"status_code": reply.status_code, "request_id": _id("req_"),
                        "body": json.loads(bytes(reply.body))}
            entry = {"id": _id("batch_req_"), "custom_id": line["custom_id"], "response": response,
                     "error": None}
            (results.output if reply.status_code == 200 else results.errors).append(entry)
        return results

    def _finish(self, job: BatchJob, status: str, at: int, results: _Results) -> None:
        batch = job.batch
        files: dict[str, str | None] = {}
        for kind, lines in (("output", results.output), ("error", results.errors)):
            name = f"{batch['id']}_{kind}.jsonl"
            stored = self._store(_jsonl(lines), name, "batch_output", at) if lines else None
            files[f"{kind}_file_id"] = stored["id"] if stored else None
        counts = {**batch["request_counts"], "completed": len(results.output), "failed": len(results.errors)}
        batch.update(files, status=status, request_counts=counts, usage=_usage(results.bills))
        batch[f"{status}_at"] = at
        if status != "cancelled":
            batch["finalizing_at"] = at


def batch_routes(upstream: _Upstream, responses: ResponsesApi) -> list[Route]:
    """The Files and Batch routes of the fake (see the module's doc)."""
    api = BatchesApi(upstream, responses)
    return [
        Route("/v1/files", api.upload, methods=["POST"]),
        Route("/v1/files/{file_id}", api.file, methods=["GET"]),
        Route("/v1/files/{file_id}", api.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", api.content, methods=["GET"]),
        Route("/v1/batches", api.create, methods=["POST"]),
        Route("/v1/batches/{batch_id}", api.retrieve, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", api.cancel, methods=["POST"]),
    ]
