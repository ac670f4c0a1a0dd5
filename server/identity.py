"""Who a call comes from, for per-client limits: the one place that decides it.

A client is its bearer token when the server verifies tokens (a short SHA-256 hash, never the token), else
the network address it connects from. The port is dropped (every new connection gets a new one), and an
IPv6 address counts by its /64 network, the smallest block one host is usually given, so that neither a
new connection nor a new address of the same host makes a new client.

An unverified token must not decide identity: anyone could send a fresh one with each call and escape the
limit. So `trust_tokens` is true only where the server itself refuses calls without a valid token.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence

import grpc

AUTHORIZATION = "authorization"
TOKEN_HASH_DIGITS = 12  # 48 bits of SHA-256: distinct for any realistic number of tokens
IPV6_CLIENT_PREFIX = 64


def client_identity(
    peer: str, metadata: Sequence[tuple[str, str | bytes]] | None, *, trust_tokens: bool
) -> str:
    """ "token:<hash>" for a call with `authorization: Bearer TOKEN` when tokens are trusted, else
    "peer:<address>" from grpc's peer string (e.g. "ipv4:10.0.0.7:53211" -> "peer:10.0.0.7")."""
    if trust_tokens:
        token = _bearer_token(metadata)
        if token:
            digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
            return f"token:{digest[:TOKEN_HASH_DIGITS]}"
    return f"peer:{peer_host(peer)}"


def context_identity(context: grpc.ServicerContext, *, trust_tokens: bool) -> str:
    return client_identity(context.peer(), context.invocation_metadata(), trust_tokens=trust_tokens)


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


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return None
