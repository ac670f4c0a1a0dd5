"""The ready file: how a server started on port 0 tells the tools that started it where it listens.

`stylize-server --ready-file PATH` writes PATH once the model is loaded and health says SERVING: one JSON
object with the gRPC host and port, the metrics port (null when off) and the process id. It is written
atomically (a temporary file, fsync, rename), so a reader never sees half of it, and removed when the
server exits. Scripts and tests start a server with it and call wait_for_ready_file() rather than parse
the server's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReadyInfo:
    host: str
    port: int
    pid: int
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        """host:port for a gRPC client; a wildcard host is reached through loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


def write_ready_file(path: Path, info: ReadyInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(asdict(info), file)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_ready_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_ready_file(path: Path) -> ReadyInfo:
    data = json.loads(path.read_text())
    return ReadyInfo(
        host=str(data["host"]),
        port=int(data["port"]),
        pid=int(data["pid"]),
        metrics_port=None if data.get("metrics_port") is None else int(data["metrics_port"]),
    )


def wait_for_ready_file(
    path: Path, process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None, timeout: float = 180.0
) -> ReadyInfo:
    """The server's ReadyInfo once `path` exists; raises RuntimeError when `process` exits first, or
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"stylize-server exited with status {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"stylize-server wrote no ready file {path} within {timeout:.0f}s")
        time.sleep(0.05)
    return read_ready_file(path)
