#!/usr/bin/env python3
"""Fuzz the real server for a long while: the property of tests/test_fuzz.py with as many examples as asked.

    .venv/bin/python scripts/fuzz.py --examples 2000              # random; prints the seed to replay it
    .venv/bin/python scripts/fuzz.py --examples 300 --seed 7

Runs the server in this process (the real engine, tiny images, 1-2 iterations; see tests/fuzzing.py) and sends
hostile requests: random options (NaN, infinities, huge, negative, unknown enum values, bad layer names) and
the mutated bytes of every format Pillow reads. Every call must end with a Result, INVALID_ARGUMENT naming a
request field, or RESOURCE_EXHAUSTED. Afterwards a plain request must still complete, and the process's RSS
must stay within the graph cache's budget plus a margin of its start. Prints a summary of the outcomes, and
on a failure the smallest request hypothesis found; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the strategies live beside the tests

RSS_MARGIN = 768 * 2**20  # as tests/test_fuzz.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="requests to try (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="seed, to replay a run (default: a random one, printed)")
    parser.add_argument("--model", type=Path, help="the feature network (default: the built one)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")

    # Imported here so that --help is quick.
    from hypothesis import given, seed, settings

    from stylize_service.models.paths import default_model_path
    from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
    from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
    from stylize_service.server.engine.engine import Engine
    from tests import fuzzing
    from tests.fakes import channel, running_server

    model = args.model or default_model_path()
    if not model.is_file():
        print(f"fuzz: the model {model} is not built; run `bash scripts/setup.sh`", file=sys.stderr)
        return 2
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    tally = fuzzing.Tally()
    engine = Engine(model, intra_op_threads=2)
    started = time.monotonic()
    failure = ""
    with running_server(engine) as (server, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        fuzzing.assert_still_serving(stub)
        rss_start = peak = fuzzing.rss_bytes()

        @seed(run_seed)
        @settings(settings.get_profile("ci"), max_examples=args.examples, derandomize=False)
        @given(request=fuzzing.requests())
        def property_holds(request: pb.StylizeRequest) -> None:
            nonlocal peak
            fuzzing.check_response(stub, request, tally)
            peak = max(peak, fuzzing.rss_bytes())

        try:
            property_holds()
            fuzzing.assert_still_serving(stub)
        except AssertionError as err:
            failure = str(err) or repr(err)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=fuzzing.CALL_TIMEOUT)
        rss_end = fuzzing.rss_bytes()
        busy = server.scheduler.running + server.scheduler.waiting
    cache = info.graph_cache
    bound = rss_start + cache.budget_bytes + RSS_MARGIN
    if not failure and peak > bound:
        failure = f"RSS peaked at {peak / 2**20:.0f} MB, over the bound of {bound / 2**20:.0f} MB"
    if not failure and busy:
        failure = f"{busy} job(s) still running or queued at the end"

    calls = sum(tally.counts.values())
    print(
        f"fuzz: {calls} calls ({args.examples} examples asked), seed {run_seed}, {time.monotonic() - started:.0f} s"
    )
    for outcome, count in sorted(tally.counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {count:6d}  {outcome}")
    print(
        f"  graph cache: {cache.entries} choices, {cache.used_bytes / 2**20:.0f} of {cache.budget_bytes / 2**20:.0f} MB, "
        f"{cache.evictions} evictions"
    )
    print(
        f"  RSS: {rss_start / 2**20:.0f} MB at the start, peak {peak / 2**20:.0f} MB, end {rss_end / 2**20:.0f} MB"
    )
    if failure:
        print(f"result: FAILED: {failure}")
        print(f"replay: .venv/bin/python scripts/fuzz.py --examples {args.examples} --seed {run_seed}")
        return 1
    print("result: ok (every response a Result, a refusal naming a field, or RESOURCE_EXHAUSTED)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
