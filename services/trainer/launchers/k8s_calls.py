"""Kubernetes API calls with retries of transient errors, and API errors as domain errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from concepts.errors import (
    AlreadyExists,
    CustomDiffError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.metrics import LAUNCHER_ERRORS

log = logging.getLogger(__name__)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


def call_with_retries(what: str, fn: Callable[..., Any], *args: Any, retries: int,
                      sleep: Callable[[float], None], **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, retrying 429, 5xx and connection errors `retries` times.

    The wait before retry n is the response's Retry-After when it gives one, else 0.5 * 2**n
    seconds, at most MAX_BACKOFF_S. Other API errors are not retried.

    Raises:
        NotFound, AlreadyExists, PermissionDenied, FailedPrecondition, Unavailable: the API's answer
        as a domain error naming `what`, chained to the ApiException or connection error.
    """
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            LAUNCHER_ERRORS.labels(f"http_{e.status}").inc()
            if e.status not in TRANSIENT_STATUSES or attempt == retries:
                raise domain_error(what, e) from e
            delay = _retry_after(e) or backoff(attempt)
            log.warning("%s: HTTP %s, retrying in %.1fs", what, e.status, delay)
        except urllib3.exceptions.HTTPError as e:
            LAUNCHER_ERRORS.labels("connection").inc()
            if attempt == retries:
                raise Unavailable(f"{what}: {e}") from e
            delay = backoff(attempt)
            log.warning("%s: %s, retrying in %.1fs", what, e, delay)
        sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def domain_error(what: str, e: ApiException) -> CustomDiffError:
    detail = f"{what}: HTTP {e.status}: {_api_message(e)}"
    if e.status == 404:
        return NotFound(detail)
    if e.status == 409:
        return AlreadyExists(detail)
    if e.status in (401, 403):
        return PermissionDenied(f"{detail} (does the trainer's Role allow it?)")
    if e.status in (400, 422):
        return FailedPrecondition(f"{detail} (check the kubernetes settings)")
    return Unavailable(detail)


def backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt)


def _api_message(e: ApiException) -> str:
    """The `message` of the Status body the API server sends with every error."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.reason)


def _retry_after(e: ApiException) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form only), capped at MAX_BACKOFF_S."""
    value = (e.headers or {}).get("Retry-After")
    try:
        return min(float(value), MAX_BACKOFF_S) if value is not None else None
    except ValueError:
        return None
