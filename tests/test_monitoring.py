"""Runtime monitoring that acts: the detectors watch real traffic through the gateway and the
token endpoint, and what they find suspends an agent, throttles a service or only alerts,
as the workload's kind (or its ``policy.monitoring``) says; admins list and clear the alerts.

Every test drives the real gateway with the official SDK. The monitor runs on its own thread;
a test that is about to look at what it did first calls ``Monitor.drain()``, which returns
only once every observation queued so far has been handled (it shares a lock with the thread),
so no test waits on the clock for the monitor.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from broker.devvault import DevVault
from broker.monitoring.monitor import Monitor, fingerprint_key
from broker.revocation.denylist import apply_here
from tests.conftest import SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import Clock, assert_oauth_error, assert_problem, wait_for

Sections = dict[str, dict[str, Any]]
EnvFactory = Callable[..., Env]

# The fields the spec promises for every alert.
ALERT_FIELDS = {"id", "ts", "tenant_id", "workload_id", "detector", "severity", "action",
                "summary", "evidence", "status"}
LOOP_THRESHOLD = 20  # monitoring.loop.threshold by default
FAILURE_THRESHOLD = 20  # monitoring.failures.threshold by default
BASELINE_CALLS = 10  # monitoring.new_model / origin min_baseline_calls by default
# A model some forty times dearer than the test models (well past the 4x at which new_model
# turns critical), for its price weighting.
DEAR = {"provider": "fake-openai", "upstream_model": "mock-gpt",
        "input_micros_per_mtok": 50_000_000, "output_micros_per_mtok": 100_000_000}
EVERYDAY_MODELS = ["gpt-test", "gpt-other", "compat-test", "mock-gpt"]


# --- building a broker with the monitor on ------------------------------------------------------


def _monitoring(*, server: dict[str, Any] | None = None, models: Sections | None = None,
                **monitoring: Any) -> Callable[[Sections], None]:
    """An ``adjust`` for :func:`make_env`: monitoring on, with these overrides."""
    def adjust(sections: Sections) -> None:
        sections["monitoring"] = {"enabled": True, **monitoring}
        if server is not None:
            sections["server"] = server
        if models is not None:
            sections["models"].update(models)
    return adjust


@pytest.fixture
def make_menv(make_live_broker: Callable[..., Broker], sqlite_url: str,
              fake: FakeProviderServer) -> EnvFactory:
    """A live broker watched by its monitor, configured by :func:`_monitoring`'s arguments."""
    def factory(**options: Any) -> Env:
        return make_env(make_live_broker, sqlite_url, fake, adjust=_monitoring(**options))
    return factory


@pytest.fixture
def menv(make_menv: EnvFactory) -> Env:
    """The common case: the default detectors and actions."""
    return make_menv()


# --- helpers ------------------------------------------------------------------------------------


def _monitor(env: Env) -> Monitor:
    monitor = env.broker.services.monitor
    assert monitor is not None, "monitoring.enabled starts the monitor"
    return monitor


def _replace_monitor(env: Env, clock: Callable[[], float] = time.time) -> Monitor:
    """Stop the broker's monitor (it handles what is queued and writes its baselines) and put
    a new one on the same database in its place, wired as the broker wires its own. The new
    one runs no thread: the test drains it."""
    svc = env.broker.services
    _monitor(env).stop()
    fresh = Monitor(svc.db, svc.settings, svc.metrics, clock=clock,
                    applied=lambda entry: apply_here(svc.token_gate, entry),
                    key=fingerprint_key(svc.pepper))
    svc.monitor = fresh  # the request path reports to whichever monitor the services hold
    return fresh


def _openai(env: Env, token: str, **headers: str) -> openai.OpenAI:
    assert env.broker.url is not None, "a live broker"
    return env.broker.opened(openai.OpenAI(api_key=token, base_url=env.broker.url + "/v1",
                                           max_retries=0, default_headers=headers))


