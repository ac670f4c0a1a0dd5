"""The client's options come from the proto: every StylizeOptions field is a flag and a build_options
keyword, typed by its field, with the proto's comment as its help."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import shutil
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from stylize_service.client import cli
from stylize_service.client.comments import DESCRIPTOR_SET_SUFFIX, comments_by_name, proto_comments
from stylize_service.client.flags import value_text
from stylize_service.client.formats import extension, extension_for_mime, format_from_suffix
from stylize_service.client.job_plan import collect_options
from stylize_service.client.options import OPTIONS, Kind, Option, enum_values
from stylize_service.client.request import OPTION_NAMES, build_options, enum_choices, enum_name
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
FIELDS = pb.StylizeOptions.DESCRIPTOR.fields


def option_actions() -> dict[str, argparse.Action]:
    """The CLI's actions by dest."""
    return {action.dest: action for action in cli.build_parser()._actions}


def sample_argument(option: Option, tmp_path: Path) -> list[str]:
    """Command-line words that set the option to a value other than its zero value."""
    if option.kind is Kind.BOOL and not option.repeated:
        return [option.flag]
    if option.kind is Kind.LAYERS:
        text = "relu1_1:0.5,relu2_1"
    elif option.kind is Kind.ENUM:
        assert option.enum is not None
        text = list(enum_values(option.enum))[-1]
    elif option.kind is Kind.BYTES:
        path = tmp_path / f"{option.name}.bin"
        path.write_bytes(b"\x89PNG not really")
        text = str(path)
    else:
        text = {Kind.INT: "7", Kind.FLOAT: "0.5", Kind.STRING: "text", Kind.BOOL: "true"}[option.kind]
    return [option.flag, f"{text},{text}" if option.repeated and option.kind is not Kind.LAYERS else text]


def test_every_stylize_options_field_has_a_flag_that_reaches_the_request(tmp_path: Path) -> None:
    actions = option_actions()
    argv = ["photo.png"]
    for field in FIELDS:
        flag = "--" + field.name.replace("_", "-")
        assert field.name in actions and flag in actions[field.name].option_strings, (
            f"no flag for {field.name}"
        )
        argv += sample_argument(OPTIONS[field.name], tmp_path)
    args = cli.build_parser().parse_args(argv)
    message = build_options(**collect_options(args))
    assert {field.name for field, _ in message.ListFields()} == {field.name for field in FIELDS}
    assert {field.name for field in FIELDS} == OPTION_NAMES


def test_flags_left_out_stay_unset() -> None:
    args = cli.build_parser().parse_args(["photo.png"])
    options = collect_options(args)
    assert set(options) == OPTION_NAMES and set(options.values()) == {None}
    assert build_options(**options) == pb.StylizeOptions()


def test_existing_flag_spellings_still_work(tmp_path: Path) -> None:
    argv = ["photo.png", "-n", "12", "--output-format", "jpg", "--frame-format", "webp", "--preserve-colors"]
    argv += ["--pooling", "avg", "--color-mode", "histogram", "--style-layers", "relu1_1,relu2_1:0.5"]
    message = build_options(**collect_options(cli.build_parser().parse_args(argv)))
    assert message.iterations == 12 and message.preserve_colors is True
    assert (message.output_format, message.frame_format) == (pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_WEBP)
    assert (message.pooling, message.color_mode) == (pb.POOLING_AVG, pb.COLOR_MODE_HISTOGRAM)
    assert [(lw.layer, lw.HasField("weight"), lw.weight) for lw in message.style_layers] == [
        ("relu1_1", False, 0.0),
        ("relu2_1", True, 0.5),
    ]


def test_output_format_defaults_to_the_suffix_of_o() -> None:
    for name, expected in (("out.JPG", "jpeg"), ("out.jpeg", "jpeg"), ("out.webp", "webp"), ("x.png", "png")):
        options = collect_options(cli.build_parser().parse_args(["photo.png", "-o", name]))
        assert options["output_format"] == expected
    explicit = cli.build_parser().parse_args(["photo.png", "-o", "out.png", "--output-format", "webp"])
    assert collect_options(explicit)["output_format"] == "webp"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-size", "-1"], "argument --max-size: -1 is out of range 0..4294967295"),
        (["--seed", str(2**63)], "out of range"),
        (["--content-weight", "heavy"], "argument --content-weight: invalid float value"),
        (["--init", "zeros"], "argument --init: invalid choice: 'zeros'"),
        (["--output-format", "unspecified"], "invalid choice"),
        (["--init-image", "missing.png"], "argument --init-image: no such file: missing.png"),
        (["--content-layers", ","], "argument --content-layers: no layer given"),
    ],
)
def test_flags_refuse_values_their_field_cannot_take(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["photo.png", *argv])
    assert caught.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_help_is_the_proto_comment() -> None:
    actions = option_actions()
    comments = proto_comments()
    for field in FIELDS:
        comment = comments[field.full_name]  # every option is documented in the proto
        assert comment in (actions[field.name].help or "").replace("%%", "%"), field.name
    assert actions["max_size"].help.startswith("Longest side of the output, px;")
    # Enum flags also carry their values' comments, by short name.
    assert "avg: average pooling, which the paper found gives smoother results." in actions["pooling"].help
    assert "Here the default is the format of -o's suffix" in actions["output_format"].help  # the CLI's note


