#!/usr/bin/env python3
"""Regenerate the Python code of protos/stylize/v1/stylize.proto, or check that the committed code is fresh.

    .venv/bin/python scripts/gen_protos.py           # writes the generated files beside the .proto
    .venv/bin/python scripts/gen_protos.py --check   # exit 1 (listing the stale files) if they differ

The generated files are committed: stylize_pb2.py, stylize_pb2.pyi, stylize_pb2_grpc.py and
stylize_descriptor_set.binpb, the proto's FileDescriptorSet *with* its source info (the comments, which
protoc strips from the _pb2 module; the client's option help comes from them).

protoc writes `from stylize.v1 import stylize_pb2` into the gRPC module; we rewrite it into a relative import
because the package lives at stylize_service.protos.stylize.v1, and a top-level `stylize` package would be a
different (unrelated) package. The output depends only on the .proto and the grpcio-tools version (pinned
in pyproject.toml), so --check is reliable in CI.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"  # the import root: protos are named stylize/v1/<file>.proto under it
PROTO_FILES = ("stylize/v1/stylize.proto",)

ABSOLUTE_IMPORT = "from stylize.v1 import "
RELATIVE_IMPORT = "from . import "


def generated_names(proto: str) -> list[str]:
    """The files protoc writes for one .proto, relative to the import root."""
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", descriptor_set_name(proto)]


def descriptor_set_name(proto: str) -> str:
    """The FileDescriptorSet with source info (comments) written for one .proto."""
    return f"{proto.removesuffix('.proto')}_descriptor_set.binpb"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir (mirroring the import root) and fix the imports; returns relative paths."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    written: list[Path] = []
    for proto in PROTO_FILES:
        (out_dir / descriptor_set_name(proto)).parent.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "--include_source_info",
            f"--descriptor_set_out={out_dir / descriptor_set_name(proto)}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"gen_protos: protoc failed on {proto}")
        for name in generated_names(proto):
            path = out_dir / name
            if path.suffix in (".py", ".pyi"):
                path.write_text(fix_imports(path.read_text(encoding="utf-8")), encoding="utf-8")
            written.append(Path(name))
    return written


def fix_imports(source: str) -> str:
    """Absolute imports of sibling generated modules -> relative ones (see the module docstring)."""
    return "\n".join(
        RELATIVE_IMPORT + line[len(ABSOLUTE_IMPORT) :] if line.startswith(ABSOLUTE_IMPORT) else line
        for line in source.split("\n")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the committed files are stale"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        names = generate(fresh_root)
        stale = [
            name
            for name in names
            if not (PROTO_ROOT / name).is_file()
            or (PROTO_ROOT / name).read_bytes() != (fresh_root / name).read_bytes()
        ]
        if args.check:
            if stale:
                for name in stale:
                    print(f"gen_protos: stale or missing: protos/{name}", file=sys.stderr)
                print("gen_protos: run `.venv/bin/python scripts/gen_protos.py` and commit", file=sys.stderr)
                return 1
            print(f"gen_protos: {len(names)} generated files are up to date")
            return 0
        for name in names:
            (PROTO_ROOT / name).write_bytes((fresh_root / name).read_bytes())
        print(f"gen_protos: wrote {', '.join(f'protos/{n}' for n in names)} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