def _messages(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def _chat(client: openai.OpenAI, text: str, model: str = "gpt-test", **params: Any
          ) -> ChatCompletion:
    answer: ChatCompletion = client.chat.completions.create(
        model=model, messages=_messages(text), **params)
    return answer


def _token(env: Env, workload: dict[str, Any]) -> str:
    return env.broker.token(workload["client_id"], workload["client_secret"])


def _exchange(env: Env, workload: dict[str, Any], secret: str | None = None,
              **headers: str) -> httpx.Response:
    resp: httpx.Response = env.broker.client.post("/v1/token", headers=headers, data={
        "grant_type": "client_credentials", "client_id": workload["client_id"],
        "client_secret": workload["client_secret"] if secret is None else secret})
    return resp


def _workload(env: Env, kind: str, **policy: Any) -> dict[str, Any]:
    """A workload of ``kind`` in a tenant of its own, with the permissive limits of
    ``env.agent`` unless ``policy`` says otherwise."""
    tenant = env.broker.create_tenant()
    body = {"models": EVERYDAY_MODELS, "token_budget_micros": 1_000_000,
            "rate": {"rpm": 1_000_000, "tpm": 10**12},
            "max_concurrent": 100_000, "max_live_tokens": 100_000, **policy}
    return env.broker.create_workload(tenant["id"], kind=kind, policy=body)


def _alerts(env: Env, headers: dict[str, str] | None = None, **query: str) -> list[dict[str, Any]]:
    """The alerts the admin API lists, once the monitor has handled everything sent so far."""
    _monitor(env).drain()
    resp = env.broker.client.get("/v1/admin/alerts", params=query,
                                 headers=headers or env.broker.admin())
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def _only_alert(env: Env, workload: dict[str, Any]) -> dict[str, Any]:
    found = _alerts(env, workload_id=workload["id"])
    assert len(found) == 1, found
    return found[0]


def _metric(env: Env, name: str, **labels: str) -> float:
    resp = env.broker.client.get("/metrics")
    assert resp.status_code == 200, resp.text
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _bootstrap_admin_id(env: Env) -> str:
    [admin] = env.query("SELECT id FROM workload WHERE client_id = 'admin'")
    return str(admin["id"])


def _suspended(env: Env, workload: dict[str, Any]) -> bool:
    rows = env.query("SELECT suspended_at FROM workload WHERE id = :w", w=workload["id"])
    return rows[0]["suspended_at"] is not None


def _assert_suspended(env: Env, workload: dict[str, Any], token: str) -> None:
    """Suspended through the revocation path: its live token dies, a new exchange fails."""
    assert _suspended(env, workload)
    with pytest.raises(openai.AuthenticationError):
        _chat(_openai(env, token), "still there?")
    assert_oauth_error(_exchange(env, workload), 401, "invalid_client")


def _assert_working(env: Env, workload: dict[str, Any], token: str) -> None:
    assert not _suspended(env, workload)
    assert _chat(_openai(env, token), "still there?").choices[0].message.content
    assert _exchange(env, workload).status_code == 200


def _loop(client: openai.OpenAI, times: int = LOOP_THRESHOLD, text: str = "Summarise the ticket."
          ) -> None:
    for _ in range(times):
        _chat(client, text)


# --- loop --------------------------------------------------------------------------------------


def test_an_agent_repeating_one_request_is_suspended_and_the_alert_keeps_no_prompt(
        menv: Env) -> None:
    agent = menv.agent()
    token = _token(menv, agent)
    client = _openai(menv, token)
    prompt = "Reconcile ledger batch " + secrets.token_hex(8)  # searched for below
    for _ in range(LOOP_THRESHOLD - 1):
        _chat(client, prompt)
    assert _alerts(menv, workload_id=agent["id"]) == []  # one short of the threshold
    _chat(client, prompt)

    alert = _only_alert(menv, agent)
    assert set(alert) >= ALERT_FIELDS, alert
    assert alert["detector"] == "loop" and alert["action"] == "suspend"
    assert alert["severity"] == "critical" and alert["status"] == "open"
    assert alert["workload_id"] == agent["id"] and alert["tenant_id"] == agent["tenant_id"]
    assert alert["evidence"]["count"] == LOOP_THRESHOLD
    assert alert["ts"].endswith("Z") and alert["summary"]
    shown = menv.broker.client.get(f"/v1/admin/alerts/{alert['id']}", headers=menv.broker.admin())
    assert shown.status_code == 200 and shown.json() == alert

    _assert_suspended(menv, agent, token)

    audit = menv.query("SELECT actor, action, target FROM audit_event WHERE actor = 'broker:monitor'")
    assert {"actor": "broker:monitor", "action": "alert.raise", "target": alert["id"]} in audit
    assert {"actor": "broker:monitor", "action": "workload.suspend", "target": agent["id"]} in audit
    assert _metric(menv, "broker_alerts_total", detector="loop", action="suspend") == 1

    # Only a digest of the request is kept: neither the alert nor the stored baselines hold
    # the prompt.
    _monitor(menv).flush()
    stored = menv.query("SELECT workload_id, state FROM monitor_state")
    assert agent["id"] in [row["workload_id"] for row in stored]
    for text in (json.dumps(alert), json.dumps(stored, default=str)):
        assert prompt not in text and "ledger batch" not in text

    # Clearing the alert does not lift the suspension: /resume does.
    cleared = menv.broker.client.post(f"/v1/admin/alerts/{alert['id']}/clear", json={},
                                      headers=menv.broker.admin())
    assert cleared.status_code == 200 and cleared.json()["status"] == "cleared"
    assert _suspended(menv, agent)
    assert_oauth_error(_exchange(menv, agent), 401, "invalid_client")


def test_streamed_calls_are_watched_once_they_settle(menv: Env) -> None:
    agent = menv.agent()
    client = _openai(menv, _token(menv, agent))
    for _ in range(LOOP_THRESHOLD):
        with client.chat.completions.create(model="gpt-test", messages=_messages("stream it"),
                                            stream=True) as stream:
            for _chunk in stream:
                pass
    menv.wait_for_events(LOOP_THRESHOLD)  # a stream settles after its last byte
    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("loop", "suspend")
    assert _suspended(menv, agent)


def test_a_suspension_by_the_monitor_ends_the_agents_running_streams(menv: Env) -> None:
    agent = menv.agent()
    client = _openai(menv, _token(menv, agent))
    # A long, slow answer: it is still running when the loop beside it is caught.
    menv.fake.state.faults.answer_tokens = 3_000
    menv.fake.state.faults.chunk_delay_s = 0.01
    with client.chat.completions.create(model="gpt-test", messages=_messages("a long story"),
                                        stream=True, max_tokens=3_000) as stream:
        chunks = iter(stream)
        next(chunks)
        for _ in range(LOOP_THRESHOLD):
            _chat(client, "loop", max_tokens=5)
        _monitor(menv).drain()
        with pytest.raises(openai.APIError, match="revoked"):
            for _chunk in chunks:
                pass


def test_as_many_different_requests_trip_nothing(menv: Env) -> None:
    agent = menv.agent()
    token = _token(menv, agent)
    client = _openai(menv, token)
    for n in range(LOOP_THRESHOLD + 5):
        _chat(client, f"Summarise ticket {n}.")
    assert _alerts(menv, workload_id=agent["id"]) == []
    _assert_working(menv, agent, token)


def test_a_looping_service_is_throttled_until_an_admin_clears_the_alert(menv: Env) -> None:
    service = _workload(menv, "service", rate={"rpm": 100, "tpm": 10**9})
    client = _openai(menv, _token(menv, service))
    _loop(client)
    alert = _only_alert(menv, service)
    assert (alert["detector"], alert["action"], alert["status"]) == ("loop", "throttle", "open")
    assert not _suspended(menv, service)

    # Its rpm is now 100 x 0.1 = 10, and it made 20 calls this minute. The replicas drop the
    # cached policy on the bus's message, which arrives a moment after the alert.
    def refused() -> bool:
        try:
            _chat(client, "one more")
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded", exc.body
            assert int(exc.response.headers["retry-after"]) >= 1
            return True
        return False

    wait_for(refused, 10, what="a 429 once the throttle is on")

    cleared = menv.broker.client.post(f"/v1/admin/alerts/{alert['id']}/clear", json={},
                                      headers=menv.broker.admin())
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["status"] == "cleared" and cleared.json()["cleared_at"]
    # 20-odd calls this minute are well within the restored 100.
    assert _chat(client, "back to normal").choices[0].message.content
    assert _alerts(menv, workload_id=service["id"], status="open") == []
    assert _metric(menv, "broker_alerts_total", detector="loop", action="throttle") == 1
    audit = menv.query("SELECT actor, action FROM audit_event WHERE target = :a ORDER BY id",
                       a=alert["id"])
    assert [(row["actor"], row["action"]) for row in audit] == [
        ("broker:monitor", "alert.raise"), (_bootstrap_admin_id(menv), "alert.clear")]


def test_a_looping_interactive_session_only_raises_an_alert(menv: Env) -> None:
    person = _workload(menv, "interactive")
    token = _token(menv, person)
    _loop(_openai(menv, token))
    alert = _only_alert(menv, person)
    assert (alert["detector"], alert["action"]) == ("loop", "alert")
    _assert_working(menv, person, token)
    assert _metric(menv, "broker_alerts_total", detector="loop", action="alert") == 1


def test_policy_monitoring_overrides_the_action_of_a_detector(menv: Env) -> None:
    alerted = menv.agent(monitoring={"loop": "alert"})
    silenced = menv.agent(monitoring={"loop": "off"})
    tokens = {w["id"]: _token(menv, w) for w in (alerted, silenced)}
    for workload in (alerted, silenced):
        _loop(_openai(menv, tokens[workload["id"]]))

    alert = _only_alert(menv, alerted)
    assert (alert["detector"], alert["action"]) == ("loop", "alert")
    _assert_working(menv, alerted, tokens[alerted["id"]])
    assert _alerts(menv, workload_id=silenced["id"]) == []
    _assert_working(menv, silenced, tokens[silenced["id"]])


# --- failures ----------------------------------------------------------------------------------


def test_wrong_secrets_from_anyone_only_alert_and_never_suspend(make_menv: EnvFactory) -> None:
    env = make_menv(server={"trusted_proxies": ["127.0.0.1/32"]})
    agent = env.agent()
    # Twenty addresses, one wrong secret each: every (client, address) pair stays under the
    # lockout of auth.failure_limit, as a spread-out guesser would, so each guess reaches the
    # secret check and the monitor. The right secret, from the proxy itself, is then not
    # locked out: what decides is the monitor's action alone.
    for n in range(FAILURE_THRESHOLD):
        wrong = _exchange(env, agent, secret="wrong-" + secrets.token_hex(8),
                          **{"x-forwarded-for": f"192.0.2.{n + 1}"})
        assert_oauth_error(wrong, 401, "invalid_client")

    alert = _only_alert(env, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "alert")
    assert alert["evidence"]["authenticated"] == 0
    assert alert["evidence"]["count"] == FAILURE_THRESHOLD
    _assert_working(env, agent, _token(env, agent))


def _not_allowed(env: Env, agent: dict[str, Any], token: str) -> Callable[[int], None]:
    client = _openai(env, token)

    def call(n: int) -> None:  # gpt-other is not among the agent's models
        with pytest.raises(openai.PermissionDeniedError) as refused:
            _chat(client, f"try {n}", model="gpt-other")
        assert refused.value.code == "model_not_allowed"
    return call


def _rate_limited(env: Env, agent: dict[str, Any], token: str) -> Callable[[int], None]:
    client = _openai(env, token)
    _chat(client, "the one call a minute its rpm allows")

    def call(n: int) -> None:
        with pytest.raises(openai.RateLimitError) as refused:
            _chat(client, f"try {n}")
        assert refused.value.code == "rate_limit_exceeded"
    return call


def _revoked(env: Env, agent: dict[str, Any], token: str) -> Callable[[int], None]:
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    resp = env.broker.client.post(f"/v1/admin/tokens/{jti}/revoke", json={"reason": "leaked"},
                                  headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    client = _openai(env, token)

    def call(n: int) -> None:  # a validly signed token of this agent: whoever holds it is it
        with pytest.raises(openai.AuthenticationError):
            _chat(client, f"try {n}")
    return call


@pytest.mark.parametrize(("refusal", "policy"), [
    pytest.param(_not_allowed, {}, id="model-not-allowed"),
    pytest.param(_rate_limited, {"rate": {"rpm": 1, "tpm": 10**9}}, id="rate-limited"),
])
def test_an_agent_refused_again_and_again_is_suspended(
        menv: Env, refusal: Callable[[Env, dict[str, Any], str], Callable[[int], None]],
        policy: dict[str, Any]) -> None:
    agent = menv.agent(**policy)
    token = _token(menv, agent)
    refused = refusal(menv, agent, token)
    for n in range(FAILURE_THRESHOLD):
        refused(n)

    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "suspend")
    assert alert["evidence"]["authenticated"] == FAILURE_THRESHOLD
    assert _suspended(menv, agent)
    assert_oauth_error(_exchange(menv, agent), 401, "invalid_client")


def test_wrong_secrets_for_the_bootstrap_admin_raise_an_alert(make_menv: EnvFactory) -> None:
    env = make_menv(server={"trusted_proxies": ["127.0.0.1/32"]})
    admin = {"client_id": "admin", "client_secret": ""}
    for n in range(FAILURE_THRESHOLD):  # spread out, as in the test above
        wrong = _exchange(env, admin, secret="wrong-" + secrets.token_hex(8),
                          **{"x-forwarded-for": f"192.0.2.{n + 1}"})
        assert_oauth_error(wrong, 401, "invalid_client")
    found = _alerts(env, workload_id=_bootstrap_admin_id(env))
    assert [(a["detector"], a["action"]) for a in found] == [("failures", "alert")]


def test_an_agent_retrying_a_dead_token_is_alerted_but_never_suspended_by_it(
        menv: Env) -> None:
    """Its token died of an admin's decision (here a tenant's kill switch): the agent's retries
    are worth an alert, but must not turn the kill switch into suspensions that outlive it."""
    agent = menv.agent()
    token = _token(menv, agent)
    tenant = agent["tenant_id"]
    resp = menv.broker.client.post(f"/v1/admin/tenants/{tenant}/suspend", json={},
                                   headers=menv.broker.admin())
    assert resp.status_code == 200, resp.text
    client = _openai(menv, token)
    for n in range(FAILURE_THRESHOLD):
        with pytest.raises(openai.AuthenticationError):
            _chat(client, f"try {n}")
    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "alert")
    resp = menv.broker.client.post(f"/v1/admin/tenants/{tenant}/resume", json={},
                                   headers=menv.broker.admin())
    assert resp.status_code == 200, resp.text
    assert not _suspended(menv, agent)
    assert _exchange(menv, agent).status_code == 200


