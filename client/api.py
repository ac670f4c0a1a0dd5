"""A small Python client of stylize.v1.StyleTransfer. It needs only grpc and the generated code.

    from stylize_service.client.api import StylizeClient

    with StylizeClient("localhost:50051") as client:
        print(client.info().model.name)
        call = client.stylize("photo.jpg", ["starry.jpg", ("waves.png", 0.5)], max_size=384, frame_every=20)
        for event in call:                 # pb.Queued, pb.Progress, pb.Frame, then one pb.Result
            ...
        png = call.result.image            # the Result, also the last event
        # or, in one go:  result = client.run("photo.jpg", ["starry.jpg"], on_event=print, iterations=200)

A server that keeps strangers out (see client/security.py):

    StylizeClient("stylize.example.com:50051", tls_ca="ca.pem", token=os.environ["STYLIZE_TOKEN"])
    StylizeClient(address, tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key")   # mutual TLS

The address is any gRPC target: "host:port", "dns:///name:port" (every address the name resolves to,
e.g. a Kubernetes headless Service) or "ipv4:10.0.0.1:50051,10.0.0.2:50051". Calls are spread over the
replicas round robin, skipping those whose health service says NOT_SERVING (loading or draining); see
SERVICE_CONFIG. With retries=N a call that every replica refuses as busy is tried again, up to N times.

Errors are raised as StylizeError, whose `code` is the grpc.StatusCode (INVALID_ARGUMENT for a bad
request, UNAVAILABLE when the server cannot be reached, UNAUTHENTICATED for a missing or wrong token,
CANCELLED after cancel(), ...). Unusable TLS files or tokens raise ClientSecurityError (a ValueError).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import grpc

from stylize_service.client.request import ImageInput, StyleInput, build_request
from stylize_service.client.security import PemInput, open_channel, token_metadata
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.protos.stylize.v1.contract import DEFAULT_MAX_MESSAGE_MB, SERVICE_NAME

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_RETRY_BACKOFF = 1.0  # seconds before the first retry; it doubles for each further one ...
MAX_RETRY_BACKOFF = 30.0  # ... up to this (a job takes seconds to an hour to free its worker)

# The channel's gRPC service config: round robin over every address the target resolves to (gRPC's
# default, pick_first, would send every call to one replica), and client-side health checking, so that
# replicas whose grpc.health.v1 status for the service is NOT_SERVING (loading the model, or draining)
# get no calls. Clients in other languages can use the same JSON.
SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME}}
)

# What iterating a StylizeCall yields: the oneof of StylizeResponse, unwrapped.
Event: TypeAlias = pb.Queued | pb.Progress | pb.Frame | pb.Result


class StylizeError(Exception):
    """A call failed; code is the grpc.StatusCode and details the server's (or grpc's) message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> StylizeError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(code, details or code.name)


# Starts one attempt of a call, given the seconds left until its deadline (None = none): the grpc call,
# an iterator of StylizeResponse that is also a grpc.Future.
Attempt = Callable[[float | None], Any]
# on_retry(error, retry, delay): the call was refused as busy; retry number `retry` follows in `delay` s.
RetryHook = Callable[["StylizeError", int, float], None]


