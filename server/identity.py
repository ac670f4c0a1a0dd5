"""Who a call comes from: the one place that decides it, for the per-client bound, the logs and, later, who
owns a job. The same string serves all three, so that a log line can be matched to the bound.

A caller is, in this order:
- its bearer token, where the server verifies tokens: "token:" and the first TOKEN_HASH_DIGITS hex
  digits of the token's SHA-256, never the token;
- else its client certificate, under mutual TLS: "cert:" and the same hash of the certificate's identity
  (its subject alternative names, else its common name), which the CA vouches for;
- else the network address it connects from: "peer:" and the address without the port (every new
  connection gets a new one), an IPv6 address by its /64 network, the smallest block one host is usually
  given, so that neither a new connection nor a new address of the same host makes a new caller.

An unverified token must not decide identity: anyone could send a fresh one with each call and escape the
limit. So `trust_tokens` is true only where the server itself refuses calls without a valid token.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from typing import cast

import grpc

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
TOKEN_HASH_DIGITS = 12  # 48 bits of SHA-256: distinct for any realistic number of tokens or certificates
IPV6_CLIENT_PREFIX = 64

Metadata = Sequence[tuple[str, str | bytes]]


def short_hash(secret: str | bytes) -> str:
    """The first TOKEN_HASH_DIGITS hex digits of secret's SHA-256: how logs and bounds name a secret."""
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()[:TOKEN_HASH_DIGITS]


def token_label(token: str) -> str:
    """A verified token's caller name: "token:<short hash>"."""
    return f"token:{short_hash(token)}"


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of the call's `authorization: Bearer TOKEN` metadata; "" if the header is there but is
    not a bearer token, None if there is no such header."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return None


def client_identity(
    peer: str,
    metadata: Metadata | None,
    *,
    trust_tokens: bool,
    certificate: Sequence[bytes] | None = None,
) -> str:
    """The caller's name from grpc's peer string (e.g. "ipv4:10.0.0.7:53211"), its metadata and, under
    mutual TLS, its certificate's identities (grpc's peer_identities())."""
    if trust_tokens:
        token = bearer_token(metadata)
        if token:
            return token_label(token)
    if certificate:
        return "cert:" + short_hash(b"\n".join(sorted(certificate)))
    return f"peer:{peer_host(peer)}"


def context_identity(context: grpc.ServicerContext, *, trust_tokens: bool) -> str:
    """client_identity of a call in progress."""
    return client_identity(
        context.peer(),
        context.invocation_metadata(),
        trust_tokens=trust_tokens,
        certificate=_certificate_identities(context),
    )


def _certificate_identities(context: grpc.ServicerContext) -> Sequence[bytes] | None:
    # grpc's stubs type auth_context() as Mapping[str, bytes] and peer_identities() as an Iterable: grpc
    # gives a list of bytes per property, and a list of identities.
    auth = cast(Mapping[str, Sequence[bytes]], context.auth_context() or {})
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_pem_cert"):
        return None  # plaintext, or TLS without a client certificate
    return cast(Sequence[bytes] | None, context.peer_identities())


def peer_host(peer: str) -> str:
    """The host part of a grpc peer string, without the port; IPv6 as its /64 network. Other transports
    (unix sockets, in-process) are returned as they are."""
    scheme, _, address = peer.partition(":")
    if scheme == "ipv4":
        return address.rpartition(":")[0] or address
    if scheme == "ipv6":
        host = address.rpartition(":")[0].strip("[]") if address.startswith("[") else address
        host = host.split("%", 1)[0]  # a zone index ("fe80::1%eth0") names the interface, not the host
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False))
    return peer