def test_a_revoked_token_retried_alerts_only(menv: Env) -> None:
    agent = menv.agent()
    token = _token(menv, agent)
    retry = _revoked(menv, agent, token)
    for n in range(FAILURE_THRESHOLD):
        retry(n)
    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "alert")
    assert not _suspended(menv, agent)


def test_upstream_failures_count_as_failures(menv: Env) -> None:
    agent = menv.agent()
    token = _token(menv, agent)
    client = _openai(menv, token)
    menv.fake.state.faults.status = 500
    for n in range(FAILURE_THRESHOLD):
        with pytest.raises(openai.APIStatusError):
            _chat(client, f"attempt {n}")  # different requests: not a loop
    menv.fake.state.faults.status = None

    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "suspend")
    assert alert["evidence"]["reason_upstream_error"] == FAILURE_THRESHOLD
    _assert_suspended(menv, agent, token)


# --- new_model ---------------------------------------------------------------------------------


def test_a_much_dearer_model_after_the_baseline_suspends_an_agent(make_menv: EnvFactory) -> None:
    env = make_menv(models={"gpt-dear": DEAR})
    agent = env.agent(models=[*EVERYDAY_MODELS, "gpt-dear"])
    token = _token(env, agent)
    client = _openai(env, token)
    for n in range(BASELINE_CALLS):
        _chat(client, f"routine {n}")
    assert _alerts(env, workload_id=agent["id"]) == []
    _chat(client, "now the expensive one", model="gpt-dear")

    alert = _only_alert(env, agent)
    assert (alert["detector"], alert["severity"], alert["action"]) == (
        "new_model", "critical", "suspend")
    assert alert["evidence"]["model"] == "gpt-dear"
    _assert_suspended(env, agent, token)


