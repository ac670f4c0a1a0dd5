"""The comments of the proto, read from the descriptor set that scripts/gen_protos.py writes beside it.

protoc strips comments from the generated _pb2 module, so gen_protos also writes
stylize_descriptor_set.binpb: the same FileDescriptorSet *with* its SourceCodeInfo, where every comment is
attached to the path of the element it documents. Here those paths are turned into full names
("stylize.v1.StylizeOptions.max_size", "stylize.v1.Pooling.POOLING_MAX") by walking the descriptor protos.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

DESCRIPTOR_SET_SUFFIX = "_descriptor_set.binpb"  # scripts/gen_protos.py's name: <proto stem> + this


@functools.cache
def proto_comments() -> dict[str, str]:
    """Full name -> comment of every documented element of stylize.proto (see comments_by_name)."""
    stem = pb.DESCRIPTOR.name.rsplit("/", 1)[-1].removesuffix(".proto")
    resource = importlib.resources.files(pb.__package__).joinpath(stem + DESCRIPTOR_SET_SUFFIX)
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(resource.read_bytes())
    comments: dict[str, str] = {}
    for file in descriptor_set.file:
        comments.update(comments_by_name(file))
    return comments


def comments_by_name(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Full name -> comment, with its lines joined into one paragraph, for every element of the file
    that has a leading comment (above it) or else a trailing one (after it on its line)."""
    comments = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        name = element_name(file, location.path)
        if text.strip() and name is not None:
            comments[name] = " ".join(text.split())
    return comments


def element_name(file: descriptor_pb2.FileDescriptorProto, path: Sequence[int]) -> str | None:
    """The full name of the element that a SourceCodeInfo path points to (a message, field, enum, enum
    value, service, method, ...), or None for paths that point elsewhere (a field's type, an option, a
    reserved range). A path alternates a field number of the descriptor proto with an index into that
    repeated field, e.g. [4, 0, 2, 1] = message_type[0].field[1]."""
    if not path or len(path) % 2:
        return None
    names = [file.package] if file.package else []
    node: Any = file  # FileDescriptorProto, then DescriptorProto, FieldDescriptorProto, ...
    for number, index in zip(path[::2], path[1::2], strict=True):
        field = node.DESCRIPTOR.fields_by_number.get(number)
        if field is None or not field.is_repeated or field.message_type is None:
            return None
        node = getattr(node, field.name)[index]
        if "name" not in node.DESCRIPTOR.fields_by_name:
            return None
        names.append(node.name)
    return ".".join(names)
