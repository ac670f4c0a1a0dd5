"""The command line as jobs: the content files (folders expanded), the styles and their weights, the
stylization options, and where each job's result, frames and animation go. Checked before anything is sent:
a missing file or clashing flags raise UsageError."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stylize_service.client.flags import option_values
from stylize_service.client.formats import extension_for_mime, format_from_suffix
from stylize_service.client.outputs import ANIMATION_SUFFIXES
from stylize_service.client.request import Style
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(Exception):
    """A flag or input that cannot be used; the CLI prints it after its usage line and exits EXIT_USAGE."""


@dataclass
class Job:
    """One job of the command line: a content file to stylize, or (`stylize watch`) a job on the server
    to follow, job_id; its outputs are named after `name`, the content file's stem or the job id."""

    content: Path | None
    output: Path | None  # -o; None = output_dir / NAME-stylized.EXT, EXT from the result's format
    output_dir: Path
    frames_dir: Path | None
    animation: Path | None
    job_id: str | None = None

    @property
    def name(self) -> str:
        return self.content.stem if self.content is not None else str(self.job_id)

    @property
    def label(self) -> str:
        """How progress lines and errors name the job: its content file, or its id."""
        return self.content.name if self.content is not None else str(self.job_id)

    def output_path(self, result: pb.Result) -> Path:
        if self.output is not None:
            return self.output
        return self.output_dir / f"{self.name}-stylized.{extension_for_mime(result.mime_type)}"


def parse_styles(values: Sequence[str], masks: Sequence[tuple[int, str, str]] = ()) -> list[Style]:
    """--style PATH[:WEIGHT] values, in order, with the masks that followed them: (style index, "mask"
    or "style_mask", PATH) from --mask and --style-mask (StyleFlag)."""
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
        styles.append(Style(path, weight))
    for index, kind, mask in masks:
        flag = "--mask" if kind == "mask" else "--style-mask"
        if not Path(mask).is_file():
            raise UsageError(f"{flag} {mask}: no such file")
        if getattr(styles[index], kind) is not None:
            raise UsageError(f"{flag} {mask}: --style {values[index]} has one already")
        if kind == "mask":
            styles[index] = replace(styles[index], mask=Path(mask))
        else:
            styles[index] = replace(styles[index], style_mask=Path(mask))
    return styles


class StyleMaskFlag(argparse.Action):
    """--mask / --style-mask PATH: recorded with the index of the --style it follows."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        styles = getattr(namespace, "style", None) or []
        if not styles:
            parser.error(f"{option_string} must follow the --style it belongs to")
        recorded = list(getattr(namespace, self.dest, None) or [])
        recorded.append((len(styles) - 1, self.const, str(values)))
        setattr(namespace, self.dest, recorded)


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
    return _with_outputs(args, [(content, content.stem, None) for content in contents], batch)


def plan_watch_jobs(args: argparse.Namespace) -> list[Job]:
    """`stylize watch ID...`: the jobs to follow, their outputs named after their ids as a normal run's
    are after their content files (several ids are a batch)."""
    ids = list(dict.fromkeys(args.ids))  # the same job twice would write the same files twice
    return _with_outputs(args, [(None, job_id, job_id) for job_id in ids], batch=len(ids) > 1)


def _with_outputs(
    args: argparse.Namespace, items: list[tuple[Path | None, str, str | None]], batch: bool
) -> list[Job]:
    """Jobs for (content, name, job id) items, with the outputs the flags give them; UsageError for
    clashing flags."""
    if args.animation is not None and args.animation.suffix.lower() not in ANIMATION_SUFFIXES:
        raise UsageError(f"--animation {args.animation}: must end in .gif or .webp")
    if batch:
        if args.output is not None:
            raise UsageError("-o/--output takes one input; with several, use --output-dir")
        if args.animation is not None and "{name}" not in str(args.animation):
            raise UsageError("with several inputs, --animation must contain {name}, e.g. anim/{name}.gif")
        names = [name for _, name, _ in items]
        if len(set(names)) != len(names):
            raise UsageError("several inputs have the same name; their outputs would overwrite each other")
    jobs = []
    for content, name, job_id in items:
        frames = args.frames_dir / name if batch and args.frames_dir else args.frames_dir
        animation = Path(str(args.animation).replace("{name}", name)) if args.animation else None
        jobs.append(Job(content, args.output, args.output_dir or Path("."), frames, animation, job_id))
    return jobs
