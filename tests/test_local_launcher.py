"""The local launcher: CPU threads shared out among concurrent jobs, and telling live processes from gone ones."""

from __future__ import annotations

import os
import queue
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import processes
from services.trainer.launcher import LaunchRequest, LaunchState
from services.trainer.launchers.local import LocalProcessLauncher


def _fake_python(tmp_path):
    """Stands in for the interpreter: records OMP_NUM_THREADS in the job directory, writes no result."""
    script = tmp_path / "python"
    script.write_text(f"#!{sys.executable}\nimport os\nopen('threads', 'w').write(os.environ['OMP_NUM_THREADS'])\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize(("slots", "preset", "expected"), [
    (1, None, str(os.cpu_count())),
    (2, None, str(max(1, os.cpu_count() // 2))),
    (64, None, "1"),
    (2, "3", "3"),  # the operator's setting wins
])
def test_each_job_gets_its_share_of_the_cores(tmp_path, monkeypatch, slots, preset, expected):
    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    launcher = LocalProcessLauncher(max_concurrent=slots, python=_fake_python(tmp_path))
    events: queue.Queue = queue.Queue()
    launcher.watch(events.put)
    work = tmp_path / "job"
    launcher.launch(LaunchRequest(job_id="ab12", concept_id="c", spec_path=str(tmp_path / "spec.json"),
                                  work_dir=str(work)))
    states = [events.get(timeout=60).state for _ in range(2)]
    assert states[0] is LaunchState.RUNNING and states[1] is LaunchState.FAILED  # no result.json written
    assert (work / "threads").read_text() == expected


@pytest.mark.parametrize("error", [FileNotFoundError, ProcessLookupError])
def test_a_process_that_is_reaped_while_it_is_looked_at_is_gone(monkeypatch, error):
    """A cancel racing the job's exit: /proc/<pid>/stat vanishes between signalling the pid and reading it."""
    looks = iter([True, False])  # the pid still answered kill(pid, 0); by the second look it is gone
    monkeypatch.setattr(processes, "_exists", lambda pid: next(looks))

    def stat(pid):
        raise error(2, "No such file or directory")

    monkeypatch.setattr(processes, "_proc_stat", stat)
    assert processes.alive(12345) is False


def test_alive_sees_running_zombie_and_reaped_children():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert processes.alive(proc.pid)
    finally:
        proc.kill()
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    assert not processes.alive(proc.pid)  # a zombie of ours counts as gone
    proc.wait()
    assert not processes.alive(proc.pid)


def test_reattach_does_not_take_a_reused_pid_for_the_job(tmp_path):
    """After a host reboot the job's pid may belong to another process: the job is judged as dead."""
    work = tmp_path / "job"
    work.mkdir()
    (work / "pid").write_text(str(os.getpid()))  # alive, but not running in the job's directory
    (work / "progress.jsonl").write_text('{"event": "progress", "step": 3}\n')
    state, message = LocalProcessLauncher().reattach("ab12", str(work))
    assert state is LaunchState.FAILED and "ended without a result" in message


def test_a_job_cancelled_while_its_resume_is_on_the_way_is_not_started(tmp_path):
    launcher = LocalProcessLauncher(python=_fake_python(tmp_path))
    events: queue.Queue = queue.Queue()
    launcher.watch(events.put)
    launcher.cancel("ab12")  # between its process's death and the service relaunching it
    launcher.launch(LaunchRequest(job_id="ab12", concept_id="c", spec_path=str(tmp_path / "spec.json"),
                                  work_dir=str(tmp_path / "job")))
    assert not (tmp_path / "job").exists() and events.empty()
