"""Run the `tritonserver` binary that ships in the nvidia-pytriton wheel on our model repository.

The wheel carries the server, the Python backend's shared library and one backend stub per Python
version, but no ready backend directory; `prepare_backends` assembles one for this interpreter.
The stub links against libpython, so the interpreter's LIBDIR goes first on LD_LIBRARY_PATH (else
it crashes on start), and this interpreter's bin directory goes first on PATH so the stub's Python
sees this environment's packages.

Each server runs in its own session (process group), with its files in a per-port state directory
(`triton_state`): stopping it, or finding it dead, ends with SIGKILL to the whole group, so no backend
stub outlives it, and whoever next starts Triton on that port kills what a SIGKILLed owner left.
`triton_supervisor` restarts a server that dies.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from concepts.errors import Unavailable
from services.common.processes import describe_exit
from services.inference.triton_client import new_client
from services.inference.triton_protocol import ENV_OVERRIDES, MODEL_NAME
from services.inference.triton_state import StateDir, shm_prefix

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


@dataclass(frozen=True)
class TritonLaunch:
    """How to start tritonserver; a supervisor starts every restart from the same one.

    Args:
        overrides: environment variables overriding the model's config.pbtxt parameters.
        log_path: where the server's output goes; None: the state directory's ``tritonserver.log``.
        ready_timeout_s: how long loading the model may take.
    """

    model_repository: Path = DEFAULT_REPOSITORY
    overrides: dict[str, str] = field(default_factory=dict)
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_path: Path | None = None
    ready_timeout_s: float = 300.0

    @property
    def grpc_url(self) -> str:
        """Where this machine reaches the gRPC endpoint (loopback when it binds every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(tritonserver_dist() / "bin" / "tritonserver"), f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}", "--model-control-mode=none", "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix(self.grpc_port)}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", f"--http-address={self.host}",
            f"--http-port={self.http_port}", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
        ]


def acquire_state(grpc_port: int, root: Path | None = None) -> StateDir:
    """The port's state directory (leftovers of a dead owner killed) with a fresh backend directory."""
    state = StateDir.acquire(grpc_port, root)
    try:
        shutil.rmtree(state.backends, ignore_errors=True)
        prepare_backends(state.backends)
    except BaseException:
        state.release()
        raise
    return state


@dataclass
class TritonServer:
    """A running tritonserver; `stop()` (or leaving its `with` block) shuts it down and reaps its group."""

    process: subprocess.Popen
    launch: TritonLaunch
    log_path: Path
    log_offset: int
    state: StateDir
    owns_state: bool = False

    host = property(lambda self: self.launch.host)
    grpc_port = property(lambda self: self.launch.grpc_port)
    http_port = property(lambda self: self.launch.http_port)
    metrics_port = property(lambda self: self.launch.metrics_port)
    grpc_url = property(lambda self: self.launch.grpc_url)

    def log_text(self) -> str:
        """What this server wrote to its log (a log file shared by restarts holds theirs too)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines, without the startup tables."""
        return "\n".join([line for line in self.log_text().splitlines() if not line.startswith(("|", "+"))][-lines:])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (Triton unloads models and drains requests), SIGKILL after `timeout_s`; the exit code.

        However the server ended, its process group then gets SIGKILL (no backend stub survives it)
        and its shared-memory regions are unlinked. Safe to call again, or on a server that died.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass  # nothing of the group is left
        self.state.clear_leftovers()
        if self.owns_state:
            self.owns_state = False
            self.state.release()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(launch: TritonLaunch, state: StateDir) -> TritonServer:
    """Start tritonserver (not waiting for it) in its own session; it gets SIGTERM when this thread dies."""
    log_path = Path(launch.log_path) if launch.log_path else state.log_path
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        # preexec_fn only calls prctl (no locks, no allocation), which is safe even with threads running.
        process = subprocess.Popen(launch.command(state.backends), stdout=out, stderr=subprocess.STDOUT,
                                   env=server_env(dict(os.environ), launch.overrides), start_new_session=True,
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509
    log.info("started tritonserver (pid %d) on %s; log %s", process.pid, launch.grpc_url, log_path)
    return TritonServer(process, launch, log_path, log_offset, state)


def overrides_of(base_model: str | None = None, store_url: str | None = None,
                 cache_bytes: int | None = None) -> dict[str, str]:
    """The environment overriding config.pbtxt's parameters (None keeps a parameter)."""
    values = (("base_model", base_model), ("store_url", store_url), ("cache_bytes", cache_bytes))
    return {ENV_OVERRIDES[k]: str(v) for k, v in values if v is not None}


def start_triton(model_repository: Path = DEFAULT_REPOSITORY, *, base_model: str | None = None,
                 store_url: str | None = None, cache_bytes: int | None = None, grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, host: str = "0.0.0.0",
                 log_path: Path | None = None, ready_timeout_s: float = 300.0) -> TritonServer:
    """Start one unsupervised tritonserver on `model_repository` and wait until the model is ready.

    Args:
        base_model, store_url, cache_bytes: override the model's config.pbtxt parameters (through
            CUSTOMDIFF_BASE_MODEL / CUSTOMDIFF_STORE_URL / CUSTOMDIFF_CACHE_BYTES); None keeps them.
        grpc_port, http_port, metrics_port: explicit ports (Triton has no "any free port").
        host: address every endpoint binds to.
        log_path: where the server's output goes; default a file in its state directory.
        ready_timeout_s: how long loading the model may take.

    Raises:
        Unavailable: the server exited or was not ready in time (the message ends with its log).
    """
    launch = TritonLaunch(Path(model_repository), overrides_of(base_model, store_url, cache_bytes), host,
                          grpc_port, http_port, metrics_port, Path(log_path) if log_path else None, ready_timeout_s)
    state = acquire_state(grpc_port)
    try:
        server = spawn(launch, state)
    except BaseException:
        state.release()
        raise
    server.owns_state = True
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

    client = new_client(server.grpc_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise Unavailable(f"tritonserver {describe_exit(server.process.returncode)}:\n{server.log_tail()}")
            try:
                if client.is_server_ready(client_timeout=2) and client.is_model_ready(model, client_timeout=2):
                    return
            except triton.InferenceServerException:
                pass  # not listening yet
            time.sleep(0.2)
    finally:
        client.close()
    raise Unavailable(f"tritonserver not ready within {timeout_s:.0f} s:\n{server.log_tail()}")
