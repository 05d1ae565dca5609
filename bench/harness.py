"""Shared machinery for the benchmarks: server processes, a seeded broker, the wrk load generator,
tables, the RESULTS.md writer and a py-spy profile summary.

Every server runs in its own process; the load generator (``wrk``, one thread, closed loop, one
connection per unit of concurrency, keep-alive) is another process. Throughput and latencies come
from wrk's own counters, so the Python side only orchestrates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.devvault import DevVault, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PYTHON = sys.executable


# --- processes -------------------------------------------------------------------------------


class ServerProcess:
    """A server in a child process, ready once ``ready_path`` answers (200, unless ``any_status``)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/",
        any_status: bool = False,
        log_dir: Path,
        cwd: Path = ROOT,
    ):
        self.name = name
        self.cwd = cwd
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(env) if env is not None else _clean_env()
        self.ready_path = ready_path
        self.any_status = any_status
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(self.url + self.ready_path, timeout=1).status_code
                if status == 200 or self.any_status:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _clean_env() -> dict[str, str]:
    """The parent's environment without BROKER_*/VAULT_* variables that could leak into a server."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "BAO_"))}


def bare_server(log_dir: Path) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "bench.servers", "bare", "--port", str(port)]
    return ServerProcess("bare", argv, port, ready_path="/bare", log_dir=log_dir)


def mock_upstream_server(log_dir: Path) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "bench.servers", "mock-upstream", "--port", str(port)]
    # The fake provider refuses a request without an API key, as a real one does: any answer will do.
    return ServerProcess("mock-upstream", argv, port, ready_path="/v1/models", any_status=True,
                         log_dir=log_dir)


# --- the broker --------------------------------------------------------------------------------

HUGE = 10**15  # settings.MAX_MICROS: budgets no run of this benchmark can exhaust


@dataclass
class Identity:
    client_id: str
    client_secret: str = field(repr=False)
    workload_id: str


# A load generator is one client of one tenant: lift the per-client and per-tenant caps that
# would otherwise (rightly) throttle it. Unknown to an older checkout, so only for this one.
_UNLIMITED_TOML = """
[auth]
issuance_rpm = 1000000

[gateway]
tenant_max_concurrent = 1000000
"""


@dataclass
class BrokerUnderTest:
    """A real ``broker serve`` process on SQLite (WAL) in a temp dir, against an OpenBao dev server."""

    vault: DevVault
    workdir: Path
    extra_toml: str = ""
    admin_secret: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(32), repr=False)
    server: ServerProcess | None = None
    port: int = field(default_factory=free_port)
    # Another checkout of the broker to run instead of this one (e.g. the code before a change,
    # measured side by side in the same run): put first on the server's PYTHONPATH.
    source: Path | None = None
    # PostgreSQL instead of the SQLite file (replicas share it), and the Vault prefix replicas
    # share (their signing keys); a fresh one per broker otherwise.
    database_url: str | None = None
    vault_prefix: str = field(default_factory=lambda: f"bench-{secrets.token_hex(4)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / ("broker.db" if self.source is None else f"broker-{self.port}.db")

    def config_text(self) -> str:
        return f"""
[database]
url = "{self.database_url or f"sqlite:///{self.db_path}"}"

[vault]
addr = "{self.vault.addr}"
kv_mount = "secret"
prefix = "{self.vault_prefix}"

[issuer]
url = "{self.url}"
audience = "ai-broker"

[tokens]
default_ttl_s = 900
max_ttl_s = 900

[server]
host = "127.0.0.1"
port = {self.port}

