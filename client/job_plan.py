"""The command line as jobs: the content files (folders expanded), the styles and their weights, the
stylization options, and where each job's result, frames and animation go. Checked before anything is sent:
a missing file or clashing flags raise UsageError."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylize_service.client.flags import option_values
from stylize_service.client.formats import extension_for_mime, format_from_suffix
from stylize_service.client.outputs import ANIMATION_SUFFIXES
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(Exception):
    """A flag or input that cannot be used; the CLI prints it after its usage line and exits EXIT_USAGE."""


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
