"""Failed calls as exceptions that carry what the server said: code, message and its google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest): which, and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One quota a request would exceed (google.rpc.QuotaFailure): ``tenant:<name>`` and the quota's words."""

    subject: str
    description: str


class CallError(grpc.RpcError):
    """A call that failed; still a `grpc.RpcError` (``code()``, ``details()``) for code that catches those.

    Attributes:
        status: the gRPC status code.
        message: the server's message (it ends with ``[request <id>]`` for the server's log).
        reason: ErrorInfo.reason, a stable machine-readable cause (e.g. ``QUOTA_EXCEEDED``), or "".
        request_id: the id the server logged the call under, or "".
        field_violations: BadRequest's violations: which request fields were wrong.
        quota_violations: QuotaFailure's violations.
    """

    def __init__(self, status: grpc.StatusCode, message: str, reason: str = "", request_id: str = "",
                 field_violations: tuple[FieldViolation, ...] = (),
                 quota_violations: tuple[QuotaViolation, ...] = ()) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.request_id = request_id
        self.field_violations = field_violations
        self.quota_violations = quota_violations

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> CallError:
        """The details the server packed into the status (grpc-status-details-bin), unpacked."""
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        reason, request_id, fields, quotas = "", "", [], []
        for detail in status.details if status is not None else ():
            info, bad, quota = (error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(),
                                error_details_pb2.QuotaFailure())
            if detail.Unpack(info):
                reason, request_id = info.reason, info.metadata.get("request_id", "")
            elif detail.Unpack(bad):
                fields += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(quota):
                quotas += [QuotaViolation(v.subject, v.description) for v in quota.violations]
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        return cls(code, message or "", reason, request_id, tuple(fields), tuple(quotas))


class JobFailed(RuntimeError):
    """A job ended in FAILED or CANCELLED; the message is the job's error message."""
