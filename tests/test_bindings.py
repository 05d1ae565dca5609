"""Binding rules, matched as pure functions: globs, dotted claim paths, and what pins a workload."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ValidationFailed
from broker.identity.bindings import BindingRule, check_rules, claim_at, glob_match, matches

K8S_PINNING = {"cluster": (("kubernetes.io.namespace", "kubernetes.io.serviceaccount.name"),)}


@given(pattern=st.text("ab*?", max_size=8), value=st.text("ab", max_size=10))
def test_glob_matches_exactly_as_fnmatch_does_for_star_and_question_mark(pattern: str, value: str) -> None:
    assert glob_match(pattern, value) == fnmatch.fnmatchcase(value, pattern)


def test_brackets_and_dots_are_literal() -> None:
    assert glob_match("[ab].c", "[ab].c")
    assert not glob_match("[ab].c", "a.c")
    assert not glob_match("a.c", "abc")


def test_a_pattern_built_to_backtrack_is_answered_at_once() -> None:
    # As one regular expression this is exponential; an admin's pattern must not stall exchanges.
    assert not glob_match("*a" * 500 + "*b", "a" * 8000 + "c")
    assert glob_match("*a" * 500 + "*", "a" * 8000)


def test_dotted_paths_reach_into_objects_and_keys_that_hold_dots() -> None:
    claims = {"kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "worker"}},
              "repository_id": 74, "flag": True}
    assert claim_at(claims, "kubernetes.io.namespace") == "payments"
    assert claim_at(claims, "kubernetes.io.serviceaccount.name") == "worker"
    assert claim_at(claims, "kubernetes.io.pod") is None
    assert matches({"repository_id": "74"}, claims)
    assert not matches({"flag": "True"}, claims)  # a boolean is never a binding value
    assert not matches({"kubernetes.io": "*"}, claims)  # nor an object


@pytest.mark.parametrize(("claims", "ok"), [
    pytest.param({"sub": "system:serviceaccount:payments:worker"}, True, id="sub"),
    pytest.param({"kubernetes.io.namespace": "payments",
                  "kubernetes.io.serviceaccount.name": "worker"}, True, id="namespace-and-name"),
    pytest.param({"kubernetes.io.namespace": "payments",
                  "kubernetes.io.serviceaccount.name": "*"}, False, id="name-only-wildcards"),
    pytest.param({"kubernetes.io.namespace": "payments"}, False, id="namespace-alone"),
    pytest.param({"sub": "*?*"}, False, id="sub-only-wildcards"),
])
def test_a_rule_must_pin_one_workload(claims: dict[str, str], ok: bool) -> None:
    rule = BindingRule(issuer="cluster", claims=claims)
    if ok:
        check_rules([rule], K8S_PINNING)
    else:
        with pytest.raises(ValidationFailed):
            check_rules([rule], K8S_PINNING)
