"""Counting every gRPC call in stylize_grpc_requests_total (server/metrics.py), by method and status code.

Apart from the metrics themselves so that what reports to them (the job manager) needs no gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter

from stylize_service.server.metrics import ServerMetrics

# A call that ended within this long of its deadline is taken to have ended by it: the cancellation comes
# from gRPC core's clock and time_remaining() from Python's, which may differ by a little.
DEADLINE_SLACK_SECONDS = 0.05


def call_deadline_passed(context: grpc.ServicerContext) -> bool:
    """True when the call had a deadline and it has passed (gRPC reports that as a cancellation)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


def counting_interceptor(metrics: ServerMetrics) -> grpc.ServerInterceptor:
    """Counts every call in stylize_grpc_requests_total. Put it first in grpc.server's interceptors so
    that calls that later interceptors refuse are counted too."""
    return _CountingInterceptor(metrics.grpc_requests)


class _CountingInterceptor(grpc.ServerInterceptor):
    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED; not counted (unbounded names)
        method: str = handler_call_details.method
        return _counted_handler(handler, lambda code: self._counter.labels(method, code.name).inc())


def _final_code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status a call that ended without an exception of ours will get."""
    code = context.code()  # type: ignore[attr-defined]  # grpc has it (experimental); its stubs lack it
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code  # set_code() or abort()
    if not context.is_active():  # the client cancelled, its deadline passed, or the server stopped
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if call_deadline_passed(context) else grpc.StatusCode.CANCELLED
        )
    return default


def _counted_handler(
    handler: grpc.RpcMethodHandler, record: Callable[[grpc.StatusCode], None]
) -> grpc.RpcMethodHandler:
    """The same handler, calling record(code) once when its call ends."""

    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behavior(request, context)
            except Exception:
                record(_final_code(context, grpc.StatusCode.UNKNOWN))
                raise
            record(_final_code(context, grpc.StatusCode.OK))
            return response

        return wrapped

    def non_blocking_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        # grpcio's non-blocking streams (health's Watch): the behaviour returns at once and answers later
        # through send_response_callback, so the call holds no handler thread while it lasts. The wrapper
        # must stay non-blocking (same attributes, same signature), or every Watch would hold a thread.
        def wrapped(request: Any, context: grpc.ServicerContext, send_response_callback: Any) -> None:
            recorded = threading.Event()

            def record_once(code: grpc.StatusCode) -> None:
                if not recorded.is_set():
                    recorded.set()
                    record(code)

            def send(response: Any) -> None:
                if response is None:  # the behaviour ends the call
                    record_once(_final_code(context, grpc.StatusCode.OK))
                send_response_callback(response)

            context.add_callback(lambda: record_once(_final_code(context, grpc.StatusCode.CANCELLED)))
            try:
                behavior(request, context, send)
            except Exception:
                record_once(_final_code(context, grpc.StatusCode.UNKNOWN))
                raise

        wrapped.experimental_non_blocking = True  # type: ignore[attr-defined]
        wrapped.experimental_thread_pool = getattr(  # type: ignore[attr-defined]
            behavior, "experimental_thread_pool", None
        )
        return wrapped

    def stream_response(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # gRPC stopped reading and dropped the stream: cancelled or timed out
                record(_final_code(context, grpc.StatusCode.CANCELLED))
                raise
            except Exception:
                record(_final_code(context, grpc.StatusCode.UNKNOWN))
                raise
            record(_final_code(context, grpc.StatusCode.OK))

        return wrapped

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **serializers)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream
        if getattr(behavior, "experimental_non_blocking", False):
            return grpc.unary_stream_rpc_method_handler(non_blocking_stream(behavior), **serializers)
        return grpc.unary_stream_rpc_method_handler(stream_response(behavior), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **serializers)
    assert handler.stream_stream is not None  # a handler has exactly one of the four behaviours
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **serializers)
