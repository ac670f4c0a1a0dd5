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

Errors are raised as StylizeError, whose `code` is the grpc.StatusCode (INVALID_ARGUMENT for a bad
request, UNAVAILABLE when the server cannot be reached, UNAUTHENTICATED for a missing or wrong token,
CANCELLED after cancel(), ...). Unusable TLS files or tokens raise ClientSecurityError (a ValueError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from stylize_service.client.request import ImageInput, StyleInput, build_request
from stylize_service.client.security import PemInput, open_channel, token_metadata
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_MAX_MESSAGE_MB = 64  # the server's default limit too

Event = pb.Queued | pb.Progress | pb.Frame | pb.Result


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


class StylizeCall:
    """One running Stylize call. Iterate it (once) for its events; the last is the Result, which is
    also kept in `result`. cancel() may be called from any thread; the iteration then raises
    StylizeError(CANCELLED)."""

    def __init__(self, responses: Any) -> None:
        self._responses = responses  # the grpc call: an iterator of StylizeResponse and a grpc.Future
        self.result: pb.Result | None = None
        self._iterator = self._events()

    def __iter__(self) -> Iterator[Event]:
        return self._iterator

    def __next__(self) -> Event:
        return next(self._iterator)

    def cancel(self) -> None:
        self._responses.cancel()

    def wait(self, on_event: Callable[[Event], None] | None = None) -> pb.Result:
        """Consume the remaining events (passing each to on_event) and return the Result."""
        for event in self:
            if on_event is not None:
                on_event(event)
        assert self.result is not None  # _events raises otherwise
        return self.result

    def _events(self) -> Iterator[Event]:
        try:
            for response in self._responses:
                kind = response.WhichOneof("event")
                if kind is None:
                    continue  # an event type newer than this client
                event = getattr(response, kind)
                if kind == "result":
                    self.result = event
                yield event
        except grpc.RpcError as err:
            raise StylizeError.from_rpc(err) from None
        if self.result is None:
            raise StylizeError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")


class StylizeClient:
    """A channel to one server. Use it as a context manager (or call close()); it is thread-safe and
    several calls may run over it at once. timeout: seconds allowed per call (None = no deadline).

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
        tls: bool = False,
        tls_ca: PemInput | None = None,
        tls_cert: PemInput | None = None,
        tls_key: PemInput | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        limit = int(max_message_mb * 1024 * 1024)
        self.address = address
        self.timeout = timeout
        self._wait_for_ready = wait_for_ready
        self._metadata = token_metadata(token)
        self._channel = open_channel(
            address,
            [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
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

    def stylize_request(self, request: pb.StylizeRequest) -> StylizeCall:
        """Start a stylization from a ready-made request."""
        return StylizeCall(
            self._stub.Stylize(
                request, timeout=self.timeout, metadata=self._metadata, wait_for_ready=self._wait_for_ready
            )
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