[org]
budgets = [{{ period = "total", limit_micros = {HUGE} }}]
{self.extra_toml}
{"" if self.source is not None else _UNLIMITED_TOML}
"""

    def start(self) -> BrokerUnderTest:
        config = self.workdir / f"broker-{self.port}.toml"
        config.write_text(self.config_text())
        env = _clean_env()
        if self.source is not None:
            # ``python -m`` puts its working directory first on sys.path: run from the checkout.
            env["PYTHONPATH"] = str(self.source)
        env["BROKER_VAULT_TOKEN"] = self.vault.root_token
        env["BROKER_BOOTSTRAP_ADMIN_SECRET"] = self.admin_secret
        argv = [PYTHON, "-m", "broker.cli", "serve", "--config", str(config), "--migrate"]
        self.server = ServerProcess(
            "broker" if self.source is None else f"broker-{self.port}", argv, self.port, env=env,
            ready_path="/healthz", log_dir=self.workdir,
            cwd=ROOT if self.source is None else self.source,
        ).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    # Seeding goes through the admin API, exactly as an operator would.

    def token(self, client_id: str, secret: str, **params: str) -> str:
        resp = httpx.post(
            self.url + "/v1/token",
            data={"grant_type": "client_credentials", "client_id": client_id,
                  "client_secret": secret, **params},
            timeout=30,
        )
        resp.raise_for_status()
        token: str = resp.json()["access_token"]
        return token

    def _admin_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"authorization": "Bearer " + self.token("admin", self.admin_secret)}
        resp = httpx.post(self.url + path, json=body, headers=headers, timeout=30)
        if resp.status_code != 201:
            raise RuntimeError(f"POST {path}: {resp.status_code} {resp.text}")
        out: dict[str, Any] = resp.json()
        return out

    def create_tenant(self) -> str:
        budgets = [{"period": "total", "limit_micros": HUGE}]
        body = {"name": f"bench-{secrets.token_hex(3)}", "budgets": budgets}
        tenant_id: str = self._admin_post("/v1/admin/tenants", body)["id"]
        return tenant_id

    def create_workload(self, tenant_id: str, kind: str, policy: dict[str, Any]) -> Identity:
        body: dict[str, Any] = {"tenant_id": tenant_id, "kind": kind, "policy": policy,
                                "name": f"bench-{kind}-{secrets.token_hex(3)}"}
        if self.source is not None:
            # An older checkout refuses the policy fields it does not know (strict bodies):
            # each one it names goes, and only those, so that it keeps every cap it knows.
            for _ in NEWER_POLICY_FIELDS:
                resp = self._admin_try("/v1/admin/workloads", body)
                unknown = [f for f in NEWER_POLICY_FIELDS if f"policy.{f}: unknown field" in resp.text]
                if resp.status_code != 422 or not unknown:
                    break
                body["policy"] = {k: v for k, v in body["policy"].items() if k not in unknown}
        out = self._admin_post("/v1/admin/workloads", body)
        return Identity(out["client_id"], out["client_secret"], out["id"])

    def create_bound_workload(self, tenant_id: str, kind: str, policy: dict[str, Any],
                              bindings: Sequence[Mapping[str, Any]]) -> Identity:
        """A workload with a client secret and ``bindings``: the external identities (issuers
        configured in ``extra_toml``) whose tokens it may exchange for its own."""
        body = {"tenant_id": tenant_id, "kind": kind, "policy": policy,
                "name": f"bench-{kind}-{secrets.token_hex(3)}", "bindings": [dict(b) for b in bindings]}
        out = self._admin_post("/v1/admin/workloads", body)
        return Identity(out["client_id"], out["client_secret"], out["id"])

    def _admin_try(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A dry run of a creation's validation: an invalid body answers 422 and creates
        nothing; a valid one is created, so only a body known to fail is ever tried."""
        headers = {"authorization": "Bearer " + self.token("admin", self.admin_secret)}
        probe = {**body, "tenant_id": "tn_bench_probe_nonexistent"}
        return httpx.post(self.url + path, json=probe, headers=headers, timeout=30)


MOCK_MODEL = "gpt-4o-mini"  # priced as in broker/dev.py, served by the in-process mock provider
MOCK_TOML = f"""
[providers.mock]
plugin = "mock"

[models."{MOCK_MODEL}"]
provider = "mock"
upstream_model = "mock-gpt"
input_micros_per_mtok = 150000
output_micros_per_mtok = 600000
"""


NEWER_POLICY_FIELDS = ("max_live_tokens", "max_concurrent", "monitoring")

# Every detector still runs on the load (its cost is part of what a benchmark measures), but
# none acts: a load generator repeating one request is a "loop" the monitor would suspend.
WATCHED_NOT_ACTED_ON = {detector: "off" for detector in
                        ("loop", "failures", "velocity", "new_model", "origin")}


def bench_policy(models: Sequence[str], token_budget_micros: int, *,
                 acted_on: bool = False) -> dict[str, Any]:
    """A policy no benchmark run can exhaust or rate-limit: budgets far above what it spends,
    and caps on live tokens and concurrent calls far above what the load generator opens. The
    monitor watches its calls; only with ``acted_on`` do its findings act."""
    policy: dict[str, Any] = {
        "models": list(models),
        "token_ttl_s": 900,
        "token_budget_micros": token_budget_micros,
        "budgets": [{"period": "total", "limit_micros": HUGE}],
        "rate": {"rpm": 1_000_000, "tpm": 10**12},
        "max_live_tokens": 1_000_000,
        "max_concurrent": 1_000_000,
    }
    if not acted_on:
        policy["monitoring"] = dict(WATCHED_NOT_ACTED_ON)
    return policy


