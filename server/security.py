"""Who may call the server: TLS (optionally mutual) and bearer tokens.

- TLS: --tls-cert/--tls-key make the server speak TLS only; --tls-client-ca also requires a client
  certificate signed by that CA. The PEM files are checked here, at start, so that a bad file is a
  configuration error naming its flag rather than a failure deep inside gRPC.
- Tokens: --auth-tokens-file lists the accepted bearer tokens. BearerTokenInterceptor refuses every call
  but grpc.health.v1's (probes stay open) with UNAUTHENTICATED unless it carries
  `authorization: Bearer TOKEN` with a listed token, before the request is even read. Tokens are
  compared as SHA-256 digests with hmac.compare_digest against every listed token, and never logged: logs
  name a caller by server.identity (a token by the first hex digits of its SHA-256).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stylize_service.server.config import ConfigError, ServerConfig, setting_name
from stylize_service.server.identity import bearer_token
from stylize_service.server.logsafe import LogThrottle

logger = logging.getLogger("stylize.server")

OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"  # methods that need no token: load balancers probe them
MAX_FILE_BYTES = 1024 * 1024  # a tokens file larger than this is refused (thousands of tokens fit)
# RFC 6750's b64token: the characters a bearer token may have.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_CERTIFICATE_PEM = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----")
_KEY_PEM = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")


# --- tokens --------------------------------------------------------------------------------------


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenStore:
    """The accepted tokens, from a file of one token a line (blank lines and `#` comments ignored).

    verify() never touches the file: it runs on the thread that dispatches every call, where a slow or
    hostile read (a FIFO, a symlink to /dev/zero, a hung mount) would stall the whole server. Instead,
    once watch() has started it, a thread of the store's own checks the file every `poll_seconds` and
    re-reads it when its modification time, size or inode changes. Only a regular file of at most
    MAX_FILE_BYTES is read. If it cannot be read any more, the last good set stays in force and a warning
    is logged (once per failure). At construction an unreadable or empty file is a ConfigError.
    """

    def __init__(self, path: Path, name: str = "the tokens file", *, poll_seconds: float = 1.0) -> None:
        self.path = path
        self._name = name
        self._poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple[int, ...] | None = None
        self._failing = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            stamp, digests = self._read()
        except OSError as err:
            raise ConfigError(f"{name} {path}: cannot read it: {err.strerror or err}") from None
        if not digests:
            raise ConfigError(f"{name} {path}: no tokens in it (one a line; # starts a comment)")
        self._digests, self._stamp = digests, stamp

    def __len__(self) -> int:
        return len(self._digests)

    def verify(self, token: str) -> bool:
        """Whether token is listed. Compares against every listed token so that the time taken does not
        depend on which one (if any) matches."""
        presented = token_digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def watch(self) -> None:
        """Start re-reading the file when it changes (idempotent); close() stops it."""
        with self._lock:
            if self._watcher is not None:
                return
            self._watcher = threading.Thread(target=self._watch, name="tokens-file", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5.0)

    def refresh(self) -> None:
        """Re-read the file now if it changed (what the watcher does every poll_seconds)."""
        try:
            st = os.stat(self.path)
            if _stamp(st) == self._stamp:
                return
            stamp, digests = self._read()
        except OSError as err:
            self._fail(err)
            return
        self._digests, self._stamp, self._failing = digests, stamp, False
        if digests:
            logger.info("re-read %s %s: %d token(s)", self._name, self.path, len(digests))
        else:
            logger.warning("re-read %s %s: it has no tokens; every call is refused", self._name, self.path)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            self.refresh()

    def _fail(self, err: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        self._stamp = None  # re-read once it is readable again, whatever its time stamp
        logger.warning(
            "cannot re-read %s %s (%s); keeping the %d token(s) read before",
            self._name,
            self.path,
            err.strerror or err,
            len(self._digests),
        )

    def _read(self) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        """The file's stamp and digests. Opened without blocking (a FIFO must not hang the read) and read
        only if it is a regular file of at most MAX_FILE_BYTES; raises OSError otherwise."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES // 1024} KiB")
        digests = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if not TOKEN_PATTERN.fullmatch(token):
                # Never echo the line: it may be a token with a typo.
                logger.warning(
                    "%s %s, line %d: not a bearer token (letters, digits and -._~+/ then any =); ignored",
                    self._name,
                    self.path,
                    number,
                )
                continue
            digests.append(token_digest(token))
        return _stamp(st), tuple(digests)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED, before the request is read, for every call without a listed bearer token, except
    the methods under OPEN_SERVICE_PREFIX."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICE_PREFIX):
            # An unknown method is gRPC's to answer (UNIMPLEMENTED), token or not: refusing it here would
            # make a handler of it, and every made-up name a new metrics series and log line.
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            problem = (
                "this server needs a bearer token: send the metadata 'authorization: Bearer TOKEN' "
                "(stylize --token or $STYLIZE_TOKEN)"
            )
        elif not token:
            problem = "the authorization metadata must be 'Bearer TOKEN'"
        elif not self._tokens.verify(token):
            problem = "the bearer token is not valid"
        else:
            return handler
        return _refusal(method, problem)


