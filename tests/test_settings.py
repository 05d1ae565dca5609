"""Configuration: TOML plus ``BROKER_<SECTION>_<KEY>`` overrides, validated at start; and the
``broker`` command, which stops on a bad start with one line naming the problem (exit 2, never a
traceback) and otherwise serves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broker.devvault import DevVault, free_port
from broker.errors import ConfigError
from broker.settings import load_settings
from tests.conftest import LOGS
from tests.support import wait_for

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "broker.toml"


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- loading -------------------------------------------------------------------------------


def test_toml_then_environment_then_explicit_overrides(tmp_path: Path) -> None:
    path = toml(tmp_path, """
[vault]
addr = "http://vault.toml:8200"
kv_mount = "kv"
[tokens]
max_ttl_s = 600
[server]
port = 8000
[org]
budgets = [{ period = "month", limit_micros = 5_000_000 }]
""")
    settings = load_settings(path, env={
        "BROKER_VAULT_ADDR": "http://vault.env:8200",
        "BROKER_VAULT_TOKEN": "s.env-token",
        "BROKER_VAULT_TIMEOUT_S": "2.5",
        "BROKER_TOKENS_DEFAULT_TTL_S": "120",
        "BROKER_DATABASE_URL": "postgresql://broker@db:5432/broker",
        "BROKER_ISSUER_URL": "https://broker.example",
        "BROKER_ISSUER_AUDIENCE": "aud-env",
        "BROKER_BOOTSTRAP_ADMIN_SECRET": "boot-secret",
        "UNRELATED": "1",
    }, overrides={"server": {"port": 9000}})
    assert settings.vault.addr == "http://vault.env:8200"  # env beats TOML
    assert settings.vault.kv_mount == "kv"  # TOML beats the default
    assert settings.vault.token.get_secret_value() == "s.env-token"
    assert settings.vault.timeout_s == 2.5
    assert settings.tokens.max_ttl_s == 600 and settings.tokens.default_ttl_s == 120
    assert settings.database.url == "postgresql://broker@db:5432/broker"
    assert settings.issuer.url == "https://broker.example"
    assert settings.issuer.audience == "aud-env"
    assert settings.server.port == 9000  # the command line beats everything
    assert settings.org.budgets[0].limit_micros == 5_000_000
    assert settings.bootstrap_admin_secret is not None
    # Secrets are masked wherever settings are printed.
    assert "s.env-token" not in repr(settings) and "boot-secret" not in repr(settings)
    assert "s.env-token" not in str(settings)


def test_defaults_apply_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/broker.toml here
    settings = load_settings(env={})
    assert settings.database.url.startswith("sqlite:///")
    assert settings.vault.kv_mount == "secret"
    assert settings.tokens.default_ttl_s == 300 and settings.tokens.max_ttl_s == 900
    assert settings.issuer.audience == "ai-broker"


def test_the_shipped_configuration_and_its_commented_examples_are_valid(tmp_path: Path) -> None:
    """The file loads as shipped (with no provider: ``broker dev`` brings its own), and once its
    provider and model examples are uncommented too, each model naming a configured provider."""
    assert load_settings(SHIPPED, env={}).models == {}
    text = SHIPPED.read_text()
    start = text.index("# [providers.")
    examples = [re.sub(r"^# (?=\[|[a-z_]+ = )", "", line) for line in text[start:].splitlines()]
    uncommented = tmp_path / "broker.toml"
    uncommented.write_text(text[:start] + "\n".join(examples) + "\n")
    settings = load_settings(uncommented, env={})
    assert set(settings.models) == {"gpt-4o-mini", "claude-haiku"}
    for name, model in settings.models.items():
        assert model.provider in settings.providers, name


def test_the_shipped_issuer_examples_are_valid(tmp_path: Path) -> None:
    text = SHIPPED.read_text()
    start, end = text.index("# [auth.issuers."), text.index("[server]")
    block = [re.sub(r"^# (?=\[|[a-z_]+ = )", "", line) for line in text[start:end].splitlines()]
    path = toml(tmp_path, "\n".join(block) + "\n")
    settings = load_settings(path, env={})
    assert {n: i.type for n, i in settings.auth.issuers.items()} == {
        "cluster": "kubernetes", "github": "github-actions"}
    assert settings.auth.vault_tokens.enabled is False


_ISSUER = '[auth.issuers.c]\ntype = "oidc"\nissuer = "https://idp"\naudience = "a"\n'

BAD = [
    pytest.param(_ISSUER + 'jwks_url = "http://idp.example/jwks"\n', {}, "auth.issuers.c",
                 id="jwks-over-plain-http"),
    pytest.param(_ISSUER, {}, "auth.issuers.c", id="issuer-without-keys"),
    pytest.param(_ISSUER + 'jwks_url = "https://idp/j"\njwks_file = "/j"\n', {}, "auth.issuers.c",
                 id="issuer-with-two-key-sources"),
    pytest.param(_ISSUER + 'jwks_url = "https://idp/j"\nalgorithms = ["HS256"]\n', {},
                 "auth.issuers.c", id="issuer-allowing-hmac"),
    pytest.param('[auth.issuers.k]\ntype = "kubernetes"\nissuer = "kubernetes/serviceaccount"\n'
                 'audience = "a"\njwks_file = "/j"\n', {}, "auth.issuers.k",
                 id="legacy-kubernetes-issuer"),
    pytest.param(_ISSUER + 'jwks_url = "https://idp/j"\ntokenreview = true\n', {},
                 "auth.issuers.c", id="tokenreview-outside-kubernetes"),
    pytest.param('[auth.issuers.vault]\ntype = "oidc"\nissuer = "https://idp"\naudience = "a"\n'
                 'jwks_url = "https://idp/j"\n', {}, "auth.issuers", id="issuer-named-vault"),
    pytest.param('[auth.issuers.c]\ntype = "saml"\n', {}, "auth.issuers.c.type",
                 id="unknown-issuer-type"),
    pytest.param("", {"BROKER_AUTH_VAULT_TOKENS": '{"enabld": true}'}, "auth.vault_tokens.enabld",
                 id="env-typo-in-a-nested-table"),
    pytest.param('[vault]\nadr = "http://x"\n', {}, "vault.adr", id="typo-in-toml"),
    pytest.param("", {"BROKER_VAULT_ADR": "http://x"}, "vault.adr", id="typo-in-env"),
    pytest.param('[tokens]\nmax_ttl_s = "x"\n', {}, "tokens.max_ttl_s", id="text-for-int"),
    pytest.param("", {"BROKER_TOKENS_MAX_TTL_S": "x"}, "tokens.max_ttl_s", id="env-text-for-int"),
    pytest.param("[tokens]\nmax_ttl_s = 901\n", {}, "tokens.max_ttl_s", id="ttl-above-spec"),
    pytest.param("[tokens]\nmax_ttl_s = 1.5\n", {}, "tokens.max_ttl_s", id="float-for-int"),
    pytest.param("[tokens]\ndefault_ttl_s = 900\nmax_ttl_s = 60\n", {}, "tokens.default_ttl_s",
                 id="default-above-max"),
    pytest.param('[vaults]\naddr = "http://x"\n', {}, "vaults", id="unknown-section"),
    pytest.param("port = 80\n", {}, "port", id="unknown-top-level-key"),
    pytest.param("vault = 5\n", {}, "vault", id="section-not-a-table"),
    pytest.param("vault = 5\n", {"BROKER_VAULT_ADDR": "http://x"}, "vault",
                 id="section-not-a-table-with-env"),
    pytest.param('[vault]\ntimeout_s = "soon"\n', {}, "vault.timeout_s", id="text-for-float"),
    pytest.param("[server]\nport = 70000\n", {}, "server.port", id="port-out-of-range"),
    pytest.param("", {"BROKER_SERVER_PORT": "http"}, "server.port", id="env-port-text"),
    pytest.param("", {"BROKER_SWEEPER_INTERVAL_S": "-1"}, "sweeper.interval_s", id="env-negative"),
    pytest.param("", {"BROKER_DATABASE_URL": "not a url"}, "database.url", id="garbage-db-url"),
    pytest.param("", {"BROKER_DATABASE_URL": "nodriver://h/db"}, "database.url",
                 id="db-url-without-driver"),
    pytest.param('[org]\nbudgets = [{ period = "day", limit_micros = 1.5 }]\n', {},
                 "org.budgets.0.limit_micros", id="float-money"),
    pytest.param('[org]\nbudgets = [{ period = "day", limit_micros = -1 }]\n', {},
                 "org.budgets.0.limit_micros", id="negative-money"),
    pytest.param('[org]\nbudgets = [{ period = "week", limit_micros = 1 }]\n', {},
                 "org.budgets.0.period", id="unknown-period"),
    pytest.param('[providers.openai]\n[models.gpt-x]\nprovider = "openai"\n'
                 "output_micros_per_mtok = 1\n", {}, "models.gpt-x.input_micros_per_mtok",
                 id="model-without-input-price"),
    pytest.param('[providers.openai]\n[models.gpt-x]\nprovider = "openai"\n'
                 "input_micros_per_mtok = 1\n", {}, "models.gpt-x.output_micros_per_mtok",
                 id="model-without-output-price"),
    pytest.param('[providers.openai]\n[models.gpt-x]\nprovider = "openai"\n'
                 "input_micros_per_mtok = 0.5\noutput_micros_per_mtok = 1\n", {},
                 "models.gpt-x.input_micros_per_mtok", id="float-price"),
    pytest.param('[models.gpt-x]\nprovider = "nobody"\ninput_micros_per_mtok = 1\n'
                 "output_micros_per_mtok = 1\n", {}, "models.gpt-x.provider",
                 id="model-of-unknown-provider"),
    pytest.param('[providers.openai]\nbase_ur = "http://x"\n', {}, "providers.openai.base_ur",
                 id="typo-in-provider"),
    pytest.param("[tokens\nmax_ttl_s = 1\n", {}, "broker.toml", id="toml-syntax-error"),
    pytest.param('[server]\ntrusted_proxies = ["10.0.0.0/8", "proxy.local"]\n', {},
                 "server.trusted_proxies", id="trusted-proxy-not-a-cidr"),
    pytest.param("", {"BROKER_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, nope"},
                 "server.trusted_proxies", id="env-trusted-proxy-not-a-cidr"),
    pytest.param("[gateway]\nmax_stream_s = 590\n", {}, "gateway.max_stream_s",
                 id="stream-longer-than-the-orphan-threshold"),
    pytest.param('[providers.openai]\ntimeout_s = 900\n', {}, "providers.openai.timeout_s",
                 id="provider-timeout-longer-than-the-orphan-threshold"),
    pytest.param('[providers.openai]\n[models.gpt-x]\nprovider = "openai"\n'
                 "input_micros_per_mtok = 1\noutput_micros_per_mtok = 1\n"
                 "service_tier_percent = { priority = 0 }\n", {},
                 "models.gpt-x.service_tier_percent", id="tier-percent-zero"),
    pytest.param('[providers.openai]\n[models.gpt-x]\nprovider = "openai"\n'
                 'input_micros_per_mtok = 1\noutput_micros_per_mtok = 1\nimage_rule = "tiles"\n',
                 {}, "models.gpt-x.image_rule", id="unknown-image-rule"),
]


@pytest.mark.parametrize(("text", "env", "key"), BAD)
def test_a_bad_key_or_value_is_named(tmp_path: Path, text: str, env: dict[str, str],
                                     key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(toml(tmp_path, text), env=env)
    message = str(err.value)
    assert key in message, message
    assert "\n" not in message, "one line"


def test_a_missing_configuration_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        load_settings(tmp_path / "nowhere.toml", env={})


def test_a_bad_secret_value_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(toml(tmp_path, "[vault]\ntoken = 12345678987654321\n"), env={})
    assert "vault.token" in str(err.value)
    assert "12345678987654321" not in str(err.value)


# --- the command line ----------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "BAO_"))}
    env.update(extra)
    return env


def broker_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    LOGS.append(done.stdout + done.stderr)  # the leak scan reads what the command printed
    return done


def assert_refused_start(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("broker: "), lines
    for needle in needles:
        assert needle in lines[0], lines


@pytest.fixture
def live_env(vault: DevVault, tmp_path: Path) -> dict[str, str]:
    """A fresh SQLite path and the session's real OpenBao."""
    return _env(BROKER_DATABASE_URL=f"sqlite:///{tmp_path}/cli.db", BROKER_VAULT_ADDR=vault.addr,
                BROKER_VAULT_TOKEN=vault.root_token,
                BROKER_VAULT_PREFIX=f"cli-{os.urandom(4).hex()}")


