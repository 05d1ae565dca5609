"""Batch jobs through the broker (OpenAI Files and Batch APIs), driven by the official ``openai``
SDK against the fake provider's batches: every line of the input file is checked and bounded
like a live chat completion, a batch holds its worst case in a job slice carved out of the
token's, the provider never sees a batch the slice cannot hold, and the poller settles each job
exactly once from what the provider billed.

The poller is run by calling it (:func:`broker.gateway.batch_poll.poll_once`), with the clock it
measures a job's age by passed in; the fake's batches follow ``MockState.clock``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import jwt
import openai
import pytest
from sqlalchemy import text

from broker.api.batches import MULTIPART_ROOM
from broker.gateway import batch_poll
from broker.gateway.quote import DEFAULT_OUTPUT_LIMIT
from broker.metrics import Metrics
from broker.money import ledger
from broker.money.sweeper import sweep_once
from broker.settings import SweeperSettings
from broker.storage.db import Database
from plugins.mock_billing import Bill
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import PIN, POUT, Env, make_env
from tests.sdk_support import Sdks
from tests.test_replicas import start_replica

MAX_FILE_BYTES = 64 * 1024
MAX_LINES = 20
DISCOUNT = 50
ENDPOINT: Final = "/v1/chat/completions"


def _batch_config(sections: dict[str, dict[str, Any]]) -> None:
    # The scheduler never polls on its own here: the tests do, when they mean to.
    sections["batches"] = {"poll_interval_s": 86_400.0, "max_file_bytes": MAX_FILE_BYTES,
                           "max_lines": MAX_LINES}
    for name in ("gpt-test", "gpt-other"):
        sections["models"][name]["batch_discount_percent"] = DISCOUNT
    # Its own upstream name, so the fake's bills tell the two models apart.
    sections["models"]["gpt-other"]["upstream_model"] = "mock-gpt-other"


@pytest.fixture
def env(make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, sqlite_url, fake, adjust=_batch_config)


@pytest.fixture
def env_both(make_live_broker: Callable[..., Broker], db_url: str,
             fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, db_url, fake, adjust=_batch_config)


def line(custom_id: str, model: str = "gpt-test", text: str = "Summarise ticket 4711.",
         **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(entry).encode() + b"\n" for entry in lines)


def upload(api: openai.OpenAI, content: bytes) -> str:
    return api.files.create(file=("batch.jsonl", content, "application/jsonl"),
                            purpose="batch").id


def launch(api: openai.OpenAI, *lines: dict[str, Any]) -> str:
    batch = api.batches.create(input_file_id=upload(api, jsonl(*lines)), endpoint=ENDPOINT,
                               completion_window="24h")
    return batch.id


def poll(env: Env, now: int | None = None) -> int:
    return batch_poll.poll_once(env.broker.services, now=now)


def invoice(bills: list[Bill]) -> int:
    """The provider's own invoice of a batch's lines at the batch price (half the list), rounded
    up once, as the broker settles each model."""
    units = sum((b.prompt_tokens + b.cache_read_tokens) * PIN + b.completion_tokens * POUT
                for b in bills)
    return -(-units * (100 - DISCOUNT) // (100 * 1_000_000))


def batch_bills(env: Env, batch_id: str, upstream_model: str = "mock-gpt") -> list[Bill]:
    return [b for b in env.fake.state.bills
            if getattr(b, "batch_id", None) == batch_id and b.model == upstream_model]


def job_of(env: Env, batch_id: str) -> dict[str, Any]:
    [job] = env.query("SELECT * FROM batch_job WHERE id = :id", id=batch_id)
    return job


def slice_row(env: Env, jti: str) -> dict[str, Any]:
    [row] = env.query("SELECT * FROM token_slice WHERE jti = :j", j=jti)
    return row


def holds_of(env: Env, jti: str) -> list[dict[str, Any]]:
    return env.query("SELECT * FROM hold WHERE jti = :j", j=jti)


def decoded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def batch_cost(prompt: int, completion: int) -> int:
    return -(-(prompt * PIN + completion * POUT) * (100 - DISCOUNT) // (100 * 1_000_000))


# --- a batch's life ------------------------------------------------------------------------


def test_a_completed_batch_settles_exactly_what_the_provider_billed(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    token = env.token(batch="allowed", models=["gpt-test", "gpt-other"])
    api = sdk.broker_openai(env, token)
    lines = (line("a", max_completion_tokens=40), line("b", n=2, max_tokens=30), line("c"),
             line("d", model="gpt-other", max_completion_tokens=20))
    file_id = upload(api, jsonl(*lines))

    # The provider got the file rewritten: upstream models, every output limit explicit.
    sent = [json.loads(raw) for raw in env.fake.state.files[file_id].splitlines()]
    assert [s["body"]["model"] for s in sent] == ["mock-gpt"] * 3 + ["mock-gpt-other"]
    assert sent[2]["body"]["max_completion_tokens"] == DEFAULT_OUTPUT_LIMIT
    # The worst case is kept per model in token units: n answers count n times.
    [stored] = env.query("SELECT * FROM batch_file WHERE id = :id", id=file_id)
    worst = decoded(stored["worst"])
    assert worst["gpt-test"][1] == 40 + 2 * 30 + DEFAULT_OUTPUT_LIMIT
    assert worst["gpt-other"][1] == 20

    batch = api.batches.create(input_file_id=file_id, endpoint=ENDPOINT,
                               completion_window="24h")
    assert batch.status == "in_progress" and batch.id in env.fake.state.batches
    job = job_of(env, batch.id)
    job_slice = slice_row(env, job["jti"])
    holds = {h["id"]: h["amount_micros"] for h in holds_of(env, job["jti"])}
    hold_ids = decoded(job["hold_ids"])
    # One hold per model, at the batch price of its worst case, rounded up once per model.
    assert holds == {hold_ids[m]: batch_cost(w[0], w[1]) for m, w in worst.items()}
    assert (job_slice["kind"], job_slice["parent_jti"]) == ("job", jti_of(token))
    assert job_slice["budget_micros"] == job_slice["held_micros"] == sum(holds.values())
    assert env.slice_of(token)["held_micros"] == sum(holds.values())
    [audit] = env.query("SELECT * FROM audit_event WHERE action = 'batch.create'")
    assert audit["target"] == batch.id

    assert poll(env) == 1  # the fake finished it at once

    events = {e["model"]: e for e in env.events()}
    assert set(events) == {"gpt-test", "gpt-other"}
    for model, upstream in (("gpt-test", "mock-gpt"), ("gpt-other", "mock-gpt-other")):
        bills = batch_bills(env, batch.id, upstream)
        assert bills, f"the fake billed {model}"
        event = events[model]
        assert (event["request_id"], event["status"], event["estimated"]) == (batch.id, "ok", 0)
        assert event["cost_micros"] == invoice(bills) <= holds[hold_ids[model]]
        assert event["prompt_tokens"] == sum(b.prompt_tokens for b in bills)
        assert event["completion_tokens"] == sum(b.completion_tokens for b in bills)
    spent = sum(e["cost_micros"] for e in events.values())
    assert env.slice_of(token)["spent_micros"] == spent
    assert env.slice_of(token)["held_micros"] == 0
    assert slice_row(env, job["jti"])["released_at"] is not None
    assert holds_of(env, job["jti"]) == []
    assert job_of(env, batch.id)["status"] == "completed"

    # Settled once: polling again charges nothing more.
    assert poll(env) == 0
    assert len(env.events()) == 2 and env.slice_of(token)["spent_micros"] == spent
    assert api.batches.retrieve(batch.id).status == "completed"


def test_a_batch_over_the_slice_is_refused_before_the_provider_sees_it(env: Env, sdk: Sdks) -> None:
    token = env.token(budget=2_000, batch="allowed")
    api = sdk.broker_openai(env, token)
    file_id = upload(api, jsonl(line("a")))  # 4096 output tokens: ~4,800 micro-dollars
    with pytest.raises(openai.RateLimitError) as refused:
        api.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"
    assert env.fake.state.batches == {}
    assert env.query("SELECT * FROM batch_job") == []
    assert env.query("SELECT * FROM token_slice WHERE kind = 'job'") == []
    assert env.slice_of(token)["held_micros"] == 0


@pytest.mark.parametrize(("policy", "code"), [
    ({"batch": "denied"}, "batch_not_allowed"),
    ({}, "approval_required"),  # an agent's default: approval, and the token holds no grant
])
def test_the_policy_gates_a_batch(env: Env, policy: dict[str, Any], code: str, sdk: Sdks) -> None:
    api = sdk.broker_openai(env, env.token(**policy))
    file_id = upload(api, jsonl(line("a", max_completion_tokens=10)))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        api.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    assert refused.value.code == code
    assert env.fake.state.batches == {}
    assert env.query("SELECT * FROM token_slice WHERE kind = 'job'") == []


def test_a_grant_of_batch_lets_an_agent_behind_approval_launch_one(env: Env, sdk: Sdks) -> None:
    agent = env.agent()  # an agent's batches need an approval
    granted = env.broker.client.post("/v1/admin/grants", headers=env.broker.admin(), json={
        "workload_id": agent["id"], "tool": "batch", "ttl_s": 600})
    assert granted.status_code == 201, granted.text
    token = env.broker.token(agent["client_id"], agent["client_secret"])
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=10))
    assert list(env.fake.state.batches) == [batch_id]


def test_another_tenants_file_and_batch_are_not_found(env: Env, sdk: Sdks) -> None:
    owner = sdk.broker_openai(env, env.token(batch="allowed"))
    file_id = upload(owner, jsonl(line("a", max_completion_tokens=10)))
    batch = owner.batches.create(input_file_id=file_id, endpoint=ENDPOINT,
                                 completion_window="24h")
    other = sdk.broker_openai(env, env.token(batch="allowed"))  # a workload of another tenant
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert list(env.fake.state.batches) == [batch.id]
    assert env.fake.state.batches[batch.id].batch["status"] != "cancelling"


def test_a_batch_the_provider_refuses_costs_nothing(env: Env, sdk: Sdks) -> None:
    token = env.token(batch="allowed")
    api = sdk.broker_openai(env, token)
    file_id = upload(api, jsonl(line("a", max_completion_tokens=10)))
    env.fake.state.faults.status = 500
    with pytest.raises(openai.APIStatusError) as failed:
        api.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    assert failed.value.status_code == 502
    [event] = env.events()
    assert (event["status"], event["cost_micros"]) == ("upstream_error", 0)
    [job_slice] = env.query("SELECT * FROM token_slice WHERE kind = 'job'")
    assert job_slice["released_at"] is not None and job_slice["spent_micros"] == 0
    assert env.slice_of(token)["held_micros"] == env.slice_of(token)["spent_micros"] == 0


# --- the poller ----------------------------------------------------------------------------


def test_a_crash_while_a_batch_runs_leaves_its_job_for_the_poller(env: Env) -> None:
    fake = env.fake.state
    fake.clock, fake.faults.batch_duration_s = 1_000.0, 600.0
    token = env.token(batch="allowed")
    with contextlib.ExitStack() as stack:
        crashed = start_replica(stack, env.broker.settings)
        api = openai.OpenAI(base_url="http://broker.test/v1", api_key=token, max_retries=0,
                            http_client=crashed.client)
        batch_id = launch(api, line("a", max_completion_tokens=30), line("b"))
    # That broker is gone with the job open; the sweeper must leave the job's money alone,
    # and the token's slice, which the job was carved out of, stays unreleased after its expiry.
    job = job_of(env, batch_id)
    later = int(time.time()) + 7_200
    env.broker.sweep(now=later)
    assert len(holds_of(env, job["jti"])) == 1
    assert slice_row(env, job["jti"])["released_at"] is None
    assert env.slice_of(token)["released_at"] is None
    assert env.events() == []

    with contextlib.ExitStack() as stack:
        restarted = start_replica(stack, env.broker.settings)
        assert batch_poll.poll_once(restarted.services) == 0  # still running at the provider
        fake.clock = 2_000.0
        assert batch_poll.poll_once(restarted.services) == 1
        assert batch_poll.poll_once(restarted.services) == 0
    [event] = env.events()
    assert (event["request_id"], event["status"]) == (batch_id, "ok")
    assert event["cost_micros"] == invoice(batch_bills(env, batch_id))
    env.broker.sweep(now=later)
    token_slice = env.slice_of(token)
    assert token_slice["released_at"] is not None
    assert (token_slice["held_micros"], token_slice["spent_micros"]) == (0, event["cost_micros"])


@pytest.mark.parametrize("forgotten", [True, False])
def test_a_job_is_settled_at_its_whole_hold_only_after_max_age(env: Env, forgotten: bool, sdk: Sdks) -> None:
    """A job the provider no longer knows, or that never finishes."""
    env.fake.state.faults.batch_duration_s = 10.0**9
    token = env.token(batch="allowed")
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=30))
    if forgotten:
        env.fake.state.forget_batches()
    job = job_of(env, batch_id)
    [hold] = holds_of(env, job["jti"])
    deadline = job["created_at"] + env.broker.settings.batches.max_age_s
    assert poll(env, now=deadline) == 0
    assert env.events() == [] and holds_of(env, job["jti"]) == [hold]
    assert poll(env, now=deadline + 1) == 1
    [event] = env.events()
    assert (event["status"], event["estimated"]) == ("orphaned", 1)
    assert event["cost_micros"] == hold["amount_micros"] == env.slice_of(token)["spent_micros"]
    assert job_of(env, batch_id)["status"] == "orphaned"
    assert poll(env, now=deadline + 2) == 0 and len(env.events()) == 1


def test_a_batch_whose_creation_got_no_answer_stays_held_until_max_age(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer, sdk: Sdks) -> None:
    """The provider may have made it: the job is held, under the broker's own id, and settled
    at its whole hold once it is too old to be running."""
    env = make_env(make_live_broker, sqlite_url, fake, adjust=_batch_config, timeout_s=1.0)
    token = env.token(batch="allowed")
    api = sdk.broker_openai(env, token)
    file_id = upload(api, jsonl(line("a", max_completion_tokens=30)))
    fake.state.faults.delay_s = 3.0
    with pytest.raises(openai.APIStatusError) as timed_out:
        api.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    assert timed_out.value.status_code == 504
    fake.state.faults.delay_s = 0.0
    [job] = env.query("SELECT * FROM batch_job")
    assert (job["status"], job["id"]) == ("creating", job["jti"])
    [hold] = holds_of(env, job["jti"])
    deadline = job["created_at"] + env.broker.settings.batches.max_age_s
    assert poll(env, now=deadline) == 0
    assert poll(env, now=deadline + 1) == 1
    [event] = env.events()
    assert (event["status"], event["cost_micros"]) == ("orphaned", hold["amount_micros"])
    assert env.slice_of(token)["held_micros"] == 0


def test_a_provider_outage_leaves_the_job_for_the_next_poll(env: Env, sdk: Sdks) -> None:
    token = env.token(batch="allowed")
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=30))
    env.fake.state.faults.status = 503
    job = job_of(env, batch_id)
    assert poll(env, now=job["created_at"] + 10 * env.broker.settings.batches.max_age_s) == 0
    assert env.events() == [] and len(holds_of(env, job["jti"])) == 1
    env.fake.state.faults.status = None
    assert poll(env) == 1
    [event] = env.events()
    assert event["status"] == "ok" and event["cost_micros"] == invoice(batch_bills(env, batch_id))


def test_a_cancelled_batch_settles_what_the_provider_billed(env: Env, sdk: Sdks) -> None:
    fake = env.fake.state
    fake.faults.batch_duration_s, fake.faults.batch_done_lines = 10.0**9, 1
    token = env.token(batch="allowed")
    api = sdk.broker_openai(env, token)
    batch_id = launch(api, line("a", max_completion_tokens=30), line("b"), line("c"))
    assert api.batches.cancel(batch_id).status == "cancelling"
    [audit] = env.query("SELECT * FROM audit_event WHERE action = 'batch.cancel'")
    assert audit["target"] == batch_id
    assert poll(env) == 1
    [event] = env.events()
    bills = batch_bills(env, batch_id)
    assert len(bills) == 1
    assert (event["status"], event["cost_micros"]) == ("cancelled", invoice(bills))
    assert env.slice_of(token)["spent_micros"] == invoice(bills)
    assert env.slice_of(token)["held_micros"] == 0


def test_suspending_the_workload_cancels_the_batches_its_tokens_launched(
        env: Env, sdk: Sdks) -> None:
    fake = env.fake.state
    fake.faults.batch_duration_s, fake.faults.batch_done_lines = 10.0**9, 1
    agent = env.agent(batch="allowed")
    token = env.broker.token(agent["client_id"], agent["client_secret"])
    api = sdk.broker_openai(env, token)
    batch_id = launch(api, line("a"), line("b"))
    assert poll(env) == 0 and fake.batches[batch_id].batch["status"] == "in_progress"
    suspended = env.broker.client.post(f"/v1/admin/workloads/{agent['id']}/suspend",
                                       headers=env.broker.admin())
    assert suspended.status_code == 200, suspended.text
    assert poll(env) == 0  # the cancellation is asked for ...
    assert fake.batches[batch_id].batch["status"] in ("cancelling", "cancelled")
    [audit] = env.query("SELECT * FROM audit_event WHERE action = 'batch.cancel'")
    assert (audit["target"], audit["actor"]) == (batch_id, "batches.poll")
    assert poll(env) == 1  # ... and what the provider billed before it is settled
    [event] = env.events()
    assert (event["status"], event["cost_micros"]) == (
        "cancelled", invoice(batch_bills(env, batch_id)))
    assert len(env.query("SELECT * FROM audit_event WHERE action = 'batch.cancel'")) == 1


def test_an_expired_token_does_not_cancel_its_batch(env: Env, sdk: Sdks) -> None:
    fake = env.fake.state
    fake.faults.batch_duration_s = 10.0**9
    token = env.token(batch="allowed")
    batch_id = launch(sdk.broker_openai(env, token), line("a"))
    assert poll(env, now=int(time.time()) + 3600) == 0
    assert fake.batches[batch_id].batch["status"] == "in_progress"


@pytest.mark.parametrize(("outcome", "status", "answered"), [
    ("failed", "upstream_error", 0),
    ("expired", "expired", 1),
])
def test_a_failed_or_expired_batch_settles_what_the_provider_billed(
        env: Env, outcome: str, status: str, answered: int, sdk: Sdks) -> None:
    fake = env.fake.state
    fake.faults.batch_outcome, fake.faults.batch_done_lines = outcome, answered  # type: ignore[assignment]
    token = env.token(batch="allowed")
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=30), line("b"))
    assert poll(env) == 1
    [event] = env.events()
    bills = batch_bills(env, batch_id)
    assert len(bills) == answered
    assert (event["status"], event["cost_micros"]) == (status, invoice(bills))
    token_slice = env.slice_of(token)
    assert (token_slice["spent_micros"], token_slice["held_micros"]) == (invoice(bills), 0)


def test_a_line_answered_without_usage_is_charged_its_worst_case(env: Env, sdk: Sdks) -> None:
    env.fake.state.faults.omit_usage = True
    token = env.token(batch="allowed")
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=30), line("b", n=3))
    [hold] = holds_of(env, job_of(env, batch_id)["jti"])
    assert poll(env) == 1
    [event] = env.events()
    assert (event["status"], event["estimated"]) == ("ok", 1)
    assert event["cost_micros"] == hold["amount_micros"]


def test_a_provider_billing_above_the_hold_is_charged_and_the_token_refused(env: Env, sdk: Sdks) -> None:
    fake = env.fake.state
    fake.faults.ignore_max_tokens, fake.faults.overrun_tokens = True, 5_000
    token = env.token(batch="allowed")
    api = sdk.broker_openai(env, token)
    batch_id = launch(api, line("a", max_completion_tokens=5))
    [hold] = holds_of(env, job_of(env, batch_id)["jti"])
    assert poll(env) == 1
    [event] = env.events()
    assert event["status"] == "overrun"
    assert event["cost_micros"] == invoice(batch_bills(env, batch_id)) > hold["amount_micros"]
    assert env.slice_of(token)["revoked_at"] is not None
    assert env.query("SELECT * FROM audit_event WHERE action = 'usage.overrun'")


@pytest.mark.parametrize("replicas", [2])
def test_two_pollers_at_once_settle_a_job_once(env_both: Env, replicas: int, sdk: Sdks) -> None:
    env = env_both
    token = env.token(batch="allowed", models=["gpt-test", "gpt-other"])
    batch_id = launch(sdk.broker_openai(env, token), line("a", max_completion_tokens=30),
                      line("b", model="gpt-other", max_completion_tokens=5))
    start = threading.Barrier(replicas)
    settled: list[int] = []

    def poller() -> None:
        start.wait()
        settled.append(poll(env))

    threads = [threading.Thread(target=poller) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(settled) == [0] * (replicas - 1) + [1]
    events = env.events()
    assert sorted(e["model"] for e in events) == ["gpt-other", "gpt-test"]
    assert env.slice_of(token)["spent_micros"] == sum(e["cost_micros"] for e in events) == (
        invoice(batch_bills(env, batch_id)) + invoice(batch_bills(env, batch_id, "mock-gpt-other")))


# --- the input file ------------------------------------------------------------------------


def _too_large() -> bytes:
    return jsonl(line("a", text="x" * (MAX_FILE_BYTES + 1)))


@pytest.mark.parametrize(("content", "status", "code", "param"), [
    (_too_large(), 413, "payload_too_large", None),
    (jsonl(*(line(str(i)) for i in range(MAX_LINES + 1))), 400, "invalid_request", "file"),
    (jsonl(line("a")) + b"{not json\n", 400, "invalid_request", "line 2: body"),
    (jsonl(line("a"), line("a")), 400, "invalid_request", "line 2: custom_id"),
    (jsonl(line("a", model="gpt-other")), 403, "model_not_allowed", "line 1: body.model"),
    (jsonl(line("a", model="no-such-model")), 404, "model_not_found", "line 1: body.model"),
    (jsonl(line("a", max_tokens=0)), 400, "invalid_request", "line 1: body.max_tokens"),
    (jsonl(line("a", stream=True)), 400, "invalid_request", "line 1: body.stream"),
    (jsonl({**line("a"), "url": "/v1/embeddings"}), 400, "invalid_request", "line 1: url"),
    (jsonl(line("a"), line("b", model="compat-test")), 400, "invalid_request",
     "line 2: body.model"),
    (b"\n\n", 400, "invalid_request", "file"),
], ids=["size", "lines", "bad-json", "duplicate-custom-id", "disallowed-model", "unknown-model",
        "bad-limit", "stream", "other-endpoint", "two-providers", "empty"])
def test_a_malformed_file_is_refused_naming_its_line(env: Env, content: bytes, status: int,
                                                     code: str, param: str | None, sdk: Sdks) -> None:
    api = sdk.broker_openai(env, env.token(batch="allowed", models=["gpt-test", "compat-test"]))
    with pytest.raises(openai.APIStatusError) as refused:
        upload(api, content)
    body = refused.value.body
    assert isinstance(body, dict)
    assert (refused.value.status_code, body.get("code"), body.get("param")) == (status, code,
                                                                                 param)
    assert env.fake.state.files == {}
    assert env.query("SELECT * FROM batch_file") == []


def test_an_upload_is_refused_as_soon_as_it_passes_the_limit(env: Env) -> None:
    """A chunked upload (no Content-Length to refuse it by) is counted as it is read."""
    boundary = "batch-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"'
            "\r\nContent-Type: application/jsonl\r\n\r\n").encode()
    size = MAX_FILE_BYTES + MULTIPART_ROOM + 1024  # just past what the broker reads

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(len(head), size, 4096):
            yield b"x" * min(4096, size - start)

    token = env.token(batch="allowed")
    response = env.broker.client.post(
        "/v1/files", content=chunks(),
        headers={"authorization": f"Bearer {token}",
                 "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert env.fake.state.files == {}


def test_only_batch_files_are_accepted(env: Env, sdk: Sdks) -> None:
    api = sdk.broker_openai(env, env.token(batch="allowed"))
    with pytest.raises(openai.BadRequestError) as refused:
        api.files.create(file=("a.jsonl", jsonl(line("a")), "application/jsonl"),
                         purpose="assistants")
    assert refused.value.param == "purpose"
    assert env.fake.state.files == {}


# --- the ledger: job slices ------------------------------------------------------------------


def test_a_job_slice_outlives_its_token_and_keeps_its_slice_open(db: Database) -> None:
    now = 1_000_000
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="tok", workload_id="w", tenant_id="t", amount=1_000, budgets=[], issued_at=now,
        expires_at=now + 300))

    def carve(amount: int, at: int = now) -> bool:
        return db.transaction(lambda c: ledger.reserve_job_slice(
            c, jti=f"job-{amount}", parent="tok", workload_id="w", tenant_id="t",
            amount=amount, now=at, expires_at=now + 10**6))

    assert not carve(1_001)  # beyond the token's slice
    assert not carve(10, at=now + 301)  # the token has expired
    assert carve(600)
    db.transaction(lambda c: ledger.place_hold(c, hold_id="h1", jti="job-600", amount=600,
                                               now=now))

    def rows() -> dict[str, Any]:
        with db.engine.connect() as conn:
            return {r.jti: r for r in conn.execute(text("SELECT * FROM token_slice"))}

    assert rows()["job-600"].expires_at == now + 10**6  # not clamped to its token's expiry
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count FROM live_slices")).scalar() == 1  # no token

    # Long after the token expired, the sweeper settles no job hold and releases neither slice.
    assert sweep_once(db, SweeperSettings(), Metrics(), now=now + 100_000)[1] == 0
    assert rows()["tok"].released_at is None and rows()["job-600"].released_at is None

    db.transaction(lambda c: ledger.settle_hold(c, hold_id="h1", cost=250, event={
        "request_id": "batch_1", "ts": now, "model": "m", "provider": "p", "status": "ok"}))
    assert db.transaction(lambda c: ledger.release_slice(c, "job-600", now)) == 350
    assert (rows()["tok"].spent_micros, rows()["tok"].held_micros) == (250, 0)
    sweep_once(db, SweeperSettings(), Metrics(), now=now + 100_000)
    assert rows()["tok"].released_at is not None


def test_batch_routes_count_against_the_workloads_request_rate(env: Env, sdk: Sdks) -> None:
    token = env.token(batch="allowed", rate={"rpm": 2})
    api = sdk.broker_openai(env, token)
    batch_id = launch(api, line("a"))  # two requests: the upload and the creation
    with pytest.raises(openai.RateLimitError) as refused:
        api.batches.retrieve(batch_id)
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.response.headers.get("retry-after")
