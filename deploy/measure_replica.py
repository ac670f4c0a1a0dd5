#!/usr/bin/env python3
"""Measure one stylize-server set up as one replica of deploy/k8s: the figures its probes, resources,
autoscaler and grace period rest on.

    python deploy/measure_replica.py                                # 512 px, 20 iterations, 2 threads
    python deploy/measure_replica.py --max-size 1024 --iterations 10

It starts `stylize-server` on 127.0.0.1 with the Deployment's settings (one job at a time, ONNX Runtime
threads = the CPU limit, telemetry off), runs one job on the bundled samples while it asks the health
service every second, then starts a second job and sends SIGTERM with a short drain grace. It reports:

- seconds from start to health SERVING (what the startupProbe must allow);
- resident memory once loaded and idle, and the peak after the job (VmRSS and VmHWM of /proc);
- the server's CPU time during the job over the job's wall time, as a share of `--threads` cores: what
  the HorizontalPodAutoscaler sees of a busy replica whose CPU request is that many cores;
- the slowest health check during the job (what the probes' timeoutSeconds must allow);
- seconds from SIGTERM to exit beyond the drain grace, with a job running (what
  terminationGracePeriodSeconds must leave beyond STYLIZE_GRACE_SECONDS).

Linux only (it reads /proc). Other processes on the machine lower the CPU share it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stylize_service.client.api import StylizeClient, StylizeError
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server import procfs

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "client" / "samples"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Report:
    threads: int
    max_size: int
    iterations: int
    seconds_to_serving: float = 0.0
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    job_seconds: float = 0.0
    cpu_share_of_threads: float = 0.0  # server CPU seconds / (job wall seconds * threads)
    health_checks: int = 0
    health_failures: int = 0
    slowest_health_check_s: float = 0.0
    drain_grace_s: float = 0.0
    sigterm_to_exit_s: float = 0.0
    drained_job_status: str = ""
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(channel: grpc.Channel, timeout: float) -> int | None:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return None
    return int(reply.status)


class HealthPoller(threading.Thread):
    """Asks the health service every `interval` seconds, as the kubelet's probes do, and keeps the times."""

    def __init__(self, address: str, interval: float, timeout: float) -> None:
        super().__init__(name="health-poller", daemon=True)
        self._address = address
        self._interval = interval
        self._timeout = timeout
        self._halt = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0

    def run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            while not self._halt.is_set():
                started = time.perf_counter()
                status = health_status(channel, self._timeout)
                self.latencies.append(time.perf_counter() - started)
                if status != SERVING:
                    self.failures += 1
                self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        STYLIZE_HOST="127.0.0.1",
        STYLIZE_PORT=str(port),
        STYLIZE_CONCURRENCY="1",
        STYLIZE_THREADS=str(args.threads),
        STYLIZE_GRACE_SECONDS=str(args.drain_grace),
        ORT_DISABLE_TELEMETRY="1",
    )
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stylize_service.server.main"], env=env, stdout=log, stderr=log
        )


def wait_serving(address: str, server: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    with grpc.insecure_channel(address) as channel:
        while health_status(channel, timeout=1.0) != SERVING:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode} before SERVING")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not SERVING within {limit:g}s")
            time.sleep(0.1)


def measure(args: argparse.Namespace, log_path: Path) -> Report:
    report = Report(threads=args.threads, max_size=args.max_size, iterations=args.iterations)
    if (cores := len(os.sched_getaffinity(0))) < args.threads:
        report.notes.append(f"only {cores} cores here for {args.threads} threads")
    port = free_port()
    address = f"127.0.0.1:{port}"
    started = time.perf_counter()
    server = start_server(args, port, log_path)
    try:
        wait_serving(address, server, args.start_timeout)
        report.seconds_to_serving = time.perf_counter() - started
        report.idle_rss_mib = procfs.status_value(server.pid, "VmRSS") / 2**20

        options = {"max_size": args.max_size, "iterations": args.iterations, "frame_every": 0}
        with StylizeClient(address) as client:
            poller = HealthPoller(address, interval=1.0, timeout=args.probe_timeout)
            poller.start()
            cpu_before, wall_before = procfs.cpu_seconds(server.pid), time.perf_counter()
            client.run(args.content, [args.style], **options)
            report.job_seconds = time.perf_counter() - wall_before
            cpu_used = procfs.cpu_seconds(server.pid) - cpu_before
            poller.stop()
            report.cpu_share_of_threads = cpu_used / (report.job_seconds * args.threads)
            report.peak_rss_mib = procfs.status_value(server.pid, "VmHWM") / 2**20
            report.health_checks = len(poller.latencies)
            report.health_failures = poller.failures
            report.slowest_health_check_s = max(poller.latencies, default=0.0)

            # Drain: a job is running when SIGTERM comes; it may run for the grace, then is cancelled.
            report.drain_grace_s = args.drain_grace
            call = client.stylize(args.content, [args.style], **{**options, "iterations": 100_000})
            for event in call:
                if isinstance(event, pb.Progress) and event.iteration >= 1:
                    break
            sigterm_at = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            try:
                call.wait()
                report.drained_job_status = "OK"
            except StylizeError as err:
                report.drained_job_status = err.code.name
            server.wait(timeout=args.drain_grace + args.start_timeout)
            report.sigterm_to_exit_s = time.perf_counter() - sigterm_at
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return report


def print_report(report: Report) -> None:
    print(
        f"replica: {report.threads} threads, one job of {report.max_size} px, {report.iterations} iterations"
    )
    print(f"  start to SERVING            {report.seconds_to_serving:8.1f} s")
    print(f"  resident, idle              {report.idle_rss_mib:8.0f} MiB")
    print(f"  resident, peak after job    {report.peak_rss_mib:8.0f} MiB")
    print(f"  job                         {report.job_seconds:8.1f} s")
    print(f"  CPU during the job          {report.cpu_share_of_threads:8.0%} of {report.threads} cores")
    print(
        f"  health checks during job    {report.health_checks:8d} "
        f"({report.health_failures} not SERVING), slowest {report.slowest_health_check_s * 1000:.0f} ms"
    )
    print(
        f"  SIGTERM to exit, job running {report.sigterm_to_exit_s:7.1f} s with a {report.drain_grace_s:g} s "
        f"grace ({report.sigterm_to_exit_s - report.drain_grace_s:+.1f} s beyond it; "
        f"the job ended {report.drained_job_status})"
    )
    for note in report.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="the CPU limit in cores (default: %(default)s)"
    )
    parser.add_argument("--max-size", type=int, default=512, help="px (default: %(default)s)")
    parser.add_argument(
        "--iterations", type=int, default=20, help="of the measured job (default: %(default)s)"
    )
    parser.add_argument("--content", type=Path, default=SAMPLES / "coffee.png")
    parser.add_argument("--style", type=Path, default=SAMPLES / "style_swirls.jpg")
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=2.0,
        help="STYLIZE_GRACE_SECONDS for the drain (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-timeout", type=float, default=10.0, help="seconds per health check (default: %(default)s)"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for SERVING (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.max_size < 16 or args.iterations < 1 or args.drain_grace < 0:
        parser.error("--threads and --iterations must be >= 1, --max-size >= 16, --drain-grace >= 0")

    with tempfile.TemporaryDirectory(prefix="stylize-measure-") as tmp:
        log_path = Path(tmp) / "server.log"
        try:
            report = measure(args, log_path)
        except (RuntimeError, StylizeError, subprocess.TimeoutExpired) as err:
            print(
                f"measure_replica: error: {err}\n--- server log ---\n{log_path.read_text()}", file=sys.stderr
            )
            return 1
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