def test_the_models_of_a_workloads_first_calls_are_its_baseline(make_menv: EnvFactory) -> None:
    env = make_menv(models={"gpt-dear": DEAR})
    agent = env.agent(models=[*EVERYDAY_MODELS, "gpt-dear"])
    token = _token(env, agent)
    client = _openai(env, token)
    first = ["gpt-test", "gpt-dear", "compat-test"]
    for n in range(BASELINE_CALLS):
        _chat(client, f"mixed {n}", model=first[n % len(first)])
    for model in first:
        _chat(client, f"after the baseline on {model}", model=model)
    assert _alerts(env, workload_id=agent["id"]) == []
    _assert_working(env, agent, token)


def test_a_new_model_of_the_same_price_is_only_noted(menv: Env) -> None:
    agent = menv.agent(models=EVERYDAY_MODELS)
    token = _token(menv, agent)
    client = _openai(menv, token)
    for n in range(BASELINE_CALLS):
        _chat(client, f"routine {n}")
    _chat(client, "same price, new name", model="compat-test")

    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["severity"], alert["action"]) == ("new_model", "info", "alert")
    _assert_working(menv, agent, token)


# --- origin ------------------------------------------------------------------------------------

USUAL = "198.51.100.7"
ELSEWHERE = "203.0.113.9"


