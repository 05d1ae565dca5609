"""The runtime-monitoring detectors, specified by the traffic that must and must not trip them.

All time is simulated (``tests/traffic.py``): no test sleeps or reads a clock.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.monitoring.baselines import Baseline, WindowSums
from broker.monitoring.detectors import PEER_PREFIX, Detectors, Finding, Observation, peer_key
from broker.settings.monitoring import MonitoringSettings
from tests.traffic import (
    T0,
    call,
    looping_agent,
    refusal,
    refusing_agent,
    replay,
    spender,
    steady_traffic,
    wrong_secret_flood,
)

SETTINGS = MonitoringSettings()
HOUR = 3600.0
DAY = 86_400.0
STEP = SETTINGS.velocity.window_s / 5


def findings(observations: Iterable[Observation], detectors: Detectors | None = None,
             ) -> list[tuple[Observation, Finding]]:
    return replay(detectors if detectors is not None else Detectors(SETTINGS), observations)


def only(found: list[tuple[Observation, Finding]], detector: str) -> list[tuple[Observation, Finding]]:
    return [(obs, f) for obs, f in found if f.detector == detector]


def roundtrip(detectors: Detectors) -> Detectors:
    """What a restart does: write the dirty states as JSON, read them into a new engine."""
    written = json.loads(json.dumps(detectors.dirty(), allow_nan=False))
    restored = Detectors(SETTINGS)
    for key, state in written.items():
        restored.load(key, state)
    return restored


def merged(*streams: Iterable[Observation]) -> Iterable[Observation]:
    return heapq.merge(*streams, key=lambda obs: obs.ts)


# --- loop --------------------------------------------------------------------------------------


def test_an_agent_repeating_one_request_trips_loop_at_the_threshold() -> None:
    found = findings(looping_agent(T0, 20, 2.0))

    assert len(found) == 1
    obs, finding = found[0]
    assert obs.ts == T0 + 19 * 2.0  # the 20th repeat, not later
    assert (finding.detector, finding.severity, finding.attributable) == ("loop", "critical", True)
    assert finding.summary == "agent repeated one request 20 times in 60 s"
    assert finding.evidence == {"fingerprint": "ab" * 8, "count": 20, "window_s": 60,
                                "model": "sonnet"}


def test_a_loop_is_quiet_for_the_cooldown_then_reported_again() -> None:
    found = only(findings(looping_agent(T0, 400, 2.0)), "loop")  # 800 s of looping

    times = [obs.ts - T0 for obs, _ in found]
    assert times == [38.0, 38.0 + 300, 38.0 + 600]


def test_the_same_request_repeated_slower_than_the_threshold_is_no_loop() -> None:
    # 15 a minute for an hour: a poller, not a loop.
    assert only(findings(looping_agent(T0, 900, 4.0)), "loop") == []


def test_distinct_requests_at_a_high_rate_are_no_loop() -> None:
    assert only(findings(call(T0 + n * 0.1) for n in range(2_000)), "loop") == []


# --- failures ----------------------------------------------------------------------------------


def test_authenticated_refusals_trip_failures_and_are_attributable() -> None:
    found = findings(refusing_agent(T0, 20, 2.0))

    assert len(found) == 1
    finding = found[0][1]
    assert (finding.detector, finding.severity, finding.attributable) == ("failures", "warning", True)
    assert finding.evidence == {"count": 20, "authenticated": 20, "window_s": 60,
                                "reason_refused_token": 20}
    assert finding.summary == "agent was refused 20 times in 60 s"


def test_a_wrong_secret_flood_is_reported_but_not_attributable() -> None:
    # Anyone who knows a client id can send wrong secrets for it: this must never suspend it.
    found = findings(wrong_secret_flood(T0, 1_000, 0.1))

    assert len(found) == 1  # then the cooldown
    finding = found[0][1]
    assert finding.attributable is False
    assert finding.evidence["reason_bad_secret"] == 20
    assert finding.evidence["authenticated"] == 0


def test_a_flood_of_wrong_secrets_does_not_hide_the_agents_own_refusals() -> None:
    flood = wrong_secret_flood(T0, 100, 0.1)
    own = refusing_agent(T0 + 20, 20, 1.0, reason="rate_limited")  # within the flood's cooldown

    found = findings(merged(flood, own))

    assert [f.attributable for _, f in found] == [False, True]
    assert found[1][1].evidence["reason_rate_limited"] == 20


def test_mixed_refusals_are_attributable_only_when_the_authenticated_ones_reach_the_threshold() -> None:
    mixed = merged(refusing_agent(T0, 15, 2.0), wrong_secret_flood(T0 + 1, 15, 2.0))

    found = findings(mixed)

    assert len(found) == 1
    assert found[0][1].attributable is False
    assert found[0][1].evidence["count"] == 20


def test_refusals_spread_wider_than_the_window_never_trip() -> None:
    assert findings(refusing_agent(T0, 500, 4.0)) == []  # 15 a minute


def test_refusals_feed_only_the_failures_detector() -> None:
    obs = [Observation(ts=T0 + n, workload_id="wl_a", tenant_id="tn", kind="agent",
                       signal="refusal", refusal="upstream_error", model="opus",
                       cost_micros=10**9, fingerprint="ab" * 32, client_ip=f"10.{n}.0.1")
           for n in range(25)]

    assert {f.detector for _, f in findings(obs)} == {"failures"}


# --- velocity ----------------------------------------------------------------------------------


def test_a_workload_jumping_from_a_cent_to_five_dollars_trips_velocity_within_k_of_n_steps() -> None:
    history = spender(T0, DAY, 10_000)  # $0.01 every 5 minutes for a day
    attack_start = T0 + DAY
    attack = spender(attack_start, HOUR, 5_000_000)  # then $5 every 5 minutes

    found = findings(merged(history, attack))

    first_obs, first = found[0]
    assert first_obs.ts - attack_start < SETTINGS.velocity.k * STEP
    assert (first.detector, first.severity) == ("velocity", "critical")
    assert first.evidence["source"] == "own"
    assert 10_000 <= cast(int, first.evidence["baseline_micros"]) <= 50_000
    assert cast(int, first.evidence["spend_micros"]) >= SETTINGS.velocity.floor_micros
    assert first.evidence["factor"] == 10.0


def test_hot_windows_are_not_learned_so_a_long_attack_keeps_being_reported() -> None:
    history = spender(T0, DAY, 10_000)
    attack = spender(T0 + DAY, 2 * HOUR, 5_000_000)

    found = findings(merged(history, attack))

    # One finding per cooldown (2 h / 300 s), each against the same, pre-attack baseline.
    assert len(found) == 24
    baselines = {f.evidence["baseline_micros"] for _, f in found}
    assert len(baselines) == 1


def test_a_burst_inside_one_step_is_not_sustained() -> None:
    history = spender(T0, DAY, 10_000)
    burst = [call(T0 + DAY + n, cost_micros=400_000) for n in range(5)]  # $2 within 5 s

    assert findings(merged(history, burst)) == []
    # The same burst, then one more call in the next step: two of the last three steps hot.
    assert len(findings(merged(history, burst, [call(T0 + DAY + STEP, cost_micros=1_000)]))) == 1


def test_a_sparse_workloads_burst_of_a_few_of_its_own_calls_is_not_velocity() -> None:
    # One $0.23 call an hour for two weeks: most windows are empty, so their spread alone
    # would put the baseline below a single call. Then eight calls in five minutes ($1.80).
    hourly = [call(T0 + h * HOUR, model="opus", tokens=3_000) for h in range(14 * 24)]
    burst = [call(T0 + 14 * DAY + n * 37, model="opus", tokens=3_000) for n in range(8)]

    assert findings([*hourly, *burst]) == []


def test_a_workload_creeping_just_under_the_line_cannot_teach_itself_normal_quickly() -> None:
    # An attacker who knows the baseline keeps every window at 9.9x it: never hot, always
    # learned. The baseline may follow, but only at its own spread's pace.
    decay = 0.5 ** (STEP / SETTINGS.velocity.half_life_s)
    baseline = Baseline()
    for _ in range(1_440):  # a day of $0.01 windows of five calls
        baseline.add(decay, WindowSums(5, 10_000, 5_000, 5 * 2_000**2, 5 * 1_000**2))
    start = baseline.line()[0]

    for _ in range(60):  # an hour of steps
        spend = int(9.9 * baseline.line()[0])
        baseline.add_clipped(decay, WindowSums(5, spend, 5_000, 5 * (spend // 5) ** 2,
                                               5 * 1_000**2))

    assert baseline.line()[0] < 2 * start  # learned as is, it would be 300x


def test_below_the_floor_velocity_never_fires_however_large_the_ratio() -> None:
    history = spender(T0, DAY, 100)  # a hundredth of a cent every 5 minutes
    surge = spender(T0 + DAY, 6 * HOUR, 990_000)  # 9,900x that, just under the $1 floor

    assert findings(merged(history, surge)) == []


def _peers(tenant: str, micros_per_window: int) -> list[Iterable[Observation]]:
    return [spender(T0, 2 * HOUR, micros_per_window, workload_id=f"wl_peer{n}", tenant_id=tenant)
            for n in range(3)]


@pytest.mark.parametrize(("peer_spend", "expected"), [
    pytest.param(50_000, "peers", id="peers-spend-a-fortieth"),
    pytest.param(900_000, None, id="peers-spend-about-the-same"),
    pytest.param(None, "floor", id="no-peers-only-the-floor"),
])
def test_a_workload_without_history_is_compared_with_its_peers(peer_spend: int | None,
                                                              expected: str | None) -> None:
    peers = _peers("tn_p", peer_spend) if peer_spend is not None else []
    newcomer = spender(T0 + 2 * HOUR, HOUR, 2_000_000, workload_id="wl_new", tenant_id="tn_p")

    found = findings(merged(*peers, newcomer))

    assert [f.evidence["source"] for _, f in found][:1] == ([expected] if expected else [])
    assert all(obs.workload_id == "wl_new" for obs, _ in found)


def test_peers_of_another_tenant_or_kind_are_not_peers() -> None:
    peers = _peers("tn_other", 900_000)
    newcomer = spender(T0 + 2 * HOUR, HOUR, 2_000_000, workload_id="wl_new", tenant_id="tn_p")
    service = spender(T0 + 2 * HOUR, HOUR, 2_000_000, workload_id="wl_svc", tenant_id="tn_other",
                      kind="service")

    found = findings(merged(*peers, newcomer, service))

    assert {(obs.workload_id, f.evidence["source"]) for obs, f in found} == {
        ("wl_new", "floor"), ("wl_svc", "floor")}


def test_a_week_offline_decays_the_baseline_to_idle() -> None:
    history = spender(T0, DAY, 200_000)  # $0.20 every 5 minutes
    back = spender(T0 + 8 * DAY, HOUR, 2_500_000)  # after a week: 12.5x its old rate

    found = only(findings(merged(history, back)), "velocity")

    # A week of idle windows is seven half-lives: the old rate no longer shelters the new one.
    assert found
    assert found[0][1].evidence["source"] == "own"
    assert cast(int, found[0][1].evidence["baseline_micros"]) < 200_000


# --- new_model ---------------------------------------------------------------------------------


def _usual(n: int = 10, model: str = "sonnet") -> list[Observation]:
    return [call(T0 + i * 60, model=model) for i in range(n)]


def test_first_calls_build_the_baselines_and_never_trip_new_model_or_origin() -> None:
    models = ["flash", "mini", "haiku", "gpt-4o", "sonnet", "opus", "a", "b", "c", "d"]
    first = [call(T0 + i * 60, model=m, client_ip=f"10.{i}.0.1") for i, m in enumerate(models)]
    eleventh = call(T0 + 3600, model="e", client_ip="192.0.2.1")

    found = findings([*first, eleventh])

    assert [(obs.ts, f.detector) for obs, f in found] == [
        (eleventh.ts, "new_model"), (eleventh.ts, "origin")]


@pytest.mark.parametrize(("model", "price", "severity"), [
    pytest.param("flash", 400_000, "info", id="cheaper"),
    pytest.param("same-price", 15_000_000, "info", id="as-dear"),
    pytest.param("thrice", 45_000_000, "warning", id="3x"),
    pytest.param("four-times", 60_000_000, "warning", id="4x"),
    pytest.param("opus", 75_000_000, "critical", id="5x"),
])
def test_a_new_model_is_graded_by_its_price_against_the_dearest_usual_one(
        model: str, price: int, severity: str) -> None:
    new = call(T0 + HOUR, model=model, price=price)
    again = call(T0 + 2 * HOUR, model=model, price=price)  # after the cooldown

    found = findings([*_usual(), new, again])

    assert len(found) == 1  # once reported, the model joins the baseline
    finding = found[0][1]
    assert (finding.detector, finding.severity) == ("new_model", severity)
    assert finding.evidence["model"] == model
    assert finding.evidence["ratio"] == round(price / 15_000_000, 2)
    assert finding.evidence["baseline_max_price_micros_per_mtok"] == 15_000_000


def test_a_model_unused_for_the_baseline_window_is_new_again() -> None:
    first = [call(T0, model="haiku"), *_usual(9)]
    week = [call(T0 + d * DAY, model="sonnet") for d in range(1, 9)]
    haiku_again = call(T0 + 8 * DAY + 60, model="haiku")

    found = findings([*first, *week, haiku_again])

    assert [(f.detector, f.severity) for _, f in found] == [("new_model", "info")]


def test_after_a_long_silence_its_old_models_are_new_but_priced_as_before() -> None:
    back = call(T0 + 30 * DAY, model="sonnet")

    found = findings([*_usual(), back])

    assert [(f.severity, f.evidence["ratio"]) for _, f in found] == [("info", 1.0)]


def test_a_graver_finding_breaks_through_the_cooldown() -> None:
    cheap = call(T0 + HOUR, model="flash")
    dear = call(T0 + HOUR + 10, model="opus")  # within the cheap one's cooldown
    other = call(T0 + HOUR + 20, model="mini")  # no graver: stays quiet

    found = findings([*_usual(), cheap, dear, other])

    assert [f.severity for _, f in found] == ["info", "critical"]


# --- origin ------------------------------------------------------------------------------------


def test_first_calls_learn_networks_then_an_unseen_one_trips_origin() -> None:
    first = [call(T0 + i, client_ip=ip) for i, ip in enumerate(
        ["10.1.2.3", "10.1.2.4", "2001:db8:1:2::5", *(["10.1.2.9"] * 7)])]
    same_24 = call(T0 + 100, client_ip="10.1.2.200")
    same_48 = call(T0 + 101, client_ip="2001:db8:1:ffff::1")
    mapped = call(T0 + 102, client_ip="::ffff:10.1.2.77")  # the same IPv4 client, dual stack
    unseen = call(T0 + 103, client_ip="10.1.3.1")
    unseen_again = call(T0 + 1000, client_ip="10.1.3.7")  # learned once reported

    found = findings([*first, same_24, same_48, mapped, unseen, unseen_again])

    assert len(found) == 1
    obs, finding = found[0]
    assert obs is unseen
    assert (finding.detector, finding.severity) == ("origin", "warning")
    assert finding.evidence == {"ip": "10.1.3.1", "network": "10.1.3.0/24", "configured": False,
                                "known_networks": 2}


def test_configured_cidrs_trip_origin_from_the_first_call_without_learning() -> None:
    cidrs = ("10.0.0.0/8", "2001:db8::/32")
    outside = call(T0, client_ip="192.0.2.10", cidrs=cidrs)
    inside = [call(T0 + i, client_ip=ip, cidrs=cidrs)
              for i, ip in enumerate(["10.200.1.1", "2001:db8:9::1"], start=1)]
    outside_later = call(T0 + 400, client_ip="192.0.2.10", cidrs=cidrs)  # not learned

    found = findings([outside, *inside, outside_later])

    assert [obs for obs, _ in found] == [outside, outside_later]
    assert found[0][1].evidence["configured"] is True
    assert found[0][1].evidence["network"] == "192.0.2.0/24"


@pytest.mark.parametrize("ip", [None, "", "not-an-ip", "999.1.1.1", "10.1.2.3/24", "x" * 10_000])
def test_a_missing_or_unparseable_ip_is_ignored(ip: str | None) -> None:
    learned = [call(T0 + i, client_ip="10.1.2.3") for i in range(10)]

    assert findings([*learned, call(T0 + 60, client_ip=ip)]) == []


# --- persistence -------------------------------------------------------------------------------


def test_a_loop_count_survives_a_restart() -> None:
    detectors = Detectors(SETTINGS)
    loop = list(looping_agent(T0, 20, 2.0))
    assert findings(loop[:15], detectors) == []

    restored = roundtrip(detectors)

    assert [obs for obs, _ in findings(loop[15:], restored)] == [loop[19]]


def test_a_velocity_baseline_and_its_peer_group_survive_a_restart() -> None:
    detectors = Detectors(SETTINGS)
    findings(spender(T0, DAY, 10_000), detectors)
    written = json.loads(json.dumps(detectors.dirty(), allow_nan=False))
    assert set(written) == {"wl_attacked", f"{PEER_PREFIX}tn_attacked/agent"}
    restored = Detectors(SETTINGS)
    for key, state in written.items():
        restored.load(key, state)

    found = findings(spender(T0 + DAY, HOUR, 5_000_000), restored)

    assert found[0][1].evidence["source"] == "own"
    assert 10_000 <= cast(int, found[0][1].evidence["baseline_micros"]) <= 50_000


def test_dirty_returns_each_change_once() -> None:
    detectors = Detectors(SETTINGS)
    detectors.observe(call(T0, "wl_a"))
    detectors.observe(call(T0, "wl_b"))

    assert set(detectors.dirty()) == {"wl_a", "wl_b"}
    assert detectors.dirty() == {}
    detectors.observe(call(T0 + 1, "wl_b"))
    assert set(detectors.dirty()) == {"wl_b"}


def test_load_keeps_a_newer_state_already_in_memory_and_forget_drops_it() -> None:
    detectors = Detectors(SETTINGS)
    findings(looping_agent(T0, 15, 2.0), detectors)

    detectors.load("wl_attacked", {})  # stale: ignored
    assert len(findings(looping_agent(T0 + 30, 5, 2.0), detectors)) == 1

    detectors.forget("wl_attacked")
    assert not detectors.loaded("wl_attacked")
    assert "wl_attacked" not in detectors.dirty()


def _fresh_state_after(obs: Observation, key: str, loaded: object) -> tuple[object, object]:
    fresh = Detectors(SETTINGS)
    fresh.observe(obs)
    hostile = Detectors(SETTINGS)
    hostile.load(key, cast(Mapping[str, object], loaded))
    hostile.observe(obs)
    # Written states must be strict JSON: PostgreSQL refuses NaN and Infinity.
    return (json.loads(json.dumps(fresh.dirty(), allow_nan=False)),
            json.loads(json.dumps(hostile.dirty(), allow_nan=False)))


_RING = [0] * 11
_NAN = float("nan")


@pytest.mark.parametrize("state", [
    pytest.param(None, id="none"),
    pytest.param([1, 2, 3], id="a-list"),
    pytest.param("state", id="a-string"),
    pytest.param({"v": 2, "loop": {"ab": [28_332_000, 19, *_RING[1:]]}}, id="future-version"),
    pytest.param({"v": True, "loop": {"ab": [28_332_000, 19, *_RING[1:]]}}, id="bool-version"),
    pytest.param({"v": 1, "loop": {"ab": [0] * 100_000}}, id="huge-list"),
    pytest.param({"v": 1, "loop": {f"{i:x}": _RING for i in range(10_000)}}, id="too-many-keys"),
    pytest.param({"v": 1, "loop": {"ab": [0, -5, *_RING[2:]]}}, id="negative-count"),
    pytest.param({"v": 1, "loop": {"ab": [0, 1.5, *_RING[2:]]}}, id="float-count"),
    pytest.param({"v": 1, "loop": {"ab": [0, True, *_RING[2:]]}}, id="bool-count"),
    pytest.param({"v": 1, "loop": {"ab": [0, 10**40, *_RING[2:]]}}, id="huge-count"),
    pytest.param({"v": 1, "loop": {"": _RING}}, id="empty-key"),
    pytest.param({"v": 1, "loop": {"ab": {"deep": {"deeper": {}}}}}, id="nested-garbage"),
    pytest.param({"v": 1, "velocity": {"steps": [0] * 6, "hot": 0, "own": [_NAN] * 9,
                                       "windows": 0}}, id="nan-baseline"),
    pytest.param({"v": 1, "velocity": {"steps": [-1, *([[0] * 5] * 5)], "hot": 0,
                                       "own": [float("inf")] * 9, "windows": 99}},
                 id="infinite-baseline"),
    pytest.param({"v": 1, "velocity": {"steps": [-1, *([[0] * 5] * 5)], "hot": 0,
                                       "own": [1e-300, *([1e39] * 7), 0], "windows": 99}},
                 id="vanishing-weight"),
    pytest.param({"v": 1, "velocity": {"steps": [-1, *([[0] * 5] * 5)], "hot": 2**1000,
                                       "own": [0] * 9, "windows": 99}}, id="huge-hot-bits"),
    pytest.param({"v": 1, "cooldown": {"loop": [1e300, 2, True]}}, id="cooldown-forever"),
    pytest.param({"v": 1, "cooldown": {"loop": [T0 + 999, 2, 1]}}, id="int-as-flag"),
    pytest.param({"v": 1, "new_model": {"calls": 10**30, "models": {}}}, id="huge-int"),
    pytest.param({"v": 1, "new_model": {"calls": 10, "models": {"m": [_NAN, 5]}}}, id="nan-ts"),
    pytest.param({"v": 1, "origin": "everywhere"}, id="wrong-type"),
    pytest.param({"v": 1, "origin": {"calls": 10, "networks": {"x" * 1000: T0}}}, id="long-key"),
])
def test_a_hostile_state_loads_as_fresh_without_raising(state: object) -> None:
    fresh, hostile = _fresh_state_after(call(T0), "wl_attacked", state)

    assert hostile == fresh


def test_a_hostile_peer_state_loads_as_fresh() -> None:
    detectors = Detectors(SETTINGS)
    key = peer_key("tn_attacked", "agent")
    detectors.load(key, {"v": 1, "baseline": [_NAN] * 9})

    found = findings(spender(T0, HOUR, 2_000_000), detectors)

    assert found[0][1].evidence["source"] == "floor"


def test_a_broken_section_does_not_cost_the_others() -> None:
    detectors = Detectors(SETTINGS)
    findings(looping_agent(T0, 15, 2.0), detectors)
    state = detectors.dirty()["wl_attacked"]
    velocity = cast(dict[str, object], state["velocity"])
    velocity["own"] = [_NAN] * 9
    restored = Detectors(SETTINGS)
    restored.load("wl_attacked", state)

    assert len(findings(looping_agent(T0 + 30, 5, 2.0), restored)) == 1


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=12)
    | st.dictionaries(st.sampled_from(["v", "steps", "hot", "own", "windows", "all", "calls",
                                       "models", "networks", "authenticated", "reasons", "ab"]),
                      inner, max_size=6),
    max_leaves=40)
_sections = st.sampled_from(["cooldown", "loop", "failures", "velocity", "new_model", "origin"])


@given(st.dictionaries(_sections, _json, max_size=6), st.booleans())
def test_no_state_whatever_its_shape_makes_load_or_observe_raise(
        sections: dict[str, object], peers: bool) -> None:
    detectors = Detectors(SETTINGS)
    key = peer_key("tn_attacked", "agent") if peers else "wl_attacked"
    detectors.load(key, {"v": 1, **sections})

    for n in range(3):
        detectors.observe(call(T0 + n * 400, cost_micros=2_000_000))
        detectors.observe(refusal(T0 + n * 400 + 1))

    json.dumps(detectors.dirty(), allow_nan=False)


_events = st.lists(st.tuples(
    st.sampled_from([0.0, 0.5, 7.0, 61.0, 299.0, 3_000.0, 9 * DAY]),  # time since the last event
    st.sampled_from(["wl_a", "wl_b"]),
    st.sampled_from(["usage", "usage", "usage", "refusal"]),
    st.integers(0, 3),  # which model, network and fingerprint
    st.integers(0, 3_000_000),  # cost
), max_size=60)


def _observations(events: list[tuple[float, str, str, int, int]]) -> list[Observation]:
    out, ts = [], T0
    for gap, workload, signal, pick, cost in events:
        ts += gap
        out.append(Observation(
            ts=ts, workload_id=workload, tenant_id="tn", kind="agent", signal=signal,
            model=f"m{pick}", cost_micros=cost, tokens=cost // 100,
            price_micros_per_mtok=(pick + 1) * 1_000_000, fingerprint=f"{pick:064x}",
            client_ip=f"10.{pick}.0.1", refusal="bad_secret" if pick == 0 else "rate_limited",
            authenticated=pick != 0))
    return out


@given(_events, st.integers(0, 60))
def test_a_restored_engine_continues_exactly_like_the_one_that_never_stopped(
        events: list[tuple[float, str, str, int, int]], split: int) -> None:
    observations = _observations(events)
    before, after = observations[:split], observations[split:]
    running = Detectors(SETTINGS)
    findings(before, running)
    restored = roundtrip(running)

    assert findings(after, restored) == findings(after, running)
    assert restored.dirty() == running.dirty()


# --- memory ------------------------------------------------------------------------------------


def test_a_workloads_state_stays_bounded_whatever_it_sends() -> None:
    detectors = Detectors(SETTINGS)
    for n in range(20_000):
        detectors.observe(call(T0 + n, model=f"model-{n}", fingerprint=f"{n:064x}",
                               client_ip=f"10.{n // 256 % 256}.{n % 256}.1"))
        detectors.observe(refusal(T0 + n, reason=f"reason_{n}"))

    state = detectors.dirty()["wl_attacked"]

    assert len(cast(dict[str, object], state["loop"])) == 16
    assert len(cast(dict[str, dict[str, object]], state["new_model"])["models"]) == 64
    assert len(cast(dict[str, dict[str, object]], state["origin"])["networks"]) == 32
    assert len(cast(dict[str, dict[str, object]], state["failures"])["reasons"]) <= 9
    assert len(json.dumps(state)) < 16_000


def test_memory_is_bounded_by_max_workloads_and_evicted_changes_are_still_written() -> None:
    detectors = Detectors(SETTINGS, max_workloads=100)
    findings(looping_agent(T0, 15, 0.1), detectors)
    for n in range(150):
        detectors.observe(call(T0 + 2, f"wl_{n}"))
    assert len(detectors) == 100
    assert not detectors.loaded("wl_attacked")

    # Evicted before it was written: its loop count is kept and continues when it comes back.
    assert len(findings(looping_agent(T0 + 3, 5, 0.1), detectors)) == 1
    written = detectors.dirty()
    assert {f"wl_{n}" for n in range(150)} | {"wl_attacked"} <= set(written)


def test_without_writes_memory_stays_bounded_by_losing_the_oldest_changes() -> None:
    # Only if dirty() is not called while max_workloads other workloads are evicted.
    detectors = Detectors(SETTINGS, max_workloads=10)
    for n in range(1_000):
        detectors.observe(call(T0 + 2, f"wl_{n}"))

    assert len(detectors) == 10
    assert len(detectors.dirty()) <= 20


def test_an_evicted_state_not_yet_written_wins_over_the_database_copy() -> None:
    detectors = Detectors(SETTINGS, max_workloads=2)
    findings(looping_agent(T0, 15, 0.1), detectors)
    findings([call(T0 + 2, "wl_x"), call(T0 + 2, "wl_y")], detectors)
    assert not detectors.loaded("wl_attacked")

    detectors.load("wl_attacked", {})  # what the database held before the 15 repeats

    assert len(findings(looping_agent(T0 + 3, 5, 0.1), detectors)) == 1


def test_a_peer_key_fits_the_state_column() -> None:
    assert peer_key("tn_0123456789abcdef", "interactive") == "peers/tn_0123456789abcdef/interactive"
    long_key = peer_key("t" * 200, "agent")
    assert long_key.startswith(PEER_PREFIX) and len(long_key) <= 40
    assert long_key != peer_key("t" * 200, "service")


# --- the closed form for idle time -----------------------------------------------------------


@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=30), st.integers(1, 400),
       st.sampled_from([60, 3_600, 86_400, 31_622_400]), st.sampled_from([2.0, 60.0, 17_280.0]))
def test_idle_time_in_closed_form_equals_learning_every_empty_window(
        sums: list[int], idle: int, half_life: int, step: float) -> None:
    ln_decay = -math.log(2) * step / half_life
    closed, stepped = Baseline(), Baseline()
    for spend in sums:
        window = WindowSums(1 + spend % 7, spend, spend // 3, spend * spend, (spend // 3) ** 2)
        closed.add(math.exp(ln_decay), window)
        stepped.add(math.exp(ln_decay), window)

    closed.add_zeros(ln_decay, idle)
    for _ in range(idle):
        stepped.add(math.exp(ln_decay), WindowSums(0, 0, 0, 0, 0))

    for got, want in zip(closed.to_json(), stepped.to_json(), strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)


# --- a steady day ------------------------------------------------------------------------------


def test_a_steady_day_of_a_hundred_workloads_trips_nothing() -> None:
    observations = list(steady_traffic(workloads=100, hours=24, seed=1))

    assert len(observations) > 20_000
    assert {obs.kind for obs in observations} == {"agent", "service", "interactive", "admin"}
    assert findings(observations) == []


def test_the_steady_day_still_shows_attacks_hidden_in_it() -> None:
    # The control for the test above: the same kind of day, with a loop and a runaway agent.
    day = steady_traffic(workloads=30, hours=24, seed=2)
    loop = looping_agent(T0 + 12 * HOUR, 30, 1.0, workload_id="wl_loop")
    runaway = merged(spender(T0, 10 * HOUR, 10_000, workload_id="wl_runaway"),
                     spender(T0 + 10 * HOUR, HOUR, 5_000_000, workload_id="wl_runaway"))

    found = findings(merged(day, loop, runaway))

    assert {(obs.workload_id, f.detector) for obs, f in found} == {
        ("wl_loop", "loop"), ("wl_runaway", "velocity")}


def test_steady_traffic_is_deterministic_per_seed() -> None:
    def first(seed: int) -> list[Observation]:
        stream = steady_traffic(workloads=20, hours=1, seed=seed)
        return [obs for _, obs in zip(range(200), stream, strict=False)]

    assert first(7) == first(7)
    assert first(7) != first(8)
