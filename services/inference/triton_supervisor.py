"""Keep one tritonserver running: restart it with backoff whenever it dies, until told to stop.

`customdiff serve` and `customdiff triton` run Triton under a `TritonSupervisor`. One thread starts
the server (so the server's parent-death signal follows that thread, which lives until `stop()`),
waits for it to exit, logs why (exit code or signal, and the tail of its log), SIGKILLs what is left
of its process group (a backend stub never outlives it), waits, and starts it again. The wait starts
at `initial_backoff_s` and doubles after each failure up to `max_backoff_s`; a server that stayed up
`reset_after_s` resets it. docs/operations.md ("Triton supervision") describes it for operators.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Self

from services.common.processes import describe_exit
from services.inference.triton_server import (TritonLaunch, TritonServer, acquire_state, spawn,
                                              wait_ready)
from services.common.server import StopSignals
from services.inference.triton_state import StateDir

log = logging.getLogger(__name__)


class TritonSupervisor:
    """A tritonserver that is restarted whenever it exits; `start()`, then `stop()` (or a `with` block)."""

    def __init__(self, launch: TritonLaunch, *, initial_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 reset_after_s: float = 60.0, state_root: Path | None = None) -> None:
        self.launch = launch
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.reset_after_s = reset_after_s
        self.state_root = state_root
        self.server: TritonServer | None = None  # the current process (None before the first start)
        self.restarts = 0
        self._died_at: float | None = None
        self._state: StateDir | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._first: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    @property
    def grpc_url(self) -> str:
        return self.launch.grpc_url

    @property
    def log_path(self) -> Path:
        return self.launch.log_path or self._state.log_path

    def start(self) -> Self:
        """Start Triton and wait until its model is ready (`launch.ready_timeout_s`).

        Raises:
            Unavailable: the first start failed (bad configuration, say): nothing is left running.
        """
        self._state = acquire_state(self.launch.grpc_port, self.state_root)
        self._thread.start()
        try:
            self._first.result()
        except BaseException:
            self.stop(timeout_s=10)
            raise
        return self

    def stop(self, timeout_s: float = 60.0) -> int:
        """Stop supervising and stop the server (SIGTERM, SIGKILL after `timeout_s`); its exit code."""
        with self._lock:
            self._stopping.set()
            server = self.server
        code = server.stop(timeout_s) if server is not None else 0
        self._thread.join()
        if self._state is not None:
            self._state.release()
            self._state = None
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        delay = self.initial_backoff_s
        while True:
            ready_at = self._start_one()
            if ready_at is not None:
                self._wait_exit(ready_at)
            if self._stopping.is_set():
                return
            if ready_at is not None and time.monotonic() - ready_at >= self.reset_after_s:
                delay = self.initial_backoff_s
            log.warning("restarting tritonserver on %s in %.1f s", self.grpc_url, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.max_backoff_s)

    def _start_one(self) -> float | None:
        """Spawn a server and wait until its model is ready; when it became ready, None if it did not.

        The first outcome, good or bad, goes to `start()`; a bad one also ends supervision.
        """
        try:
            with self._lock:
                if self._stopping.is_set():
                    return None
                if self.server is not None:
                    self.restarts += 1
                self.server = server = spawn(self.launch, self._state)
            wait_ready(server, self.launch.ready_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to start(), else logged and retried
            if self.server is not None:
                self.server.stop(timeout_s=10)
            if not self._first.done():
                self._stopping.set()
                self._first.set_exception(e)
            elif not self._stopping.is_set():
                log.error("tritonserver on %s failed to start: %s", self.grpc_url, e)
            return None
        if not self._first.done():
            self._first.set_result(None)
        elif self._died_at is not None:
            log.warning("tritonserver on %s is serving again, %.1f s after the previous one died", self.grpc_url,
                        time.monotonic() - self._died_at)
        return time.monotonic()

    def _wait_exit(self, ready_at: float) -> None:
        """Block until the current server exits; reap its group and, unless stopping, log why it died."""
        server = self.server
        code = server.process.wait()
        self._died_at = time.monotonic()
        server.stop()  # SIGKILL to its process group: its backend stubs die with it
        if not self._stopping.is_set():
            log.error("tritonserver (pid %d) %s after %.1f s up; its log ended with:\n%s", server.process.pid,
                      describe_exit(code), self._died_at - ready_at, server.log_tail())


def serve_until(stop: StopSignals, supervisor: TritonSupervisor) -> int:
    """Block until SIGTERM or SIGINT (`stop`), then stop the supervised server; its exit code."""
    stop.wait()
    log.info("stopping tritonserver")
    return supervisor.stop()
