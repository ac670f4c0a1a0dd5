"""How a client reaches a server that keeps strangers out: a TLS channel and a bearer token.

open_channel() makes the gRPC channel: plaintext, or TLS trusting gRPC's default roots (tls=True) or the
CA in tls_ca, optionally with a client certificate for mutual TLS (tls_cert and tls_key). token_metadata()
is the `authorization: Bearer TOKEN` metadata to send with every call; it is plain call metadata, not
gRPC call credentials, so that a token also reaches a server on loopback without TLS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import grpc

PemInput = str | os.PathLike[str] | bytes  # a path to a PEM file, or its contents
Metadata = tuple[tuple[str, str], ...]

# RFC 6750's b64token: what a bearer token may contain (and what the server's tokens file accepts).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_PEM_BLOCKS = {
    "certificate": re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
}


class ClientSecurityError(ValueError):
    """A TLS or token argument cannot be used. argument is its keyword name (tls_ca, tls_cert, ...), which
    is also the CLI's flag with - for _."""

    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(f"{argument}: {problem}")
        self.argument = argument
        self.problem = problem


def read_pem(value: PemInput, argument: str, kind: str) -> bytes:
    """The PEM bytes of value (a path or the contents), checked to hold a block of kind ("certificate"
    or "private key")."""
    if isinstance(value, bytes):
        data, where = value, "the data given"
    else:
        where = os.fspath(value)
        try:
            with open(where, "rb") as file:
                data = file.read()
        except OSError as err:
            raise ClientSecurityError(argument, f"cannot read {where}: {err.strerror or err}") from None
    if not _PEM_BLOCKS[kind].search(data):
        raise ClientSecurityError(argument, f"no PEM {kind} in {where}")
    return data


def channel_credentials(
    *,
    tls: bool = False,
    tls_ca: PemInput | None = None,
    tls_cert: PemInput | None = None,
    tls_key: PemInput | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. TLS is on when tls is true or any file is given; without
    tls_ca the server's certificate is checked against gRPC's default roots."""
    if (tls_cert is None) != (tls_key is None):
        missing = "tls_key" if tls_key is None else "tls_cert"
        raise ClientSecurityError(missing, "tls_cert and tls_key go together: give both or neither")
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "tls_ca", "certificate") if tls_ca is not None else None,
        private_key=read_pem(tls_key, "tls_key", "private key") if tls_key is not None else None,
        certificate_chain=read_pem(tls_cert, "tls_cert", "certificate") if tls_cert is not None else None,
    )


def token_metadata(token: str | None) -> Metadata:
    """The metadata that carries token (none for None)."""
    if token is None:
        return ()
    token = token.strip()
    if not TOKEN_PATTERN.fullmatch(token):
        raise ClientSecurityError(
            "token", "not a bearer token (letters, digits and -._~+/, then any =; no spaces)"
        )
    return (("authorization", f"Bearer {token}"),)


def open_channel(
    address: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    tls: bool = False,
    tls_ca: PemInput | None = None,
    tls_cert: PemInput | None = None,
    tls_key: PemInput | None = None,
    tls_server_name: str | None = None,
) -> grpc.Channel:
    """A channel to address, over TLS when channel_credentials says so. tls_server_name: the name to
    check the server's certificate against instead of address's host (e.g. when connecting by IP)."""
    credentials = channel_credentials(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    if credentials is None:
        if tls_server_name is not None:
            raise ClientSecurityError("tls_server_name", "needs TLS (tls, tls_ca or tls_cert)")
        return grpc.insecure_channel(address, options=list(options))
    options = list(options)
    if tls_server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(address, credentials, options=options)
