"""A real redis-server for the fleet store's tests: started on a free port in a temporary directory, with
no persistence, and stopped at the end.

Where the binary is absent the tests that need it skip, naming the package to install; under CI (the
environment variable CI set) they fail instead, so that CI never passes without running them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "install redis-server (Debian package redis-server) to run the Redis store tests"


def redis_binary() -> str:
    """The redis-server to run; skips the test (fails it under CI) when there is none."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"redis-server is not installed and CI is set: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self,
        binary: str,
        directory: Path,
        port: int | None = None,
        password: str | None = None,
        *,
        persistent: bool = False,
    ):
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]
        # persistent: every write synced to the append-only file, so the data outlives a restart.
        args += (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        args += ["--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@contextlib.contextmanager
def redis_server(directory: Path, password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), directory, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
