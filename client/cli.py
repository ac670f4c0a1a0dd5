"""`stylize`: the command-line client.

stylize photo.jpg --style starry.jpg -o out.png                     # one image
stylize photo.jpg --style a.jpg:2 --style b.jpg:1 --max-size 384    # a blend of two styles, 2:1
stylize photo.jpg --style a.jpg --mask sky.png --style b.jpg --mask ground.png   # a style per region
stylize photos/ --style starry.jpg --output-dir out/                # every image of a folder
stylize photo.jpg --style s.jpg --frames-dir frames/ --animation progress.gif
stylize photo.jpg --style s.jpg --detach                            # submit, print the job id, exit
stylize watch ID -o out.png --frames-dir frames/                    # follow a job, save as a run does
stylize jobs                                                        # this client's jobs on the server
stylize cancel ID                                                   # cancel a job
stylize info                                                        # the server's model, defaults, limits
stylize info --server host:50051 --tls-ca ca.pem --token TOKEN      # a server with TLS and tokens
stylize photos/ -s s.jpg --server ipv4:10.0.0.1:50051,10.0.0.2:50051 --parallel 2   # over two replicas

A run submits each image as a job (SubmitJob) and follows it (WatchJob), reattaching after a dropped
connection or a server restart; a server without jobs gets one Stylize call per image instead.

Here: the flags, the subcommands and the dispatch. The command line becomes jobs in job_plan.py, they run in
job_runner.py, failures are reported (and exit statuses chosen) in exit_status.py, `stylize info` prints
through server_info.py and `stylize jobs` through job_list.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc

from stylize_service.client.api import DEFAULT_ADDRESS, StylizeClient, StylizeError, is_job_id
from stylize_service.client.exit_status import (
    EXIT_AUTH,
    EXIT_BUSY,
    EXIT_DEADLINE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    report_error,
    report_security_error,
)
from stylize_service.client.flags import add_option_flags
from stylize_service.client.job_list import print_cancelled, print_jobs
from stylize_service.client.job_plan import (
    Job,
    StyleMaskFlag,
    UsageError,
    collect_options,
    parse_styles,
    plan_jobs,
    plan_watch_jobs,
)
from stylize_service.client.job_runner import FRAMES_PER_JOB, run_jobs, submit_jobs, watch_jobs
from stylize_service.client.reattach import DEFAULT_RECONNECT_SECONDS
from stylize_service.client.request import Style
from stylize_service.client.security import ClientSecurityError
from stylize_service.client.server_info import print_server_info

DEFAULT_RETRIES = 3  # busy refusals retried per job: about 1, 2 and 4 s apart, each on the next replica

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

Each image is a job on the server: a dropped connection or a server restart is reattached for up to
--reconnect-seconds, with nothing lost or saved twice. --detach only submits, printing the job ids; then
`stylize watch ID...` follows jobs and saves what a run saves (its outputs named after the ids),
`stylize jobs` lists yours and `stylize cancel ID...` cancels them (each has --help).

exit status: {EXIT_OK} ok, {EXIT_FAILED} other error (also a job cancelled on the server), {EXIT_USAGE}
invalid arguments (flags, files, the server's INVALID_ARGUMENT, or NOT_FOUND: no such job, or another
client's), {EXIT_UNAVAILABLE} server unreachable (or the TLS handshake failed; for longer than
--reconnect-seconds during a job), {EXIT_BUSY} server busy or message too large, {EXIT_DEADLINE} --timeout
passed, {EXIT_AUTH} the server refused the credentials (no or a wrong --token), {EXIT_INTERRUPTED}
interrupted (Ctrl-C or SIGTERM cancels this run's unfinished jobs; `stylize watch` leaves them running).
environment: the defaults of --server, --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token
are STYLIZE_SERVER, STYLIZE_TLS (1 = on), STYLIZE_TLS_CA, STYLIZE_CLIENT_TLS_CERT, STYLIZE_CLIENT_TLS_KEY,
STYLIZE_TLS_SERVER_NAME and STYLIZE_TOKEN."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "info":
        args = build_info_parser().parse_args(argv[1:])
        return run_info(args, args.json)
    if command == "jobs":
        return run_list(build_jobs_parser().parse_args(argv[1:]))
    if command == "cancel":
        return run_cancel(build_cancel_parser().parse_args(argv[1:]))
    if command == "watch":
        parser = build_watch_parser()
        args = parser.parse_args(argv[1:])
        try:
            jobs = plan_watch_jobs(args)
        except UsageError as err:
            _usage_error(parser, str(err))
        return _run(args, watch=True, jobs=jobs)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.info:
        return run_info(args, False)
    try:
        if args.detach:
            _check_detach(args)
        jobs = plan_jobs(args)
        options = collect_options(args)
        styles = parse_styles(args.style or [], args.masks or [])
    except UsageError as err:
        _usage_error(parser, str(err))
    return _run(args, jobs=jobs, styles=styles, options=options)


def _run(
    args: argparse.Namespace,
    *,
    jobs: list[Job],
    styles: list[Style] | None = None,
    options: dict[str, Any] | None = None,
    watch: bool = False,
) -> int:
    """Submit, run or watch the jobs; Ctrl-C or SIGTERM cancels the run's unfinished jobs."""
    try:
        with _sigterm_interrupts(), connect(args, retries=getattr(args, "retries", 0)) as client:
            if watch:
                return watch_jobs(
                    client,
                    jobs,
                    parallel=args.parallel,
                    quiet=args.quiet,
                    frame_duration=args.frame_duration,
                    reconnect_seconds=args.reconnect_seconds,
                )
            assert styles is not None and options is not None
            if args.detach:
                return submit_jobs(client, jobs, styles, options, quiet=args.quiet)
            return run_jobs(
                client,
                jobs,
                styles,
                options,
                parallel=args.parallel,
                quiet=args.quiet,
                frame_duration=args.frame_duration,
                reconnect_seconds=args.reconnect_seconds,
            )
    except ClientSecurityError as err:
        return report_security_error(err)
    except KeyboardInterrupt:  # outside a job (job_runner cancels those that run)
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`, a CI job's end) stops a run as Ctrl-C does, so that its
    unfinished jobs are cancelled rather than left running on the server. Python's handlers run in the
    main thread only; elsewhere SIGTERM keeps its own handling."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_detach(args: argparse.Namespace) -> None:
    """--detach saves nothing, so the output flags belong to `stylize watch`."""
    given = [
        flag
        for flag, value in (
            ("-o/--output", args.output),
            ("--output-dir", args.output_dir),
            ("--frames-dir", args.frames_dir),
            ("--animation", args.animation),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"--detach saves nothing: give {', '.join(given)} to `stylize watch ID` (and --frame-every "
            "here, for frames to save)"
        )


def run_info(args: argparse.Namespace, as_json: bool) -> int:
    """`stylize info` (and --info): the server's model, defaults, limits and load."""
    try:
        with connect(args) as client:
            info = client.info()
    except ClientSecurityError as err:
        return report_security_error(err)
    except StylizeError as err:
        return report_error(err, args.server)
    print_server_info(info, args.server, as_json=as_json)
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    """`stylize jobs`: the caller's jobs, newest first."""
    try:
        with connect(args) as client:
            jobs = list(client.jobs(page_size=args.page_size))
    except ClientSecurityError as err:
        return report_security_error(err)
    except StylizeError as err:
        return report_error(err, args.server)
    print_jobs(jobs, as_json=args.json)
    return EXIT_OK


def run_cancel(args: argparse.Namespace) -> int:
    """`stylize cancel ID...`: each job as CancelJob returns it; the first failure's status, going on
    past jobs the server does not know."""
    worst = EXIT_OK
    try:
        with connect(args) as client:
            for job_id in dict.fromkeys(args.ids):
                try:
                    job = client.cancel(job_id)
                except StylizeError as err:
                    code = report_error(err, args.server, job_id)
                    if err.code is not grpc.StatusCode.NOT_FOUND:
                        return code  # unreachable, refused credentials, ...: the others would fail too
                    worst = worst or code
                    continue
                print_cancelled(job)
    except ClientSecurityError as err:
        return report_security_error(err)
    return worst


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
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="deadline of each call; following a job, reattachments included, counts as one, and passing it "
        "cancels the job (default: none)",
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


def _job_id(text: str) -> str:
    if not is_job_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (32 lowercase hex digits)")
    return text


def _job_ids(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("ids", nargs="+", type=_job_id, metavar="ID", help=what)


def _reconnect_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reconnect-seconds",
        type=_non_negative_float,
        default=DEFAULT_RECONNECT_SECONDS,
        metavar="SECONDS",
        help="when a job's stream breaks (a dropped connection, a server restart), reattach for up to "
        "this long without a new event, after the last event seen; 0 = give up at once "
        "(default: %(default)g)",
    )


def _output_flags(parser: argparse.ArgumentParser) -> None:
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


def _parallel_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--parallel", type=_positive, default=1, metavar="N", help=help_text)


def build_watch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize watch",
        description="Follow jobs on the server (from --detach, or a run that ended early) to their end and "
        "save their results, frames and animations as a run does, named after the job ids (ID-stylized.EXT). "
        "The events the server kept are replayed first (frames beyond its retention bound are gone: see "
        "`stylize info`); the job must have been submitted with --frame-every for frames to come. "
        "Ctrl-C stops following; the jobs go on (`stylize cancel` stops them). Exit status as `stylize`'s: "
        f"{EXIT_USAGE} for an id the server does not know (NOT_FOUND) or a malformed one, {EXIT_FAILED} for a "
        "job cancelled on the server.",
    )
    _job_ids(parser, "the jobs to follow")
    _server_flags(parser)
    _reconnect_flag(parser)
    _parallel_flag(parser, "follow up to N jobs at a time (default: %(default)s, one after another)")
    _output_flags(parser)
    return parser


def build_jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize jobs",
        description="List your jobs on the server, newest first: id, state, iterations done, created "
        "(UTC). Jobs belong to the token, client certificate or address that submitted them.",
    )
    _server_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the jobs as a JSON array of Job messages")
    parser.add_argument(
        "--page-size", type=int, default=0, metavar="N", help="jobs per call, 1..100 (default: the server's)"
    )
    return parser


def build_cancel_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize cancel",
        description="Cancel jobs (a running one stops within one loss evaluation) and print each as it is "
        "then: ID STATE. A job that has ended stays as it is. Exit status as `stylize`'s: "
        f"{EXIT_USAGE} for an id the server does not know (NOT_FOUND), after trying the others.",
    )
    _job_ids(parser, "the jobs to cancel")
    _server_flags(parser)
    return parser


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
        "stylize CONTENT... --style STYLE[:WEIGHT]...  |  stylize watch ID...  |  stylize jobs  |  "
        "stylize cancel ID...  |  stylize info",
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
    parser.add_argument(
        "--mask",
        action=StyleMaskFlag,
        const="mask",
        dest="masks",
        metavar="PATH",
        help="after a --style: where in the picture that style paints, a greyscale image in the "
        "content's aspect ratio, white = paints, grey = softly (docs/masks.md); without one the style "
        "paints everywhere",
    )
    parser.add_argument(
        "--style-mask",
        action=StyleMaskFlag,
        const="style_mask",
        dest="masks",
        metavar="PATH",
        help="after a --style: where in that style image its texture is taken from, in its aspect ratio",
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
    _parallel_flag(
        parser,
        "run up to N jobs at a time, to use several replicas at once; about the replicas times "
        "their concurrency (default: 1, one job after another)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="submit the jobs, print their ids (one a line) and exit; `stylize watch ID` follows them",
    )
    _reconnect_flag(parser)
    _output_flags(parser)

    opt = parser.add_argument_group("stylization options (stylize.v1.StylizeOptions; default: the server's)")
    add_option_flags(opt, short=SHORT_FLAGS, notes=CLI_NOTES)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
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


if __name__ == "__main__":
    raise SystemExit(main())
