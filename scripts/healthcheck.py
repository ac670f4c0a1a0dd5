#!/usr/bin/env python3
"""Ask a stylize server for its health over grpc.health.v1; exit 0 when it answers SERVING, else 1.

Used by the Docker HEALTHCHECK and by scripts/demo.sh (with --wait, to wait for the server to come up).

    python scripts/healthcheck.py                       # 127.0.0.1:$STYLIZE_PORT (default 50051)
    python scripts/healthcheck.py --address 127.0.0.1:6000 --wait 60

It reads the server's own variables, so that inside the server's container it needs none of its own. The
health service needs no bearer token. With STYLIZE_TLS_CERT set it speaks TLS and trusts that very
certificate (the server's own, so no CA file is needed), checked for a name the certificate holds, which
it learns from the certificate (one extra handshake). With STYLIZE_TLS_CLIENT_CA set as well (mutual
TLS), it presents STYLIZE_TLS_CERT and STYLIZE_TLS_KEY as its client certificate, which works when the
client CA issued the server's certificate for client use too; otherwise give it one of its own. Each
choice has a flag and a variable of its own (see --help), which win over the server's.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import ssl
import sys
import time
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stylize_service.client.security import ClientSecurityError, channel_credentials, open_channel


class Tls(NamedTuple):  # not a dataclass: tests load this script without registering it as a module
    ca: str  # trust root: a CA, or the server's own certificate
    cert: str | None  # client certificate and key, for mutual TLS
    key: str | None
    server_name: str | None  # None: learn it from the certificate


def default_address() -> str:
    return f"127.0.0.1:{os.environ.get('STYLIZE_PORT', '50051')}"


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def tls_settings(args: argparse.Namespace) -> Tls | None:
    """TLS as the flags, else the health check's variables, else the server's variables say; None for
    plaintext."""
    if args.plaintext:
        return None
    ca = args.tls_ca or _env("STYLIZE_TLS_CERT")
    if ca is None:
        return None
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None and _env("STYLIZE_TLS_CLIENT_CA"):
        cert, key = _env("STYLIZE_TLS_CERT"), _env("STYLIZE_TLS_KEY")
    return Tls(ca, cert, key, args.tls_server_name)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def certificate_name(address: str, tls: Tls, timeout: float) -> str | None:
    """A name the server's certificate holds, to check it for (None: the address's host will do). Learned
    over one TLS handshake that checks the certificate against tls.ca, but not its name."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the name is what this handshake is for; gRPC checks it next
    context.verify_flags |= (
        ssl.VERIFY_X509_PARTIAL_CHAIN
    )  # the trust root may be the server's own certificate
    context.load_verify_locations(cafile=tls.ca)
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw) as conn:
        peer = conn.getpeercert() or {}
    names = peer.get("subjectAltName", ())
    dns = [str(value) for kind, value in names if kind == "DNS"]
    if dns:
        return dns[0].replace("*", "healthcheck", 1)  # a wildcard stands for any one label
    ips = [ipaddress.ip_address(str(value).strip()) for kind, value in names if kind == "IP Address"]
    if ips:
        try:
            if ipaddress.ip_address(host) in ips:
                return None
        except ValueError:
            pass
        return str(ips[0])
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def check_once(address: str, service: str, timeout: float, tls: Tls | None = None) -> str:
    """The status name the server reports (e.g. "SERVING"), or a short reason it could not be asked."""
    server_name = None
    if tls is not None:
        try:  # the files first, so that a bad one is named as such rather than as a failed handshake
            channel_credentials(tls_ca=tls.ca, tls_cert=tls.cert, tls_key=tls.key)
        except ClientSecurityError as err:
            return f"cannot use --{err.argument.replace('_', '-')}: {err.problem}"
        server_name = tls.server_name
        if server_name is None:
            try:
                server_name = certificate_name(address, tls, timeout)
            except ssl.SSLCertVerificationError as err:
                return f"TLS: the server's certificate is not trusted by {tls.ca} ({err.verify_message})"
            except ssl.SSLError as err:
                return f"TLS handshake failed ({err.reason or err})"
            except OSError as err:
                return f"unreachable ({err.strerror or err})"
    channel = open_channel(
        address,
        tls=tls is not None,
        tls_ca=tls.ca if tls else None,
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        tls_server_name=server_name,
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return f"unreachable ({err.code().name}: {err.details()})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=default_address(), help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--service", default="", help='service name to ask about; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default: %(default)s)")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="keep asking for up to this many seconds until SERVING"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    tls = parser.add_argument_group("TLS (default: as the server's STYLIZE_TLS_* variables say)")
    tls.add_argument(
        "--tls-ca",
        default=_env("STYLIZE_HEALTHCHECK_TLS_CA"),
        metavar="PEM",
        help="trust this CA, or certificate (default: $STYLIZE_HEALTHCHECK_TLS_CA, else $STYLIZE_TLS_CERT)",
    )
    tls.add_argument(
        "--tls-cert",
        default=_env("STYLIZE_HEALTHCHECK_TLS_CERT"),
        metavar="PEM",
        help="client certificate (default: $STYLIZE_HEALTHCHECK_TLS_CERT, else with "
        "$STYLIZE_TLS_CLIENT_CA set $STYLIZE_TLS_CERT)",
    )
    tls.add_argument(
        "--tls-key",
        default=_env("STYLIZE_HEALTHCHECK_TLS_KEY"),
        metavar="PEM",
        help="key of --tls-cert (default: $STYLIZE_HEALTHCHECK_TLS_KEY, else as --tls-cert $STYLIZE_TLS_KEY)",
    )
    tls.add_argument(
        "--tls-server-name",
        default=_env("STYLIZE_HEALTHCHECK_TLS_SERVER_NAME"),
        metavar="NAME",
        help="check the certificate for this name (default: $STYLIZE_HEALTHCHECK_TLS_SERVER_NAME, "
        "else a name the certificate holds)",
    )
    tls.add_argument("--plaintext", action="store_true", help="no TLS, whatever the variables say")
    args = parser.parse_args(argv)
    settings = tls_settings(args)

    deadline = time.monotonic() + args.wait
    while True:
        status = check_once(args.address, args.service, args.timeout, settings)
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
