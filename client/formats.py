"""Image formats: the names of the ImageFormat enum and the file suffixes and MIME types that go with them.

The formats and their spellings come from the proto (options.enum_spellings: "png", "jpeg", "webp" and
the alias "jpg"). Two conventions connect them to files: a suffix is any spelling of its format, and files
are named with the shortest one (.jpg, not .jpeg); a MIME type is "image/" + the format's name, as the
proto's comments on ImageFormat say ("image/png", "image/jpeg", "image/webp").
"""

from __future__ import annotations

from pathlib import PurePath

from stylize_service.client.options import enum_spellings, enum_values
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

_NAMES = {number: name for name, number in enum_values(pb.ImageFormat.DESCRIPTOR).items()}
_SPELLINGS = enum_spellings(pb.ImageFormat.DESCRIPTOR)
UNKNOWN_EXTENSION = "bin"  # a format newer than this client


def format_from_suffix(path: PurePath) -> str | None:
    """The format a file name asks for ("out.JPG" -> "jpeg"), or None when the suffix names none."""
    number = _SPELLINGS.get(path.suffix.lower().removeprefix("."))
    return None if number is None else _NAMES[number]


def extension(format_name: str) -> str:
    """The suffix, without the dot, to name a file of a format: "jpeg" -> "jpg"."""
    number = _SPELLINGS[format_name]
    return min((s for s, n in _SPELLINGS.items() if n == number), key=lambda s: (len(s), s))


def extension_for_mime(mime_type: str) -> str:
    """The suffix for a Result or Frame's mime_type: "image/jpeg" -> "jpg", unknown -> "bin"."""
    name = mime_type.removeprefix("image/") if mime_type.startswith("image/") else ""
    return extension(name) if name in _NAMES.values() else UNKNOWN_EXTENSION
