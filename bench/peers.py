"""The peer users would pick instead of the broker, measured in the same run: a LiteLLM proxy.

LiteLLM is installed on first use into a virtualenv of its own (``.bench-peers/litellm-<version>``
under the checkout, ignored by git), never into the broker's: its dependencies are not ours. It
runs as ``litellm --config`` with one worker and no database (a master key, no virtual keys, no
spend tracking), pointed at the same fake provider with the same provider key, so that a request
through it does the same provider work as one through the broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT, ServerProcess
from broker.devvault import free_port

LITELLM_VERSION = "1.108.7"
PEERS_DIR = ROOT / ".bench-peers"
MASTER_KEY = "sk-bench-litellm-master"


def litellm_executable(version: str = LITELLM_VERSION) -> Path:
    """The ``litellm`` command of its own virtualenv, installed there if it is not yet."""
    venv = PEERS_DIR / f"litellm-{version}"
    command = venv / "bin" / "litellm"
    if command.exists():
        return command
    print(f"bench: installing litellm[proxy]=={version} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={version}"],
                   check=True)
    return command


def litellm_server(log_dir: Path, upstream_url: str, provider_key: str, model: str,
                   version: str = LITELLM_VERSION) -> ServerProcess:
    """A LiteLLM proxy serving ``model`` from the fake provider at ``upstream_url``."""
    command = litellm_executable(version)
    config = log_dir / "litellm.yaml"
    # YAML is a superset of JSON: the configuration is written as JSON, quoting and all.
    config.write_text(json.dumps({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{upstream_url}/v1",
            "api_key": provider_key}}],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }))
    port = free_port()
    argv = [str(command), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(log_dir), "LITELLM_LOG": "ERROR",
           "LITELLM_MODE": "PRODUCTION"}
    return ServerProcess(f"litellm-{version}", argv, port, env=env,
                         ready_path="/health/liveliness", log_dir=log_dir, cwd=log_dir)