# --- wrk -------------------------------------------------------------------------------------

_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for ASCII


@dataclass(frozen=True)
class Target:
    """One HTTP request that wrk repeats: the thing measured in one row."""

    name: str
    url: str
    method: str = "GET"
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    pids: tuple[int, ...] = ()  # the processes serving it, for CPU accounting

    def lua(self) -> str:
        lines = [f"wrk.method = {_lua_string(self.method)}"]
        if self.body:
            lines.append(f"wrk.body = {_lua_string(self.body)}")
        for name, value in self.headers:
            lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
        return "\n".join(lines) + "\n" + _DONE_LUA


@dataclass(frozen=True)
class Measurement:
    target: str
    concurrency: int
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    server_cpus: tuple[float, ...]  # cores used by each server process of the target (Target.pids)
    wrk_cpu: float  # cores used by wrk
    other_cpu: float  # cores used by everything else on the machine (other users' work)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def server_cpu(self) -> float:
        return sum(self.server_cpus)

    @property
    def per_cpu_s(self) -> float:
        """Requests per second of server CPU: what a row costs, less sensitive than req/s to
        other processes taking the cores."""
        return self.requests / (self.server_cpu * self.duration_s) if self.server_cpu else 0.0

    @property
    def server_cpu_text(self) -> str:
        return " + ".join(f"{c:.2f}" for c in self.server_cpus)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


# --- CPU accounting: the machine is shared, so each row says how busy the rest of it was ---------

_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICK


def _process_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(pids: Sequence[int], max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait_s``) for a half second in which the rest of the machine uses
    under ``threshold`` cores; return the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        m0, p0, t0 = _machine_busy_s(), sum(_process_cpu_s(p) for p in pids), time.monotonic()
        time.sleep(0.5)
        dt_s = time.monotonic() - t0
        other = (_machine_busy_s() - m0 - (sum(_process_cpu_s(p) for p in pids) - p0)) / dt_s
        if other < threshold or time.monotonic() >= deadline:
            return other


def run_wrk(target: Target, concurrency: int, duration_s: float, workdir: Path) -> Measurement:
    script = workdir / f"wrk-{re.sub(r'[^a-z0-9]+', '-', target.name.lower())}.lua"
    script.write_text(target.lua())
    pids = target.pids
    m0, p0 = _machine_busy_s(), [_process_cpu_s(p) for p in pids]
    w0, t0 = _children_cpu_s(), time.monotonic()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "20s",
         "-s", str(script), target.url],
        capture_output=True, text=True, check=True,
    )
    wall = time.monotonic() - t0
    servers = [_process_cpu_s(p) - before for p, before in zip(pids, p0, strict=True)]
    wrk = _children_cpu_s() - w0
    other = max(0.0, _machine_busy_s() - m0 - sum(servers) - wrk)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len("BENCH_JSON "):])
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return Measurement(
        target=target.name, concurrency=concurrency, requests=data["requests"],
        duration_s=data["duration_us"] / 1e6, errors=errors,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        server_cpus=tuple(c / wall for c in servers), wrk_cpu=wrk / wall, other_cpu=other / wall,
    )


def measure(
    target: Target,
    concurrency: int,
    *,
    warmup_s: float,
    duration_s: float,
    workdir: Path,
    quiet_wait_s: float = 5.0,
) -> Measurement:
    """Wait briefly for a quiet machine, warm up (discarded), then measure for ``duration_s``."""
    if quiet_wait_s > 0:
        wait_quiet(target.pids, quiet_wait_s)
    if warmup_s > 0:
        run_wrk(target, concurrency, warmup_s, workdir)
    m = run_wrk(target, concurrency, duration_s, workdir)
    print(
        f"  c={concurrency:<3} {target.name:<36} {m.rps:8.0f} req/s  p50 {m.p50_ms:7.2f} ms  "
        f"p99 {m.p99_ms:7.2f} ms  err {m.errors}  cpu: server {m.server_cpu_text} wrk {m.wrk_cpu:.2f} "
        f"other {m.other_cpu:.2f}",
        flush=True,
    )
    return m


# --- reporting ---------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


