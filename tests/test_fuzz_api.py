"""Schemathesis over ``/openapi.json``: every operation the broker describes gets requests built
from its schema (and, for the operations that take input, requests that break it), sent to a
live broker with real credentials, and every answer must be no server error, and every refusal
in the error dialect of its route (docs/api.md, "errors"):

* OAuth (``/v1/token``, ``/v1/introspect``): ``{"error", "error_description"}``;
* OpenAI-compatible gateway routes: ``{"error": {"message", "type", "code", "param"}}``;
* Anthropic-compatible routes (``/v1/messages``): ``{"type": "error", "error": {"type",
  "message"}}``;
* everything else (admin, identity, health): RFC 9457 ``application/problem+json``.

The dialects are written out here from the specification rather than taken from the broker's
own ``dialect_for``: a route served in the wrong dialect must fail.

Bounded and reproducible: a few examples per operation and mode, derandomized (a CI verdict does
not depend on luck), no example database, no per-example deadline; the broker's upstream is the
local fake provider, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.conftest import ADMIN_SECRET
from tests.gateway_support import Env

# ``HYPOTHESIS_PROFILE=explore`` (see tests/conftest.py) searches at random with many more
# examples and no time bound (about 12,000 requests, 4 minutes here: run it with --timeout=0 -s
# to see what each operation answered); the default replays a fixed, small sequence.
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
EXAMPLES = 150 if EXPLORE else 10  # per operation and mode: about 850 requests by default
BUDGET_S = None if EXPLORE else 110.0  # the default run, with room to spare on a slow machine

OAUTH = ("/v1/token", "/v1/introspect")
OPENAI = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/v1/files",
          "/v1/batches")
ANTHROPIC = ("/v1/messages",)
_OPENAI_ERROR_KEYS = {"message", "type", "code", "param"}


def dialect(path: str) -> str:
    if path in OAUTH:
        return "oauth"
    if path.startswith(OPENAI):
        return "openai"
    if path.startswith(ANTHROPIC):
        return "anthropic"
    return "problem"


def dialect_errors(path: str, status: int, headers: Any, body: Any) -> list[str]:
    """What is wrong with a 4xx answer of ``path`` in its dialect (nothing: an empty list)."""
    kind = dialect(path)
    if kind == "oauth":
        ok = (isinstance(body, dict) and set(body) == {"error", "error_description"}
              and isinstance(body["error"], str) and isinstance(body["error_description"], str))
        return [] if ok else [f"not an OAuth error: {body!r}"]
    if kind == "openai":
        inner = body.get("error") if isinstance(body, dict) else None
        ok = (isinstance(inner, dict) and set(body) == {"error"}
              and set(inner) == _OPENAI_ERROR_KEYS
              and isinstance(inner["message"], str) and isinstance(inner["type"], str)
              and all(inner[k] is None or isinstance(inner[k], str) for k in ("code", "param")))
        return [] if ok else [f"not an OpenAI error: {body!r}"]
    if kind == "anthropic":
        inner = body.get("error") if isinstance(body, dict) else None
        ok = (isinstance(inner, dict) and set(body) == {"type", "error"}
              and body["type"] == "error" and set(inner) == {"type", "message"}
              and all(isinstance(inner[k], str) for k in ("type", "message")))
        return [] if ok else [f"not an Anthropic error: {body!r}"]
    problems = []
    if not str(headers.get("content-type", "")).startswith("application/problem+json"):
        problems.append(f"content-type {headers.get('content-type')!r}")
    ok = (isinstance(body, dict) and set(body) == {"type", "title", "status", "detail"}
          and body["status"] == status and str(body["type"]).startswith("urn:broker:error:")
          and bool(body["title"]) and bool(body["detail"]))
    return problems if ok else [*problems, f"not a problem document: {body!r}"]


def verdict(path: str, status: int, headers: Any, content: bytes) -> list[str]:
    """Everything wrong with one answer: a server error, or a refusal out of its dialect."""
    if status >= 500:
        return [f"{status}: {content[:500]!r}"]
    if status < 400:
        return []
    try:
        body = json.loads(content)
    except ValueError:
        return [f"{status} without a JSON body: {content[:200]!r}"]
    return [f"{status} {m}" for m in dialect_errors(path, status, headers, body)]


# --- the checks themselves ------------------------------------------------------------------


def test_the_dialect_check_tells_each_shape_apart() -> None:
    problem = {"type": "urn:broker:error:not_found", "title": "Not found", "status": 404,
               "detail": "no such tenant"}
    openai = {"error": {"message": "m", "type": "invalid_request_error", "code": "c",
                        "param": None}}
    anthropic = {"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}
    oauth = {"error": "invalid_client", "error_description": "d"}
    cases = {"/v1/admin/tenants/x": problem, "/v1/chat/completions": openai,
             "/v1/messages/count_tokens": anthropic, "/v1/token": oauth}
    json_type = {"content-type": "application/json"}
    for path, body in cases.items():
        headers = {"content-type": "application/problem+json"} if body is problem else json_type
        assert verdict(path, 404, headers, json.dumps(body).encode()) == [], path
        for other in cases.values():
            if other is not body:
                assert verdict(path, 404, headers, json.dumps(other).encode()), (path, other)
    assert verdict("/v1/admin/tenants", 400, json_type, json.dumps(problem).encode())
    assert verdict("/healthz", 503, json_type, b"{}")
    assert verdict("/v1/models", 401, json_type, b"denied")


# --- the fuzzing ----------------------------------------------------------------------------


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as opened:
        yield opened


def _credentials(env: Env) -> dict[str, dict[str, str]]:
    admin = env.broker.token("admin", ADMIN_SECRET)
    agent = env.token()
    return {"admin": {"authorization": f"Bearer {admin}"},
            "agent": {"authorization": f"Bearer {agent}"}}


def _who(path: str) -> str | None:
    """Whose credential a route takes: an admin's (introspection is an admin's question too),
    none (the token endpoint and the public documents), or the workload's (the gateway and the
    workload's own approvals)."""
    if path.startswith("/v1/admin") or path == "/v1/introspect":
        return "admin"
    if path == "/v1/token" or not path.startswith("/v1/"):
        return None
    return "agent"


