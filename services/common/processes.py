"""Facts about local processes that the launcher and the Triton supervisor both need: alive, and how one ended."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def describe_exit(code: int | None) -> str:
    """A Popen return code in words: "exited with code 1", "was killed by SIGKILL" (the OOM killer's, too)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a zombie child of ours counts as gone)."""
    if not _exists(pid):
        return False
    try:
        stat = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        # Reaped between the two looks (a cancel racing the exit), or a system without /proc.
        return _exists(pid) and not Path("/proc/self/stat").exists()
    # The state follows the command name, which is in parentheses and may itself hold spaces.
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return True


def _proc_stat(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text()
