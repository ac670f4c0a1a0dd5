"""`stylize`: the command-line client.

stylize photo.jpg --style starry.jpg -o out.png                     # one image
stylize photo.jpg --style a.jpg:2 --style b.jpg:1 --max-size 384    # a blend of two styles, 2:1
stylize photos/ --style starry.jpg --output-dir out/                # every image of a folder
stylize photo.jpg --style s.jpg --frames-dir frames/ --animation progress.gif
stylize info                                                        # the server's model, defaults, limits
stylize info --server host:50051 --tls-ca ca.pem --token TOKEN      # a server with TLS and tokens
stylize photos/ -s s.jpg --server ipv4:10.0.0.1:50051,10.0.0.2:50051 --parallel 2   # over two replicas
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc

from stylize_service.client.api import DEFAULT_ADDRESS, Event, StylizeCall, StylizeClient, StylizeError
from stylize_service.client.display import ProgressDisplay
from stylize_service.client.flags import add_option_flags, option_values, value_text
from stylize_service.client.formats import extension_for_mime, format_from_suffix
from stylize_service.client.options import OPTIONS
from stylize_service.client.outputs import ANIMATION_SUFFIXES, JobOutputs
from stylize_service.client.request import build_request
from stylize_service.client.security import ClientSecurityError
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

EXIT_OK = 0
EXIT_FAILED = 1  # any other error (INTERNAL, a file that cannot be written, ...)
EXIT_USAGE = 2  # bad flags, missing input files, or the server said INVALID_ARGUMENT
EXIT_UNAVAILABLE = 3  # the server cannot be reached (or is shutting down)
EXIT_BUSY = 4  # the server's queue is full (RESOURCE_EXHAUSTED), or a message was too large
EXIT_DEADLINE = 5  # --timeout passed
EXIT_AUTH = 6  # the server refused the credentials: UNAUTHENTICATED or PERMISSION_DENIED
EXIT_INTERRUPTED = 130  # Ctrl-C: the call was cancelled

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_BUSY,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_DEADLINE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.CANCELLED: EXIT_INTERRUPTED,
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FRAMES_PER_JOB = 50  # with --frames-dir or --animation and no --frame-every: about this many frames
DEFAULT_RETRIES = 3  # busy refusals retried per job: about 1, 2 and 4 s apart, each on the next replica
# Before a parallel batch, wait up to this long for the channel's connections, so that the first jobs are
# spread over the replicas rather than all sent to the first one to connect.
CONNECT_WAIT_SECONDS = 10.0

# What the CLI adds to the proto's own flags: short forms, and notes on what it does beyond the proto.
SHORT_FLAGS = {"iterations": "-n"}
CLI_NOTES = {
    "frame_every": f"With --frames-dir or --animation and no --frame-every: 1/{FRAMES_PER_JOB} of the "
    "iterations (--iterations, else the server's default).",
    "output_format": "Here the default is the format of -o's suffix, if given.",
}

EPILOG = f"""\
The stylization options are the fields of stylize.v1.StylizeOptions, with the proto's comments as their
help; options left out take the server's defaults (see `stylize info`). Layer lists are comma separated,
each LAYER or LAYER:WEIGHT, e.g. relu1_1,relu2_1:0.5; an image option takes a file (PATH).
Results are named NAME-stylized.EXT (EXT: the result's format) unless -o is given. With several inputs
(or a folder), results go to --output-dir, frames to --frames-dir/NAME/, and --animation must contain
{{name}} (e.g. anim/{{name}}.gif).

exit status: {EXIT_OK} ok, {EXIT_FAILED} other error, {EXIT_USAGE} invalid arguments (flags, files, or the
server's INVALID_ARGUMENT), {EXIT_UNAVAILABLE} server unreachable (or the TLS handshake failed), {EXIT_BUSY}
server busy or message too large, {EXIT_DEADLINE} --timeout passed, {EXIT_AUTH} the server refused the
credentials (no or a wrong --token), {EXIT_INTERRUPTED} interrupted (Ctrl-C cancels the job).
environment: the defaults of --server, --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token
are STYLIZE_SERVER, STYLIZE_TLS (1 = on), STYLIZE_TLS_CA, STYLIZE_CLIENT_TLS_CERT, STYLIZE_CLIENT_TLS_KEY,
STYLIZE_TLS_SERVER_NAME and STYLIZE_TOKEN."""


class UsageError(Exception):
    pass


@dataclass
class Job:
    content: Path
    output: Path | None  # -o; None = output_dir / NAME-stylized.EXT, EXT from the result's format
    output_dir: Path
    frames_dir: Path | None
    animation: Path | None

    def output_path(self, result: pb.Result) -> Path:
        if self.output is not None:
            return self.output
        return self.output_dir / f"{self.content.stem}-stylized.{extension_for_mime(result.mime_type)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        args = build_info_parser().parse_args(argv[1:])
        return run_info(args, args.json)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.info:
        return run_info(args, False)
    try:
        jobs = plan_jobs(args)
        options = collect_options(args)
        styles = parse_styles(args.style or [])
    except UsageError as err:
        _usage_error(parser, str(err))
    try:
        return run_jobs(args, jobs, styles, options)
    except ClientSecurityError as err:
        return _security_error(err)
    except KeyboardInterrupt:  # outside a call (a running call is cancelled in run_job)
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- arguments -------------------------------------------------------------------------------------


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("STYLIZE_SERVER", DEFAULT_ADDRESS),
        metavar="TARGET",
        help="the stylize server: HOST:PORT, or several replicas as dns:///NAME:PORT (every address NAME "
        "resolves to) or ipv4:IP:PORT,IP:PORT; calls go round robin over the replicas that report "
        "SERVING (default: $STYLIZE_SERVER or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="deadline of each call (default: none)"
    )
    sec = parser.add_argument_group("security (see the README's Security section)")
    sec.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("STYLIZE_TLS", "").lower() in ("1", "true", "yes", "on"),
        help="use TLS, checking the server's certificate against gRPC's default roots "
        "(implied by --tls-ca and --tls-cert; default: $STYLIZE_TLS=1)",
    )
    sec.add_argument(
        "--tls-ca",
        default=_env("STYLIZE_TLS_CA"),
        metavar="PEM",
        help="use TLS, trusting the CA certificate(s) in this file (default: $STYLIZE_TLS_CA)",
    )
    sec.add_argument(
        "--tls-cert",
        default=_env("STYLIZE_CLIENT_TLS_CERT"),
        metavar="PEM",
        help="client certificate, for a server that requires one (mutual TLS); with --tls-key "
        "(default: $STYLIZE_CLIENT_TLS_CERT)",
    )
    sec.add_argument(
        "--tls-key",
        default=_env("STYLIZE_CLIENT_TLS_KEY"),
        metavar="PEM",
        help="private key of --tls-cert (default: $STYLIZE_CLIENT_TLS_KEY)",
    )
    sec.add_argument(
        "--tls-server-name",
        default=_env("STYLIZE_TLS_SERVER_NAME"),
        metavar="NAME",
        help="check the server's certificate for this name instead of --server's host "
        "(default: $STYLIZE_TLS_SERVER_NAME)",
    )
    sec.add_argument(
        "--token",
        default=_env("STYLIZE_TOKEN"),
        help="bearer token for a server with --auth-tokens-file (default: $STYLIZE_TOKEN, which other "
        "users cannot see, unlike a command line)",
    )


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def connect(args: argparse.Namespace, retries: int = 0) -> StylizeClient:
    """A client for --server with the security flags; raises ClientSecurityError for unusable ones.
    retries: how often a job refused as busy is tried again (--retries)."""
    return StylizeClient(
        args.server,
        args.timeout,
        retries=retries,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=args.token,
    )


def _security_error(err: ClientSecurityError) -> int:
    flag = "--" + err.argument.replace("_", "-")
    print(f"stylize: error: {flag}: {err.problem}", file=sys.stderr)
    return EXIT_USAGE


def build_info_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize info", description="Show the server's model, option defaults and limits."
    )
    _server_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the GetInfo response as JSON")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize",
        description="Neural style transfer with a stylize server: "
        "stylize CONTENT... --style STYLE[:WEIGHT]...  |  stylize info",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("content", nargs="*", type=Path, help="content image(s), or folders of images")
    parser.add_argument(
        "-s",
        "--style",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="style image, repeatable; WEIGHT is its share of the blend (default: equal shares)",
    )
    _server_flags(parser)
    parser.add_argument("--info", action="store_true", help="show the server's model and limits, and exit")
    parser.add_argument(
        "--retries",
        type=_non_negative,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="when the server (every replica) is busy, try a job again up to N times, with a backoff "
        "doubling from 1 s; each try goes to the next replica (default: %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        metavar="N",
        help="run up to N jobs at a time, to use several replicas at once; about the replicas times "
        "their concurrency (default: 1, one job after another)",
    )

    out = parser.add_argument_group("outputs")
    out.add_argument(
        "-o", "--output", type=Path, help="result file (one input only; default: NAME-stylized.EXT)"
    )
    out.add_argument("--output-dir", type=Path, help="folder for results (default: the current folder)")
    out.add_argument("--frames-dir", type=Path, help="write every intermediate frame into this folder")
    out.add_argument("--animation", type=Path, metavar="PATH.gif|PATH.webp", help="animate the frames")
    out.add_argument(
        "--frame-duration", type=int, default=100, metavar="MS", help="animation frame time (default: 100)"
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    opt = parser.add_argument_group("stylization options (stylize.v1.StylizeOptions; default: the server's)")
    add_option_flags(opt, short=SHORT_FLAGS, notes=CLI_NOTES)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(f"stylize: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def parse_styles(values: Sequence[str]) -> list[tuple[Path, float]]:
    if not values:
        raise UsageError("at least one --style is required")
    styles = []
    for value in values:
        path, weight = Path(value), 0.0
        # PATH:WEIGHT, unless the whole value is an existing file (a path may contain ':').
        if ":" in value and not path.exists():
            head, _, tail = value.rpartition(":")
            try:
                path, weight = Path(head), float(tail)
            except ValueError:
                raise UsageError(f"--style {value}: WEIGHT must be a number") from None
        if not path.is_file():
            raise UsageError(f"--style {value}: no such file: {path}")
        styles.append((path, weight))
    return styles


def collect_options(args: argparse.Namespace) -> dict[str, Any]:
    """The StylizeOptions fields given on the command line, as build_options takes them."""
    options = option_values(args)
    if "output_format" in options and options["output_format"] is None and args.output is not None:
        options["output_format"] = format_from_suffix(args.output)
        if options["output_format"] is None:
            raise UsageError(
                f"-o {args.output}: cannot tell the format from '{args.output.suffix}'; use --output-format"
            )
    return options


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Inputs -> jobs with their output paths; raises UsageError for missing files or clashing flags."""
    if not args.content:
        raise UsageError("no content image given (or use `stylize info`)")
    contents: list[Path] = []
    for path in args.content:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UsageError(f"{path}: no images in this folder")
            contents.extend(found)
        elif path.is_file():
            contents.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    batch = len(contents) > 1 or any(p.is_dir() for p in args.content)
    if args.animation is not None and args.animation.suffix.lower() not in ANIMATION_SUFFIXES:
        raise UsageError(f"--animation {args.animation}: must end in .gif or .webp")
    if batch:
        if args.output is not None:
            raise UsageError("-o/--output takes one input; with several, use --output-dir")
        if args.animation is not None and "{name}" not in str(args.animation):
            raise UsageError("with several inputs, --animation must contain {name}, e.g. anim/{name}.gif")
        stems = [p.stem for p in contents]
        if len(set(stems)) != len(stems):
            raise UsageError("several inputs have the same name; their outputs would overwrite each other")
    jobs = []
    for content in contents:
        frames = args.frames_dir / content.stem if batch and args.frames_dir else args.frames_dir
        animation = Path(str(args.animation).replace("{name}", content.stem)) if args.animation else None
        jobs.append(Job(content, args.output, args.output_dir or Path("."), frames, animation))
    return jobs


# --- running ---------------------------------------------------------------------------------------


def run_info(args: argparse.Namespace, as_json: bool) -> int:
    server = args.server
    try:
        with connect(args) as client:
            info = client.info()
    except ClientSecurityError as err:
        return _security_error(err)
    except StylizeError as err:
        return _report(err, server)
    if as_json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))
        return EXIT_OK
    model, limits, d = info.model, info.limits, info.defaults
    pre = model.preprocessing
    print(f"server           {server} (stylize-service {info.server_version})")
    print(f"model            {model.name}: {model.weights_source}")
    print(f"providers        {', '.join(model.providers)}")
    print(
        f"preprocessing    {pre.channel_order}, (x * {pre.input_scale:g} - mean) / std, "
        f"mean {' '.join(map(_g, pre.mean))}, std {' '.join(map(_g, pre.std))}"
    )
    print(f"layers           {', '.join(model.layers)}")
    print("defaults         (the flags' values when left out; unset: chosen per request, see --help)")
    for option in OPTIONS.values():
        print(f"  {option.flag:<18} {value_text(option, d)}")
    print("limits")
    print(f"  max pixels     {limits.max_pixels} per input image")
    print(f"  max message    {limits.max_message_bytes / 2**20:g} MiB")
    print(
        f"  max size       {limits.max_size} px, {limits.max_iterations} iterations, {limits.max_styles} styles"
    )
    print(
        f"  jobs           {limits.concurrency} at a time, {limits.queue_size} queued, "
        f"{limits.max_jobs_per_client} per client"
    )
    print(
        f"  memory         {_mib(limits.memory_budget_bytes)} MiB budget, "
        f"{_mib(limits.memory_for_jobs_bytes)} MiB for jobs (larger stages run in exact tiles)"
    )
    print(f"  max weight     {_g(limits.max_weight)}")
    cache, load = info.graph_cache, info.load
    print("now")
    print(f"  jobs           {load.running_jobs} running, {load.queued_jobs} queued")
    print(
        f"  graph cache    {cache.entries} layer choice(s), {_mib(cache.used_bytes)} of "
        f"{_mib(cache.budget_bytes)} MiB, {cache.evictions} evicted"
    )
    return EXIT_OK


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def _g(value: float) -> str:
    return f"{value:g}"


