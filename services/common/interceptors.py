"""Server interceptors: bearer-token auth and domain-error -> gRPC status mapping, one job each.

Both wrap the method handler's behaviour, so they run in the thread that runs the RPC (unary and
server-streaming alike) and the caller's tenant is available to the servicer via `current_tenant()`.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from concepts import errors

log = logging.getLogger(__name__)
DOMAIN = "customdiff.io"
# Health checking and reflection stay open: probes and tools carry no API key.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")

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


def _wrap(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its unary-unary or unary-stream behaviour wrapped by `around(behaviour)`."""
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary, streaming=False),
                                                   handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream, streaming=True),
                                                    handler.request_deserializer, handler.response_serializer)
    return handler


class AuthInterceptor(grpc.ServerInterceptor):
    """Maps `authorization: Bearer <api key>` to a tenant; every RPC but health and reflection needs one."""

    def __init__(self, api_keys: dict[str, str]) -> None:
        self._api_keys = dict(api_keys)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        tenant = self._tenant_for(metadata.get("authorization", ""))

        def around(behaviour, streaming):
            def check(context):
                if tenant is None:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or unknown API key: send metadata 'authorization: Bearer <api key>'")

            def unary(request, context):
                check(context)
                token = _tenant.set(tenant)
                try:
                    return behaviour(request, context)
                finally:
                    _tenant.reset(token)

            def stream(request, context):
                check(context)
                token = _tenant.set(tenant)
                try:
                    yield from behaviour(request, context)
                finally:
                    _tenant.reset(token)

            return stream if streaming else unary

        return _wrap(handler, around)

    def _tenant_for(self, header: str) -> str | None:
        scheme, _, key = header.partition(" ")
        return self._api_keys.get(key.strip()) if scheme.lower() == "bearer" else None


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain errors into canonical codes with ErrorInfo (and BadRequest naming the field).

    Anything else becomes INTERNAL with a generic message; the traceback goes to the log only.
    """

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method

        def around(behaviour, streaming):
            def unary(request, context):
                try:
                    return behaviour(request, context)
                except Exception as e:  # noqa: BLE001 - the one place that maps every error
                    _abort(context, e, method)

            def stream(request, context):
                try:
                    yield from behaviour(request, context)
                except Exception as e:  # noqa: BLE001
                    _abort(context, e, method)

            return stream if streaming else unary

        return _wrap(continuation(handler_call_details), around)


def to_status(exc: errors.CustomDiffError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error."""
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), code_pb2.INTERNAL)
    details = []
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)
    details.append(info)
    if isinstance(exc, errors.InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=code, message=str(exc), details=packed)


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.CustomDiffError):
        context.abort_with_status(rpc_status.to_status(to_status(exc)))
    if context.code() not in (None, grpc.StatusCode.OK):  # the servicer aborted itself: keep its status
        raise exc
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
