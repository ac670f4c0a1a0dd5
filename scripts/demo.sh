#!/usr/bin/env bash
# The main job in one command: set up, start a server, stylize the bundled samples, stop the server.
#
#   bash scripts/demo.sh [OUTPUT_DIR]        # default OUTPUT_DIR: out/demo in the checkout
#
# Writes into OUTPUT_DIR:
#   result.png     the stylized image
#   frames/        every intermediate frame (emptied first)
#   progress.gif   an animation of the optimisation
#   server.log     the server's log
#
# Environment (all optional):
#   STYLIZE_DEMO_OUT            output folder when no argument is given
#   STYLIZE_DEMO_CONTENT        content image (default: client/samples/coffee.png)
#   STYLIZE_DEMO_STYLE          style image, PATH[:WEIGHT] (default: client/samples/style_swirls.jpg)
#   STYLIZE_DEMO_MAX_SIZE       longest side of the result in px (default: 384)
#   STYLIZE_DEMO_ITERATIONS     L-BFGS iterations (default: 200)
#   STYLIZE_DEMO_FRAME_EVERY    keep a frame every N iterations (default: 10)
#   STYLIZE_DEMO_START_TIMEOUT  seconds to wait for the server to report SERVING (default: 120)
# and whatever scripts/setup.sh reads (STYLIZE_PYTHON, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

say() { printf 'demo: %s\n' "$*"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

case "${1:-}" in
-h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
esac
[[ $# -le 1 ]] || die "usage: bash scripts/demo.sh [OUTPUT_DIR]"

# Resolve the output folder against the caller's directory before moving to the checkout.
out_arg="${1:-${STYLIZE_DEMO_OUT:-$ROOT/out/demo}}"
mkdir -p "$out_arg"
OUT="$(cd "$out_arg" && pwd)"

content="${STYLIZE_DEMO_CONTENT:-client/samples/coffee.png}"
style="${STYLIZE_DEMO_STYLE:-client/samples/style_swirls.jpg}"
max_size="${STYLIZE_DEMO_MAX_SIZE:-384}"
iterations="${STYLIZE_DEMO_ITERATIONS:-200}"
frame_every="${STYLIZE_DEMO_FRAME_EVERY:-10}"
start_timeout="${STYLIZE_DEMO_START_TIMEOUT:-120}"

cd "$ROOT"
bash "$ROOT/scripts/setup.sh"

for f in "$content" "${style%:*}"; do
    [[ -f "$f" ]] || die "input image not found: $f"
done

port="$("$VENV/bin/python" -c '
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
')"
address="127.0.0.1:$port"

server_pid=""
client_pid=""
stop_client() {
    if [[ -n "$client_pid" ]] && kill -0 "$client_pid" 2>/dev/null; then
        kill -TERM "$client_pid" 2>/dev/null || true
        wait "$client_pid" 2>/dev/null || true
    fi
}
stop_server() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        say "stopping the server (pid $server_pid)"
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
cleanup() {
    stop_client
    stop_server
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting stylize-server on $address (log: $OUT/server.log)"
STYLIZE_HOST=127.0.0.1 STYLIZE_PORT="$port" STYLIZE_STATE_DIR="$OUT/state" "$VENV/bin/stylize-server" >"$OUT/server.log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + start_timeout))
until "$VENV/bin/python" "$ROOT/scripts/healthcheck.py" --address "$address" --timeout 2 --quiet; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        tail -n 30 "$OUT/server.log" >&2 || true
        die "the server exited before it was ready; its log is above (and in $OUT/server.log)"
    fi
    if ((SECONDS >= deadline)); then
        tail -n 30 "$OUT/server.log" >&2 || true
        die "the server did not report SERVING within ${start_timeout}s (STYLIZE_DEMO_START_TIMEOUT)"
    fi
    sleep 1
done
say "server is SERVING"

rm -rf "$OUT/frames"
mkdir -p "$OUT/frames"
say "stylizing $content with $style: max size ${max_size}px, $iterations iterations (a few minutes on 2 cores)"
started=$SECONDS
# In the background so that a signal to this script runs the cleanup at once (bash defers traps while a
# foreground command runs); the cleanup then stops the client as well as the server.
"$VENV/bin/stylize" "$content" \
    --style "$style" \
    --server "$address" \
    -o "$OUT/result.png" \
    --frames-dir "$OUT/frames" \
    --animation "$OUT/progress.gif" \
    --frame-every "$frame_every" \
    --max-size "$max_size" \
    --iterations "$iterations" &
client_pid=$!
wait "$client_pid" || die "the client failed; see its message above and the server log in $OUT/server.log"
client_pid=""

stop_server
frames=$(find "$OUT/frames" -type f | wc -l)
say "done in $((SECONDS - started))s. Files:"
say "  result:    $OUT/result.png"
say "  frames:    $OUT/frames/ ($frames files)"
say "  animation: $OUT/progress.gif"
say "  server log: $OUT/server.log"