def run_jobs(
    args: argparse.Namespace, jobs: list[Job], styles: list[tuple[Path, float]], options: dict[str, Any]
) -> int:
    with connect(args, retries=args.retries) as client:
        total = options.get("iterations")
        if total is None:  # the server's default sizes the progress bar and the implied --frame-every
            try:
                total = client.info().defaults.iterations  # 0 if the server does not say
            except StylizeError as err:
                return _report(err, args.server)
        wants_frames = any(job.frames_dir is not None or job.animation is not None for job in jobs)
        if wants_frames and options.get("frame_every") is None:
            if not total:
                print(
                    "stylize: error: the server reports no default iterations; give --frame-every",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            options = options | {"frame_every": max(1, total // FRAMES_PER_JOB)}
        runner = _JobRunner(client, styles, options, total, quiet=args.quiet, duration=args.frame_duration)
        if args.parallel > 1 and len(jobs) > 1:
            return runner.run_parallel(jobs, args.parallel)
        worst = EXIT_OK
        for job in jobs:
            code = runner.run(job)
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code  # nothing more can succeed
            worst = worst or code
    return worst


class _LineStderr:
    """stderr while jobs run at once: each thread's text goes out in whole lines, and it is no terminal,
    so that every job reports in plain lines (a redrawn bar per job would overwrite the others')."""

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._pending = threading.local()  # this thread's text after its last newline

    def write(self, text: str) -> int:
        lines, newline, rest = (getattr(self._pending, "text", "") + text).rpartition("\n")
        if newline:
            with self._lock:
                self._target.write(lines + newline)
                self._target.flush()
        self._pending.text = rest
        return len(text)

    def flush(self) -> None:
        pass  # a partial line waits for its newline, so that lines never interleave

    def isatty(self) -> bool:
        return False


class _RunningCalls:
    """The calls in flight, so that Ctrl-C can cancel every one of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[StylizeCall] = set()
        self.cancelled = False

    @contextlib.contextmanager
    def track(self, call: StylizeCall) -> Iterator[None]:
        with self._lock:
            self._calls.add(call)
            if self.cancelled:  # started just after Ctrl-C
                call.cancel()
        try:
            yield
        finally:
            with self._lock:
                self._calls.discard(call)

    def cancel_all(self) -> None:
        with self._lock:
            self.cancelled = True
            for call in self._calls:
                call.cancel()


class _JobRunner:
    """Runs jobs over one client, one after another (run) or up to N at a time (run_parallel)."""

    def __init__(
        self,
        client: StylizeClient,
        styles: list[tuple[Path, float]],
        options: dict[str, Any],
        total_iterations: int,
        *,
        quiet: bool,
        duration: int,
    ) -> None:
        self.client = client
        self.styles = styles
        self.options = options
        self.total_iterations = total_iterations
        self.quiet = quiet
        self.duration = duration
        self.running = _RunningCalls()

    def run(self, job: Job) -> int:
        return run_job(
            self.client,
            job,
            self.styles,
            self.options,
            self.total_iterations,
            quiet=self.quiet,
            duration=self.duration,
            running=self.running,
        )

    def run_parallel(self, jobs: list[Job], parallel: int) -> int:
        """Up to `parallel` jobs at a time; the first failure's exit status in job order. A job that
        finds the server unreachable stops the jobs not yet started; Ctrl-C cancels every running one."""
        stop = threading.Event()
        codes: dict[int, int] = {}
        self.client.wait_ready(CONNECT_WAIT_SECONDS)  # unreachable: the jobs report it

        def one(index: int, job: Job) -> None:
            if stop.is_set():
                return
            codes[index] = code = self.run(job)
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                stop.set()

        with (
            contextlib.redirect_stderr(_LineStderr(sys.stderr)),
            ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="stylize-job") as pool,
        ):
            pending: set[Future[None]] = {pool.submit(one, index, job) for index, job in enumerate(jobs)}
            try:
                while pending:  # timed waits, so that Ctrl-C reaches this (the main) thread promptly
                    _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop.set()
                self.running.cancel_all()
                print("stylize: interrupted; the running jobs were cancelled", file=sys.stderr)
                return EXIT_INTERRUPTED
        for code in (codes[index] for index in sorted(codes)):
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code
        return next((code for _, code in sorted(codes.items()) if code), EXIT_OK)


def run_job(
    client: StylizeClient,
    job: Job,
    styles: list[tuple[Path, float]],
    options: dict[str, Any],
    total_iterations: int,
    *,
    quiet: bool,
    duration: int,
    running: _RunningCalls,
) -> int:
    label = job.content.name
    display = ProgressDisplay(label, total_iterations, enabled=not quiet)
    try:
        request = build_request(job.content, styles, **options)
    except OSError as err:
        print(f"stylize: error: {label}: cannot read an input: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # argparse checks the values already; this is a last guard
        print(f"stylize: error: {label}: invalid option: {err}", file=sys.stderr)
        return EXIT_USAGE
    outputs = JobOutputs(job.frames_dir, job.animation, duration)
    heard_from_server = False  # an event came: a later UNAVAILABLE means the connection was lost

    def on_event(event: Event) -> None:
        nonlocal heard_from_server
        heard_from_server = True
        display.on_event(event)
        if isinstance(event, pb.Frame):
            outputs.on_frame(event)

    def on_retry(error: StylizeError, retry: int, delay: float) -> None:
        if not quiet:
            display.abort()
            print(
                f"stylize: {label}: busy ({error.details}); retry {retry} of {client.retries} in {delay:.1f}s",
                file=sys.stderr,
            )

    call = client.stylize_request(request, on_retry=on_retry)
    try:
        with running.track(call):
            result = call.wait(on_event)
        output = job.output_path(result)
        outputs.write_result(result, output)
    except KeyboardInterrupt:
        call.cancel()
        display.abort()
        print(f"stylize: {label}: interrupted; the job was cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StylizeError as err:
        display.abort()
        if err.code is grpc.StatusCode.CANCELLED and running.cancelled:
            return EXIT_INTERRUPTED  # Ctrl-C during a parallel batch, already reported
        return _report(err, client.address, label, mid_job=heard_from_server)
    except OSError as err:
        display.abort()
        print(f"stylize: error: {label}: cannot write the output: {err}", file=sys.stderr)
        return EXIT_FAILED
    display.finish(result, str(output))
    return EXIT_OK


def _report(err: StylizeError, server: str, label: str = "", *, mid_job: bool = False) -> int:
    """Print what went wrong and why it may have; mid_job: the server had answered the call already."""
    prefix = f"{label}: " if label else ""
    if err.code is grpc.StatusCode.UNAVAILABLE and mid_job:
        # Reached once, so neither the address nor TLS is the problem.
        message = (
            f"lost the connection to the stylize server at {server} during the job ({err.details}): "
            "the server stopped or restarted, or the network failed; the job did not finish"
        )
    elif err.code is grpc.StatusCode.UNAVAILABLE:
        message = (
            f"cannot reach the stylize server at {server}, or it is shutting down ({err.details}); "
            "is it running? (--server, $STYLIZE_SERVER)"
        )
        if "unhealthy" in err.details:  # the channel's health checking found no SERVING replica
            message += "; it is up but not SERVING: still loading its model, or draining"
        else:
            # A TLS mismatch looks like a failure to connect. The details name only the last address's
            # failure (round robin tries every address of the name), so a handshake error may not show.
            message += (
                "; or do TLS settings differ? A TLS server needs --tls-ca CA (or --tls), one that "
                "requires client certificates also --tls-cert and --tls-key"
            )
    elif err.code is grpc.StatusCode.INVALID_ARGUMENT:
        message = f"the server refused the request: {err.details}"
    elif err.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the server is out of capacity or the message is too large: {err.details}"
    elif err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the deadline (--timeout) passed: {err.details}"
    elif err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        message = f"the server refused the credentials: {err.details}"
        if "--token" not in err.details:
            message += " (--token, $STYLIZE_TOKEN)"
    else:
        message = f"{err.code.name}: {err.details}"
    print(f"stylize: error: {prefix}{message}", file=sys.stderr)
    return _EXIT_BY_CODE.get(err.code, EXIT_FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
