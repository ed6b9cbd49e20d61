"""Where a tritonserver keeps its files, and how what a killed one left behind is found and removed.

One directory per gRPC port under the system temp dir, ``customdiff-triton.<port>``: the backend
directory (the Python backend and its stub), the default log, and a lock file. Whoever starts Triton
on that port holds the lock (``flock``) for as long as it runs; the kernel drops it however its holder
dies, SIGKILL included. So whoever takes the lock next knows that any ``tritonserver`` or
``triton_python_backend_stub`` still naming the directory on its command line (the server's
``--backend-directory``, the stub's library path) belongs to a dead owner, and kills it; the Python
backend's shared-memory regions carry a per-port prefix, so a killed server's regions go the same way.
A clean stop removes the directory. Earlier versions used random ``customdiff-triton-*`` temporary
directories; those no running process names are removed too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from concepts.errors import Unavailable
from services.common.processes import alive

log = logging.getLogger(__name__)

STATE_PREFIX = "customdiff-triton."
LEGACY_PREFIX = "customdiff-triton-"
TRITON_PROGRAMS = ("tritonserver", "triton_python_backend_stub")
SHM_DIR = Path("/dev/shm")
LEGACY_MIN_AGE_S = 60.0


def shm_prefix(grpc_port: int) -> str:
    """The Python backend's shared-memory region prefix for the server on `grpc_port`."""
    return f"customdiff_triton_{grpc_port}_"


def triton_processes() -> dict[int, str]:
    """pid -> command line (NULs as spaces) of this user's tritonserver and backend-stub processes."""
    found = {}
    uid = os.getuid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and os.path.basename(argv[0].decode(errors="replace")) in TRITON_PROGRAMS:
            found[int(entry.name)] = b" ".join(argv).decode(errors="replace")
    return found


def kill_and_wait(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGKILL `pids` and wait (bounded) until none of them runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def remove_shm(prefix: str) -> None:
    """Unlink the shared-memory regions whose names start with `prefix`."""
    for region in SHM_DIR.glob(f"{prefix}*") if SHM_DIR.is_dir() else ():
        region.unlink(missing_ok=True)


def remove_legacy_dirs(root: Path, running: dict[int, str]) -> None:
    """Remove earlier versions' ``customdiff-triton-*`` temporary directories no running Triton names."""
    now = time.time()
    for path in root.glob(f"{LEGACY_PREFIX}*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or now - st.st_mtime < LEGACY_MIN_AGE_S
                or any(f"{path}/" in cmdline for cmdline in running.values())):
            continue
        log.info("removing %s, left behind by a stopped tritonserver", path)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class StateDir:
    """The locked per-port directory of one tritonserver (see the module docstring)."""

    path: Path
    grpc_port: int
    _lock: IO = field(repr=False)

    @property
    def backends(self) -> Path:
        return self.path / "backends"

    @property
    def log_path(self) -> Path:
        return self.path / "tritonserver.log"

    @classmethod
    def acquire(cls, grpc_port: int, root: Path | None = None) -> StateDir:
        """Take the directory of `grpc_port`, killing what a dead previous owner left running.

        Raises:
            Unavailable: another live process holds it (it runs a Triton on that port), or it is
                not a directory of this user's.
        """
        root = Path(root or tempfile.gettempdir())
        path = root / f"{STATE_PREFIX}{grpc_port}"
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise Unavailable(f"{path} is not a directory of this user's; remove it")
        lock = open(path / "lock", "a")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise Unavailable(f"another process runs a tritonserver on port {grpc_port} (it holds {path})") from None
        state = cls(path, grpc_port, lock)
        state.clear_leftovers(remove_legacy=True)
        return state

    def clear_leftovers(self, remove_legacy: bool = False) -> None:
        """SIGKILL the Triton processes naming this directory; unlink their shared memory."""
        running = triton_processes()
        stale = [pid for pid, cmdline in running.items() if f"{self.path}/" in cmdline]
        if stale:
            log.warning("killing %d tritonserver/stub process(es) a previous owner of %s left running: %s",
                        len(stale), self.path, stale)
            kill_and_wait(stale)
        remove_shm(shm_prefix(self.grpc_port))
        if remove_legacy:
            remove_legacy_dirs(self.path.parent, running)

    def release(self) -> None:
        """Remove the directory (the default log with it) and drop the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()
