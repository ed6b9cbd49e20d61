"""Progress bars for the CLI and the library code it drives: tqdm, on rank 0 only, on a terminal only.

One place decides whether a bar shows, so a command, the trainer's class-image generation and a
torchrun job agree: never on a rank other than 0 (each rank would draw its own copy), and otherwise
only when stderr is a terminal, since a bar's carriage returns garble logs and pipes.
``CUSTOMDIFF_PROGRESS=1`` forces bars on (e.g. to watch a job's log) and ``=0`` forces them off; the
rank rule still holds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

PROGRESS_ENV = "CUSTOMDIFF_PROGRESS"


def bars_enabled(rank: int | None = None, stream: TextIO | None = None) -> bool:
    """Whether a progress bar should show on `stream`.

    Args:
        rank: this process's rank; None reads torchrun's ``RANK`` (0 when unset).
        stream: where the bar would go; None is the current ``sys.stderr``.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        return False
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, rank: int | None = None, **kwargs: Any):
    """A tqdm bar on stderr, disabled unless `enabled` and `bars_enabled(rank)`.

    Args:
        enabled: the caller's own switch (library code's `progress` flag); False always disables.
        kwargs: passed to `tqdm` (e.g. ``leave``, ``position``).
    """
    from tqdm.auto import tqdm

    show = enabled and bars_enabled(rank)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, **kwargs)


class StageBar:
    """A bar over a fixed list of stages, naming the one running: ``merge: 50%|... | 2/4 [merging]``.

    Use as a context manager and call `next()` when a stage is done.
    """

    def __init__(self, desc: str, stages: Sequence[str], enabled: bool = True, rank: int | None = None) -> None:
        self.stages = tuple(stages)
        self.bar = progress_bar(total=len(self.stages), desc=desc, unit="stage", enabled=enabled, rank=rank)
        self.bar.set_postfix_str(self._current())

    def _current(self) -> str:
        return self.stages[self.bar.n] if self.bar.n < len(self.stages) else "done"

    def next(self) -> None:
        """The current stage is done; the bar advances and names the next one."""
        self.bar.n += 1  # count and name together, so that no frame shows a done stage as running
        self.bar.set_postfix_str(self._current())

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
