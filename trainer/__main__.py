"""``python -m trainer --spec spec.json``: the entrypoint every launcher runs (alone or under torchrun).

Exit status 0 on success (or a requested stop), 2 when the user must fix the input, 1 otherwise; the
reason is the last line of ``<work_dir>/progress.jsonl``: ``{"event": "error", "message": ...}``.
With $CUSTOMDIFF_OTLP_ENDPOINT set, the run is a "training" span of the trace in $TRACEPARENT (the
CreateTrainingJob that started it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from concepts.errors import CustomDiffError, InvalidArgument
from concepts.tracing import OTLP_ENV, TRACEPARENT_ENV, configure_tracing, continued


def _error(work_dir: str | None, message: str) -> None:
    from trainer.progress import ProgressLog

    if work_dir:
        ProgressLog(work_dir).error(message)
    print(json.dumps({"event": "error", "message": message}), flush=True)


def _read_spec(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument("spec", f"cannot read job spec {path}: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("spec", f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run one Custom Diffusion training job.")
    parser.add_argument("--spec", required=True, help="job spec JSON file (docs/job-spec.md)")
    args = parser.parse_args(argv)
    work_dir = None
    stop_tracing = configure_tracing("customdiff-trainer", os.environ.get(OTLP_ENV, ""))
    try:
        data = _read_spec(args.spec)
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
        if stop_tracing is not None:
            stop_tracing()  # flush the spans


if __name__ == "__main__":
    sys.exit(main())
