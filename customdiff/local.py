"""Start the whole stack (`customdiff serve`) as a subprocess on loopback: for the demo and end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_serve(directory: Path, api_keys: str, only: tuple[str, ...] = (),
                **overrides: Any) -> tuple[subprocess.Popen, dict[str, int]]:
    """Write a config under `directory` and run `customdiff serve` (`--only` these components, if given)
    on it until it reports its ports.

    Returns the process (stop it with terminate(); it exits 0) and the gRPC port of each service.

    Raises:
        RuntimeError: serve exited before it was ready; the message points at its log.
    """
    data = directory.resolve() / "data"
    config = {"database_url": f"sqlite:///{data}/registry.db", "store_url": str(data / "store"),
              "work_dir": str(data / "jobs"), "api_keys": api_keys, "trainer_port": 0, "merger_port": 0,
              "inference_port": 0, "triton_url": f"127.0.0.1:{free_port()}", **overrides}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(json.dumps(config, indent=2))
    log = directory / "serve.log"
    with open(log, "wb") as err:
        command = [sys.executable, "-m", "customdiff", "serve", "--config", str(directory / "config.yaml")]
        proc = subprocess.Popen(command + [arg for c in only for arg in ("--only", c)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()  # {"ports": ..., "triton": ...} once every component is ready
    if not line:
        raise RuntimeError(f"customdiff serve exited with {proc.wait()}; see {log}")
    return proc, json.loads(line)["ports"]