def _calls_from(env: Env, token: str, address: str, times: int = 1) -> None:
    client = _openai(env, token, **{"x-forwarded-for": address})
    for n in range(times):
        _chat(client, f"from {address}: {n}")


def test_a_call_from_an_unseen_network_after_the_baseline_suspends_an_agent(
        make_menv: EnvFactory) -> None:
    env = make_menv(server={"trusted_proxies": ["127.0.0.1/32"]})
    agent = env.agent()
    token = _token(env, agent)
    _calls_from(env, token, USUAL, BASELINE_CALLS)
    _calls_from(env, token, "198.51.100.200")  # the same /24: a known network
    assert _alerts(env, workload_id=agent["id"]) == []
    _calls_from(env, token, ELSEWHERE)

    alert = _only_alert(env, agent)
    assert (alert["detector"], alert["action"]) == ("origin", "suspend")
    assert alert["evidence"]["network"] == "203.0.113.0/24"
    _assert_suspended(env, agent, token)


def test_forwarded_for_from_an_untrusted_peer_is_not_an_origin(menv: Env) -> None:
    agent = menv.agent()  # no trusted proxies: every call comes from 127.0.0.1
    token = _token(menv, agent)
    _calls_from(menv, token, USUAL, BASELINE_CALLS)
    _calls_from(menv, token, ELSEWHERE)
    assert _alerts(menv, workload_id=agent["id"]) == []
    _assert_working(menv, agent, token)