def test_cli_stops_on_a_bad_config_key(tmp_path: Path, live_env: dict[str, str]) -> None:
    done = broker_cli(["serve", "--config", str(SHIPPED)], {**live_env, "BROKER_VAULT_ADR": "x"},
                      tmp_path)
    assert_refused_start(done, "vault.adr")


def test_cli_stops_on_a_bad_value(tmp_path: Path, live_env: dict[str, str]) -> None:
    done = broker_cli(["migrate"], {**live_env, "BROKER_TOKENS_MAX_TTL_S": "x"}, tmp_path)
    assert_refused_start(done, "tokens.max_ttl_s")
    done = broker_cli(["serve"], {**live_env, "BROKER_DATABASE_URL": "garbage"}, tmp_path)
    assert_refused_start(done, "database.url")


def test_cli_stops_on_a_missing_config_file(tmp_path: Path, live_env: dict[str, str]) -> None:
    done = broker_cli(["serve", "--config", "nowhere.toml"], live_env, tmp_path)
    assert_refused_start(done, "nowhere.toml")


def test_serve_refuses_an_unmigrated_database(tmp_path: Path, live_env: dict[str, str]) -> None:
    done = broker_cli(["serve", "--port", str(free_port())], live_env, tmp_path)
    assert_refused_start(done, "broker migrate")


