"""Run the `tritonserver` binary that ships in the nvidia-pytriton wheel on our model repository.

The wheel carries the server, the Python backend's shared library and one backend stub per Python
version, but no ready backend directory; `prepare_backends` assembles one for this interpreter.
The stub links against libpython, so the interpreter's LIBDIR goes first on LD_LIBRARY_PATH (else
it crashes on start), and this interpreter's bin directory goes first on PATH so the stub's Python
sees this environment's packages.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from concepts.errors import Unavailable
from services.inference.triton_protocol import ENV_OVERRIDES, MODEL_NAME

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = PROJECT_ROOT / "deploy" / "triton" / "model_repository"


def tritonserver_dist() -> Path:
    """The pytriton wheel's ``tritonserver`` directory (bin/, backends/, python_backend_stubs/)."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(directory: Path) -> Path:
    """Write a backend directory with the Python backend for this interpreter's version; return it."""
    dist = tritonserver_dist()
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, python / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise Unavailable(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    shutil.copy2(stub, python / stub.name)
    return directory


def server_env(environ: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    """The server's environment: library and binary paths for the stub, the model's overrides."""
    env = dict(environ)
    libs = [sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH", ""),
            str(tritonserver_dist().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # model.py imports the project; a source checkout works without being installed.
    env["PYTHONPATH"] = ":".join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(overrides)
    return env


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when the thread that started it exits (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class TritonServer:
    """A running tritonserver; `stop()` (or leaving its `with` block) shuts it down cleanly."""

    process: subprocess.Popen
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path
    _workdir: tempfile.TemporaryDirectory = field(repr=False)

    @property
    def grpc_url(self) -> str:
        """Where this machine reaches the gRPC endpoint (loopback when it binds every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines, without the startup tables."""
        return "\n".join([line for line in self.log_text().splitlines() if not line.startswith(("|", "+"))][-lines:])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (Triton unloads models and drains requests), SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        self._workdir.cleanup()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_triton(model_repository: Path = DEFAULT_REPOSITORY, *, base_model: str | None = None,
                 store_url: str | None = None, cache_bytes: int | None = None, grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, host: str = "0.0.0.0",
                 log_path: Path | None = None, ready_timeout_s: float = 300.0) -> TritonServer:
    """Start tritonserver on `model_repository` and wait until the model is ready.

    Args:
        base_model, store_url, cache_bytes: override the model's config.pbtxt parameters (through
            CUSTOMDIFF_BASE_MODEL / CUSTOMDIFF_STORE_URL / CUSTOMDIFF_CACHE_BYTES); None keeps them.
        grpc_port, http_port, metrics_port: explicit ports (Triton has no "any free port").
        host: address every endpoint binds to.
        log_path: where the server's output goes; default a file in its temporary directory.
        ready_timeout_s: how long loading the model may take.

    Raises:
        Unavailable: the server exited or was not ready in time (the message ends with its log).
    """
    workdir = tempfile.TemporaryDirectory(prefix="customdiff-triton-")
    backends = prepare_backends(Path(workdir.name) / "backends")
    log_path = Path(log_path) if log_path else Path(workdir.name) / "tritonserver.log"
    overrides = {ENV_OVERRIDES[k]: str(v) for k, v in
                 (("base_model", base_model), ("store_url", store_url), ("cache_bytes", cache_bytes)) if v is not None}
    command = [
        str(tritonserver_dist() / "bin" / "tritonserver"), f"--model-repository={model_repository}",
        f"--backend-directory={backends}", "--model-control-mode=none", "--allow-gpu-metrics=false",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--http-address={host}", f"--http-port={http_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
    ]
    with open(log_path, "ab") as out:
        # preexec_fn only calls prctl (no locks, no allocation), which is safe even with threads running.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=server_env(dict(os.environ), overrides),
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509
    server = TritonServer(process, host, grpc_port, http_port, metrics_port, log_path, workdir)
    try:
        wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop(timeout_s=10)
        raise
    return server


def wait_ready(server: TritonServer, timeout_s: float, model: str = MODEL_NAME) -> None:
    """Poll the server's gRPC health until `model` is ready.

    Raises:
        Unavailable: the process exited, or `timeout_s` passed.
    """
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise Unavailable(f"tritonserver exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.is_server_ready() and client.is_model_ready(model):
                    return
            except triton.InferenceServerException:
                pass  # not listening yet
            time.sleep(0.5)
    finally:
        client.close()
    raise Unavailable(f"tritonserver not ready within {timeout_s:.0f} s:\n{server.log_tail()}")


def serve_until_signal(server: TritonServer) -> int:
    """Block until the server exits; SIGTERM or SIGINT to this process stops it cleanly. The exit code."""
    def forward(signum: int, _frame) -> None:
        log.info("signal %d: stopping tritonserver", signum)
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = server.process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()
    return code
