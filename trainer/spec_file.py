"""Reading a job spec file: a local path, or an object-store URL whose job directory is copied down first.

`python -m trainer` and the training pods' check (`services.trainer.launchers.check_spec`) read a
spec the same way, so the check sees exactly the inputs the trainer will.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any

from concepts.errors import InvalidArgument
from concepts.jobdir import JobDir, JobMirror, relocate


def read_spec(path: str) -> dict[str, Any]:
    """The JSON object in the local spec file `path`.

    Raises:
        InvalidArgument: the file is missing, unreadable, not JSON, or not an object (field "spec").
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument("spec", f"cannot read job spec {path}: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("spec", f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def open_remote(spec_url: str) -> tuple[JobMirror, str]:
    """Copy the job directory holding `spec_url` to local scratch; returns (mirror, local spec path).

    The copy's spec names the copied inputs, and its class-image cache is the scratch root's (kept
    across jobs on this machine, as a local work directory's parent is). The mirror uploads the
    outputs of rank $RANK (0 when unset) back until it is closed.

    Raises:
        InvalidArgument: the spec is missing or invalid (checked before its paths are relocated).
    """
    from trainer.checkpoint import STEP_MARKER, step_marker
    from trainer.spec import JobSpec

    remote = JobDir(posixpath.dirname(spec_url))
    mirror = JobMirror.open(remote, rank=int(os.environ.get("RANK", "0")), markers={STEP_MARKER: step_marker})
    try:
        local_spec = mirror.local / posixpath.basename(spec_url)
        data = read_spec(str(local_spec))
        JobSpec.from_dict(data)  # a bad field is named here, not failed on by `relocate`
        data = relocate(data, remote.url, str(mirror.local))
        data["class_image_cache_dir"] = str(mirror.local.parent / "class-images")
        local_spec.write_text(json.dumps(data, indent=2))
    except Exception:
        mirror.close()
        raise
    return mirror, str(local_spec)