def test_serve_refuses_when_vault_does_not_answer(tmp_path: Path,
                                                  live_env: dict[str, str]) -> None:
    env = {**live_env, "BROKER_VAULT_ADDR": "http://127.0.0.1:1"}
    done = broker_cli(["serve", "--port", str(free_port())], env, tmp_path)
    assert_refused_start(done, "Vault", "127.0.0.1:1")


def test_serve_refuses_a_vault_token_that_cannot_read(tmp_path: Path,
                                                      live_env: dict[str, str]) -> None:
    done = broker_cli(["serve"], {**live_env, "BROKER_VAULT_TOKEN": "wrong-token"}, tmp_path)
    assert_refused_start(done, "Vault")


def test_migrate_refuses_when_the_database_does_not_answer(tmp_path: Path,
                                                           live_env: dict[str, str]) -> None:
    env = {**live_env, "BROKER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}
    done = broker_cli(["migrate"], env, tmp_path)
    assert_refused_start(done, "database.url")


def _serve_until_healthy(args: list[str], env: dict[str, str], cwd: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", *args, "--port", str(port)],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=60, interval=0.2, what="broker serve becoming healthy")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        jwks = httpx.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=10).json()
        assert jwks["keys"]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        LOGS.append(out)
    # A shutdown that was asked for and completed is a success.
    assert proc.returncode == 0, out
    assert "Application shutdown complete" in out, out
    assert "Traceback" not in out, out


def test_migrate_then_serve(tmp_path: Path, live_env: dict[str, str]) -> None:
    first = broker_cli(["migrate", "--config", str(SHIPPED)], live_env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "database migrated to" in first.stdout
    again = broker_cli(["migrate", "--config", str(SHIPPED)], live_env, tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout  # idempotent
    _serve_until_healthy(["serve", "--config", str(SHIPPED)], live_env, tmp_path)


def test_serve_migrates_when_told_to(tmp_path: Path, live_env: dict[str, str]) -> None:
    _serve_until_healthy(["serve", "--migrate"], live_env, tmp_path)


def test_env_overrides_reach_lists_and_named_tables(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[providers.openai-compatible]\nbase_url = "http://old"\n'
        '[models.gpt-4o]\nprovider = "openai-compatible"\n'
        "input_micros_per_mtok = 1\noutput_micros_per_mtok = 2\n"
        '[models.gpt-4o-mini]\nprovider = "openai-compatible"\n'
        "input_micros_per_mtok = 3\noutput_micros_per_mtok = 4\n"
    )
    settings = load_settings(path, env={
        "BROKER_ORG_BUDGETS": '[{"period": "day", "limit_micros": 5}]',
        "BROKER_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL": "http://new",
        "BROKER_MODELS_GPT_4O_MINI_OUTPUT_MICROS_PER_MTOK": "7",
    })
    assert [(b.period, b.limit_micros) for b in settings.org.budgets] == [("day", 5)]
    assert settings.providers["openai-compatible"].base_url == "http://new"
    assert settings.models["gpt-4o-mini"].output_micros_per_mtok == 7
    assert settings.models["gpt-4o"].output_micros_per_mtok == 2


def test_nested_tables_come_from_the_environment_as_json(tmp_path: Path) -> None:
    issuer = {"type": "spiffe", "issuer": "https://spire", "jwks_url": "https://spire/keys",
              "audience": "ai-broker"}
    settings = load_settings(None, env={
        "BROKER_AUTH_ISSUERS": json.dumps({"spire": issuer}),
        "BROKER_AUTH_VAULT_TOKENS": '{"enabled": true}',
        "BROKER_TOKENS_MAX_DELEGATION_DEPTH": "1"})
    assert settings.auth.issuers["spire"].jwks_url == "https://spire/keys"
    assert settings.auth.vault_tokens.enabled is True
    assert settings.tokens.max_delegation_depth == 1


def test_trusted_proxies_and_the_metrics_token_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("")
    for raw in ("10.0.0.0/8, 192.168.1.0/24", '["10.0.0.0/8", "192.168.1.0/24"]'):
        settings = load_settings(path, env={"BROKER_SERVER_TRUSTED_PROXIES": raw,
                                            "BROKER_METRICS_TOKEN": "scrape-me"})
        assert settings.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.0/24")
        assert settings.metrics.token is not None
        assert "scrape-me" not in repr(settings)  # a secret value is masked


@pytest.mark.parametrize(("env", "names"), [
    pytest.param({"BROKER_PROVIDERS_NOPE_BASE_URL": "x"}, "BROKER_PROVIDERS_NOPE_BASE_URL",
                 id="unknown-provider"),
    pytest.param({"BROKER_ORG_BUDGETS": '[{"period": "day", "limit_micros": 1.5}]'}, "org.budgets",
                 id="float-money-in-json"),
    pytest.param({"BROKER_ORG_BUDGETS": "not json"}, "org.budgets", id="not-json"),
])
def test_bad_env_overrides_name_the_key(tmp_path: Path, env: dict[str, str], names: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_settings(path, env=env)
