"""Domain errors, free of any transport. `services/common/errors.py` maps each to one gRPC status."""

from __future__ import annotations


MAX_QUOTED = 100


def quote(value: object, limit: int = MAX_QUOTED) -> str:
    """`repr(value)` cut to about `limit` characters: error texts never echo a caller's megabyte back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else "cut"
    return f"{text[:limit]}... ({size})"


class CustomDiffError(Exception):
    """Base of every domain error; `reason` is the stable machine-readable code (AIP-193 ErrorInfo)."""

    reason = "INTERNAL"


class InvalidArgument(CustomDiffError, ValueError):
    """A caller-supplied value is wrong; `field` names it."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFound(CustomDiffError, LookupError):
    reason = "NOT_FOUND"


class AlreadyExists(CustomDiffError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(CustomDiffError):
    """The request is valid but the system is not in a state to run it (e.g. wrong base model)."""

    reason = "FAILED_PRECONDITION"


class BaseMismatch(FailedPrecondition):
    """An artifact was made for another base model."""

    reason = "BASE_MISMATCH"

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what} was made for base fingerprint {actual}, but this base has fingerprint {expected}"
        )
        self.expected = expected
        self.actual = actual


class CorruptArtifact(CustomDiffError):
    """Stored bytes do not match their digest or do not parse."""

    reason = "CORRUPT_ARTIFACT"


class Unavailable(CustomDiffError):
    reason = "UNAVAILABLE"


class ResourceExhausted(CustomDiffError):
    reason = "RESOURCE_EXHAUSTED"


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota would be exceeded; `quota` names it (google.rpc.QuotaFailure's subject)."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, quota: str, tenant: str, description: str) -> None:
        super().__init__(f"quota {quota} of tenant {tenant!r} exceeded: {description}")
        self.quota = quota
        self.tenant = tenant
        self.description = description


class PermissionDenied(CustomDiffError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(CustomDiffError):
    reason = "UNAUTHENTICATED"


class DeadlineExceeded(CustomDiffError):
    reason = "DEADLINE_EXCEEDED"