CPU_COLUMNS_NOTE = (
    "CPU columns are cores busy during the measured seconds: the server process(es) of the row "
    "(one uvicorn worker is at most 1.0 plus time in threads outside the GIL; `a + b` when a row "
    "has two server processes, in the order the row's name gives), wrk, and all other "
    "processes on this shared machine (other people's work; high values make a row less reliable). "
    "`req per server CPU-s` divides the requests by the server processes' CPU seconds: the cost of "
    "one request, which other load on the machine disturbs less than req/s."
)


def results_table(results: Sequence[Measurement], concurrencies: Sequence[int], *, ceiling: str) -> str:
    """One row per (concurrency, target), with throughput relative to the ``ceiling`` target."""
    by = {(m.target, m.concurrency): m for m in results}
    names = list(dict.fromkeys(m.target for m in results))
    rows = []
    for c in concurrencies:
        top = by.get((ceiling, c))
        for name in names:
            m = by.get((name, c))
            if m is None:
                continue
            rel = "1.00" if name == ceiling else (f"{m.rps / top.rps:.3f}" if top else "")
            rows.append((str(c), name, f"{m.rps:,.0f}", rel, f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}",
                         str(m.errors), f"{m.per_cpu_s:,.0f}", m.server_cpu_text, f"{m.wrk_cpu:.2f}",
                         f"{m.other_cpu:.2f}"))
    return table(rows, ["conc.", "target", "req/s", "÷ ceiling", "p50 ms", "p99 ms", "errors",
                        "req per server CPU-s", "CPU server", "CPU wrk", "CPU other"])


def machine_description() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        wrk_version = first.split("[", 1)[0].strip()
    import starlette
    import uvicorn

    return (
        f"{os.cpu_count()} CPUs (`nproc`), {cpu}; Python {platform.python_version()}, "
        f"uvicorn {uvicorn.__version__} (loop/http: {_uvicorn_impls()}), "
        f"starlette {starlette.__version__}; load generator {wrk_version.strip() or 'wrk'}"
    )


def _uvicorn_impls() -> str:
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop}/{http}"


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


_HEADER = """# Benchmark results

Produced by `bench/run.sh` (or `python -m bench`, or one benchmark at a time:
`python -m bench.bench_tokens`, `python -m bench.bench_gateway`). Each `<!-- name:start/end -->`
section is rewritten by its own benchmark; the "Analysis" sections are written by hand and name the
run they read. Figures within a section come from one run, measured side by side. These are
measurements, not tests: nothing here is asserted. The revocation benchmark writes
`bench/RESULTS-revocation.md`.
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def publish(name: str, text: str, *, write: bool) -> int:
    """Print a benchmark's report and, unless told not to, write it as its section of
    RESULTS.md; the benchmark's exit status."""
    print(text)
    if write:
        write_section(name, text)
        print(f"written to {RESULTS}")
    return 0


def profile_section(title: str, pid: int, target: Target, seconds: float, work: Path) -> str:
    """A profile under load (concurrency 16) as a report section headed ``title``."""
    return f"""
### {title} (py-spy {PROFILE_HZ} Hz, concurrency 16, {seconds:g} s each)

{profile_under_load(pid, target, 16, seconds, work)}
"""


# --- profiling ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(PYTHON).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


PROFILE_HZ = 200


@contextlib.contextmanager
def profiled(pid: int, seconds: float, out: Path, *, gil_only: bool = False) -> Iterator[None]:
    """py-spy recording ``pid`` for ``seconds`` while the body runs (the body drives load).

    Non-blocking sampling: the broker is never paused, at the price of a few unreadable samples.
    """
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    argv = [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(PROFILE_HZ),
            "-f", "raw", "-o", str(out), "--threads", "--nonblocking"]
    if gil_only:
        argv.append("--gil")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    try:
        yield
    finally:
        _, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]+?)(?::\d+)?\)$")
# Leaf frames where a thread only waits: for the queue, the GIL, the socket or the lock.
_WAITING = ("Condition.wait", "EpollSelector.select", "Event.wait", "Queue.get", "_write_to_self")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{m.group('func')}"


def _layer(name: str) -> str:
    if "sqlalchemy" in name:
        return "sqlalchemy"
    path = name.split(":", 1)[0]
    top = path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")
    if top in ("h11", "uvicorn", "httptools"):
        return "uvicorn + h11 (HTTP server)"
    if top in ("asyncio", "selectors", "anyio", "sniffio"):
        return "asyncio + anyio (loop, thread hand-off)"
    if top in ("threading", "queue", "concurrent"):
        return "threading (worker pool)"
    if top in ("jwt", "cryptography"):
        return "pyjwt + cryptography (sign/verify)"
    if top in ("pydantic", "pydantic_core"):
        return "pydantic (validation)"
    return top


