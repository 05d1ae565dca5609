"""The admin console in a real browser: Debian's chromium driven by Playwright, against a live
broker with real spend (the fake provider's). Few tests, one browser for the module.

Every page is checked for what only a browser tells: the Content-Security-Policy holds (no
violation and no console error on any page, and an injected inline script is refused), the
page works by keyboard (the skip link comes first, focus is visible), and a click reaches the
API (a suspension clicked here refuses the workload's token). A screenshot of each page is kept
under the test's temporary folder; with ``BROKER_UPDATE_SCREENSHOTS=1`` the overview's also
replaces ``docs/console-overview.png``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, sync_playwright
from sqlalchemy import text

from tests.conftest import ADMIN_SECRET, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env

CHROMIUM = shutil.which("chromium")
# Skipped on a developer's machine without the package; CI installs it (.ci/run) and sets
# BROKER_REQUIRE_BROWSER, so there a missing browser fails instead of passing silently.
if CHROMIUM is None and os.environ.get("BROKER_REQUIRE_BROWSER"):
    raise RuntimeError("BROKER_REQUIRE_BROWSER is set but Debian's chromium is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console-overview.png"
# Collects every CSP violation the page reports, before any of its own scripts run (an init
# script is the browser's, not the page's: the policy does not apply to it).
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield launched
        launched.close()


class Watched:
    """A page whose console errors and CSP violations are collected: any one fails the test."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.add_init_script(WATCH_CSP)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("dialog", self._dialog)
        self.dialogs: list[str] = []

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console {message.type}: {message.text}")

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()

    def visit(self, path: str) -> Page:
        resp = self.page.goto(path)
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        self.check(path)
        return self.page

    def check(self, where: str) -> None:
        page = self.page
        violations = page.evaluate("window.__csp")
        assert violations == [], f"{where}: CSP violations {violations}"
        assert self.errors == [], f"{where}: {self.errors}"
        # No inline script or style at all: the policy would refuse them, and the page must not
        # depend on anything it refuses.
        counts = page.evaluate("""() => ({
            inlineScripts: document.querySelectorAll("script:not([src])").length,
            styleAttrs: document.querySelectorAll("[style]").length,
            styleTags: document.querySelectorAll("style").length,
            unlabelled: [...document.querySelectorAll("input:not([type=hidden]), textarea, select")]
                .filter((el) => !el.labels || el.labels.length === 0).map((el) => el.name),
            lang: document.documentElement.lang,
        })""")
        assert counts["inlineScripts"] == counts["styleAttrs"] == counts["styleTags"] == 0, counts
        assert counts["unlabelled"] == [] and counts["lang"] == "en", (where, counts)

    def shoot(self, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Callable[[Broker], Watched]]:
    opened: list[Watched] = []

    def factory(broker: Broker) -> Watched:
        assert broker.url is not None
        page = Watched(browser, broker.url)
        opened.append(page)
        return page

    yield factory
    for page in opened:
        page.close()


@pytest.fixture
def spend_env(make_live_broker: Callable[..., Broker], sqlite_url: str,
              fake: FakeProviderServer) -> Env:
    """A live broker in front of the fake provider, with an organisation budget."""
    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        sections["org"] = {"budgets": [{"period": "month", "limit_micros": 40_000_000}]}

    return make_env(make_live_broker, sqlite_url, fake, adjust=adjust)


