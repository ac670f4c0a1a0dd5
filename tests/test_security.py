"""Keeping strangers out: TLS, mutual TLS and bearer tokens, end to end against an in-process server.

A throwaway CA, a server certificate for localhost and client certificates are made with the openssl
command (the same commands as docs/security.md's recipe); the tests skip if it is not installed.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stylize_service.client import cli
from stylize_service.client.api import StylizeClient, StylizeError
from stylize_service.client.security import ClientSecurityError
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import main as server_main
from stylize_service.server.app import SERVICE_NAME, StylizeServer
from stylize_service.server.config import ConfigError, load_config
from stylize_service.server.identity import token_label
from stylize_service.server.security import ServerSecurity, TokenStore
from tests.fakes import FakeEngine, encode, gradient, image_bytes, running_server, wait_until
from tests.markdown import DOCS, section
from tests.test_scripts import load_script

SECURITY_PAGE = DOCS / "security.md"
TOKEN = secrets.token_urlsafe(24)  # random, so that finding it in a log cannot be a coincidence
OTHER_TOKEN = secrets.token_urlsafe(24)
TIMEOUT = 10.0
EXPOSED = "anyone who can reach the port"  # from ServerSecurity.exposure_warning


# --- a throwaway PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # for DNS:localhost only, usable for client authentication too
    server_key: Path
    client_cert: Path  # signed by ca
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(cwd: Path, name: str) -> None:
    _openssl(
        cwd,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def _make_leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        cwd,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
    )
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        cwd,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        rogue_ca=d / "rogue-ca.pem",
        rogue_cert=d / "rogue.pem",
        rogue_key=d / "rogue.key",
    )


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\n\n{TOKEN}\n")
    return path


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def localhost(address: str) -> str:
    """The server's address by the name its certificate holds."""
    return "localhost:" + address.rpartition(":")[2]


@pytest.fixture
def secure(pki: Pki, tokens_file: Path, engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    """A server with TLS and tokens; yields (server, "localhost:PORT")."""
    with running_server(
        engine, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens_file=tokens_file
    ) as (server, address):
        yield server, localhost(address)


@pytest.fixture
def mutual(pki: Pki, engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    """A server with mutual TLS (client certificates signed by pki.ca) and no tokens."""
    with running_server(engine, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as (
        server,
        address,
    ):
        yield server, localhost(address)


def small_request() -> pb.StylizeRequest:
    return pb.StylizeRequest(
        content_image=image_bytes(48, 32),
        styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
        options=pb.StylizeOptions(max_size=32, iterations=3),
    )


def tls_channel(pki: Pki, address: str, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- configuration ---------------------------------------------------------------------------------


def test_security_settings_come_from_flags_and_environment(pki: Pki, tokens_file: Path) -> None:
    env = {
        "STYLIZE_TLS_CERT": str(pki.server_cert),
        "STYLIZE_TLS_KEY": str(pki.server_key),
        "STYLIZE_TLS_CLIENT_CA": str(pki.ca),
        "STYLIZE_AUTH_TOKENS_FILE": str(tokens_file),
    }
    config = load_config([], environ=env)
    assert (config.tls_cert, config.tls_key) == (pki.server_cert, pki.server_key)
    assert (config.tls_client_ca, config.auth_tokens_file) == (pki.ca, tokens_file)
    security = ServerSecurity.from_config(config)
    assert security.credentials is not None and security.tokens is not None and len(security.tokens) == 1
    assert security.describe() == "TLS with client certificates, 1 bearer token(s)"
    assert load_config(["--tls-client-ca", str(pki.rogue_ca)], environ=env).tls_client_ca == pki.rogue_ca
    assert ServerSecurity.from_config(load_config([], environ={})).describe() == "plaintext, no tokens"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--tls-cert", "a.pem"],
            "--tls-cert (STYLIZE_TLS_CERT) and --tls-key (STYLIZE_TLS_KEY) go together",
        ),
        (["--tls-key", "a.key"], "go together: give both or neither"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (STYLIZE_TLS_CLIENT_CA) needs --tls-cert"),
    ],
)
def test_tls_flags_that_do_not_pair_up_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(argv, environ={})


def _unusable_files(pki: Pki, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """id -> (argv, what the error must say)."""
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    damaged = tmp / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    encrypted = tmp / "encrypted.key"
    _openssl(tmp, "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x", "-out", encrypted.name)
    comments = tmp / "comments-only"
    comments.write_text("# nobody yet\n\n")
    missing = str(tmp / "missing.pem")
    return {
        "missing certificate": (
            ["--tls-cert", missing, "--tls-key", str(pki.server_key)],
            f"--tls-cert (STYLIZE_TLS_CERT) {missing}: cannot read it: No such file",
        ),
        "key as certificate": (
            ["--tls-cert", str(pki.server_key), "--tls-key", str(pki.server_key)],
            "--tls-cert (STYLIZE_TLS_CERT)",
        ),
        "damaged certificate": (
            ["--tls-cert", str(damaged), "--tls-key", str(pki.server_key)],
            "not a valid PEM certificate",
        ),
        "certificate as key": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_cert)],
            "--tls-key (STYLIZE_TLS_KEY)",
        ),
        "key of another certificate": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
            "--tls-key (STYLIZE_TLS_KEY)",
        ),
        "encrypted key": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(encrypted)],
            "the key is encrypted",
        ),
        "missing client CA": (
            [*tls, "--tls-client-ca", missing],
            "--tls-client-ca (STYLIZE_TLS_CLIENT_CA)",
        ),
        "missing tokens file": (
            ["--auth-tokens-file", missing],
            f"--auth-tokens-file (STYLIZE_AUTH_TOKENS_FILE) {missing}: cannot read it",
        ),
        "tokens file without tokens": (["--auth-tokens-file", str(comments)], "no tokens in it"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing certificate",
        "key as certificate",
        "damaged certificate",
        "certificate as key",
        "key of another certificate",
        "encrypted key",
        "missing client CA",
        "missing tokens file",
        "tokens file without tokens",
    ],
)
def test_unusable_files_are_config_errors_naming_the_flag(
    case: str, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = _unusable_files(pki, tmp_path)[case]
    assert server_main.main([*argv, "--port", "0"]) == server_main.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("stylize-server: error: "), err
    assert message in err
    assert "Traceback" not in err


# --- TLS and tokens, end to end --------------------------------------------------------------------


def test_a_plaintext_client_is_refused(secure: tuple[StylizeServer, str]) -> None:
    with pytest.raises(StylizeError) as caught, StylizeClient(secure[1], TIMEOUT, token=TOKEN) as client:
        client.info()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, OTHER_TOKEN], ids=["no token", "wrong token"])