@dataclass
class Profile:
    total: int
    self_counts: Counter[str]
    inclusive: Counter[str]
    threads: Counter[str]
    layers: Counter[str]
    waiting: int
    possible: int = 0  # samples a thread holding the GIL all the time would give (GIL mode)

    def top(self, counter: Counter[str], n: int, *, only: tuple[str, ...] = ()) -> list[tuple[str, float]]:
        items = [(k, c) for k, c in counter.most_common() if not only or k.startswith(only)]
        return [(name, 100.0 * c / self.total) for name, c in items[:n]]


def read_profile(path: Path) -> Profile:
    """Summarise py-spy's collapsed stacks: self time, inclusive time, per thread, per layer."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        names = [_frame_name(f) for f in frames[1:]]
        if not names:
            continue
        total += count
        tname = frames[0].partition("): ")[2] or frames[0]
        threads["event loop (MainThread)" if tname == "MainThread" else f"{tname}s"] += count
        leaf = names[-1]
        if leaf.endswith(_WAITING):
            waiting += count
            layers["(waiting: lock, queue, poll)"] += count
        else:
            layers[_layer(leaf)] += count
        self_counts[leaf] += count
        for name in set(names):
            inclusive[name] += count
    return Profile(total, self_counts, inclusive, threads, layers, waiting)


def profile_markdown(profile: Profile, n: int = 12) -> str:
    if profile.total == 0:
        return "(no samples)"

    def pct(c: int) -> str:
        return f"{100.0 * c / profile.total:.0f} %"

    by_thread = ", ".join(f"{role} {pct(c)}" for role, c in profile.threads.most_common()
                          if c * 100 >= profile.total)
    gil = ""
    if profile.possible:
        gil = (f" The GIL was held in {100.0 * profile.total / profile.possible:.0f} % of the "
               "sampling instants (100 % would mean one core saturated with Python).")
    shown = [(name, c) for name, c in profile.layers.most_common() if c * 100 >= profile.total]
    rest = profile.total - sum(c for _, c in shown)
    rows = [(name, pct(c)) for name, c in shown] + ([("other (each < 1 %)", pct(rest))] if rest else [])
    layers = table(rows, ["layer (by leaf frame)", "share"])
    own = table([(f"`{name}`", f"{p:.1f} %") for name, p in profile.top(profile.self_counts, n)],
                ["frame", "self"])
    ours = table(
        [(f"`{name}`", f"{p:.1f} %") for name, p in
         profile.top(profile.inclusive, n, only=("broker/", "plugins/"))
         if not name.startswith("broker/cli.py")],
        ["broker frame", "inclusive"],
    )
    return f"""{profile.total} samples. Samples by thread: {by_thread}.{gil}

{layers}

Top frames by own time:

{own}

The broker's own functions, inclusive of what they call:

{ours}"""


def profile_under_load(pid: int, target: Target, concurrency: int, seconds: float, work: Path) -> str:
    """Two py-spy recordings of ``pid`` while wrk drives ``target``: every thread (wall clock, so
    waiting shows), then only the thread holding the GIL (what the one core is busy with)."""
    if py_spy() is None:
        return "(Profile skipped: py-spy is not installed: `pip install py-spy`.)"
    parts = []
    for gil, title in ((False, "all threads, wall clock"), (True, "GIL holder only (CPU)")):
        out = work / f"{re.sub(r'[^a-z0-9]+', '-', target.name.lower())}-{'gil' if gil else 'wall'}.prof"
        with profiled(pid, seconds, out, gil_only=gil):
            m = run_wrk(target, concurrency, seconds, work)
        prof = read_profile(out)
        if gil:
            prof.possible = round(seconds * PROFILE_HZ)
        parts.append(f"#### {title} ({m.rps:,.0f} req/s while sampled)\n\n{profile_markdown(prof)}\n")
    return "\n".join(parts)


def put_provider_key(vault: DevVault, path: str, key: str) -> None:
    """Write a provider key where the broker reads it (KV v2 ``secret/<path>``, field ``api_key``)."""
    import hvac

    client = hvac.Client(url=vault.addr, token=vault.root_token)
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": key}, mount_point="secret")


@contextlib.contextmanager
def workspace(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A temp dir for databases, configs, logs, wrk scripts and profiles; removed unless ``keep``
    (it holds client secrets in the wrk scripts, so it is private to this user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
