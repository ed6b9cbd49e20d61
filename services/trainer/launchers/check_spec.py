"""Init container of every training pod: `python -m services.trainer.launchers.check_spec SPEC_PATH`.

Exits EXIT_BAD_SPEC when the spec or its inputs are invalid. torchrun reports any worker failure as
exit code 1, so a bad spec seen only by the trainer would be retried `backoffLimit` times; checked
here, the Job's podFailurePolicy fails the Job at once and the message names the field.

A spec on an object store (``s3://bucket/jobs/<job id>/spec.json``) is read as the trainer reads it:
its job directory is copied to local scratch and the copy's inputs are checked. A store that cannot
be reached is no bad spec: that error ends the check with exit status 1, which the Job retries.
"""

from __future__ import annotations

import sys

from concepts.errors import InvalidArgument, NotFound
from concepts.jobdir import is_remote
from services.trainer.launchers.job_manifest import EXIT_BAD_SPEC


def main(argv: list[str]) -> int:
    from trainer.spec import JobSpec, check_inputs
    from trainer.spec_file import open_remote, read_spec

    if len(argv) != 1:
        print("usage: python -m services.trainer.launchers.check_spec SPEC_PATH", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        mirror, spec_path = open_remote(argv[0]) if is_remote(argv[0]) else (None, argv[0])
    except InvalidArgument as e:
        return _bad_spec(argv[0], e)
    try:
        check_inputs(JobSpec.from_dict(read_spec(spec_path)))
    except (InvalidArgument, NotFound, OSError, ValueError) as e:
        return _bad_spec(argv[0], e)
    finally:
        if mirror is not None:
            mirror.close()
    return 0


def _bad_spec(spec_path: str, error: Exception) -> int:
    # FallbackToLogsOnError turns this last line into the pod's termination message.
    print(f"invalid job spec {spec_path}: {error}", file=sys.stderr)
    return EXIT_BAD_SPEC


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