# A client without a token can be refused hundreds of times a second; past this rate the log counts them.
_refusal_log = LogThrottle()


def _held_back_note(count: int) -> str:
    return f" ({count} more refusals not logged)" if count else ""


def _refusal(method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with UNAUTHENTICATED. Stream-request shaped whatever the method, so that
    gRPC hands it the call without receiving (let alone decoding) the request message first; on the wire
    the client cannot tell the difference."""

    def refuse(_requests: Any, context: grpc.ServicerContext) -> None:
        held_back = _refusal_log.admit("unauthenticated")
        if held_back is not None:
            logger.info(
                "refused %s from %s: %s%s", method, context.peer(), message, _held_back_note(held_back)
            )
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


# --- TLS -----------------------------------------------------------------------------------------


def _read_pem(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{setting_name(field)} {path}: cannot read it: {err.strerror or err}") from None


def _read_certificates(path: Path, field: str) -> bytes:
    data = _read_pem(path, field)
    if not _CERTIFICATE_PEM.search(data):
        raise ConfigError(
            f"{setting_name(field)} {path}: no PEM certificate in it "
            "(expected a '-----BEGIN CERTIFICATE-----' block)"
        )
    try:  # the ssl module parses with OpenSSL, as gRPC will: a damaged certificate fails here, clearly
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{setting_name(field)} {path}: not a valid PEM certificate: {err}") from None
    return data


def _read_key(path: Path, field: str) -> bytes:
    data = _read_pem(path, field)
    match = _KEY_PEM.search(data)
    if match is None:
        raise ConfigError(
            f"{setting_name(field)} {path}: no PEM private key in it "
            "(expected a '-----BEGIN ... PRIVATE KEY-----' block)"
        )
    if b"ENCRYPTED" in match.group(1) or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ConfigError(
            f"{setting_name(field)} {path}: the key is encrypted; the server needs it unencrypted "
            "(e.g. `openssl pkey -in KEY -out PLAIN_KEY`, readable only by the server's user)"
        )
    return data


def _no_password() -> str:
    # Given to ssl so that an encrypted key fails instead of prompting on a terminal.
    raise ssl.SSLError("the key needs a password")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, or None for plaintext; ConfigError names the flag of
    a missing, unreadable or unusable file."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    certificate = _read_certificates(config.tls_cert, "tls_cert")
    key = _read_key(config.tls_key, "tls_key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            config.tls_cert, config.tls_key, password=_no_password
        )
    except (ssl.SSLError, OSError) as err:
        reason = getattr(err, "reason", None)
        problem = "does not belong to the certificate" if reason == "KEY_VALUES_MISMATCH" else str(err)
        raise ConfigError(
            f"{setting_name('tls_key')} {config.tls_key}: {problem} of {setting_name('tls_cert')} "
            f"{config.tls_cert}"
        ) from None
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read_certificates(config.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# --- together ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether host (as --host gives it) is reachable only from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0 / ::, which are checked above as addresses)


@dataclass(frozen=True)
class ServerSecurity:
    """Everything of a config that decides who may call: what StylizeServer listens and filters with."""

    credentials: grpc.ServerCredentials | None = None
    tokens: TokenStore | None = None
    mutual_tls: bool = False

    @classmethod
    def from_config(cls, config: ServerConfig) -> ServerSecurity:
        """Read and check the files the config names; raises ConfigError naming the flag at fault."""
        tokens = None
        if config.auth_tokens_file is not None:
            tokens = TokenStore(config.auth_tokens_file, setting_name("auth_tokens_file"))
        return cls(
            credentials=server_credentials(config),
            tokens=tokens,
            mutual_tls=config.tls_client_ca is not None,
        )

    def watch(self) -> None:
        """Start following changes of the files that may change while serving (the tokens file)."""
        if self.tokens is not None:
            self.tokens.watch()

    def close(self) -> None:
        if self.tokens is not None:
            self.tokens.close()

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.tokens)] if self.tokens is not None else []

    def describe(self) -> str:
        """For the start-up log line, e.g. "TLS with client certificates, 3 bearer token(s)"."""
        transport = "plaintext"
        if self.credentials is not None:
            transport = "TLS with client certificates" if self.mutual_tls else "TLS"
        tokens = f"{len(self.tokens)} bearer token(s)" if self.tokens is not None else "no tokens"
        return f"{transport}, {tokens}"

    def exposure_warning(self, host: str) -> str | None:
        """The warning to log at start when the server is open to anyone who can reach it, else None."""
        if self.credentials is not None or self.tokens is not None or is_loopback(host):
            return None
        return (
            f"listening on {host} in plaintext without tokens: anyone who can reach the port can use the "
            "server; set --tls-cert/--tls-key and --auth-tokens-file (or --tls-client-ca), or --host 127.0.0.1"
        )
