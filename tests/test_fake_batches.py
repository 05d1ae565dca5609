"""The fake provider's OpenAI Files and Batch APIs (`plugins.mock_batches`), driven over HTTP by
the official `openai` SDK: the shapes it parses, the job's clock, each outcome, and the bills.

Token rules as in `plugins.mock_upstream` ("words" billing): the prompt "hello" is 2 tokens, an
answer min(limit, 16) words "w0 w1 ...", one token each.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any, Final

import httpx
import openai
import pytest
from openai.types import Batch, FileObject

from tests.fake_provider import FakeProviderServer, fresh
from tests.sdk_support import Sdks

CHAT: Final = "/v1/chat/completions"
T0 = 1_000_000.0  # the test's clock when a batch is made


@pytest.fixture
def fake(module_fake: FakeProviderServer) -> Iterator[FakeProviderServer]:
    server = fresh(module_fake)
    server.state.clock = T0
    yield server


def chat_line(custom_id: str, content: str = "hello", **extra: Any) -> dict[str, Any]:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def start(sdk: Sdks, fake: FakeProviderServer, lines: list[dict[str, Any]], endpoint: Any = CHAT) -> Batch:
    """Upload the lines and make a batch of them."""
    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    uploaded = api.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return api.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")


def retrieve(sdk: Sdks, fake: FakeProviderServer, batch_id: str) -> Batch:
    """The batch, also validated strictly (pydantic, not the SDK's lenient parsing)."""
    response = httpx.get(f"{fake.url}/v1/batches/{batch_id}", headers={"authorization": "Bearer k"})
    assert response.status_code == 200, response.text
    Batch.model_validate(response.json())
    return sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.retrieve(batch_id)


def content(sdk: Sdks, fake: FakeProviderServer, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    text = sdk.openai(f"{fake.url}/v1", "sk-openai-test").files.content(file_id).text
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


# --- files ------------------------------------------------------------------------------------


def test_a_file_is_stored_read_and_deleted(fake: FakeProviderServer, sdk: Sdks) -> None:
    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    data = b'{"a": 1}\r\n{"b": "\xc3\xa9"}\n\n\x00\xff'  # any bytes come back unchanged
    uploaded = api.files.create(file=("in.jsonl", data), purpose="batch")
    assert isinstance(uploaded, FileObject)
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "in.jsonl", "batch")
    assert (uploaded.status, uploaded.created_at) == ("processed", int(T0))
    assert fake.state.files == {uploaded.id: data}
    assert api.files.retrieve(uploaded.id) == uploaded
    assert api.files.content(uploaded.id).content == data

    deleted = api.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (uploaded.id, True, "file")
    assert fake.state.files == {} and fake.state.file_objects == {}
    for call in (api.files.retrieve, api.files.content, api.files.delete):
        with pytest.raises(openai.NotFoundError) as info:
            call(uploaded.id)
        assert info.value.body == {"message": f"No such File object: {uploaded.id}",
                                   "type": "invalid_request_error", "code": None, "param": None}


def test_an_upload_needs_a_file_and_a_purpose(fake: FakeProviderServer) -> None:
    url, auth = f"{fake.url}/v1/files", {"authorization": "Bearer k"}
    missing_file = httpx.post(url, headers=auth, data={"purpose": "batch"}, files={"x": ("a", b"1")})
    assert missing_file.status_code == 400 and "'file'" in missing_file.json()["error"]["message"]
    bad_purpose = httpx.post(url, headers=auth, data={"purpose": "nope"}, files={"file": ("a", b"1")})
    assert bad_purpose.status_code == 400 and "purpose" in bad_purpose.json()["error"]["message"]
    not_multipart = httpx.post(url, headers=auth, json={"purpose": "batch"})
    assert not_multipart.status_code == 400
    assert fake.state.files == {}


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/files"), ("GET", "/v1/files/file-x"), ("GET", "/v1/files/file-x/content"),
    ("DELETE", "/v1/files/file-x"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_x"),
    ("POST", "/v1/batches/batch_x/cancel"),
])
def test_every_route_needs_an_api_key(fake: FakeProviderServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{fake.url}{path}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# --- creating a batch -------------------------------------------------------------------------


def test_a_new_batch_is_in_progress_with_every_other_field_null(fake: FakeProviderServer, sdk: Sdks) -> None:
    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    uploaded = api.files.create(file=("in.jsonl", jsonl([chat_line("a"), chat_line("b")]) + b"\n"),
                                purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                               metadata={"job": "nightly"})
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert (batch.status, batch.endpoint, batch.input_file_id) == ("in_progress", CHAT, uploaded.id)
    assert batch.created_at == batch.in_progress_at == int(T0)
    assert batch.expires_at == int(T0) + 86_400
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 0}
    assert batch.metadata == {"job": "nightly"}
    assert {name for name, value in batch.model_dump().items() if value is None} == {
        "errors", "output_file_id", "error_file_id", "finalizing_at", "completed_at", "failed_at",
        "expired_at", "cancelling_at", "cancelled_at", "model", "usage"}
    assert fake.state.bills == []
    # Deleting the input file does not change the job: it works on the file as it was.
    api.files.delete(uploaded.id)
    assert retrieve(sdk, fake, batch.id).status == "completed"


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"input_file_id": "file-nope"}, 404, "No such File object"),
    ({"endpoint": "/v1/completions"}, 400, "endpoint"),
    ({"completion_window": "1h"}, 400, "completion_window"),
])
def test_a_batch_is_refused_for_a_bad_parameter(
    fake: FakeProviderServer, change: dict[str, str], status: int, message: str, sdk: Sdks
) -> None:
    uploaded = sdk.openai(f"{fake.url}/v1", "sk-openai-test").files.create(
        file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "24h", **change}
    response = httpx.post(f"{fake.url}/v1/batches", headers={"authorization": "Bearer k"}, json=body)
    assert response.status_code == status and message in response.json()["error"]["message"]
    assert fake.state.batches == {}