def _budgeted_agent(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    broker = env.broker
    tenant = broker.create_tenant("research", budgets=[
        {"period": "day", "limit_micros": 4_000_000}, {"period": "month", "limit_micros": 25_000_000}])
    agent = broker.create_workload(tenant["id"], name="summariser", policy={
        "models": ["gpt-test"], "token_budget_micros": 500_000, "max_live_tokens": 100,
        "budgets": [{"period": "day", "limit_micros": 3_000_000}]})
    return tenant, agent


def _history(env: Env, tenant_id: str, workload_id: str) -> None:
    """Two weeks of past spend, as the gateway would have recorded it, so the charts have a
    shape (today's spend is real: the test's own calls)."""
    now = int(time.time())
    day = now - now % 86_400
    with env.broker.services.db.engine.begin() as conn:
        for i in range(1, 14):
            cost = 300_000 + (i * 487_000) % 2_600_000
            conn.execute(text(
                "INSERT INTO usage_event (id, request_id, ts, tenant_id, workload_id, jti, model, "
                "provider, prompt_tokens, completion_tokens, cost_micros, status, latency_ms, "
                "stream, estimated) VALUES (:id, :id, :ts, :t, :w, 'past', 'gpt-test', "
                "'fake-openai', 1000, 500, :c, 'ok', 200, false, false)"),
                {"id": f"hist-{i}", "ts": day - i * 86_400 + 43_200, "t": tenant_id,
                 "w": workload_id, "c": cost})


def test_every_page_in_a_browser_keeps_the_policy_and_works_by_keyboard(
        spend_env: Env, watched: Callable[[Broker], Watched], tmp_path: Path) -> None:
    env = spend_env
    broker = env.broker
    tenant, agent = _budgeted_agent(env)
    token = broker.token(agent["client_id"], agent["client_secret"])
    for _ in range(3):
        resp = broker.client.post("/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                                  json={"model": "gpt-test",
                                        "messages": [{"role": "user", "content": "hello"}]})
        assert resp.status_code == 200, resp.text
    env.wait_for_events(3)
    _history(env, tenant["id"], agent["id"])

    w = watched(broker)
    page = w.visit("/console/")
    assert page.url.endswith("/console/sign-in")
    # The first Tab reaches the skip link, and focus is visible.
    page.keyboard.press("Tab")
    focused = page.evaluate("""() => {
        const el = document.activeElement;
        const style = getComputedStyle(el);
        return {text: el.textContent, outline: style.outlineStyle, width: style.outlineWidth};
    }""")
    assert focused["text"] == "Skip to main content", focused
    assert focused["outline"] != "none" and focused["width"] != "0px", focused
    w.shoot(tmp_path / "screenshots", "sign-in")

    # Sign in by keyboard alone.
    page.get_by_label("Client id").fill("admin")
    page.get_by_label("Client secret").fill(ADMIN_SECRET)
    page.get_by_label("Client secret").press("Enter")
    page.wait_for_url("**/console/")
    w.check("overview")
    assert page.get_by_role("heading", name="Overview").is_visible()
    assert page.locator("svg[role=img]").count() == 3  # the organisation, tenant, workload
    assert page.get_by_text("daily budget $3.00").count() == 1
    shot = w.shoot(tmp_path / "screenshots", "overview")
    if os.environ.get("BROKER_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    # The policy is in force, not just sent: an inline script is refused, and reported.
    with pytest.raises(Exception, match=r"(?i)content security policy|refused"):
        page.add_script_tag(content="window.__inline = 1")
    assert page.evaluate("window.__inline === undefined")
    assert page.evaluate("window.__csp.length") >= 1
    page.evaluate("window.__csp = []")
    w.errors.clear()

    pages = {"tenants": "/console/tenants", "tenant": f"/console/tenants/{tenant['id']}",
             "workload": f"/console/workloads/{agent['id']}", "approvals": "/console/approvals",
             "alerts": "/console/alerts", "audit": "/console/audit",
             "providers": "/console/providers"}
    for name, path in pages.items():
        w.visit(path)
        w.shoot(tmp_path / "screenshots", name)
    # Navigating by the links, as a user does.
    w.visit("/console/")
    page.get_by_role("link", name="Tenants and workloads").click()
    page.get_by_role("link", name="research").click()
    page.get_by_role("link", name="summariser").click()
    w.check("workload by links")
    assert page.get_by_role("heading", name="Live tokens").is_visible()
    assert page.locator("table", has_text="Live tokens of summariser").locator("tbody tr").count() >= 1
    page.goto("/console/no-such-page")
    assert page.get_by_role("alert").inner_text().startswith("404")
    w.errors = [e for e in w.errors if "404" not in e]  # the browser logs the 404 itself
    w.check("not found")


def test_a_suspension_clicked_in_the_console_refuses_the_workload_at_the_api(
        spend_env: Env, watched: Callable[[Broker], Watched], tmp_path: Path,
        recorded_logs: list[str]) -> None:
    broker = spend_env.broker
    _tenant, agent = _budgeted_agent(spend_env)
    token = broker.token(agent["client_id"], agent["client_secret"])
    bearer = {"authorization": f"Bearer {token}"}
    assert broker.client.get("/v1/models", headers=bearer).status_code == 200

    w = watched(broker)
    page = w.visit("/console/sign-in")
    # Signed in with a pasted admin token this time.
    admin_token = broker.admin_token()
    page.get_by_label("Access token").fill(admin_token)
    page.get_by_role("button", name="Sign in with token").click()
    page.wait_for_url("**/console/")
    w.visit(f"/console/workloads/{agent['id']}")
    page.get_by_label("Reason for suspending").fill("clicked in the console")
    page.get_by_role("button", name="Suspend workload").click()
    page.wait_for_url(f"**/console/workloads/{agent['id']}?notice=suspended")
    w.check("after suspending")
    assert w.dialogs and w.dialogs[0].startswith("Suspend summariser?")
    assert "Suspended" in page.get_by_role("status").inner_text()
    assert page.get_by_text("suspended", exact=True).count() >= 1
    w.shoot(tmp_path / "screenshots", "suspended")

    # The API refuses the workload's token, and any new one.
    assert broker.client.get("/v1/models", headers=bearer).status_code == 401
    resp = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"

    # A form without its token (a forged POST) is refused with a page, nothing changed.
    page.evaluate("document.querySelector('form[action$=\"/resume\"] input[name=csrf]').value = 'x'")
    page.get_by_role("button", name="Resume workload").click()
    assert page.get_by_role("alert").inner_text().startswith("403")
    w.errors = [e for e in w.errors if "403" not in e]
    w.check("refused")
    detail = broker.client.get(f"/v1/admin/workloads/{agent['id']}", headers=broker.admin()).json()
    assert detail["suspended"] is True

    # Signing out ends the session: the console asks for a sign-in again.
    w.visit(f"/console/workloads/{agent['id']}")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/sign-in?notice=signed-out")
    w.visit("/console/tenants")
    assert page.url.endswith("/console/sign-in")
    # Nothing typed into the console reached a log line.
    assert not any(admin_token in line or ADMIN_SECRET in line for line in recorded_logs)


def _sign_in(w: Watched, client_id: str, secret: str) -> Page:
    page = w.visit("/console/sign-in")
    page.get_by_label("Client id").fill(client_id)
    page.get_by_label("Client secret").fill(secret)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url("**/console/")
    w.check("signed in")
    return page


def test_in_the_browser_roles_hold_and_the_cookie_is_locked_down(
        spend_env: Env, watched: Callable[[Broker], Watched], tmp_path: Path) -> None:
    """A tenant-admin sees its own tenant only, an auditor sees everything and can press
    nothing, and the session cookie is one scripts cannot read nor other sites send."""
    broker = spend_env.broker
    mine, agent = _budgeted_agent(spend_env)
    other = broker.create_tenant("elsewhere")
    theirs = broker.create_workload(other["id"], name="their-agent")
    tenant_admin = broker.create_workload(mine["id"], kind="admin", roles=["tenant-admin"])
    auditor = broker.create_workload("tn_root", kind="admin", roles=["auditor"])

    w = watched(broker)
    page = _sign_in(w, tenant_admin["client_id"], tenant_admin["client_secret"])
    [cookie] = [c for c in w.context.cookies() if c["name"] == "broker_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # plain HTTP here; over HTTPS it is Secure and __Host-
    assert page.evaluate("document.cookie") == ""  # invisible to the page's scripts
    w.visit("/console/tenants")
    assert page.get_by_role("link", name="research").count() == 1
    assert page.get_by_text("elsewhere").count() == 0
    resp = page.goto(f"/console/workloads/{theirs['id']}")
    assert resp is not None and resp.status == 404  # another tenant's is not there at all
    w.errors = [e for e in w.errors if "404" not in e]
    w.visit(f"/console/workloads/{agent['id']}")
    assert page.get_by_role("button", name="Suspend workload").count() == 1
    w.shoot(tmp_path / "screenshots", "tenant-admin")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/sign-in?notice=signed-out")

    page = _sign_in(w, auditor["client_id"], auditor["client_secret"])
    w.visit("/console/tenants")
    assert page.get_by_text("elsewhere").count() == 1  # every tenant
    for path in (f"/console/workloads/{agent['id']}", "/console/approvals", "/console/alerts",
                 f"/console/tenants/{mine['id']}"):
        w.visit(path)
        pressable = [b for b in page.get_by_role("button").all_inner_texts()
                     if b.strip() not in ("Sign out", "Filter")]
        assert pressable == [], (path, pressable)
    w.shoot(tmp_path / "screenshots", "auditor")