def test_configured_networks_alert_from_the_first_call(make_menv: EnvFactory) -> None:
    env = make_menv(server={"trusted_proxies": ["127.0.0.1/32"]})
    agent = env.agent(monitoring={"cidrs": ["198.51.100.0/24"]})
    token = _token(env, agent)
    _calls_from(env, token, USUAL)
    assert _alerts(env, workload_id=agent["id"]) == []
    _calls_from(env, token, ELSEWHERE)

    alert = _only_alert(env, agent)
    assert (alert["detector"], alert["action"]) == ("origin", "suspend")
    assert alert["evidence"]["configured"] is True
    _assert_suspended(env, agent, token)


# --- velocity ----------------------------------------------------------------------------------


def test_spending_far_above_the_floor_without_a_baseline_suspends_an_agent(
        make_menv: EnvFactory) -> None:
    floor = 1_000
    env = make_menv(velocity={"window_s": 10, "k": 1, "n": 1, "floor_micros": floor})
    agent = env.agent()
    token = _token(env, agent)
    client = _openai(env, token)
    _chat(client, "a short answer", max_tokens=5)
    assert _alerts(env, workload_id=agent["id"]) == []
    env.fake.state.faults.answer_tokens = 2_000
    _chat(client, "a long answer", max_tokens=2_000)
    short, long = sorted(e["cost_micros"] for e in env.events())
    assert short < floor <= long

    alert = _only_alert(env, agent)
    assert (alert["detector"], alert["action"]) == ("velocity", "suspend")
    assert alert["evidence"]["spend_micros"] >= floor
    _assert_suspended(env, agent, token)


# --- the alerts API ----------------------------------------------------------------------------


def _admin_headers(env: Env, tenant_id: str, role: str) -> dict[str, str]:
    admin = env.broker.create_workload(tenant_id, kind="admin", roles=[role])
    return {"authorization": f"Bearer {_token(env, admin)}"}


def test_alerts_are_scoped_to_their_tenant_and_only_writers_clear_them(
        make_menv: EnvFactory) -> None:
    env = make_menv(loop={"threshold": 2})
    person = _workload(env, "interactive")
    _loop(_openai(env, _token(env, person)), times=2)
    alert = _only_alert(env, person)
    path = f"/v1/admin/alerts/{alert['id']}"
    client = env.broker.client

    own = _admin_headers(env, person["tenant_id"], "tenant-admin")
    assert [a["id"] for a in _alerts(env, own)] == [alert["id"]]
    assert client.get(path, headers=own).json()["id"] == alert["id"]

    other = _admin_headers(env, env.broker.create_tenant()["id"], "tenant-admin")
    assert _alerts(env, other) == []
    assert _alerts(env, other, tenant_id=person["tenant_id"]) == []
    assert_problem(client.get(path, headers=other), 404, "not_found")
    assert_problem(client.post(path + "/clear", json={}, headers=other), 404, "not_found")

    auditor = _admin_headers(env, env.broker.create_tenant()["id"], "auditor")
    assert [a["id"] for a in _alerts(env, auditor)] == [alert["id"]]
    assert_problem(client.post(path + "/clear", json={}, headers=auditor), 403)
    assert client.get(path, headers=auditor).json()["status"] == "open"

    first = client.post(path + "/clear", json={}, headers=own)
    again = client.post(path + "/clear", json={}, headers=own)
    assert first.status_code == again.status_code == 200, again.text
    assert first.json() == again.json() and again.json()["status"] == "cleared"
    clears = env.query("SELECT target FROM audit_event WHERE action = 'alert.clear'")
    assert clears == [{"target": alert["id"]}]


