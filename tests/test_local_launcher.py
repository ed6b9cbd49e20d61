"""The local launcher's process environment: CPU threads shared out among concurrent jobs."""

from __future__ import annotations

import os
import queue
import stat
import sys

import pytest

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
