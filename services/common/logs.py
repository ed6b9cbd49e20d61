"""Log lines as text or as JSON objects, each with the context of the work it is about.

JSON fields: ``ts`` (RFC 3339, UTC), ``level``, ``service``, ``logger``, ``message``, and, when the
line is written inside an RPC or a job: ``tenant``, ``request_id``, ``trace_id``, ``job_id``;
``exception`` holds a traceback. The RPC fields come from the interceptors' context variables, the
trace id from the current OpenTelemetry span (or the job's recorded one), the job id from `job_context`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator

from services.common import interceptors
from concepts.tracing import current_trace_id

_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")
_job_trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_trace_id", default="")


@contextlib.contextmanager
def job_context(job_id: str, trace_id: str = "") -> Iterator[None]:
    """Log lines written inside carry `job_id`, and `trace_id` (the job's CreateTrainingJob trace) when no
    span is current."""
    tokens = _job_id.set(job_id), _job_trace_id.set(trace_id)
    try:
        yield
    finally:
        _job_id.reset(tokens[0])
        _job_trace_id.reset(tokens[1])


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module doc for the fields)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = {"tenant": interceptors.current_tenant_or(""), "request_id": interceptors.current_request_id(),
                   "trace_id": current_trace_id() or _job_trace_id.get(), "job_id": _job_id.get()}
        line.update({key: value for key, value in context.items() if value})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(log_format: str, service: str, verbose: bool = False) -> None:
    """Replace the root logger's handlers with one on stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else
                         logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
