"""`stylize`: the command-line client.

stylize photo.jpg --style starry.jpg -o out.png                     # one image
stylize photo.jpg --style a.jpg:2 --style b.jpg:1 --max-size 384    # a blend of two styles, 2:1
stylize photos/ --style starry.jpg --output-dir out/                # every image of a folder
stylize photo.jpg --style s.jpg --frames-dir frames/ --animation progress.gif
stylize info                                                        # the server's model, defaults, limits
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from stylize_service.client.api import DEFAULT_ADDRESS, Event, StylizeClient, StylizeError
from stylize_service.client.display import ProgressDisplay
from stylize_service.client.flags import add_option_flags, option_values, value_text
from stylize_service.client.formats import extension_for_mime, format_from_suffix
from stylize_service.client.options import OPTIONS
from stylize_service.client.outputs import ANIMATION_SUFFIXES, JobOutputs
from stylize_service.client.request import build_request
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

EXIT_OK = 0
EXIT_FAILED = 1  # any other error (INTERNAL, a file that cannot be written, ...)
EXIT_USAGE = 2  # bad flags, missing input files, or the server said INVALID_ARGUMENT
EXIT_UNAVAILABLE = 3  # the server cannot be reached (or is shutting down)
EXIT_BUSY = 4  # the server's queue is full (RESOURCE_EXHAUSTED), or a message was too large
EXIT_DEADLINE = 5  # --timeout passed
EXIT_INTERRUPTED = 130  # Ctrl-C: the call was cancelled

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_BUSY,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_DEADLINE,
    grpc.StatusCode.CANCELLED: EXIT_INTERRUPTED,
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FRAMES_PER_JOB = 50  # with --frames-dir or --animation and no --frame-every: about this many frames

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
server's INVALID_ARGUMENT), {EXIT_UNAVAILABLE} server unreachable, {EXIT_BUSY} server busy or message too
large, {EXIT_DEADLINE} --timeout passed, {EXIT_INTERRUPTED} interrupted (Ctrl-C cancels the job).
environment: STYLIZE_SERVER is the default of --server."""


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
        return run_info(args.server, args.timeout, args.json)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.info:
        return run_info(args.server, args.timeout, False)
    try:
        jobs = plan_jobs(args)
        options = collect_options(args)
        styles = parse_styles(args.style or [])
    except UsageError as err:
        _usage_error(parser, str(err))
    try:
        return run_jobs(args, jobs, styles, options)
    except KeyboardInterrupt:  # outside a call (a running call is cancelled in run_job)
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- arguments -------------------------------------------------------------------------------------


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("STYLIZE_SERVER", DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help="the stylize server (default: $STYLIZE_SERVER or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="deadline of each call (default: none)"
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


def run_info(server: str, timeout: float | None, as_json: bool) -> int:
    try:
        with StylizeClient(server, timeout) as client:
            info = client.info()
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
    print(f"  jobs           {limits.concurrency} at a time, {limits.queue_size} queued")
    return EXIT_OK


def _g(value: float) -> str:
    return f"{value:g}"


def run_jobs(
    args: argparse.Namespace, jobs: list[Job], styles: list[tuple[Path, float]], options: dict[str, Any]
) -> int:
    worst = EXIT_OK
    with StylizeClient(args.server, args.timeout) as client:
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
        for job in jobs:
            code = run_job(
                client, job, styles, options, total, quiet=args.quiet, duration=args.frame_duration
            )
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code  # nothing more can succeed
            worst = worst or code
    return worst


def run_job(
    client: StylizeClient,
    job: Job,
    styles: list[tuple[Path, float]],
    options: dict[str, Any],
    total_iterations: int,
    *,
    quiet: bool,
    duration: int,
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

    def on_event(event: Event) -> None:
        display.on_event(event)
        if isinstance(event, pb.Frame):
            outputs.on_frame(event)

    call = client.stylize_request(request)
    try:
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
        return _report(err, client.address, label)
    except OSError as err:
        display.abort()
        print(f"stylize: error: {label}: cannot write the output: {err}", file=sys.stderr)
        return EXIT_FAILED
    display.finish(result, str(output))
    return EXIT_OK


def _report(err: StylizeError, server: str, label: str = "") -> int:
    prefix = f"{label}: " if label else ""
    if err.code is grpc.StatusCode.UNAVAILABLE:
        message = (
            f"cannot reach the stylize server at {server}, or it is shutting down ({err.details}); "
            "is it running? (--server, $STYLIZE_SERVER)"
        )
    elif err.code is grpc.StatusCode.INVALID_ARGUMENT:
        message = f"the server refused the request: {err.details}"
    elif err.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the server is out of capacity or the message is too large: {err.details}"
    elif err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the deadline (--timeout) passed: {err.details}"
    else:
        message = f"{err.code.name}: {err.details}"
    print(f"stylize: error: {prefix}{message}", file=sys.stderr)
    return _EXIT_BY_CODE.get(err.code, EXIT_FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
