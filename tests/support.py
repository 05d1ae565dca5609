"""What the tests share besides fixtures: waiting on a condition (never on the clock), a clock a
test moves by hand, and the broker's error shapes.

A test that needs time to pass either injects a :class:`Clock` where the code under test takes
``now`` (or a clock), or waits with :func:`wait_for` for the condition it is about to assert:
it never sleeps for a guessed while.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

PROBLEM = "application/problem+json"


def wait_for(condition: Callable[[], object], timeout: float = 10.0, *, interval: float = 0.01,
             what: str | Callable[[], str] = "the condition") -> float:
    """Seconds until ``condition()`` was true, asking every ``interval`` seconds; an
    ``AssertionError`` naming ``what`` (a text, or a function describing the state seen) once
    ``timeout`` seconds have passed without it."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            described = what() if callable(what) else what
            raise AssertionError(f"{described} did not hold within {timeout}s")
        time.sleep(interval)


class Clock:
    """A clock that stands still until the test moves it: pass it (or ``clock.now``) where the
    code takes a clock or ``now``."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def assert_problem(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An error of the admin and health routes: ``status``, ``application/problem+json`` with
    the four members of RFC 9457 as the broker fills them (``type`` is
    ``urn:broker:error:<code>``); returns the body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    assert set(body) == {"type", "title", "status", "detail"}, body
    assert body["status"] == status and body["title"] and body["detail"], body
    if code is not None:
        assert body["type"] == f"urn:broker:error:{code}", body
    return body


def assert_oauth_error(resp: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """An error of ``/v1/token`` or ``/v1/introspect`` (RFC 6749 §5.2): ``error`` and an
    ``error_description``, nothing else."""
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error"] == error, body
    return body
