"""Fuzzing the real server (in process, the real engine) with hostile requests: a short, seeded profile.

The strategies and the property are in tests/fuzzing.py; scripts/fuzz.py runs the same property for as
many examples as asked. Every response must be a Result, INVALID_ARGUMENT naming a request field, or
RESOURCE_EXHAUSTED; the server keeps serving, and its memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import StylizeServer
from stylize_service.server.servicer import EngineLike
from tests import fuzzing
from tests.fakes import channel, running_server

# The server decodes formats that Pillow has deprecated (IM): they are read all the same, and must be safe.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")

# The process may grow by the graph cache's budget (new layer choices) and by this much besides: decoded
# images, onnxruntime's arenas for tiny images, Python's own heap.
RSS_MARGIN = 768 * 2**20


@pytest.fixture(scope="module")
def fuzz_server(real_engine: EngineLike) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(real_engine) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_stub(fuzz_server: tuple[StylizeServer, str]) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(fuzz_server[1]) as ch:
        yield pb_grpc.StyleTransferStub(ch)


@pytest.fixture(scope="module")
def baseline_rss(fuzz_stub: pb_grpc.StyleTransferStub) -> int:
    fuzzing.assert_still_serving(fuzz_stub)  # the default choice compiled before measuring
    return fuzzing.rss_bytes()


def test_the_corpus_covers_every_format_pillow_reads() -> None:
    from PIL import Image

    Image.init()
    assert set(Image.OPEN) <= set(fuzzing.CORPUS), set(Image.OPEN) - set(fuzzing.CORPUS)


def test_field_names_are_recognised() -> None:
    assert (
        fuzzing.named_field("options.style_layers[3].weight must be ...") == "options.style_layers[].weight"
    )
    assert fuzzing.named_field("styles[0].image is empty") == "styles[].image"
    assert fuzzing.named_field("content_image is empty") == "content_image"
    assert fuzzing.named_field("options.no_such_field is bad") is None
    assert fuzzing.named_field("internal error: ValueError") is None


@settings(settings.get_profile("ci"))
@given(request=fuzzing.requests())
def test_every_response_is_a_result_or_a_refusal_naming_a_field(
    fuzz_stub: pb_grpc.StyleTransferStub, baseline_rss: int, request: pb.StylizeRequest
) -> None:
    fuzzing.check_response(fuzz_stub, request)


def test_the_server_still_serves_and_its_memory_is_bounded_after_the_fuzzing(
    fuzz_server: tuple[StylizeServer, str], fuzz_stub: pb_grpc.StyleTransferStub, baseline_rss: int
) -> None:
    fuzzing.assert_still_serving(fuzz_stub)
    info = fuzz_stub.GetInfo(pb.GetInfoRequest(), timeout=fuzzing.CALL_TIMEOUT)
    cache = info.graph_cache
    assert cache.used_bytes <= cache.budget_bytes or cache.entries == 1
    assert fuzzing.rss_bytes() - baseline_rss < cache.budget_bytes + RSS_MARGIN
    assert fuzz_server[0].scheduler.running == 0 and fuzz_server[0].scheduler.waiting == 0
