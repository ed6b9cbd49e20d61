"""A Triton Python model's `execute` around the engine: parse the batch's requests, run them, answer each.

Both repositories' `stable_diffusion/1/model.py` use it (torch in `model_repository`, the ONNX graphs
by BLS in `model_repository_onnx`). `respond` answers a whole `execute` batch when it returns
(request-level batching, non-decoupled); `submit_decoupled` hands each request to the engine's
step-level loop and answers it through its response sender when its images are done, so `execute`
returns at once and Triton's next requests join the running loop (decoupled models). Importable
anywhere; `triton_python_backend_utils` is imported when a function runs, since only Triton's Python
backend stub provides it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from concepts.errors import CustomDiffError, InvalidArgument
from engine.engine import BATCHING, Engine, to_png
from engine.request import GenerationRequest
from concepts.tracing import OTLP_ENV, TRACEPARENT, configure_tracing, context_from
from services.inference.triton_metrics import TritonMetrics
from services.inference.triton_protocol import error_text

log = logging.getLogger("customdiff.triton")
tracer = trace.get_tracer("customdiff.triton")


def observe(args: dict) -> tuple[TritonMetrics, Callable[[], None] | None]:
    """For `initialize`: the instance's engine observer (Triton metrics on :8002) and its tracing, on when
    $CUSTOMDIFF_OTLP_ENDPOINT is set; returns the observer and what flushes the spans (for `finalize`)."""
    stop_tracing = configure_tracing("customdiff-triton", os.environ.get(OTLP_ENV, ""))
    return TritonMetrics(args["model_name"], args["model_instance_name"]), stop_tracing


def model_parameters(parameters: Mapping[str, Mapping[str, str]]) -> tuple[str, dict[str, Mapping[str, str]]]:
    """config.pbtxt's ``batching`` parameter ("request" when absent) and the others (for `ModelSettings`).

    Raises:
        InvalidArgument: ``batching`` is neither "request" nor "step".
    """
    rest = dict(parameters)
    batching = rest.pop("batching", {}).get("string_value", "request")
    if batching not in BATCHING:
        raise InvalidArgument("batching", f"must be one of {list(BATCHING)}, got {batching!r}")
    return batching, rest


def submit_decoupled(engine: Engine, requests: list) -> None:
    """Decoupled models: queue each request on the engine's step-level loop; answer it when it is done.

    Each request gets exactly one response, its last (``TRITONSERVER_RESPONSE_COMPLETE_FINAL``), from
    the loop's thread when its images are ready, or at once if it does not parse. A request's Triton
    `timeout` (the client's deadline) becomes its deadline in the loop.
    """
    for request in requests:
        sender = request.get_response_sender()
        timeout_us = request.timeout() if hasattr(request, "timeout") else 0
        params = _parameters(request)
        span = _span(params)
        try:
            future = engine.submit(_parse(request, params), time.monotonic() + timeout_us / 1e6 if timeout_us else None,
                                   trace.set_span_in_context(span))
        except Exception as e:  # noqa: BLE001 - a request that cannot start still gets its one final answer
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda done, sender=sender, span=span: _answer(sender, done, span))


def _parameters(request) -> dict:
    """The request's parameters: its GenerationRequest fields and the caller's ``traceparent``."""
    return json.loads(request.parameters() or "{}")


def _span(params: dict) -> Span:
    """The model's SERVER span of one request, continuing the caller's trace (the ``traceparent`` parameter)."""
    traceparent = params.get(TRACEPARENT, "")
    return tracer.start_span("stable_diffusion", context=context_from(traceparent if isinstance(traceparent, str)
                                                                        else ""), kind=SpanKind.SERVER)


def _end(span: Span, error: BaseException | None) -> None:
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, getattr(error, "reason", type(error).__name__)))
    span.end()


def _answer(sender, future: Future, span: Span) -> None:
    """Send the request's one final response. Every request must get it, even when the client went away:
    Triton holds a decoupled request (and cannot unload the model) until its final flag is sent."""
    import triton_python_backend_utils as pb_utils

    _end(span, future.exception())
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        sender.send(_response(future), flags=final)
    except Exception:  # noqa: BLE001 - e.g. the client cancelled its stream
        log.warning("stable_diffusion: could not send a response; closing the request without one", exc_info=True)
        try:
            sender.send(flags=final)
        except Exception:  # noqa: BLE001 - already closed
            pass


def _response(future: Future):
    """The response for a finished loop future: its PNGs, or its error (a bug as INTERNAL, logged)."""
    try:
        return images_response(future.result())
    except CustomDiffError as e:
        return error_response(e)
    except Exception as e:  # a bug, not a bad request
        log.exception("stable_diffusion: a request failed in the step loop")
        return error_response(CustomDiffError(f"internal error: {type(e).__name__}: {e}"))


def images_response(images: list[np.ndarray]):
    """A response with the images as PNG bytes in ``IMAGES`` [1, num_images]."""
    import triton_python_backend_utils as pb_utils

    pngs = np.array([[to_png(image) for image in images]], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", pngs)])


def _parse(request, params: dict) -> GenerationRequest:
    fields = {k: v for k, v in params.items() if k != TRACEPARENT}  # trace context is not a field (`_span`)
    return GenerationRequest.from_parameters(_text(request, "PROMPT"), _text(request, "NEGATIVE_PROMPT"), fields)


def respond(engine: Engine, requests: list, model: str) -> list:
    """Exactly one response per request, in order; the batch's valid requests run together.

    A request that does not parse gets its own error; an error of the whole batch (a domain error,
    e.g. a BLS call that failed, or a bug) goes to every request that ran.
    """
    responses: list = [None] * len(requests)
    parsed: list[tuple[int, GenerationRequest]] = []
    params = [_parameters(request) for request in requests]
    spans = [_span(p) for p in params]
    for i, request in enumerate(requests):
        try:
            parsed.append((i, _parse(request, params[i])))
        except CustomDiffError as e:
            responses[i] = error_response(e)
            _end(spans[i], e)
    try:
        results = engine.generate_batch([r for _, r in parsed], [trace.set_span_in_context(spans[i]) for i, _ in parsed])
    except CustomDiffError as e:
        results = [e] * len(parsed)
    except Exception as e:  # a bug, not a bad request
        log.exception("%s: batch of %d failed", model, len(parsed))
        results = [CustomDiffError(f"internal error: {type(e).__name__}: {e}")] * len(parsed)
    for (i, _), result in zip(parsed, results):
        if isinstance(result, CustomDiffError):
            responses[i] = error_response(result)
            _end(spans[i], result)
        else:
            responses[i] = images_response(result)
            _end(spans[i], None)
    return responses


def error_response(error: CustomDiffError):
    """A response carrying `error` as ``[REASON] message`` with the matching Triton status code."""
    import triton_python_backend_utils as pb_utils

    codes = {"INVALID_ARGUMENT": pb_utils.TritonError.INVALID_ARG,
             "NOT_FOUND": pb_utils.TritonError.NOT_FOUND, "UNAVAILABLE": pb_utils.TritonError.UNAVAILABLE}
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(error_text(error), codes.get(error.reason, pb_utils.TritonError.INTERNAL)))


def _text(request, name: str) -> str:
    """A BYTES [1] input as text; "" when the optional input is absent."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ""
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