def test_a_batch_needs_a_file_uploaded_for_batches(fake: FakeProviderServer, sdk: Sdks) -> None:
    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    uploaded = api.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")


# --- completed --------------------------------------------------------------------------------


@pytest.mark.parametrize("billing", ["words", "tokenizer"])
def test_each_line_gets_exactly_what_the_chat_route_answers(
    fake: FakeProviderServer, billing: Any, sdk: Sdks
) -> None:
    fake.state.billing = billing
    fake.state.faults.cache_read_tokens = 1
    lines = [chat_line("plain"), chat_line("limited", max_tokens=3),
             chat_line("new-limit", "a longer question", max_completion_tokens=5, max_tokens=9),
             chat_line("tier", service_tier="flex")]
    batch = start(sdk, fake, lines)
    done = retrieve(sdk, fake, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.completed_at == done.finalizing_at == int(T0)
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    output = content(sdk, fake, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["plain", "limited", "new-limit", "tier"]
    batch_bills = list(fake.state.bills)
    assert len(batch_bills) == 4 and all(bill.batch_id == batch.id for bill in batch_bills)

    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    for line, answered in zip(lines, output, strict=True):
        assert answered["id"].startswith("batch_req_") and answered["error"] is None
        assert answered["response"]["status_code"] == 200
        assert answered["response"]["request_id"].startswith("req_")
        direct = api.chat.completions.with_raw_response.create(**line["body"]).http_response.json()
        body = answered["response"]["body"]
        assert {**body, "id": None} == {**direct, "id": None}  # the same answer, to the byte
    # ... and the same bills, but for the batch's mark.
    assert [dataclasses.replace(b, batch_id=None) for b in batch_bills] == fake.state.bills[4:]

    usage = done.usage
    assert usage is not None
    bodies = [line["response"]["body"]["usage"] for line in output]
    assert usage.input_tokens == sum(u["prompt_tokens"] for u in bodies)
    assert usage.output_tokens == sum(u["completion_tokens"] for u in bodies)
    assert usage.input_tokens_details.cached_tokens == 4
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # The provider's invoice: $1 / $2 per million, cache reads $0.10 (each bill rounds up on its own).
    invoice = sum(bill.cost_micros(1_000_000, 2_000_000, cache_read=100_000) for bill in batch_bills)
    assert invoice == (usage.input_tokens - 4) + 2 * usage.output_tokens + 4


def test_lines_that_fail_go_to_the_error_file_unbilled(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.batch_failed_lines = {"injected"}
    no_model = {"custom_id": "no-model", "method": "POST", "url": CHAT, "body": {"messages": []}}
    streamed = chat_line("streamed", stream=True)
    batch = start(sdk, fake, [chat_line("ok"), chat_line("injected"), no_model, streamed])
    done = retrieve(sdk, fake, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert [line["custom_id"] for line in content(sdk, fake, done.output_file_id)] == ["ok"]
    errors = by_id(content(sdk, fake, done.error_file_id))
    assert list(errors) == ["injected", "no-model", "streamed"]
    for line in errors.values():
        assert line["error"] is None and line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert "required" in errors["no-model"]["response"]["body"]["error"]["message"]
    assert [bill.batch_id for bill in fake.state.bills] == [batch.id]
    assert done.usage is not None and done.usage.total_tokens == 2 + 16
    files = fake.state.file_objects
    assert files[str(done.error_file_id)]["purpose"] == "batch_output"
    assert files[str(done.error_file_id)]["filename"] == f"{batch.id}_error.jsonl"


def test_responses_and_embeddings_batches_use_those_routes(fake: FakeProviderServer, sdk: Sdks) -> None:
    responses = start(sdk, fake, [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                                   "body": {"model": "o3", "input": "hello", "max_output_tokens": 12}}],
                      "/v1/responses")
    embeddings = start(sdk, fake, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                    "body": {"model": "mock-embedding", "input": ["abcd", "abcdefgh"]}}],
                       "/v1/embeddings")
    answered = content(sdk, fake, retrieve(sdk, fake, responses.id).output_file_id)[0]["response"]["body"]
    assert answered["object"] == "response" and answered["usage"]["output_tokens"] == 12
    assert answered["usage"]["output_tokens_details"]["reasoning_tokens"] == 8
    done = retrieve(sdk, fake, embeddings.id)
    vectors = content(sdk, fake, done.output_file_id)[0]["response"]["body"]
    assert [item["index"] for item in vectors["data"]] == [0, 1]
    assert [(bill.route, bill.batch_id) for bill in fake.state.bills] == [
        ("responses", responses.id), ("embeddings", embeddings.id)]
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (3, 0)
    assert retrieve(sdk, fake, responses.id).usage is not None


# --- the clock --------------------------------------------------------------------------------


def test_a_batch_finishes_when_the_test_clock_says_so(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.batch_duration_s = 60.0
    batch = start(sdk, fake, [chat_line("a")])
    fake.state.clock = T0 + 59.5
    assert retrieve(sdk, fake, batch.id).status == "in_progress"
    assert fake.state.bills == []
    fake.state.clock = T0 + 3_600  # looked at long after it finished
    done = retrieve(sdk, fake, batch.id)
    assert (done.status, done.completed_at, done.finalizing_at) == ("completed", T0 + 60, T0 + 60)
    assert len(fake.state.bills) == 1
    assert retrieve(sdk, fake, batch.id) == done  # finished once: nothing runs or bills again
    assert len(fake.state.bills) == 1


def test_without_a_clock_a_batch_follows_real_time(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.clock = None
    fake.state.faults.batch_duration_s = 3_600
    batch = start(sdk, fake, [chat_line("a")])
    assert abs(batch.created_at - time.time()) < 60
    assert retrieve(sdk, fake, batch.id).status == "in_progress"


# --- other outcomes ---------------------------------------------------------------------------


def test_a_failed_batch_answers_and_bills_nothing(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.batch_outcome = "failed"
    fake.state.faults.batch_duration_s = 5
    batch = start(sdk, fake, [chat_line("a"), chat_line("b")])
    fake.state.clock = T0 + 5
    done = retrieve(sdk, fake, batch.id)
    assert (done.status, done.failed_at, done.completed_at) == ("failed", T0 + 5, None)
    assert done.errors is not None and done.errors.object == "list"
    assert [(e.code, e.line) for e in done.errors.data or []] == [("batch_failed", None)]
    assert (done.output_file_id, done.error_file_id, done.usage) == (None, None, None)
    assert fake.state.bills == []


def test_an_invalid_input_file_fails_the_batch_naming_each_line(fake: FakeProviderServer, sdk: Sdks) -> None:
    lines = [chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"},
             {**chat_line("c"), "method": "GET"}, chat_line("a")]
    api = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    uploaded = api.files.create(file=("in.jsonl", jsonl(lines) + b"not json\n"), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = retrieve(sdk, fake, batch.id)
    assert done.status == "failed" and done.errors is not None
    assert [(e.code, e.line, e.param) for e in done.errors.data or []] == [
        ("mismatched_endpoint", 2, "url"), ("invalid_method", 3, "method"),
        ("duplicate_custom_id", 4, "custom_id"), ("invalid_json_line", 5, None)]
    assert fake.state.bills == []

    empty = api.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    batch = api.batches.create(input_file_id=empty.id, endpoint=CHAT, completion_window="24h")
    done = retrieve(sdk, fake, batch.id)
    assert done.errors is not None and [e.code for e in done.errors.data or []] == ["empty_file"]


@pytest.mark.parametrize(("done_lines", "answered"), [(1, ["a"]), (None, ["a", "b", "c"]), (0, [])])
def test_an_expired_batch_answers_its_first_lines_and_expires_the_rest(
    fake: FakeProviderServer, done_lines: int | None, answered: list[str], sdk: Sdks
) -> None:
    fake.state.faults.batch_outcome = "expired"
    fake.state.faults.batch_done_lines = done_lines
    batch = start(sdk, fake, [chat_line("a"), chat_line("b"), chat_line("c")])
    done = retrieve(sdk, fake, batch.id)
    assert (done.status, done.expired_at) == ("expired", int(T0))
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 3, "completed": len(answered),
                                                "failed": 3 - len(answered)}
    if answered:
        assert [line["custom_id"] for line in content(sdk, fake, done.output_file_id)] == answered
    else:
        assert done.output_file_id is None
    if len(answered) < 3:
        expired = content(sdk, fake, done.error_file_id)
        assert [line["custom_id"] for line in expired] == ["a", "b", "c"][len(answered):]
        assert all(line["response"] is None and line["error"]["code"] == "batch_expired"
                   for line in expired)
    else:
        assert done.error_file_id is None
    assert [bill.batch_id for bill in fake.state.bills] == [batch.id] * len(answered)
    assert done.usage is not None and done.usage.output_tokens == 16 * len(answered)


# --- cancel -----------------------------------------------------------------------------------


def test_a_cancelled_batch_keeps_the_lines_answered_before_the_cancel(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    fake.state.faults.batch_duration_s = 100
    fake.state.faults.batch_done_lines = 2
    batch = start(sdk, fake, [chat_line("a"), chat_line("b"), chat_line("c")])
    fake.state.clock = T0 + 10
    cancelling = sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel(batch.id)
    assert (cancelling.status, cancelling.cancelling_at) == ("cancelling", T0 + 10)
    assert [bill.batch_id for bill in fake.state.bills] == [batch.id] * 2  # answered before
    again = sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel(batch.id)
    assert again.status == "cancelling"  # a repeat changes nothing

    fake.state.clock = T0 + 20
    done = retrieve(sdk, fake, batch.id)
    assert (done.status, done.cancelling_at, done.cancelled_at) == ("cancelled", T0 + 10, T0 + 20)
    assert (done.completed_at, done.finalizing_at, done.error_file_id) == (None, None, None)
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 0}
    assert [line["custom_id"] for line in content(sdk, fake, done.output_file_id)] == ["a", "b"]
    assert done.usage is not None and done.usage.output_tokens == 32
    assert len(fake.state.bills) == 2
    with pytest.raises(openai.ConflictError, match="status 'cancelled'"):
        sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel(batch.id)


def test_a_cancel_answers_nothing_by_default(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.batch_duration_s = 100
    batch = start(sdk, fake, [chat_line("a")])
    sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel(batch.id)
    done = retrieve(sdk, fake, batch.id)
    assert (done.status, done.output_file_id, done.error_file_id) == ("cancelled", None, None)
    assert done.usage is not None and done.usage.total_tokens == 0
    assert fake.state.bills == []


def test_a_cancel_comes_too_late_for_a_finished_batch(fake: FakeProviderServer, sdk: Sdks) -> None:
    batch = start(sdk, fake, [chat_line("a")])  # its time (0 s) has come: the cancel finds it done
    with pytest.raises(openai.ConflictError) as info:
        sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel(batch.id)
    assert info.value.status_code == 409 and "status 'completed'" in info.value.message
    assert retrieve(sdk, fake, batch.id).status == "completed" and len(fake.state.bills) == 1


# --- a provider that forgets ------------------------------------------------------------------


def test_a_forgotten_batch_is_a_404(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.batch_duration_s = 100
    batch = start(sdk, fake, [chat_line("a")])
    fake.state.forget_batches()
    for call in (sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.retrieve,
                 sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.cancel):
        with pytest.raises(openai.NotFoundError) as info:
            call(batch.id)
        assert info.value.body == {"message": f"No batch found with id '{batch.id}'.",
                                   "type": "invalid_request_error", "code": None, "param": None}
    assert fake.state.files  # the files stay
    fake.state.reset()
    assert (fake.state.files, fake.state.file_objects, fake.state.clock) == ({}, {}, None)


def test_request_faults_apply_to_these_routes(fake: FakeProviderServer, sdk: Sdks) -> None:
    batch = start(sdk, fake, [chat_line("a")])
    fake.state.faults.status = 503
    with pytest.raises(openai.InternalServerError):
        sdk.openai(f"{fake.url}/v1", "sk-openai-test").batches.retrieve(batch.id)
    assert fake.state.bills == []  # the job was not looked at
