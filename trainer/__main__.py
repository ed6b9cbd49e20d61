"""``python -m trainer --spec spec.json``: the entrypoint every launcher runs (alone or under torchrun).

Exit status 0 on success (or a requested stop), 2 when the user must fix the input, 1 otherwise; the
reason is the last line of ``<work_dir>/progress.jsonl``: ``{"event": "error", "message": ...}``.
With $CUSTOMDIFF_OTLP_ENDPOINT set, the run is a "training" span of the trace in $TRACEPARENT (the
CreateTrainingJob that started it).

A spec on an object store (``--spec s3://bucket/jobs/<id>/spec.json``: no filesystem shared with the
service) names its job directory there: the trainer copies it to a local scratch directory, runs on
the copy, and uploads its progress, checkpoint and result back as it goes (`concepts.jobdir.JobMirror`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from concepts.errors import CustomDiffError
from concepts.tracing import OTLP_ENV, TRACEPARENT_ENV, configure_tracing, continued


def _error(work_dir: str | None, message: str) -> None:
    from concepts.jobdir import JobDir, is_remote
    from trainer.progress import PROGRESS_FILE, ProgressLog

    if work_dir and is_remote(work_dir):  # it failed before its local copy was made
        JobDir(work_dir).append_text(PROGRESS_FILE, json.dumps({"event": "error", "message": message}) + "\n")
    elif work_dir:
        ProgressLog(work_dir).error(message)
    print(json.dumps({"event": "error", "message": message}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run one Custom Diffusion training job.")
    parser.add_argument("--spec", required=True, help="job spec JSON file (docs/job-spec.md)")
    args = parser.parse_args(argv)
    from concepts.jobdir import is_remote
    from trainer.spec_file import open_remote, read_spec

    work_dir = None
    mirror = None
    stop_tracing = configure_tracing("customdiff-trainer", os.environ.get(OTLP_ENV, ""))
    try:
        spec_path = args.spec
        if is_remote(spec_path):
            work_dir = spec_path.rsplit("/", 1)[0]  # where an error goes if the copy fails
            mirror, spec_path = open_remote(spec_path)
        data = read_spec(spec_path)
        work_dir = data.get("work_dir") if isinstance(data.get("work_dir"), str) else None
        from trainer.job import run_job
        from trainer.spec import JobSpec

        with continued(os.environ.get(TRACEPARENT_ENV, ""), "training") as span:
            span.set_attribute("customdiff.job_id", os.environ.get("CUSTOMDIFF_JOB_ID", ""))
            run_job(JobSpec.from_dict(data), echo=True)
        return 0
    except CustomDiffError as e:
        _error(work_dir, str(e))
        return 2
    except Exception as e:  # noqa: BLE001 - the job must always leave a reason behind
        traceback.print_exc()
        _error(work_dir, f"internal error: {type(e).__name__}: {e}")
        return 1
    finally:
        from trainer.distributed import shutdown_distributed

        shutdown_distributed()
        if mirror is not None:
            mirror.close()  # the last progress lines and the result, before the launcher sees the exit
        if stop_tracing is not None:
            stop_tracing()  # flush the spans


if __name__ == "__main__":
    sys.exit(main())
