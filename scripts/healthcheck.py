#!/usr/bin/env python3
"""Ask a stylize server for its health over grpc.health.v1; exit 0 when it answers SERVING, else 1.

Used by the Docker HEALTHCHECK and by scripts/demo.sh (with --wait, to wait for the server to come up).

    python scripts/healthcheck.py                       # 127.0.0.1:$STYLIZE_PORT (default 50051)
    python scripts/healthcheck.py --address 127.0.0.1:6000 --wait 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    return f"127.0.0.1:{os.environ.get('STYLIZE_PORT', '50051')}"


def check_once(address: str, service: str, timeout: float) -> str:
    """The status name the server reports (e.g. "SERVING"), or a short reason it could not be asked."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return f"unreachable ({err.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=default_address(), help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--service", default="", help='service name to ask about; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default: %(default)s)")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="keep asking for up to this many seconds until SERVING"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.wait
    while True:
        status = check_once(args.address, args.service, args.timeout)
        if status == "SERVING":
            if not args.quiet:
                print(f"{args.address}: SERVING")
            return 0
        if time.monotonic() >= deadline:
            if not args.quiet:
                print(f"{args.address}: {status}", file=sys.stderr)
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
