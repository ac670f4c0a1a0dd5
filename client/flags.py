"""The CLI's flags for the stylization options, generated from StylizeOptions (client/options.py).

One flag per field, named after it (max_size -> --max-size), typed by its proto type (an int field takes
only what its type can hold, an enum field its short value names, a bytes field a file, a bool field is a
switch, repeated LayerWeight fields take LAYER[:W],...), with the proto's comment as its help. Values are
kept as build_options takes them, and an option left out stays None (the server's default).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from stylize_service.client.options import OPTIONS, Kind, Option, enum_spellings
from stylize_service.client.request import enum_name
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb


class ArgumentContainer(Protocol):
    """An argparse.ArgumentParser or one of its argument groups."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


def add_option_flags(
    parser: ArgumentContainer,
    *,
    short: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add a flag for every option. short: extra short flags by option name ({"iterations": "-n"});
    notes: text appended to an option's help, for what the program does beyond the proto."""
    short, notes = short or {}, notes or {}
    unknown = (set(short) | set(notes)) - set(OPTIONS)
    if unknown:
        raise ValueError(f"not fields of StylizeOptions: {', '.join(sorted(unknown))}")
    for option in OPTIONS.values():
        flags = [short[option.name]] if option.name in short else []
        spec = _flag_spec(option)
        spec["help"] = " ".join(filter(None, (spec["help"], notes.get(option.name, "").replace("%", "%%"))))
        parser.add_argument(*flags, option.flag, dest=option.name, **spec)


def option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options as parsed (None where left out), by name, for build_options."""
    return {name: getattr(args, name) for name in OPTIONS}


_METAVARS = {Kind.INT: "N", Kind.FLOAT: "X", Kind.STRING: "TEXT", Kind.BYTES: "PATH", Kind.BOOL: "BOOL"}


def _flag_spec(option: Option) -> dict[str, Any]:
    """add_argument's keywords for one option, from its type and its proto comment."""
    spec: dict[str, Any] = {"help": option.comment().replace("%", "%%")}  # argparse formats help with %
    if option.kind is Kind.LAYERS:
        return spec | {"type": _layers_type, "metavar": "LAYER[:W],..."}
    if option.kind is Kind.BOOL and not option.repeated:
        return spec | {"action": "store_true", "default": None}  # None: unset, the server's default
    item = _item_type(option)
    if option.repeated:
        metavar = "{" + ",".join(enum_spellings(option.enum)) + "}" if option.enum else _METAVARS[option.kind]
        return spec | {"type": _list_type(item), "metavar": metavar + ",..."}
    if option.kind is Kind.ENUM:
        assert option.enum is not None
        return spec | {"type": item, "choices": list(enum_spellings(option.enum))}
    return spec | {"type": item, "metavar": _METAVARS[option.kind]}


def _item_type(option: Option) -> Callable[[str], Any]:
    """argparse's type= for one value of the option (it names the type in argparse's messages)."""
    if option.kind is Kind.INT:
        return _int_type(*option.int_range)
    if option.kind is Kind.FLOAT:
        return float
    if option.kind is Kind.BYTES:
        return _file_type
    if option.kind is Kind.BOOL:
        return _bool_type
    if option.kind is Kind.ENUM and option.repeated:
        assert option.enum is not None
        return _choice_type(list(enum_spellings(option.enum)))
    return str  # STRING, and a single ENUM (argparse checks it against its choices)


def _int_type(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)  # a ValueError makes argparse say "invalid int value"
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    parse.__name__ = "int"
    return parse


def _file_type(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def _bool_type(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(words)}")
    return words[text.lower()]


def _choice_type(choices: list[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _list_type(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"list of {getattr(item, '__name__', 'value')}"
    return parse


def _layers_type(text: str) -> list[tuple[str, float] | str]:
    """LAYER[:WEIGHT],... -> build_options' layer list (a bare LAYER leaves its weight unset, = 1)."""
    layers: list[tuple[str, float] | str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition(":")
        if not sep:
            layers.append(name)
            continue
        try:
            layers.append((name, float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"the weight of {name} must be a number, got {weight!r}"
            ) from None
    if not layers:
        raise argparse.ArgumentTypeError("no layer given")
    return layers


def value_text(option: Option, message: pb.StylizeOptions) -> str:
    """An option's value in a message (e.g. GetInfo's defaults) as its flag would take it, e.g.
    "relu1_1:1,relu2_1:0.5" or "avg"; "(unset)" for a field the message leaves unset."""
    value = getattr(message, option.name)
    if option.kind is Kind.LAYERS:
        return (
            ",".join(lw.layer + (f":{lw.weight:g}" if lw.HasField("weight") else "") for lw in value)
            or "(unset)"
        )
    if option.repeated:
        return ",".join(_scalar_text(option, item) for item in value) or "(unset)"
    if option.field.has_presence and not message.HasField(option.name):
        return "(unset)"
    if option.kind is Kind.BYTES and not value:  # no presence: empty bytes are unset
        return "(unset)"
    return _scalar_text(option, value)


def _scalar_text(option: Option, value: Any) -> str:
    if option.kind is Kind.ENUM:
        return enum_name(option.name, value)
    if option.kind is Kind.FLOAT:
        return f"{value:g}"
    if option.kind is Kind.BOOL:
        return str(value).lower()
    if option.kind is Kind.BYTES:
        return f"{len(value)} bytes"
    return str(value)
