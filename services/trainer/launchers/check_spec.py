"""Init container of every training pod: `python -m services.trainer.launchers.check_spec SPEC_PATH`.

Exits EXIT_BAD_SPEC when the spec or its inputs are invalid. torchrun reports any worker failure as
exit code 1, so a bad spec seen only by the trainer would be retried `backoffLimit` times; checked
here, the Job's podFailurePolicy fails the Job at once and the message names the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from concepts.errors import InvalidArgument, NotFound
from services.trainer.launchers.job_manifest import EXIT_BAD_SPEC


def main(argv: list[str]) -> int:
    from trainer.spec import JobSpec, check_inputs

    if len(argv) != 1:
        print("usage: python -m services.trainer.launchers.check_spec SPEC_PATH", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        spec = JobSpec.from_dict(json.loads(Path(argv[0]).read_text()))
        check_inputs(spec)
    except (InvalidArgument, NotFound, OSError, ValueError) as e:
        # FallbackToLogsOnError turns this last line into the pod's termination message.
        print(f"invalid job spec {argv[0]}: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