def test_the_alerts_api_refuses_what_it_does_not_know(menv: Env) -> None:
    client, admin = menv.broker.client, menv.broker.admin()
    assert_problem(client.get("/v1/admin/alerts?status=bogus", headers=admin), 400)
    assert_problem(client.get("/v1/admin/alerts/al_0123456789abcdef", headers=admin), 404)
    assert_problem(client.post("/v1/admin/alerts/al_0123456789abcdef/clear", json={},
                               headers=admin), 404)


def test_alerts_page_newest_first_and_filter_by_status(make_menv: EnvFactory) -> None:
    env = make_menv(loop={"threshold": 2})
    # Alerts are stamped in whole seconds by the monitor's clock: one the test moves, so that
    # each alert is a second newer than the one before.
    clock = Clock(time.time())
    monitor = _replace_monitor(env, clock=clock)
    people = [_workload(env, "interactive") for _ in range(3)]
    for person in people:  # one alert each, in this order
        _loop(_openai(env, _token(env, person)), times=2)
        monitor.drain()
        clock.advance(1)
    everyone = _alerts(env)
    assert [a["workload_id"] for a in everyone] == [p["id"] for p in reversed(people)]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        resp = env.broker.client.get("/v1/admin/alerts", params=query, headers=env.broker.admin())
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 1
        seen += [a["id"] for a in resp.json()["data"]]
        cursor = resp.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [a["id"] for a in everyone]

    newest = everyone[0]["id"]
    env.broker.client.post(f"/v1/admin/alerts/{newest}/clear", json={}, headers=env.broker.admin())
    assert [a["id"] for a in _alerts(env, status="cleared")] == [newest]
    assert [a["id"] for a in _alerts(env, status="open")] == [a["id"] for a in everyone[1:]]


# --- the monitor itself ------------------------------------------------------------------------


def test_baselines_survive_a_restart_of_the_monitor(menv: Env) -> None:
    agent = menv.agent()
    token = _token(menv, agent)
    client = _openai(menv, token)
    _loop(client, times=12)
    # Stopping handles what is queued and writes the baselines; the new monitor starts with
    # nothing in memory.
    _replace_monitor(menv)
    assert menv.query("SELECT workload_id FROM monitor_state WHERE workload_id = :w",
                      w=agent["id"])
    _loop(client, times=7)
    assert _alerts(menv, workload_id=agent["id"]) == []  # 19 in all
    _loop(client, times=1)

    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("loop", "suspend")
    assert alert["evidence"]["count"] == LOOP_THRESHOLD
    _assert_suspended(menv, agent, token)


def test_calls_never_wait_for_a_monitor_that_is_behind(make_menv: EnvFactory) -> None:
    queue_max = 100  # the smallest the settings allow
    env = make_menv(queue_max=queue_max)
    agent = env.agent()
    client = _openai(env, _token(env, agent))
    monitor = _monitor(env)
    monitor.stop()  # nothing consumes the queue any more
    # Guesses at unknown client ids name nobody to watch: they are not even queued (else a
    # flood of them, which no lockout slows, would crowd out the real observations).
    for _ in range(10):
        guess = {"client_id": "wl_" + secrets.token_hex(8), "client_secret": "x"}
        assert_oauth_error(_exchange(env, guess), 401, "invalid_client")
    assert monitor.pending() == 0
    for _ in range(queue_max):
        monitor.refusal(agent["id"], "rate_limit_exceeded", authenticated=True)
    assert _metric(env, "broker_monitor_dropped_total") == 0

    for n in range(3):  # each settled call would queue one observation
        assert _chat(client, f"call {n}").choices[0].message.content
    assert _metric(env, "broker_monitor_dropped_total") == 3