class StylizeCall:
    """One running Stylize call. Iterate it (once) for its events; the last is the Result, which is
    also kept in `result`. cancel() may be called from any thread; the iteration then raises
    StylizeError(CANCELLED).

    A call that the server refuses with RESOURCE_EXHAUSTED (every worker busy, the queue full) before
    sending any event is started again, up to `retries` times, after a backoff that doubles from `backoff`
    seconds (jittered, at most MAX_RETRY_BACKOFF): the channel's round robin sends it to the next replica.
    Nothing ran on the server, so a retry repeats no work. `timeout` bounds all attempts together."""

    def __init__(
        self,
        attempt: Attempt,
        *,
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = DEFAULT_RETRY_BACKOFF,
        on_retry: RetryHook | None = None,
    ) -> None:
        self._attempt = attempt
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retries = retries
        self._backoff = backoff
        self._on_retry = on_retry
        self._lock = threading.Lock()  # orders cancel() against starting a retry
        self._cancelled = threading.Event()
        self._responses = attempt(timeout)
        self.attempts = 1
        self.result: pb.Result | None = None
        self._iterator = self._events()

    def __iter__(self) -> Iterator[Event]:
        return self._iterator

    def __next__(self) -> Event:
        return next(self._iterator)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            self._responses.cancel()

    def wait(self, on_event: Callable[[Event], None] | None = None) -> pb.Result:
        """Consume the remaining events (passing each to on_event) and return the Result."""
        for event in self:
            if on_event is not None:
                on_event(event)
        assert self.result is not None  # _events raises otherwise
        return self.result

    def _events(self) -> Iterator[Event]:
        while True:
            received = False
            refused: StylizeError | None = None
            try:
                for response in self._responses:
                    received = True
                    kind = response.WhichOneof("event")
                    if kind is None:
                        continue  # an event type newer than this client
                    event = getattr(response, kind)
                    if kind == "result":
                        self.result = event
                    yield event
            except grpc.RpcError as err:
                error = StylizeError.from_rpc(err)
                if received or error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise error from None
                refused = error  # before any event: the job never ran anywhere
            if refused is None:
                break
            self._retry(refused)
        if self.result is None:
            raise StylizeError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")

    def _retry(self, error: StylizeError) -> None:
        """Wait out the backoff and start the next attempt, or raise `error` when no retry is left (or
        none would start before the deadline)."""
        retry = self.attempts  # 1 for the first retry
        if retry > self._retries:
            raise error
        delay = min(MAX_RETRY_BACKOFF, self._backoff * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise error
        if self._on_retry is not None:
            self._on_retry(error, retry, delay)
        if self._cancelled.wait(delay):
            raise StylizeError(grpc.StatusCode.CANCELLED, "cancelled while waiting to retry")
        with self._lock:
            if self._cancelled.is_set():
                raise StylizeError(grpc.StatusCode.CANCELLED, "cancelled while waiting to retry")
            remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            self._responses = self._attempt(remaining)
            self.attempts += 1


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    """The client channel's options: message size limits and SERVICE_CONFIG."""
    limit = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.service_config", SERVICE_CONFIG),
    ]


class StylizeClient:
    """A channel to one server or several replicas (address: any gRPC target, see the module's doc). Use
    it as a context manager (or call close()); it is thread-safe and several calls may run over it at
    once, each on the next replica. timeout: seconds allowed per call, retries included (None = no
    deadline). retries: how often a Stylize call refused as busy is tried again (see StylizeCall);
    retry_backoff: seconds before the first retry.

    TLS: tls=True checks the server's certificate against gRPC's default roots, tls_ca (a PEM path or
    bytes) against that CA instead; tls_cert and tls_key add a client certificate (mutual TLS);
    tls_server_name checks the certificate for that name instead of the address's host. token: a bearer
    token, sent as `authorization: Bearer TOKEN` with every call."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        *,
        max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
        wait_for_ready: bool = False,
        retries: int = 0,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        tls: bool = False,
        tls_ca: PemInput | None = None,
        tls_cert: PemInput | None = None,
        tls_key: PemInput | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        if retries < 0 or retry_backoff < 0:
            raise ValueError(f"retries and retry_backoff must be >= 0, got {retries} and {retry_backoff}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._wait_for_ready = wait_for_ready
        self._metadata = token_metadata(token)
        self._channel = open_channel(
            address,
            channel_options(max_message_mb),
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        self._stub = pb_grpc.StyleTransferStub(self._channel)

    def __enter__(self) -> StylizeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until a replica is connected and SERVING; False if `timeout` seconds passed first. Calls
        made before that all go to the first replica to connect, so a client that starts several calls at
        once should wait first: then round robin spreads them over the replicas that are up."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            return False
        return True

    def info(self) -> pb.GetInfoResponse:
        """The model, the defaults of every option and the server's limits."""
        try:
            return self._stub.GetInfo(
                pb.GetInfoRequest(),
                timeout=self.timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.RpcError as err:
            raise StylizeError.from_rpc(err) from None

    def stylize(self, content: ImageInput, styles: Sequence[StyleInput], **options: Any) -> StylizeCall:
        """Start a stylization. content and styles are paths or encoded bytes; a style may be an
        (image, blend weight) pair. options are StylizeOptions fields by name (see request.build_options),
        e.g. max_size=384, pooling="avg", style_layers={"relu1_1": 1, "relu2_1": 0.5}."""
        return self.stylize_request(build_request(content, styles, **options))

    def stylize_request(
        self, request: pb.StylizeRequest, *, on_retry: RetryHook | None = None
    ) -> StylizeCall:
        """Start a stylization from a ready-made request. on_retry(error, retry, delay) hears of each
        retry before its backoff (e.g. to tell the user)."""
        return StylizeCall(
            lambda timeout: self._stub.Stylize(
                request, timeout=timeout, metadata=self._metadata, wait_for_ready=self._wait_for_ready
            ),
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.retry_backoff,
            on_retry=on_retry,
        )

    def run(
        self,
        content: ImageInput,
        styles: Sequence[StyleInput],
        on_event: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> pb.Result:
        """stylize() and wait for the Result, passing every event to on_event."""
        return self.stylize(content, styles, **options).wait(on_event)
