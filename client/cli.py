"""`stylize`: the command-line client.

stylize photo.jpg --style starry.jpg -o out.png                     # one image
stylize photo.jpg --style a.jpg:2 --style b.jpg:1 --max-size 384    # a blend of two styles, 2:1
stylize photos/ --style starry.jpg --output-dir out/                # every image of a folder
stylize photo.jpg --style s.jpg --frames-dir frames/ --animation progress.gif
stylize info                                                        # the server's model, defaults, limits
stylize info --server host:50051 --tls-ca ca.pem --token TOKEN      # a server with TLS and tokens
stylize photos/ -s s.jpg --server ipv4:10.0.0.1:50051,10.0.0.2:50051 --parallel 2   # over two replicas

Here: the flags, the `info` subcommand and the dispatch. The command line becomes jobs in job_plan.py, they
run in job_runner.py, failures are reported (and exit statuses chosen) in exit_status.py, and `stylize info`
prints through server_info.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from stylize_service.client.api import DEFAULT_ADDRESS, StylizeClient, StylizeError
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
from stylize_service.client.job_plan import UsageError, collect_options, parse_styles, plan_jobs
from stylize_service.client.job_runner import FRAMES_PER_JOB, run_jobs
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

exit status: {EXIT_OK} ok, {EXIT_FAILED} other error, {EXIT_USAGE} invalid arguments (flags, files, or the
server's INVALID_ARGUMENT), {EXIT_UNAVAILABLE} server unreachable (or the TLS handshake failed), {EXIT_BUSY}
server busy or message too large, {EXIT_DEADLINE} --timeout passed, {EXIT_AUTH} the server refused the
credentials (no or a wrong --token), {EXIT_INTERRUPTED} interrupted (Ctrl-C cancels the job).
environment: the defaults of --server, --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token
are STYLIZE_SERVER, STYLIZE_TLS (1 = on), STYLIZE_TLS_CA, STYLIZE_CLIENT_TLS_CERT, STYLIZE_CLIENT_TLS_KEY,
STYLIZE_TLS_SERVER_NAME and STYLIZE_TOKEN."""


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
        with connect(args, retries=args.retries) as client:
            return run_jobs(
                client,
                jobs,
                styles,
                options,
                parallel=args.parallel,
                quiet=args.quiet,
                frame_duration=args.frame_duration,
            )
    except ClientSecurityError as err:
        return report_security_error(err)
    except KeyboardInterrupt:  # outside a call (job_runner.run_job cancels a running one)
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


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


if __name__ == "__main__":
    raise SystemExit(main())
