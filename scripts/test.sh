#!/usr/bin/env bash
# The whole test suite in one command (the same one CI runs through .ci/run):
#
#   bash scripts/test.sh [PYTEST_ARGS...]
#
# Runs scripts/setup.sh, then every check below even when an earlier one fails, and exits non-zero if any
# failed:
#   1. scripts/gen_protos.py --check   the generated gRPC code matches protos/ (skipped with a warning if
#                                       the script is absent)
#   2. scripts/typecheck.py mypy        the static type check ([tool.mypy] in pyproject.toml)
#   3. scripts/typecheck.py imports     the import-layer contracts, by lint-imports ([tool.importlinter])
#   4. ruff check .                     lint
#   5. ruff format --check .            formatting
#   6. pytest [PYTEST_ARGS...]          the tests; "no tests collected" (exit 5) counts as a failure
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
cd "$ROOT" || exit 1

bash "$ROOT/scripts/setup.sh" || {
    printf 'test: error: scripts/setup.sh failed; nothing was tested\n' >&2
    exit 1
}

failed=()
run() {
    local name="$1"
    shift
    printf '\n== %s\n' "$name"
    "$@"
    local rc=$?
    if [[ "$name" == pytest && $rc -eq 5 ]]; then
        printf 'test: pytest collected no tests; that counts as a failure\n' >&2
    fi
    if ((rc != 0)); then
        failed+=("$name (exit $rc)")
    fi
}

if [[ -f "$ROOT/scripts/gen_protos.py" ]]; then
    run "gen_protos --check" "$VENV/bin/python" "$ROOT/scripts/gen_protos.py" --check
else
    printf '\n== gen_protos --check\ntest: warning: scripts/gen_protos.py not found; skipped\n' >&2
fi
run mypy "$VENV/bin/python" "$ROOT/scripts/typecheck.py" mypy
run lint-imports "$VENV/bin/python" "$ROOT/scripts/typecheck.py" imports --no-logo
run "ruff check" "$VENV/bin/ruff" check .
run "ruff format --check" "$VENV/bin/ruff" format --check .
run pytest "$VENV/bin/python" -m pytest "$@"

echo
if ((${#failed[@]})); then
    printf 'test: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "test: all checks passed"
