#!/usr/bin/env python3
"""The static checks of the package's structure: mypy's type check and import-linter's layer contracts.

    .venv/bin/python scripts/typecheck.py mypy [MYPY_ARGS...]          # what scripts/test.sh runs
    .venv/bin/python scripts/typecheck.py imports [LINT_IMPORTS_ARGS...]

Both tools are configured in pyproject.toml ([tool.mypy], [tool.importlinter]). Both must see the code as
it is imported: the top-level folders install as one namespace, stylize_service.{server,client,models,
protos} ([tool.setuptools.package-dir]), through the editable install's import hook, which neither tool
can follow (mypy would check modules named server.x while the code imports stylize_service.server.x, and
take those imports as unresolved; grimp finds no stylize_service.server at all). So this script first
builds .mypy_tree/stylize_service/<name>, a link to each mapped folder (gitignored, rebuilt on every run),
and points the tool at it: mypy through mypy_path in its configuration, lint-imports through PYTHONPATH.
Exits with the tool's status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"  # also mypy_path in pyproject.toml
NAMESPACE = "stylize_service"


def package_dirs() -> dict[str, str]:
    """The namespace's packages and their folders, from pyproject.toml: {"server": "server", ...}."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    prefix = NAMESPACE + "."
    return {name.removeprefix(prefix): folder for name, folder in mapping.items() if name.startswith(prefix)}


def build_tree() -> Path:
    """TREE/stylize_service/<name> -> the folder of each package (relative links, so the checkout can
    move); anything else in TREE/stylize_service is removed. Returns TREE."""
    namespace = TREE / NAMESPACE
    namespace.mkdir(parents=True, exist_ok=True)
    wanted = {
        name: Path(os.path.relpath(ROOT / folder, namespace)) for name, folder in package_dirs().items()
    }
    for entry in namespace.iterdir():
        if (
            entry.name not in wanted
            or not entry.is_symlink()
            or Path(os.readlink(entry)) != wanted[entry.name]
        ):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for name, target in wanted.items():
        link = namespace / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return TREE


def tool_command(tool: str) -> list[str]:
    if tool == "mypy":
        return [sys.executable, "-m", "mypy"]
    # lint-imports is a console script beside this interpreter (the venv's bin/).
    script = Path(sys.executable).parent / "lint-imports"
    return [str(script) if script.exists() else shutil.which("lint-imports") or "lint-imports"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run mypy or import-linter on the stylize_service namespace (see the module docstring)."
    )
    parser.add_argument(
        "tool", choices=("mypy", "imports"), help="mypy: the type check; imports: lint-imports"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the tool")
    ns = parser.parse_args(argv)

    tree = build_tree()
    env = dict(os.environ)
    if ns.tool == "imports":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    try:
        return subprocess.run([*tool_command(ns.tool), *ns.args], cwd=ROOT, env=env).returncode
    except FileNotFoundError as err:
        print(f"typecheck: {err}; install the dev extra (bash scripts/setup.sh)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
