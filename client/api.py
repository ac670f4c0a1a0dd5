"""A small Python client of stylize.v1.StyleTransfer. It needs only grpc and the generated code.

    from stylize_service.client.api import StylizeClient

    with StylizeClient("localhost:50051") as client:
        print(client.info().model.name)
        call = client.stylize("photo.jpg", ["starry.jpg", ("waves.png", 0.5)], max_size=384, frame_every=20)
        for event in call:                 # pb.Queued, pb.Progress, pb.Frame, then one pb.Result
            ...
        png = call.result.image            # the Result, also the last event
        # or, in one go:  result = client.run("photo.jpg", ["starry.jpg"], on_event=print, iterations=200)

Jobs (SubmitJob and friends) outlive the call that made them: the server keeps their events and result, and
resumes them from a checkpoint after a restart. A job's events carry sequence numbers, so a watch can pick
up where a broken one stopped:

        job = client.submit("photo.jpg", ["starry.jpg"], frame_every=20)   # pb.Job, QUEUED or RUNNING
        watch = client.follow(job.id)      # reattaches across dropped connections and server restarts
        for item in watch:                 # JobEvent(sequence, event); event as for stylize()
            ...
        png = watch.result.image           # the Result, also the last event
        client.watch(job.id, after=57)     # one WatchJob stream: only the events after sequence 57
        client.get(job.id, include_image=False).state     # pb.JobState, e.g. pb.RUNNING
        client.cancel(job.id)              # stops it on the server; a watch ends with CANCELLED
        for job in client.jobs(): ...      # the caller's jobs, newest first, every page

A server without jobs (older than the job RPCs) answers submit() with UNIMPLEMENTED; stylize() still works.
A job belongs to its submitter's identity (token, client certificate or address); to anyone else, and for
an unknown id, the job calls raise NOT_FOUND (INVALID_ARGUMENT for an id that is not 32 hex digits).

A server that keeps strangers out (see client/security.py):

    StylizeClient("stylize.example.com:50051", tls_ca="ca.pem", token=os.environ["STYLIZE_TOKEN"])
    StylizeClient(address, tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key")   # mutual TLS

The address is any gRPC target: "host:port", "dns:///name:port" (every address the name resolves to,
e.g. a Kubernetes headless Service) or "ipv4:10.0.0.1:50051,10.0.0.2:50051". Calls are spread over the
replicas round robin, skipping those whose health service says NOT_SERVING (loading or draining); see
SERVICE_CONFIG. With retries=N a call that every replica refuses as busy is tried again, up to N times.

Errors are raised as StylizeError, whose `code` is the grpc.StatusCode (INVALID_ARGUMENT for a bad
request, UNAVAILABLE when the server cannot be reached, UNAUTHENTICATED for a missing or wrong token,
CANCELLED after cancel() or for a cancelled job, NOT_FOUND for an unknown job, ...). Unusable TLS files or tokens raise ClientSecurityError (a ValueError).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from stylize_service.client.errors import StylizeError as StylizeError
from stylize_service.client.reattach import (
    DEFAULT_RECONNECT_SECONDS,
    Event,
    JobWatch,
    ReconnectHook,
)
from stylize_service.client.reattach import (
    JobEvent as JobEvent,
)
from stylize_service.client.request import ImageInput, StyleInput, build_request
from stylize_service.client.security import PemInput, open_channel, token_metadata
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.protos.stylize.v1.contract import DEFAULT_MAX_MESSAGE_MB, SERVICE_NAME

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_RETRY_BACKOFF = 1.0  # seconds before the first retry; it doubles for each further one ...
MAX_RETRY_BACKOFF = 30.0  # ... up to this (a job takes seconds to an hour to free its worker)
MAX_RECONNECT_BACKOFF_MS = 5000  # the channel's longest wait between attempts to reconnect
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # the proto's job ids: 32 lowercase hex digits

# The channel's gRPC service config: round robin over every address the target resolves to (gRPC's
# default, pick_first, would send every call to one replica), and client-side health checking, so that
# replicas whose grpc.health.v1 status for the service is NOT_SERVING (loading the model, or draining)
# get no calls. Clients in other languages can use the same JSON.
SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME}}
)

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
        delay = busy_backoff(self._backoff, retry)
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


def busy_backoff(backoff: float, retry: int) -> float:
    """Seconds before retry number `retry` (1 for the first) of a call refused as busy: doubling from
    `backoff`, at most MAX_RETRY_BACKOFF, jittered within [1/2, 1] so that refused clients spread out."""
    return min(MAX_RETRY_BACKOFF, backoff * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    """The client channel's options: message size limits and SERVICE_CONFIG."""
    limit = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.service_config", SERVICE_CONFIG),
        # gRPC waits up to 120 s between attempts to reconnect to a server that went away; a job watch
        # reattaches for up to DEFAULT_RECONNECT_SECONDS, so notice a restarted server sooner.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
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
        (image, blend weight) pair, or a request.Style with a mask (where it paints) and a style mask
        (where its texture comes from): Style("a.jpg", 1.0, mask="left.png"). options are StylizeOptions fields by name (see request.build_options),
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

    # --- jobs: stylizations that outlive their call ----------------------------------------------------

    def submit(self, content: ImageInput, styles: Sequence[StyleInput], **options: Any) -> pb.Job:
        """Submit a job (SubmitJob) and return it, QUEUED or RUNNING; it runs whether anyone watches it or
        not. Takes the arguments of stylize(); the server checks the request exactly as Stylize does."""
        return self.submit_request(build_request(content, styles, **options))

    def submit_request(self, request: pb.StylizeRequest, *, on_retry: RetryHook | None = None) -> pb.Job:
        """Submit a ready-made request. A refusal as busy (RESOURCE_EXHAUSTED) is retried as Stylize's is
        (see StylizeCall): it created no job. No other error is retried, UNAVAILABLE included, because the
        job may exist then, and a second submission would run it twice. An older server, without jobs,
        answers UNIMPLEMENTED: use stylize() there."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        retry = 0
        while True:
            try:
                job: pb.Job = self._stub.SubmitJob(
                    request,
                    timeout=_remaining(deadline),
                    metadata=self._metadata,
                    wait_for_ready=self._wait_for_ready,
                )
                return job
            except grpc.RpcError as err:
                error = StylizeError.from_rpc(err)
            retry += 1
            if error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED or retry > self.retries:
                raise error
            delay = busy_backoff(self.retry_backoff, retry)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise error
            if on_retry is not None:
                on_retry(error, retry, delay)
            time.sleep(delay)

    def watch(
        self,
        job_id: str,
        after: int = 0,
        *,
        reconnect_seconds: float = 0.0,
        on_reconnect: ReconnectHook | None = None,
        not_found_reconnects: bool = False,
    ) -> JobWatch:
        """The job's events with a sequence greater than `after` (WatchJob): those the server kept, then
        the live ones. Iterating the JobWatch yields JobEvent(sequence, event); a job that succeeded ends
        with its Result, one that failed or was cancelled raises its error. reconnect_seconds = 0: one
        stream; otherwise see follow(). The client's timeout bounds the whole watch."""
        return JobWatch(
            job_id,
            lambda after_sequence, timeout: self._stub.WatchJob(
                pb.WatchJobRequest(id=job_id, after_sequence=after_sequence),
                timeout=timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            ),
            lambda: self.get(job_id, include_image=False),
            after=after,
            reconnect_seconds=reconnect_seconds,
            timeout=self.timeout,
            on_reconnect=on_reconnect,
            not_found_reconnects=not_found_reconnects,
        )

    def follow(
        self,
        job_id: str,
        after: int = 0,
        *,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
        on_reconnect: ReconnectHook | None = None,
        not_found_reconnects: bool = False,
    ) -> JobWatch:
        """watch(), reattaching: a watch that breaks (UNAVAILABLE: a dropped connection, a server that
        restarts) is opened again after the last sequence seen, with a doubling backoff, for up to
        reconnect_seconds without a new event; no event is yielded twice (see client/reattach.py).
        on_reconnect(error, n, delay) hears of each reconnection before its backoff.
        not_found_reconnects: take NOT_FOUND as a broken watch too, for a job you know exists (one you
        submitted) when the address balances over replicas that do not share their job stores."""
        return self.watch(
            job_id,
            after,
            reconnect_seconds=reconnect_seconds,
            on_reconnect=on_reconnect,
            not_found_reconnects=not_found_reconnects,
        )

    def get(self, job_id: str, include_image: bool = True) -> pb.Job:
        """The job's state, last progress, times and, once it succeeded, its Result (include_image=False
        leaves the Result's image bytes out). NOT_FOUND for a job that is not there or not yours."""
        return self._unary(
            self._stub.GetJob, pb.GetJobRequest(id=job_id, omit_result_image=not include_image)
        )

    def cancel(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        """Cancel a queued or running job (a running one stops within one loss evaluation) and return it;
        a job that has ended is returned as it is. timeout: seconds for this call (default: the
        client's), e.g. to bound a cancellation on the way out."""
        return self._unary(self._stub.CancelJob, pb.CancelJobRequest(id=job_id), timeout)

    def jobs(self, page_size: int = 0) -> Iterator[pb.Job]:
        """The caller's jobs, newest first, without their results' image bytes: every page, fetched as
        the iteration reaches it. page_size: jobs per call, 1..100; 0 = the server's default (20)."""
        token = ""
        while True:
            page: pb.ListJobsResponse = self._unary(
                self._stub.ListJobs, pb.ListJobsRequest(page_size=page_size, page_token=token)
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.RpcError as err:
            raise StylizeError.from_rpc(err) from None


def is_job_id(text: str) -> bool:
    """Whether text is a job id as the proto defines them (32 lowercase hex digits)."""
    return JOB_ID_PATTERN.fullmatch(text) is not None


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
