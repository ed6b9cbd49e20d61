"""Server interceptors: bearer-token auth and domain-error -> gRPC status mapping, one job each.

Both wrap the method handler's behaviour, so they run in the thread that runs the RPC (unary and
server-streaming alike) and the caller's tenant is available to the servicer via `current_tenant()`.
Every failed RPC gets a request id: the status message and its ErrorInfo carry it, and the server
log line with the details a caller must not see (paths, addresses, tracebacks) carries it too.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from typing import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from concepts import errors

log = logging.getLogger(__name__)
DOMAIN = "customdiff.io"
# Health checking and reflection stay open: probes and tools carry no API key.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
REQUEST_ID_HEADER = "x-request-id"
MAX_MESSAGE_CHARS = 1000
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_CODES = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.CorruptArtifact: code_pb2.DATA_LOSS,
    errors.Unavailable: code_pb2.UNAVAILABLE,
    errors.DeadlineExceeded: code_pb2.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
}


def current_tenant() -> str:
    """The authenticated tenant of the RPC being served."""
    return _tenant.get()


def current_tenant_or(default: str) -> str:
    """The authenticated tenant of the RPC being served, or `default` outside one (e.g. for log lines)."""
    return _tenant.get(default)


def current_request_id() -> str:
    """The id of the RPC being served: the caller's `x-request-id` when it is sane, else a new one."""
    return _request_id.get()


def _request_id_from(metadata) -> str:
    given = [v for k, v in metadata or () if k == REQUEST_ID_HEADER]
    if len(given) == 1 and isinstance(given[0], str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given[0]):
        return given[0]
    return uuid.uuid4().hex[:16]


def wrap_behaviour(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behaviour, of any of the four kinds, wrapped by `around(behaviour, streaming)`;
    `streaming` says whether the behaviour yields its responses."""
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary, streaming=False),
                                                   handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream, streaming=True),
                                                    handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:  # client-streaming uploads: `request` is the iterator of messages
        return grpc.stream_unary_rpc_method_handler(around(handler.stream_unary, streaming=False),
                                                    handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:  # reflection
        return grpc.stream_stream_rpc_method_handler(around(handler.stream_stream, streaming=True),
                                                     handler.request_deserializer, handler.response_serializer)
    raise TypeError(f"a method handler of no known kind: {handler!r}")  # never serve one unwrapped (unauthenticated)


def wrap_enter_leave(handler: grpc.RpcMethodHandler, enter: Callable[[grpc.ServicerContext], object],
                     leave: Callable[[object], None]) -> grpc.RpcMethodHandler:
    """Rebuild `handler` so that each call runs `enter(context)` first (it may abort) and `leave(what enter
    returned)` when the call ends; for a stream, when the stream ends or the client goes away."""
    def around(behaviour, streaming):
        def unary(request, context):
            entered = enter(context)
            try:
                return behaviour(request, context)
            finally:
                leave(entered)

        def stream(request, context):
            entered = enter(context)
            try:
                yield from behaviour(request, context)
            finally:
                leave(entered)

        return stream if streaming else unary

    return wrap_behaviour(handler, around)


class AuthInterceptor(grpc.ServerInterceptor):
    """Maps `authorization: Bearer <api key>` to a tenant; every RPC but health and reflection needs one."""

    def __init__(self, api_keys: dict[str, str]) -> None:
        self._api_keys = dict(api_keys)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        headers = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        # Two authorization headers are ambiguous (a proxy may add one): refuse rather than pick one.
        tenant = self._tenant_for(headers[0]) if len(headers) == 1 else None

        def enter(context):
            if tenant is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing, repeated or unknown API key: send one "
                                                               "metadata entry 'authorization: Bearer <api key>'")
            return _tenant.set(tenant)

        return wrap_enter_leave(handler, enter, _tenant.reset)

    def _tenant_for(self, header: str) -> str | None:
        if not isinstance(header, str):
            return None
        scheme, _, key = header.partition(" ")
        return self._api_keys.get(key.strip()) if scheme.lower() == "bearer" else None


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain errors into canonical codes with ErrorInfo (and BadRequest naming the field).

    Anything else becomes INTERNAL with a generic message; the traceback goes to the log only. The
    RPC's request id goes back to the caller in the initial metadata (`x-request-id`), error or not.
    """

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        request_id = _request_id_from(handler_call_details.invocation_metadata)

        def around(behaviour, streaming):
            def unary(request, context):
                token = _request_id.set(request_id)
                context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                try:
                    return behaviour(request, context)
                except Exception as e:  # noqa: BLE001 - the one place that maps every error
                    _abort(context, e, method, request_id)
                finally:
                    _request_id.reset(token)

            def stream(request, context):
                token = _request_id.set(request_id)
                context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                try:
                    yield from behaviour(request, context)
                except Exception as e:  # noqa: BLE001
                    _abort(context, e, method, request_id)
                finally:
                    _request_id.reset(token)

            return stream if streaming else unary

        return wrap_behaviour(continuation(handler_call_details), around)


def to_status(exc: errors.CustomDiffError, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status of a domain error; the message ends with the request id when one is given."""
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), code_pb2.INTERNAL)
    message = _cut(str(exc))
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN,
                                           metadata={"request_id": request_id} if request_id else {})]
    if isinstance(exc, errors.InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=_cut(exc.description))]))
    if isinstance(exc, errors.QuotaExceeded):
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{exc.tenant}", description=f"{exc.quota}: {exc.description}")]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    if request_id:
        message = f"{message} [request {request_id}]"
    return status_pb2.Status(code=code, message=message, details=packed)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _abort(context: grpc.ServicerContext, exc: Exception, method: str, request_id: str) -> None:
    if isinstance(exc, errors.CustomDiffError):
        log.info("request %s: %s failed: %s: %s", request_id, method, type(exc).__name__, exc,
                 exc_info=isinstance(exc, errors.CorruptArtifact))
        status = to_status(exc, request_id)
        # abort_with_status does not reach the RPC's span (the grpc instrumentation sees abort() only).
        span = trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", status.code)
        span.set_status(Status(StatusCode.ERROR, f"{code_pb2.Code.Name(status.code)}: {exc.reason}"))
        context.abort_with_status(rpc_status.to_status(status))
    if context.code() not in (None, grpc.StatusCode.OK):  # the servicer aborted itself: keep its status
        raise exc
    log.exception("request %s: unexpected error in %s", request_id, method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error; the server log has the details [request {request_id}]")