def test_no_or_a_wrong_token_is_unauthenticated_before_any_work(
    token: str | None, pki: Pki, secure: tuple[StylizeServer, str], engine: FakeEngine
) -> None:
    with StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=token) as client:
        with pytest.raises(StylizeError) as info_error:
            client.info()
        with pytest.raises(StylizeError) as stylize_error:
            client.stylize_request(small_request()).wait()
    for error in (info_error.value, stylize_error.value):
        assert error.code is grpc.StatusCode.UNAUTHENTICATED
        assert ("needs a bearer token" if token is None else "not valid") in error.details
    assert engine.jobs_started == 0


def test_a_refused_call_is_not_even_received(pki: Pki, secure: tuple[StylizeServer, str]) -> None:
    # Over the server's 4 MiB message limit: a call that got as far as reading it would be
    # RESOURCE_EXHAUSTED; an unauthenticated one is refused before that.
    huge = pb.StylizeRequest(content_image=b"\0" * (6 * 1024 * 1024))
    with StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca) as client, pytest.raises(StylizeError) as refused:
        client.stylize_request(huge).wait()
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    with (
        StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=TOKEN) as client,
        pytest.raises(StylizeError) as too_large,
    ):
        client.stylize_request(huge).wait()
    assert too_large.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_header_that_is_not_a_bearer_token_is_unauthenticated(
    pki: Pki, secure: tuple[StylizeServer, str]
) -> None:
    with tls_channel(pki, secure[1]) as ch, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.StyleTransferStub(ch).GetInfo(
            pb.GetInfoRequest(), metadata=(("authorization", f"Basic {TOKEN}"),), timeout=TIMEOUT
        )
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "must be 'Bearer TOKEN'" in caught.value.details()


def test_the_right_token_over_tls_completes_a_job_and_only_its_hash_is_logged(
    pki: Pki, secure: tuple[StylizeServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=OTHER_TOKEN) as client,
        pytest.raises(StylizeError),
    ):
        client.info()
    with StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=TOKEN) as client:
        assert client.info().model.name == "fake-vgg16"
        events: list[object] = []
        result = client.run(image_bytes(48, 32), [image_bytes(32, 32, seed=1)], events.append, max_size=32)
    assert result.image and result.width == 32 and events[-1] is result
    job_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert len(job_lines) == 1 and f"client={token_label(TOKEN)}" in job_lines[0], job_lines
    assert "outcome=ok" in job_lines[0]
    assert TOKEN not in caplog.text and OTHER_TOKEN not in caplog.text
    assert "the bearer token is not valid" in caplog.text  # the refusal was logged, without the token