def test_enum_names_come_from_the_enums() -> None:
    assert enum_choices("pooling") == ["max", "avg"]
    assert enum_choices("init") == ["noise", "content", "image"]
    assert enum_choices("color_mode") == ["style", "luminance", "histogram"]
    assert enum_choices("output_format") == ["png", "jpeg", "webp"]
    assert option_actions()["frame_format"].choices == ["png", "jpeg", "webp", "jpg"]
    assert enum_name("color_mode", pb.COLOR_MODE_LUMINANCE) == "luminance"
    assert enum_name("pooling", pb.POOLING_UNSPECIFIED) == "unspecified"


def test_build_options_types_values_by_field() -> None:
    message = build_options(
        max_size="64",
        style_weight=3,
        pooling="POOLING_AVG",
        init=pb.INIT_NOISE,
        output_format="jpg",
        color_mode="Luminance",
        content_layers={"relu4_2": 2},
        init_image=b"bytes",
        preserve_colors=1,
    )
    assert (message.max_size, message.style_weight, message.pooling, message.init) == (
        64,
        3.0,
        pb.POOLING_AVG,
        pb.INIT_NOISE,
    )
    assert (message.output_format, message.color_mode) == (pb.IMAGE_FORMAT_JPEG, pb.COLOR_MODE_LUMINANCE)
    assert (message.content_layers[0].layer, message.content_layers[0].weight) == ("relu4_2", 2.0)
    assert message.init_image == b"bytes" and message.preserve_colors is True
    with pytest.raises(ValueError, match="pooling: must be one of max, avg, got 'median'"):
        build_options(pooling="median")
    with pytest.raises(ValueError, match=r"max_size: .*out of range"):
        build_options(max_size=-3)
    with pytest.raises(TypeError, match="unknown option"):
        build_options(max_sise=3)


def test_value_text_writes_what_the_flag_reads() -> None:
    defaults = pb.StylizeOptions(
        max_size=512,
        tv_weight=1e-3,
        style_layers=[pb.LayerWeight(layer="relu1_1", weight=1), pb.LayerWeight(layer="relu2_1")],
        pooling=pb.POOLING_MAX,
        preserve_colors=False,
    )
    texts = {name: value_text(option, defaults) for name, option in OPTIONS.items()}
    assert texts["max_size"] == "512" and texts["tv_weight"] == "0.001" and texts["pooling"] == "max"
    assert texts["style_layers"] == "relu1_1:1,relu2_1" and texts["preserve_colors"] == "false"
    assert texts["min_size"] == texts["content_layers"] == texts["init_image"] == "(unset)"
    args = cli.build_parser().parse_args(["photo.png", "--style-layers", texts["style_layers"]])
    assert build_options(**collect_options(args)).style_layers == defaults.style_layers


def test_formats_and_their_files() -> None:
    assert format_from_suffix(Path("a/b.JPG")) == "jpeg" and format_from_suffix(Path("b.jpeg")) == "jpeg"
    assert format_from_suffix(Path("b.webp")) == "webp" and format_from_suffix(Path("b.tiff")) is None
    assert format_from_suffix(Path("no_suffix")) is None
    assert [extension(name) for name in enum_choices("output_format")] == ["png", "jpg", "webp"]
    assert extension_for_mime("image/jpeg") == "jpg" and extension_for_mime("image/png") == "png"
    assert extension_for_mime("image/avif") == "bin" and extension_for_mime("text/plain") == "bin"


# --- the comments and the descriptor set they come from ----------------------------------------------


def test_comments_are_keyed_by_full_name() -> None:
    field = descriptor_pb2.FieldDescriptorProto(name="size", number=1)
    message = descriptor_pb2.DescriptorProto(name="Options", field=[field])
    message.reserved_range.add(start=5, end=6)
    value = descriptor_pb2.EnumValueDescriptorProto(name="MODE_FAST", number=1)
    enum_type = descriptor_pb2.EnumDescriptorProto(name="Mode", value=[value])
    file = descriptor_pb2.FileDescriptorProto(
        package="demo.v1", message_type=[message], enum_type=[enum_type]
    )
    locations = file.source_code_info.location
    locations.add(path=[4, 0, 2, 0], leading_comments=" Longest side,\n px.\n")
    locations.add(path=[4, 0, 2, 0, 1], leading_comments=" the field's name: not an element\n")
    locations.add(path=[4, 0, 9, 0], leading_comments=" a reserved range has no name\n")
    locations.add(path=[5, 0, 2, 0], trailing_comments=" quick\n")
    locations.add(path=[4, 0], leading_comments="")
    assert comments_by_name(file) == {
        "demo.v1.Options.size": "Longest side, px.",
        "demo.v1.Mode.MODE_FAST": "quick",
    }


def load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gen_protos_writes_and_checks_the_descriptor_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = load_gen_protos()
    name = "stylize/v1/stylize" + DESCRIPTOR_SET_SUFFIX
    assert name in gen.generated_names("stylize/v1/stylize.proto")
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    monkeypatch.setattr(gen, "PROTO_ROOT", copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:-10])
    assert gen.main(["--check"]) == 1
    assert f"protos/{name}" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    committed = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "protos" / name).read_bytes())
    assert [file.name for file in committed.file] == [pb.DESCRIPTOR.name]
    # The same proto as the generated module, which embeds it without source info and json names.
    described = committed.file[0]
    described.ClearField("source_code_info")
    messages = list(described.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)  # map entries
        for field in message.field:
            field.ClearField("json_name")
    assert described == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def test_the_descriptor_set_is_packaged() -> None:
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["stylize_service.protos.stylize.v1"]
    assert any(fnmatch.fnmatch("stylize" + DESCRIPTOR_SET_SUFFIX, pattern) for pattern in patterns)
