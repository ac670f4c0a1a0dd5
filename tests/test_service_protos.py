"""The committed generated code matches stylize.proto (what CI checks), and imports relatively."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date() -> None:
    assert load_gen_protos().main(["--check"]) == 0, "run .venv/bin/python scripts/gen_protos.py"


def test_check_fails_on_stale_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = load_gen_protos()
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    stale = copy / "stylize" / "v1" / "stylize_pb2_grpc.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(gen, "PROTO_ROOT", copy)
    assert gen.main(["--check"]) == 1
    assert "stylize/v1/stylize_pb2_grpc.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerating fixes it


def test_grpc_module_imports_its_messages_relatively() -> None:
    source = (ROOT / "protos" / "stylize" / "v1" / "stylize_pb2_grpc.py").read_text()
    assert "from . import stylize_pb2" in source and "from stylize.v1" not in source
    from stylize_service.protos.stylize.v1 import stylize_pb2, stylize_pb2_grpc

    assert stylize_pb2_grpc.stylize_dot_v1_dot_stylize__pb2 is stylize_pb2  # one module, not two copies
    assert stylize_pb2.DESCRIPTOR.services_by_name["StyleTransfer"].full_name == "stylize.v1.StyleTransfer"
