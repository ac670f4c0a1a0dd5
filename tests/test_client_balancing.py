"""Client-side load balancing over replicas (round robin, health-checked) and retries of busy refusals."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from stylize_service.client import cli
from stylize_service.client.api import StylizeCall, StylizeClient, StylizeError
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.app import StylizeServer
from tests.fakes import LIVENESS, FakeEngine, encode, gradient, image_bytes, running_server
from tests.markdown import DOCS, section

SMALL = ["--max-size", "64", "--iterations", "4"]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Any]:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(4):
        (folder / f"photo{index}.png").write_bytes(encode(gradient(48, 32, seed=index)))
    style = tmp_path / "style.png"
    style.write_bytes(encode(gradient(32, 32, seed=9)))
    return {"folder": folder, "style": style}


@contextlib.contextmanager
def two_replicas(
    first: FakeEngine, second: FakeEngine, **overrides: Any
) -> Iterator[tuple[tuple[StylizeServer, str], tuple[StylizeServer, str]]]:
    """Two in-process servers: ((server, "127.0.0.1:P1"), (server, "127.0.0.1:P2"))."""
    with running_server(first, **overrides) as one, running_server(second, **overrides) as two:
        yield one, two


@contextlib.contextmanager
def held_until_both_start(first: FakeEngine, second: FakeEngine) -> Iterator[None]:
    """Both engines hold their jobs until each has started one. On replicas that run one job and queue
    none, a burst of calls then cannot all land on one replica (the first to connect), whatever the
    timing: the others are refused there and retried until the second replica has one too."""
    both_started = threading.Event()
    for engine in (first, second):
        engine.gate = both_started
        engine.started = [threading.Event() for _ in range(8)]

    def release() -> None:
        if first.started[0].wait(LIVENESS) and second.started[0].wait(LIVENESS):
            both_started.set()

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    try:
        yield
    finally:
        both_started.set()
        releaser.join(LIVENESS)


def target(*addresses: str) -> str:
    return "ipv4:" + ",".join(addresses)


def refused_count(server: StylizeServer) -> float:
    return server.metrics.registry.get_sample_value("stylize_jobs_total", {"outcome": "refused"}) or 0.0


# --- a batch over two replicas ---------------------------------------------------------------------


def test_a_four_image_batch_spreads_over_both_replicas(images: dict[str, Any], tmp_path: Path) -> None:
    # Jobs of a tenth of a second: long enough for the second replica's connection to be up for the
    # second job (the first goes to whichever replica connects first).
    first, second = FakeEngine(seconds_per_iteration=0.02), FakeEngine(seconds_per_iteration=0.02)
    with two_replicas(first, second) as ((_, one), (_, two)):
        out = tmp_path / "out"
        code = cli.main(
            [
                *(str(images["folder"]), "-s", str(images["style"]), "-q", "--output-dir", str(out)),
                *("--server", target(one, two), *SMALL),
            ]
        )
    assert code == cli.EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [f"photo{i}-stylized.png" for i in range(4)]
    assert first.completed + second.completed == 4
    assert first.completed >= 1 and second.completed >= 1, (first.completed, second.completed)


def test_parallel_runs_jobs_on_both_replicas_at_once(images: dict[str, Any], tmp_path: Path) -> None:
    # Each replica runs one job and queues none; both jobs are held until both have started, which can
    # only happen if the batch really runs two jobs at the same time, one on each replica.
    first, second = FakeEngine(), FakeEngine()
    with (
        held_until_both_start(first, second),
        two_replicas(first, second, queue_size=0) as ((_, one), (_, two)),
    ):
        code = cli.main(
            [
                *(str(images["folder"]), "-s", str(images["style"]), "-q"),
                *("--output-dir", str(tmp_path / "out"), "--server", target(one, two), *SMALL),
                *("--parallel", "2", "--retries", "4"),
            ]
        )
    assert code == cli.EXIT_OK
    assert first.completed + second.completed == 4
    assert first.max_running == 1 and second.max_running == 1


def test_parallel_output_is_whole_lines_per_job(
    images: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with two_replicas(FakeEngine(), FakeEngine()) as ((_, one), (_, two)):
        code = cli.main(
            [
                *(str(images["folder"]), "-s", str(images["style"]), "--output-dir", str(tmp_path)),
                *("--server", target(one, two), "--parallel", "3", *SMALL),
            ]
        )
    assert code == cli.EXIT_OK
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith(tuple(f"photo{i}.png: " for i in range(4))) for line in lines), lines
    assert sum(" done in " in line for line in lines) == 4


# --- retries of busy refusals --------------------------------------------------------------------


@pytest.fixture
def busy_and_free() -> Iterator[tuple[tuple[FakeEngine, StylizeServer, str], tuple[FakeEngine, str]]]:
    """Replica A runs one held job and queues none (so it refuses every other); replica B is free."""
    busy, free = FakeEngine(), FakeEngine()
    busy.gate = threading.Event()
    busy.started = [threading.Event()]
    with two_replicas(busy, free, queue_size=0) as ((busy_server, a), (_, b)):
        holder = StylizeClient(a, timeout=LIVENESS)
        held = holder.stylize(image_bytes(), [image_bytes(32, 32, seed=1)], max_size=64, iterations=4)
        assert busy.started[0].wait(LIVENESS)
        try:
            yield (busy, busy_server, a), (free, b)
        finally:
            held.cancel()
            busy.gate.set()
            holder.close()


def test_a_call_refused_by_the_busy_replica_is_retried_on_the_free_one(
    busy_and_free: tuple[tuple[FakeEngine, StylizeServer, str], tuple[FakeEngine, str]],
) -> None:
    (busy, busy_server, a), (free, b) = busy_and_free
    retries: list[tuple[grpc.StatusCode, int]] = []
    with StylizeClient(target(a, b), timeout=LIVENESS, retries=3, retry_backoff=0.01) as client:
        calls = []
        for seed in range(4):
            request = pb.StylizeRequest(
                content_image=image_bytes(seed=seed),
                styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
                options=pb.StylizeOptions(max_size=64, iterations=4),
            )
            call = client.stylize_request(request, on_retry=lambda err, n, _: retries.append((err.code, n)))
            call.wait()
            calls.append(call)
    assert all(call.result is not None for call in calls)
    assert free.completed == 4 and busy.stylize_calls == 1  # only the held job reached the busy engine
    # Round robin sent some calls to the busy replica first; each was refused there and retried.
    assert refused_count(busy_server) >= 1
    assert sum(call.attempts - 1 for call in calls) == refused_count(busy_server) == len(retries)
    assert all(code is grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in retries)


def test_without_retries_a_busy_replica_refuses_through_the_balancer(
    busy_and_free: tuple[tuple[FakeEngine, StylizeServer, str], tuple[FakeEngine, str]],
) -> None:
    (_, busy_server, a), (_, b) = busy_and_free
    codes = []
    with StylizeClient(target(a, b), timeout=LIVENESS) as client:  # retries=0: the API's default
        for _ in range(4):
            try:
                client.run(image_bytes(), [image_bytes(32, 32, seed=1)], max_size=64, iterations=4)
                codes.append(grpc.StatusCode.OK)
            except StylizeError as err:
                codes.append(err.code)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == refused_count(busy_server)


def test_the_cli_gives_up_after_its_retries_with_the_busy_exit_status(
    busy_and_free: tuple[tuple[FakeEngine, StylizeServer, str], tuple[FakeEngine, str]],
    images: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (_, busy_server, a), _ = busy_and_free
    content = images["folder"] / "photo0.png"
    argv = [str(content), "-s", str(images["style"]), "-o", str(tmp_path / "x.png"), "--server", a]
    code = cli.main([*argv, *SMALL, "--retries", "1"])
    assert code == cli.EXIT_BUSY
    err = capsys.readouterr().err
    assert "busy" in err and "retry 1 of 1 in" in err and "retry 2" not in err
    assert refused_count(busy_server) == 2  # the first try and one retry
    assert not (tmp_path / "x.png").exists()


def test_a_replica_that_is_not_serving_gets_a_clear_message(
    images: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_server(None) as (_, loading):
        content = str(images["folder"] / "photo0.png")
        code = cli.main(
            [content, "-s", str(images["style"]), "-o", str(tmp_path / "x.png"), "--server", loading]
        )
    assert code == cli.EXIT_UNAVAILABLE
    assert "not SERVING: still loading its model, or draining" in capsys.readouterr().err


def test_a_healthy_replica_takes_the_calls_while_the_other_still_loads() -> None:
    free = FakeEngine()
    with (
        running_server(None) as (_, loading),
        running_server(free) as (_, ready),
        StylizeClient(target(loading, ready), timeout=LIVENESS, wait_for_ready=True) as client,
    ):
        for _ in range(4):
            client.run(image_bytes(), [image_bytes(32, 32, seed=1)], max_size=64, iterations=2)
    assert free.completed == 4  # none went to the replica whose health says NOT_SERVING


# --- StylizeCall's retry rules, with scripted attempts ----------------------------------------------


class _RpcError(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class _Attempt:
    """One scripted attempt: yields its responses, then raises its error, if any."""

    def __init__(self, responses: list[pb.StylizeResponse], error: grpc.StatusCode | None = None) -> None:
        self._responses = responses
        self._error = error
        self.cancelled = False

    def __iter__(self) -> Iterator[pb.StylizeResponse]:
        yield from self._responses
        if self._error is not None:
            raise _RpcError(self._error, f"scripted {self._error.name}")

    def cancel(self) -> None:
        self.cancelled = True


BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED
RESULT = pb.StylizeResponse(result=pb.Result(width=1, height=1))
QUEUED = pb.StylizeResponse(queued=pb.Queued(position=1))


def scripted(*attempts: _Attempt) -> tuple[Any, list[float | None]]:
    timeouts: list[float | None] = []
    queue = list(attempts)

    def start(timeout: float | None) -> _Attempt:
        timeouts.append(timeout)
        return queue.pop(0)

    return start, timeouts


def test_busy_refusals_are_retried_with_a_doubling_backoff() -> None:
    start, timeouts = scripted(_Attempt([], BUSY), _Attempt([], BUSY), _Attempt([QUEUED, RESULT]))
    delays: list[float] = []
    call = StylizeCall(start, retries=2, backoff=0.01, on_retry=lambda _e, _n, delay: delays.append(delay))
    assert call.wait().width == 1 and call.attempts == 3
    assert 0.005 <= delays[0] <= 0.01 <= delays[1] <= 0.02  # jittered within [½, 1] of 0.01 and 0.02
    assert timeouts == [None, None, None]


def test_no_retry_once_the_server_has_answered() -> None:
    start, _ = scripted(_Attempt([QUEUED], BUSY), _Attempt([RESULT]))
    call = StylizeCall(start, retries=3, backoff=0.01)
    with pytest.raises(StylizeError) as caught:
        call.wait()
    assert caught.value.code is BUSY and call.attempts == 1


def test_other_errors_are_not_retried() -> None:
    start, _ = scripted(_Attempt([], grpc.StatusCode.INVALID_ARGUMENT), _Attempt([RESULT]))
    call = StylizeCall(start, retries=3, backoff=0.01)
    with pytest.raises(StylizeError) as caught:
        call.wait()
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and call.attempts == 1


def test_retries_share_the_deadline_and_stop_before_it() -> None:
    start, timeouts = scripted(_Attempt([], BUSY), _Attempt([], BUSY), _Attempt([RESULT]))
    call = StylizeCall(start, timeout=LIVENESS, retries=5, backoff=0.01)
    assert call.wait().width == 1
    assert timeouts[0] == LIVENESS and all(t is not None and t < LIVENESS for t in timeouts[1:])
    # A backoff that would end past the deadline is not waited: the refusal is the answer.
    start, _ = scripted(_Attempt([], BUSY), _Attempt([RESULT]))
    call = StylizeCall(start, timeout=0.5, retries=5, backoff=10.0)
    with pytest.raises(StylizeError) as caught:
        call.wait()
    assert caught.value.code is BUSY and call.attempts == 1


def test_cancel_during_the_backoff_ends_the_call() -> None:
    start, _ = scripted(_Attempt([], BUSY), _Attempt([RESULT]))
    waiting = threading.Event()
    call = StylizeCall(start, retries=1, backoff=LIVENESS * 2, on_retry=lambda *_: waiting.set())
    failure: list[StylizeError] = []
    reader = threading.Thread(target=lambda: failure.extend(_errors(call)), daemon=True)
    reader.start()
    assert waiting.wait(LIVENESS)
    call.cancel()
    reader.join(LIVENESS)
    assert not reader.is_alive() and failure and failure[0].code is grpc.StatusCode.CANCELLED
    assert call.attempts == 1


def _errors(call: StylizeCall) -> list[StylizeError]:
    try:
        call.wait()
    except StylizeError as err:
        return [err]
    return []


def test_negative_retries_are_refused() -> None:
    with pytest.raises(ValueError, match="retries and retry_backoff must be >= 0"):
        StylizeClient("localhost:1", retries=-1)
    with pytest.raises(SystemExit) as caught:
        cli.main(["x.png", "-s", "y.png", "--retries", "-1"])
    assert caught.value.code == cli.EXIT_USAGE


def test_the_docs_replicas_example_runs_over_two_replicas(tmp_path: Path, monkeypatch: Any) -> None:
    text = section(DOCS / "deployment.md", "## Several replicas")
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]  # the Python API over several replicas
    name = "dns:///stylize-headless.default.svc.cluster.local:50051"
    assert name in code
    for photo in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "painting.jpg"):
        (tmp_path / photo).write_bytes(image_bytes(48, 32, fmt="JPEG", seed=len(photo)))
    monkeypatch.chdir(tmp_path)
    first, second = FakeEngine(), FakeEngine()
    with (
        held_until_both_start(first, second),
        two_replicas(first, second, queue_size=0) as ((_, one), (_, two)),
    ):
        exec(compile(code.replace(name, target(one, two)), "docs/deployment.md", "exec"), {})
    assert sorted(p.name for p in tmp_path.glob("*.stylized.png")) == [f"{c}.stylized.png" for c in "abcd"]
    assert first.completed >= 1 and second.completed >= 1 and first.completed + second.completed == 4


def test_wait_ready_is_true_once_a_replica_serves_and_false_when_none_can() -> None:
    with running_server(FakeEngine()) as (_, address), StylizeClient(target(address)) as client:
        assert client.wait_ready(LIVENESS)
    with running_server(None) as (_, loading), StylizeClient(loading) as client:
        assert not client.wait_ready(0.5)  # up, but its health says NOT_SERVING