# --- alerts reach the configured webhook ---------------------------------------------------------


def test_an_alert_reaches_the_configured_webhook_signed(
        make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
        vault: DevVault) -> None:
    from broker.monitoring.webhooks import SIGNATURE_HEADER, verify
    from broker.storage.vault import Vault
    from tests.test_webhooks import Receiver

    secret = "whsec-" + secrets.token_hex(16)
    path = f"hooks-{secrets.token_hex(4)}/alerts"
    receiver = Receiver().start()
    try:
        def adjust(sections: Sections) -> None:
            _monitoring()(sections)
            sections["alerts"] = {"webhooks": [
                {"url": receiver.url, "secret_vault_path": path, "min_severity": "warning"}]}

        env = make_env(make_live_broker, sqlite_url, fake, adjust=adjust)
        Vault(env.broker.settings.vault).write(path, {"secret": SECRETS.add(secret)})
        receiver.fail_next(2)  # the receiver is down a moment: the outbox retries
        agent = env.agent()
        _loop(_openai(env, _token(env, agent)))
        alert = _only_alert(env, agent)
        wait_for(lambda: receiver.delivered(agent["id"]) == [alert["id"]], 20,
                 what="the alert's delivery")
        got = next(r for r in receiver.requests if r.status == 200)
        assert verify(secret.encode(), got.headers[SIGNATURE_HEADER], got.body,
                      now=int(time.time()))
        assert got.alert["detector"] == "loop" and got.alert["action"] == "suspend"
        assert secret not in json.dumps(got.alert)
    finally:
        receiver.stop()


def test_an_agent_minting_tokens_in_a_loop_meets_its_limit_and_is_suspended(menv: Env) -> None:
    agent = menv.agent(max_live_tokens=1)
    assert _exchange(menv, agent).status_code == 200
    for _ in range(FAILURE_THRESHOLD):
        assert_oauth_error(_exchange(menv, agent), 429, "slow_down")
    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("failures", "suspend")
    assert alert["evidence"]["authenticated"] == FAILURE_THRESHOLD
    assert _suspended(menv, agent)


def test_a_finding_made_while_the_database_is_away_is_acted_on_when_it_answers(
        menv: Env) -> None:
    """Nothing is lost: the loop's finding waits for the database, then suspends the agent;
    observations that could not be read wait too, in order."""
    from broker.errors import LedgerUnavailable

    monitor = _monitor(menv)
    monitor.stop()  # the test drains by hand
    agent = menv.agent()
    token = _token(menv, agent)
    client = _openai(menv, token)
    real = monitor.db.transaction
    away = {"on": False}

    def transaction(fn: Callable[..., Any]) -> Any:
        if away["on"]:
            raise LedgerUnavailable("the database did not answer")
        return real(fn)

    monitor.db.transaction = transaction  # type: ignore[method-assign]
    try:
        _loop(client)
        away["on"] = True
        monitor.drain()  # the loop is found; its action cannot be written: it waits
        with pytest.raises(LedgerUnavailable):
            monitor.drain()  # still away: it waits on
        assert menv.query("SELECT id FROM alert") == []
        assert not _suspended(menv, agent)
        away["on"] = False
        monitor.drain()
    finally:
        monitor.db.transaction = real  # type: ignore[method-assign]
    alert = _only_alert(menv, agent)
    assert (alert["detector"], alert["action"]) == ("loop", "suspend")
    assert _suspended(menv, agent)


def test_observations_wait_in_order_while_the_database_cannot_be_read(menv: Env) -> None:
    from broker.errors import LedgerUnavailable

    monitor = _monitor(menv)
    monitor.stop()
    agent = menv.agent()
    client = _openai(menv, _token(menv, agent))
    real = monitor.db.read_transaction

    def unreadable(fn: Callable[..., Any]) -> Any:
        raise LedgerUnavailable("the database did not answer")

    for n in range(3):
        _chat(client, f"call {n}")
    monitor.db.read_transaction = unreadable  # type: ignore[method-assign]
    try:
        with pytest.raises(LedgerUnavailable):
            monitor.drain()  # the agent was never seen: its state cannot be read
        assert monitor.pending() == 3  # all still there
    finally:
        monitor.db.read_transaction = real  # type: ignore[method-assign]
    assert monitor.drain() == 3
    assert monitor.pending() == 0