def test_reflection_needs_the_token(pki: Pki, secure: tuple[StylizeServer, str]) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with tls_channel(pki, secure[1]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        (reply,) = stub.ServerReflectionInfo(iter([request]), metadata=bearer(TOKEN), timeout=TIMEOUT)
    assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}


def test_health_answers_without_a_token(pki: Pki, secure: tuple[StylizeServer, str]) -> None:
    with tls_channel(pki, secure[1]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_info_with_the_token_exits_0_and_without_it_does_not(
    pki: Pki,
    secure: tuple[StylizeServer, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ["info", "--server", secure[1], "--tls-ca", str(pki.ca)]
    assert cli.main([*base, f"--token={TOKEN}"]) == cli.EXIT_OK
    assert "fake-vgg16" in capsys.readouterr().out

    assert cli.main(base) == cli.EXIT_AUTH
    err = capsys.readouterr().err
    assert "the server refused the credentials" in err and "--token" in err

    assert cli.main([*base, f"--token={OTHER_TOKEN}"]) == cli.EXIT_AUTH
    assert "not valid" in capsys.readouterr().err

    # The same from the environment.
    monkeypatch.setenv("STYLIZE_TLS_CA", str(pki.ca))
    monkeypatch.setenv("STYLIZE_TOKEN", TOKEN)
    assert cli.main(["info", "--server", secure[1]]) == cli.EXIT_OK


def test_cli_without_tls_settings_says_tls_may_be_why(
    secure: tuple[StylizeServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["info", "--server", secure[1], f"--token={TOKEN}", "--timeout", "5"])
        == cli.EXIT_UNAVAILABLE
    )
    assert "--tls-ca" in capsys.readouterr().err


def test_cli_stylizes_over_tls_with_a_token(
    pki: Pki, secure: tuple[StylizeServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, style, out = tmp_path / "photo.png", tmp_path / "style.png", tmp_path / "out.png"
    content.write_bytes(encode(gradient(48, 32)))
    style.write_bytes(encode(gradient(32, 32, seed=1)))
    argv = [str(content), "--style", str(style), "--server", secure[1], "-o", str(out), "-q"]
    argv += ["--tls-ca", str(pki.ca), "--max-size", "32", "--iterations", "2"]
    assert cli.main([*argv, f"--token={TOKEN}"]) == cli.EXIT_OK, capsys.readouterr().err
    assert out.is_file()
    out.unlink()
    assert cli.main(argv) == cli.EXIT_AUTH
    assert not out.exists()


# --- mutual TLS ------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(
    pki: Pki, mutual: tuple[StylizeServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    address = mutual[1]
    for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
        with (
            StylizeClient(address, TIMEOUT, tls_ca=pki.ca, tls_cert=cert, tls_key=key) as client,
            pytest.raises(StylizeError) as caught,
        ):
            client.info()
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE, cert
    with StylizeClient(
        address, TIMEOUT, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as c:
        assert c.info().model.name == "fake-vgg16"

    base = ["info", "--server", address, "--tls-ca", str(pki.ca), "--timeout", "5"]
    assert cli.main(base) == cli.EXIT_UNAVAILABLE
    assert "--tls-cert" in capsys.readouterr().err
    assert cli.main([*base, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]) == 0


def test_under_mutual_tls_a_job_is_logged_and_bounded_by_its_certificate(
    pki: Pki, mutual: tuple[StylizeServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server, address = mutual
    with StylizeClient(
        address, TIMEOUT, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as client:
        client.run(image_bytes(48, 32), [image_bytes(32, 32, seed=1)], max_size=32, iterations=2)

    def job_lines() -> list[str]:  # the worker logs the job's end just after its Result is sent
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]

    assert wait_until(lambda: len(job_lines()) == 1), job_lines()
    assert "client=cert:" in job_lines()[0], job_lines()
    assert server.scheduler.jobs_of(job_lines()[0].split("client=", 1)[1].split()[0]) == 0


# --- the tokens file -------------------------------------------------------------------------------


def test_tokens_file_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n   {TOKEN}  \n#{OTHER_TOKEN}\nnot a token\nsecond-token==\n")
    store = TokenStore(path)
    assert len(store) == 2
    assert store.verify(TOKEN) and store.verify("second-token==")
    assert not store.verify(OTHER_TOKEN)  # commented out
    assert not store.verify("not a token") and not store.verify("not")
    assert "line 5: not a bearer token" in caplog.text
    assert "not a token" not in caplog.text.replace("not a bearer token", "")  # the line is never echoed


def test_the_tokens_file_is_reread_after_a_change(
    pki: Pki, secure: tuple[StylizeServer, str], tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def info(token: str) -> grpc.StatusCode:
        with StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=token) as client:
            try:
                client.info()
            except StylizeError as err:
                return err.code
        return grpc.StatusCode.OK

    def accepted(token: str) -> bool:
        return info(token) is grpc.StatusCode.OK

    assert info(TOKEN) is grpc.StatusCode.OK
    assert info(OTHER_TOKEN) is grpc.StatusCode.UNAUTHENTICATED

    tokens_file.write_text(f"{OTHER_TOKEN}\n# {TOKEN} was revoked\n")  # edited in place
    assert wait_until(lambda: accepted(OTHER_TOKEN))
    assert info(TOKEN) is grpc.StatusCode.UNAUTHENTICATED

    replacement = tokens_file.with_name("tokens.new")  # replaced, as editors and secret stores do
    replacement.write_text(f"{TOKEN}\n")
    os.replace(replacement, tokens_file)
    assert wait_until(lambda: accepted(TOKEN))
    assert info(OTHER_TOKEN) is grpc.StatusCode.UNAUTHENTICATED

    # Gone: the last good set stays, with one warning however long it stays gone.
    caplog.clear()
    tokens_file.unlink()
    assert wait_until(lambda: "cannot re-read" in caplog.text)
    time.sleep(2.5)  # two more polls
    assert info(TOKEN) is grpc.StatusCode.OK
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot re-read" in r.message]
    assert len(warnings) == 1 and "keeping the 1 token(s)" in warnings[0].message

    tokens_file.write_text(f"{OTHER_TOKEN}\n")  # back: read again
    assert wait_until(lambda: accepted(OTHER_TOKEN))
    assert info(TOKEN) is grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in caplog.text and OTHER_TOKEN not in caplog.text


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "too-large"])
def test_a_hostile_tokens_file_never_blocks_a_call(
    kind: str,
    pki: Pki,
    secure: tuple[StylizeServer, str],
    tokens_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect: the tokens file was re-read on the thread that dispatches every call, with no file-type
    or size check: a FIFO at the path froze the server, health included; a link to /dev/zero took 18 GB.
    Now it is read by a thread of its own, only as a regular file of at most 1 MiB."""
    tokens_file.unlink()
    if kind == "fifo":
        os.mkfifo(tokens_file)  # nobody ever writes to it: a blocking open or read would hang for good
    elif kind == "dev-zero":
        tokens_file.symlink_to("/dev/zero")
    else:
        tokens_file.write_text(f"{TOKEN}\n" + "#" * (2 * 1024 * 1024) + "\n")
    with StylizeClient(secure[1], TIMEOUT, tls_ca=pki.ca, token=TOKEN) as client:
        for _ in range(3):  # the watcher polls every second: calls keep being answered meanwhile
            started = time.monotonic()
            client.info()  # the last good set stays in force
            assert time.monotonic() - started < 2.0
            time.sleep(0.8)
    channel = grpc.secure_channel(localhost(secure[1]), grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    with channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    reason = {"fifo": "not a regular file", "dev-zero": "not a regular file", "too-large": "larger than"}
    assert wait_until(lambda: "cannot re-read" in caplog.text)
    assert reason[kind] in caplog.text


def test_a_tokens_file_that_is_no_regular_file_is_a_config_error(tmp_path: Path) -> None:
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        TokenStore(fifo)


# --- the warning of an open server -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        *[(host, True) for host in ("0.0.0.0", "::", "192.0.2.7", "stylize.example")],
        *[(host, False) for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]")],
    ],
)
def test_only_an_open_server_outside_loopback_is_warned_about(
    host: str, warns: bool, tokens_file: Path
) -> None:
    assert (ServerSecurity().exposure_warning(host) is not None) is warns
    assert ServerSecurity(tokens=TokenStore(tokens_file)).exposure_warning(host) is None


def test_an_open_server_on_all_interfaces_warns_once_at_start(
    caplog: pytest.LogCaptureFixture, tokens_file: Path
) -> None:
    with running_server(FakeEngine(), host="0.0.0.0"):
        pass
    assert sum(EXPOSED in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    caplog.clear()
    with running_server(FakeEngine(), host="0.0.0.0", auth_tokens_file=tokens_file):
        pass
    with running_server(FakeEngine()):  # 127.0.0.1
        pass
    assert EXPOSED not in caplog.text


# --- the health check script -----------------------------------------------------------------------


def _server_env(monkeypatch: pytest.MonkeyPatch, pki: Pki, mutual: bool) -> None:
    """What the server's container has: its own variables and nothing for the health check."""
    monkeypatch.setenv("STYLIZE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("STYLIZE_TLS_KEY", str(pki.server_key))
    if mutual:
        monkeypatch.setenv("STYLIZE_TLS_CLIENT_CA", str(pki.ca))
    for name in ("CA", "CERT", "KEY", "SERVER_NAME"):
        monkeypatch.delenv(f"STYLIZE_HEALTHCHECK_TLS_{name}", raising=False)


def test_healthcheck_uses_the_servers_own_tls_variables(
    pki: Pki, secure: tuple[StylizeServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _server_env(monkeypatch, pki, mutual=False)
    # By IP, while the certificate names only localhost: the script learns the name from it.
    address = "127.0.0.1:" + secure[1].rpartition(":")[2]
    healthcheck = load_script("healthcheck")
    assert healthcheck.main(["--address", address, "--quiet"]) == 0
    assert healthcheck.main(["--address", address, "--quiet", "--plaintext", "--timeout", "2"]) == 1
    assert healthcheck.main(["--address", address, "--quiet", "--tls-server-name", "elsewhere"]) == 1


def test_healthcheck_against_mutual_tls(
    pki: Pki,
    mutual: tuple[StylizeServer, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _server_env(monkeypatch, pki, mutual=True)
    address = "127.0.0.1:" + mutual[1].rpartition(":")[2]
    healthcheck = load_script("healthcheck")
    assert healthcheck.main(["--address", address, "--quiet"]) == 0  # the server's certificate as client's
    monkeypatch.setenv("STYLIZE_HEALTHCHECK_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("STYLIZE_HEALTHCHECK_TLS_KEY", str(pki.client_key))
    assert healthcheck.main(["--address", address, "--quiet"]) == 0
    assert healthcheck.main(["--address", address, "--tls-ca", str(pki.rogue_ca)]) == 1
    assert "not trusted" in capsys.readouterr().err


# --- client-side mistakes --------------------------------------------------------------------------


def test_unusable_client_settings_name_the_argument(pki: Pki, tmp_path: Path) -> None:
    cases = [
        ({"tls_ca": tmp_path / "missing.pem"}, "tls_ca", "cannot read"),
        ({"tls_ca": pki.server_key}, "tls_ca", "no PEM certificate"),
        ({"tls_cert": pki.client_cert}, "tls_key", "go together"),
        ({"tls_cert": pki.client_cert, "tls_key": pki.client_cert}, "tls_key", "no PEM private key"),
        ({"tls_server_name": "localhost"}, "tls_server_name", "needs TLS"),
        ({"token": "two words"}, "token", "not a bearer token"),
    ]
    for kwargs, argument, problem in cases:
        with pytest.raises(ClientSecurityError) as caught:
            StylizeClient("localhost:1", **kwargs)  # type: ignore[arg-type]
        assert (caught.value.argument, problem in caught.value.problem) == (argument, True), kwargs


def test_cli_reports_an_unusable_tls_file_as_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    assert cli.main(["info", "--server", "localhost:1", "--tls-ca", str(missing)]) == cli.EXIT_USAGE
    assert f"--tls-ca: cannot read {missing}" in capsys.readouterr().err


# --- the recipe of docs/security.md ----------------------------------------------------------------


def test_the_docs_certificate_commands_and_python_example_work(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = section(SECURITY_PAGE, "## Certificates and a token")
    commands = re.search(r"```bash\n(.*?)```", recipe, re.S)
    example = re.search(r"```python\n(.*?)```", section(SECURITY_PAGE, "## Serving and calling"), re.S)
    assert commands and "openssl" in commands.group(1) and example
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands.group(1)], cwd=tmp_path, check=True, timeout=120
    )
    certs = tmp_path / "certs"
    token = (certs / "tokens").read_text().split()[0]
    with running_server(
        FakeEngine(),
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        auth_tokens_file=certs / "tokens",
    ) as (_, address):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("STYLIZE_TOKEN", token)
        code = example.group(1).replace("localhost:50051", localhost(address))
        exec(compile(code, "docs/security.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "fake-vgg16"
