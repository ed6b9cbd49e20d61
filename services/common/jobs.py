"""Streaming a job's events to a Watch RPC, shared by the trainer and merger services."""

from __future__ import annotations

from typing import Iterator

import grpc

from concepts.errors import Unavailable
from services.common.models import JobRow
from services.common.registry import TERMINAL_STATES, Registry

POLL_S = 1.0


def watch_job(registry: Registry, job_id: str, tenant: str, kind: str,
              context: grpc.ServicerContext) -> Iterator[tuple[JobRow, str]]:
    """Yield (job snapshot, log line): the current state first, then one item per event until the job ends.

    A watcher that connects late gets the current state first and then only newer events. Ends once
    the job reached a terminal state and every event up to it was sent (a snapshot may show the end
    before the events that led to it have been streamed), or when the client goes away; when the
    server shuts down it ends with UNAVAILABLE, which clients retry (on another replica).
    """
    last = registry.last_event_id(job_id)
    row = registry.get_job(job_id, tenant, kind)  # NotFound for another tenant's job
    yield row, ""
    while context.is_active():
        events = registry.events_after(job_id, last)
        if not events and row.state in TERMINAL_STATES:
            return
        if registry.watchers_released:
            raise Unavailable("the server is shutting down; watch the job again to continue")
        if not events:
            registry.wait_for_change(POLL_S)
            continue
        for event in events:
            last = event.id
            row = registry.get_job(job_id)
            yield row, event.log_line
