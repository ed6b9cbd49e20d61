"""Registry rows <-> protobuf messages, page tokens, and job-state names shared by the servicers."""

from __future__ import annotations

import base64
import re

from google.protobuf import timestamp_pb2

from concepts.errors import InvalidArgument, quote
from customdiffusion.v1 import resources_pb2
from services.common.models import ConceptRow

STATE_TO_PROTO = {
    "queued": resources_pb2.JOB_STATE_QUEUED,
    "running": resources_pb2.JOB_STATE_RUNNING,
    "succeeded": resources_pb2.JOB_STATE_SUCCEEDED,
    "failed": resources_pb2.JOB_STATE_FAILED,
    "cancelled": resources_pb2.JOB_STATE_CANCELLED,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


def timestamp(value) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def concept_to_proto(row: ConceptRow) -> resources_pb2.Concept:
    provenance = row.provenance or {}
    return resources_pb2.Concept(
        name=row.name,
        version=row.version,
        digest=row.digest,
        tokens=row.tokens,
        size_bytes=row.size_bytes,
        provenance=resources_pb2.Provenance(
            kind=str(provenance.get("kind", "")),
            job=str(provenance.get("job", "")),
            parent_digests=[str(p) for p in provenance.get("parents", [])],
            details={k: str(v) for k, v in provenance.items() if k not in ("kind", "job", "parents")},
        ),
        base_fingerprint=row.base_fingerprint,
        create_time=timestamp(row.created_at),
        class_words=row.class_words,
    )


def page(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, limit) from AIP-158 paging fields; the token is an opaque offset."""
    if page_size < 0:
        raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return 0, limit
    try:
        offset = int(base64.urlsafe_b64decode(page_token.encode()).decode().removeprefix("offset:"))
    except ValueError as e:
        raise InvalidArgument("page_token", f"not a page token this server issued: {quote(page_token)}") from e
    return offset, limit


def next_page_token(offset: int, limit: int, returned: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset + limit}".encode()).decode() if returned == limit else ""


def check_name(value: str, field: str) -> str:
    """Concept names: 1-63 characters of lower-case letters, digits, '-', '_' and '+'."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_+\-]{0,62}", value or ""):
        raise InvalidArgument(field, f"must be 1-63 characters of a-z, 0-9, '-', '_', '+' starting with a "
                                     f"letter or digit, got {quote(value)}")
    return value