MODELS = ("mock-gpt", "mock-claude", "gpt-test", "claude-test", "embed-test", "compat-test")


def _with_model(case: schemathesis.Case[Any], model: str | None) -> schemathesis.Case[Any]:
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


def _with_path(case: schemathesis.Case[Any], name: str,
               value: str | None) -> schemathesis.Case[Any]:
    if value is not None and case.path_parameters is not None:
        case.path_parameters[name] = value
    return case


def _targets(env: Env) -> dict[str, dict[str, str]]:
    """Real path parameters, by route prefix: a tenant and a workload of their own (so that
    suspending, patching or deleting them leaves the agent that fuzzes the gateway alone), a
    live token of that workload, a provider. A made-up id only ever reaches the 404."""
    tenant = env.broker.create_tenant()
    workload = env.broker.create_workload(tenant["id"], policy={"models": ["mock-gpt"]})
    token = env.broker.token(workload["client_id"], workload["client_secret"])
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    return {"/v1/admin/tenants/": {"id": tenant["id"]},
            "/v1/admin/workloads/": {"id": workload["id"]},
            "/v1/admin/tokens/": {"jti": jti},
            "/v1/admin/providers/": {"name": "fake-openai"}}


def summary(failures: list[tuple[str, str, str]]) -> str:
    """Each kind of failure (operation, status) once, with how often and a request to replay."""
    kinds: dict[tuple[str, str], list[str]] = {}
    for operation, problem, curl in failures:
        kinds.setdefault((operation, problem.split(" ", 1)[0]), []).append(f"{problem}\n    {curl}")
    return "\n".join(f"{op} -> {status} ({len(seen)} times), e.g. {seen[0]}"
                     for (op, status), seen in kinds.items())


def fuzz(operation: Any, base_url: str, session: requests.Session, headers: dict[str, str],
         targets: dict[str, dict[str, str]], failures: list[tuple[str, str, str]],
         statuses: Counter[tuple[str, int]]) -> None:
    """Send one operation its examples, count the statuses of the answers and note what is
    wrong with them."""
    modes = [GenerationMode.POSITIVE]
    if operation.body or operation.path_parameters:  # input to break
        modes.append(GenerationMode.NEGATIVE)
    strategy = st.one_of(*(operation.as_strategy(generation_mode=m) for m in modes))
    if dialect(operation.path) in ("openai", "anthropic"):
        # A model the agent may use, half the time: a made-up name stops every request at the
        # model check, before the metering and the (fake, local) provider behind it.
        strategy = st.builds(_with_model, strategy, st.sampled_from((None, *MODELS)))
    for prefix, values in targets.items():
        if operation.path.startswith(prefix):
            for name, value in values.items():  # the real one half the time
                strategy = st.builds(_with_path, strategy, st.just(name),
                                     st.sampled_from((None, value)))

    @settings(max_examples=EXAMPLES * len(modes), deadline=None, derandomize=not EXPLORE,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        statuses[operation.label, response.status_code] += 1
        # Schemathesis keeps every value of a header, in a list.
        headers_seen = {k.lower(): v[0] if isinstance(v, list) else v
                        for k, v in response.headers.items()}
        for problem in verdict(operation.path, response.status_code, headers_seen,
                               response.content):
            failures.append((operation.label, problem, case.as_curl_command(headers=headers)))

    run()


def test_every_operation_answers_without_a_server_error_and_in_its_dialect(
    env: Env, session: requests.Session,
) -> None:
    started = time.monotonic()
    resp = env.broker.client.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    schema = schemathesis.openapi.from_dict(resp.json())
    credentials = _credentials(env)
    targets = _targets(env)
    operations = []
    for result in schema.get_all_operations():
        # An operation schemathesis cannot read is a broken document: it must fail here.
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert len(operations) > 40
    failures: list[tuple[str, str, str]] = []
    statuses: Counter[tuple[str, int]] = Counter()
    # Deletions last: the real tenant and workload of ``targets`` are still there for the rest.
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):
        who = _who(operation.path)
        headers = credentials[who] if who is not None else {}
        fuzz(operation, str(env.broker.url), session, headers, targets, failures, statuses)
    took = time.monotonic() - started
    print(f"\n{statuses.total()} requests to {len(operations)} operations in {took:.1f} s")
    if EXPLORE:  # what the search reached: an operation that only ever says 404 hides bugs
        for (label, status), count in sorted(statuses.items()):
            print(f"  {label}: {status} x{count}")
    assert not failures, summary(failures)
    assert BUDGET_S is None or took < BUDGET_S
