"""The stylization options as the proto describes them: every field of stylize.v1.StylizeOptions, its kind,
its enum value names and its comment.

All of it is read from the generated code (stylize_pb2.StylizeOptions.DESCRIPTOR, and the proto's comments
through client/comments.py), so a field added to the proto becomes a keyword of request.build_options and
a flag of the CLI with no change to the client.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, EnumValueDescriptor, FieldDescriptor

from stylize_service.client.comments import proto_comments
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb


class Kind(enum.Enum):
    """How a field's Python value is given (a repeated scalar field is a list of these)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STRING = "string"
    ENUM = "enum"  # the value's short name ("avg"), or its number
    BYTES = "bytes"  # encoded bytes, or a file to read (init_image)
    LAYERS = "layers"  # repeated LayerWeight: {"relu1_1": 0.5} or ["relu4_2", ("relu5_1", 2.0)]


# Extra spellings accepted for enum values, by enum: JPEG is usually written "jpg" in file names.
ENUM_ALIASES: dict[str, dict[str, str]] = {pb.ImageFormat.DESCRIPTOR.full_name: {"jpg": "jpeg"}}

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_SCALAR_KINDS = {
    FieldDescriptor.CPPTYPE_FLOAT: Kind.FLOAT,
    FieldDescriptor.CPPTYPE_DOUBLE: Kind.FLOAT,
    FieldDescriptor.CPPTYPE_BOOL: Kind.BOOL,
    FieldDescriptor.CPPTYPE_ENUM: Kind.ENUM,
    **dict.fromkeys(_INT_RANGES, Kind.INT),
}


@dataclass(frozen=True)
class Option:
    """One field of StylizeOptions."""

    field: FieldDescriptor
    kind: Kind

    @property
    def name(self) -> str:
        return str(self.field.name)

    @property
    def flag(self) -> str:
        """The CLI flag: max_size -> --max-size."""
        return "--" + self.name.replace("_", "-")

    @property
    def repeated(self) -> bool:
        """A list of values (LAYERS is always one)."""
        return bool(self.field.is_repeated)

    @property
    def enum(self) -> EnumDescriptor | None:
        return self.field.enum_type

    @property
    def int_range(self) -> tuple[int, int]:
        """The values an INT field can hold (from its proto type, e.g. 0..2**32-1 for uint32)."""
        return _INT_RANGES[self.field.cpp_type]

    def comment(self) -> str:
        """The proto's comment on the field; for an enum field, followed by its values' comments."""
        comments = proto_comments()
        parts = [comments.get(self.field.full_name, "")]
        if self.enum is not None:
            described = []
            for name, number in enum_values(self.enum).items():
                value = self.enum.values_by_number[number]
                if f"{self.enum.full_name}.{value.name}" in comments:
                    described.append(f"{name}: {comments[f'{self.enum.full_name}.{value.name}']}.")
            parts.extend(described)
        return " ".join(filter(None, parts))


def enum_prefix(enum_type: EnumDescriptor) -> str:
    """The prefix of an enum's value names, by the proto style guide: ColorMode -> "COLOR_MODE_"."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", enum_type.name).upper() + "_"


def short_name(value: EnumValueDescriptor) -> str:
    """A value's name without its enum's prefix, in lower case: POOLING_AVG -> "avg"."""
    return str(value.name).removeprefix(enum_prefix(value.type)).lower()


def enum_values(enum_type: EnumDescriptor) -> dict[str, int]:
    """Short name -> number of an enum's values, without the X_UNSPECIFIED value (which means "unset"),
    e.g. {"max": 1, "avg": 2} for Pooling."""
    return {
        short_name(value): value.number
        for value in enum_type.values
        if not value.name.endswith("_UNSPECIFIED")
    }


def enum_spellings(enum_type: EnumDescriptor) -> dict[str, int]:
    """enum_values and the aliases of ENUM_ALIASES, e.g. "jpg" for ImageFormat."""
    values = enum_values(enum_type)
    aliases = ENUM_ALIASES.get(enum_type.full_name, {})
    return values | {alias: values[name] for alias, name in aliases.items()}


def _kind(field: FieldDescriptor) -> Kind:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return Kind.BYTES
    if field.type == FieldDescriptor.TYPE_STRING:
        return Kind.STRING
    if field.message_type is not None and field.message_type.full_name == pb.LayerWeight.DESCRIPTOR.full_name:
        if field.is_repeated:
            return Kind.LAYERS
    elif field.cpp_type in _SCALAR_KINDS:
        return _SCALAR_KINDS[field.cpp_type]
    # A new kind of field (a map, another message, a single LayerWeight) needs a rule here and a flag in
    # the CLI; tests/test_client_options.py fails until it has one.
    raise TypeError(f"{field.full_name}: the client has no rule for a field of this type")


def _options(message: Descriptor) -> dict[str, Option]:
    return {field.name: Option(field, _kind(field)) for field in message.fields}


# Every field of StylizeOptions by name, in the proto's order.
# (protobuf's stubs type DESCRIPTOR as Descriptor | google._upb._message.Descriptor; the upb class is the
# implementation of Descriptor, and isinstance(..., Descriptor) holds at runtime.)
OPTIONS: dict[str, Option] = _options(cast(Descriptor, pb.StylizeOptions.DESCRIPTOR))
