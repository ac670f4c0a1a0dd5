"""The gpu extra and how scripts/setup.sh installs it: onnxruntime-gpu in place of onnxruntime, so that one
package provides the module `onnxruntime`. setup.sh runs here against a stand-in for the virtual
environment's python whose pip only records what it is asked and keeps a list of installed packages,
so no package is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
BASE_VERSION = "1.32.0"  # what the stand-in pip "installs" for onnxruntime
GPU_VERSION = "1.31.1"  # and for onnxruntime-gpu

# The stand-in for .venv/bin/python: `-m pip ...` is emulated (see above); anything else (setup.sh's
# `-c 'import sys'` and its stamp script on stdin) runs on the real interpreter.
FAKE_PYTHON = """#!{python}
import json, os, sys
from pathlib import Path

here = Path(__file__).resolve().parent.parent
state_file, log_file = here / "installed.json", here / "pip.log"
args = sys.argv[1:]
if args[:2] != ["-m", "pip"]:
    os.execv({python!r}, [{python!r}, *args])
pip = [a for a in args[2:] if a not in ("--quiet", "--disable-pip-version-check")]
with log_file.open("a") as log:
    log.write(" ".join(pip) + "\\n")
installed = json.loads(state_file.read_text()) if state_file.exists() else {{}}
command, rest = pip[0], pip[1:]
if command == "show":
    name = rest[-1]
    if name not in installed:
        sys.exit(1)
    print(f"Name: {{name}}\\nVersion: {{installed[name]}}")
elif command == "uninstall":
    installed.pop(rest[-1])
elif command == "install" and "-e" in rest:
    spec = rest[rest.index("-e") + 1]
    extras = spec.partition("[")[2].rstrip("]").split(",")
    installed.setdefault("onnxruntime", {base!r})  # the base dependency, whatever else is there
    if "gpu" in extras:
        installed.setdefault("onnxruntime-gpu", {gpu!r})
elif command == "install" and "--force-reinstall" in rest:
    name, _, version = rest[-1].partition("==")
    installed[name] = version
state_file.write_text(json.dumps(installed))
"""


def run_setup(tmp_path: Path, extras: str, installed: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """setup.sh in a copy of the checkout with the stand-in venv; (installed packages, pip commands)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, base=BASE_VERSION, gpu=GPU_VERSION))
    python.chmod(0o755)
    (tmp_path / ".venv" / "installed.json").write_text(json.dumps(installed))
    env = {**os.environ, "STYLIZE_EXTRAS": extras, "STYLIZE_SKIP_MODEL": "1", "STYLIZE_FORCE_INSTALL": "1"}
    result = subprocess.run(
        [bash, str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((tmp_path / ".venv" / "installed.json").read_text())
    return state, (tmp_path / ".venv" / "pip.log").read_text().splitlines()


def test_gpu_extra_leaves_only_onnxruntime_gpu(tmp_path: Path) -> None:
    state, commands = run_setup(tmp_path, "dev,gpu", {})
    assert state == {"onnxruntime-gpu": GPU_VERSION}
    install = commands.index("install -e .[dev,gpu]")
    # The CPU package goes after the project's install, then the GPU one is put back over its files.
    assert commands[install + 1 :] == [
        "show onnxruntime",
        "show onnxruntime-gpu",
        "uninstall --yes onnxruntime",
        f"install --no-deps --force-reinstall onnxruntime-gpu=={GPU_VERSION}",
    ]


def test_gpu_alone_as_the_extras(tmp_path: Path) -> None:
    state, commands = run_setup(tmp_path, "gpu", {})
    assert state == {"onnxruntime-gpu": GPU_VERSION}
    assert "install -e .[gpu]" in commands


def test_without_gpu_an_earlier_gpu_install_is_replaced(tmp_path: Path) -> None:
    # A venv set up with the gpu extra, then set up again without it: pip reinstalls the base dependency
    # next to onnxruntime-gpu, and setup.sh must remove the GPU package.
    state, commands = run_setup(tmp_path, "dev", {"onnxruntime-gpu": GPU_VERSION})
    assert state == {"onnxruntime": BASE_VERSION}
    assert "uninstall --yes onnxruntime-gpu" in commands
    assert commands[-1] == f"install --no-deps --force-reinstall onnxruntime=={BASE_VERSION}"


@pytest.mark.parametrize("extras", ["dev", "", "dev,gpux"])
def test_without_gpu_nothing_is_swapped(tmp_path: Path, extras: str) -> None:
    state, commands = run_setup(tmp_path, extras, {})
    assert state == {"onnxruntime": BASE_VERSION}
    assert not [c for c in commands if c.startswith("uninstall") or "--force-reinstall" in c]


def test_gpu_extra_is_onnxruntime_gpu_with_its_cuda_libraries() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    assert "onnxruntime" in {r.name for r in base}
    (gpu,) = (Requirement(r) for r in project["optional-dependencies"]["gpu"])
    assert gpu.name == "onnxruntime-gpu"
    # The CUDA and cuDNN libraries come as packages, so that a host needs only the NVIDIA driver.
    assert gpu.extras == {"cuda", "cudnn"}
    assert gpu.specifier.contains(GPU_VERSION), f"{gpu} excludes onnxruntime-gpu {GPU_VERSION}"
