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
    """A server in a child process, ready once ``ready_path`` answers 200."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/",
        log_dir: Path,
    ):
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(env) if env is not None else _clean_env()
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
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
    return ServerProcess("mock-upstream", argv, port, ready_path="/v1/models", log_dir=log_dir)


# --- the broker --------------------------------------------------------------------------------

HUGE = 10**15  # settings.MAX_MICROS: budgets no run of this benchmark can exhaust


@dataclass
class Identity:
    client_id: str
    client_secret: str = field(repr=False)
    workload_id: str


@dataclass
class BrokerUnderTest:
    """A real ``broker serve`` process on SQLite (WAL) in a temp dir, against an OpenBao dev server."""

    vault: DevVault
    workdir: Path
    extra_toml: str = ""
    admin_secret: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(32), repr=False)
    server: ServerProcess | None = None
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "broker.db"

    def config_text(self) -> str:
        return f"""
[database]
url = "sqlite:///{self.db_path}"

[vault]
addr = "{self.vault.addr}"
kv_mount = "secret"
prefix = "bench-{secrets.token_hex(4)}"

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
"""

    def start(self) -> BrokerUnderTest:
        config = self.workdir / "broker.toml"
        config.write_text(self.config_text())
        env = _clean_env()
        env["BROKER_VAULT_TOKEN"] = self.vault.root_token
        env["BROKER_BOOTSTRAP_ADMIN_SECRET"] = self.admin_secret
        argv = [PYTHON, "-m", "broker.cli", "serve", "--config", str(config), "--migrate"]
        self.server = ServerProcess(
            "broker", argv, self.port, env=env, ready_path="/healthz", log_dir=self.workdir
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
        body = {"name": f"bench-{secrets.token_hex(3)}", "budgets": [{"period": "total", "limit_micros": HUGE}]}
        tenant_id: str = self._admin_post("/v1/admin/tenants", body)["id"]
        return tenant_id

    def create_workload(self, tenant_id: str, kind: str, policy: dict[str, Any]) -> Identity:
        body = {"tenant_id": tenant_id, "name": f"bench-{kind}-{secrets.token_hex(3)}",
                "kind": kind, "policy": policy}
        out = self._admin_post("/v1/admin/workloads", body)
        return Identity(out["client_id"], out["client_secret"], out["id"])


def bench_policy(models: Sequence[str], token_budget_micros: int) -> dict[str, Any]:
    """A policy no benchmark run can exhaust or rate-limit: budgets far above what it spends."""
    return {
        "models": list(models),
        "token_ttl_s": 900,
        "token_budget_micros": token_budget_micros,
        "budgets": [{"period": "total", "limit_micros": HUGE}],
        "rate": {"rpm": 1_000_000, "tpm": 10**12},
    }


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
    load_before: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(target: Target, concurrency: int, duration_s: float, workdir: Path) -> Measurement:
    script = workdir / f"wrk-{re.sub(r'[^a-z0-9]+', '-', target.name.lower())}.lua"
    script.write_text(target.lua())
    load = os.getloadavg()[0]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "20s",
         "-s", str(script), target.url],
        capture_output=True, text=True, check=True,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len("BENCH_JSON "):])
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return Measurement(
        target=target.name, concurrency=concurrency, requests=data["requests"],
        duration_s=data["duration_us"] / 1e6, errors=errors,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000, load_before=load,
    )


def measure(
    target: Target, concurrency: int, *, warmup_s: float, duration_s: float, workdir: Path
) -> Measurement:
    """Warm up (discarded), then measure for ``duration_s``."""
    if warmup_s > 0:
        run_wrk(target, concurrency, warmup_s, workdir)
    m = run_wrk(target, concurrency, duration_s, workdir)
    print(
        f"  c={concurrency:<3} {target.name:<34} {m.rps:9.0f} req/s  p50 {m.p50_ms:7.2f} ms  "
        f"p99 {m.p99_ms:7.2f} ms  errors {m.errors}  (load {m.load_before:.2f})",
        flush=True,
    )
    return m


# --- reporting ---------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine_description() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
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

Produced by `bench/run.sh` (or one benchmark at a time: `python -m bench.bench_tokens`, ...).
Each section below is rewritten by its own benchmark; figures within a section come from one run,
measured side by side. These are measurements, not tests: nothing here is asserted.
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


# --- profiling ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(PYTHON).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


@contextlib.contextmanager
def profiled(pid: int, seconds: float, out: Path, *, gil_only: bool = False) -> Iterator[None]:
    """py-spy recording ``pid`` for ``seconds`` while the body runs (the body drives load)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    argv = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw",
            "-o", str(out), "--threads", "--nonblocking"]
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


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{m.group('func')}"


@dataclass
class Profile:
    total: int
    self_counts: Counter[str]
    inclusive: Counter[str]
    threads: Counter[str]

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * c / self.total) for name, c in counter.most_common(n)]


def read_profile(path: Path) -> Profile:
    """Summarise py-spy's collapsed stacks: self time, inclusive time, time per thread role."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = frames[0]
        names = [_frame_name(f) for f in frames[1:]]
        if not names:
            continue
        total += count
        tname = thread.partition("): ")[2] or thread
        threads["event loop (MainThread)" if tname == "MainThread" else f"{tname} threads"] += count
        self_counts[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return Profile(total, self_counts, inclusive, threads)


def profile_markdown(profile: Profile, n: int = 15) -> str:
    lines = [f"{profile.total} samples at 250 Hz across the broker's threads."]
    lines.append("")
    lines.append("Share of samples by thread role: " + ", ".join(
        f"{role} {100.0 * c / profile.total:.0f} %" for role, c in profile.threads.most_common()
    ))
    lines.append("")
    lines.append("Top frames by own time (self):")
    lines.append("")
    lines.append(table([(f"`{name}`", f"{pct:.1f} %") for name, pct in profile.top(profile.self_counts, n)],
                       ["frame", "self"]))
    lines.append("")
    lines.append("Top frames by inclusive time (the frame and everything it called):")
    lines.append("")
    lines.append(table([(f"`{name}`", f"{pct:.1f} %") for name, pct in profile.top(profile.inclusive, n)],
                       ["frame", "inclusive"]))
    return "\n".join(lines)


@contextlib.contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
