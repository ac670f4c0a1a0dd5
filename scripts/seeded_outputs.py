"""Fingerprints of seeded stylizations through the RPC, to prove that a change leaves outputs unchanged.

Run: .venv/bin/python scripts/seeded_outputs.py --out before.json
     (change the code)
     .venv/bin/python scripts/seeded_outputs.py --compare before.json

Starts `stylize-server` on a free loopback port (once untiled, once with --tile-size for the tiled
request), sends three small seeded requests with the bundled samples (coarse-to-fine, tiled, and two
blended styles) and records the SHA-256 of each result's PNG bytes, its iterations and its final loss.
The same PNG bytes mean the same pixels: Pillow's encoder is deterministic for one array.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylize_service.client.api import StylizeClient  # noqa: E402
from stylize_service.server.readiness import wait_for_ready_file  # noqa: E402

SAMPLES = ROOT / "client" / "samples"
CONTENT = SAMPLES / "coffee.png"
STYLE = SAMPLES / "style_swirls.jpg"

# name -> (server flags, styles, options)
REQUESTS: dict[str, tuple[list[str], list[Any], dict[str, Any]]] = {
    "multiscale": ([], [STYLE], {"max_size": 160, "min_size": 64, "iterations": 9, "seed": 7}),
    "tiled": (["--tile-size", "64"], [STYLE], {"max_size": 160, "iterations": 4, "seed": 11}),
    "blended": (
        [],
        [(STYLE, 0.7), (CONTENT, 0.3)],
        {"max_size": 128, "iterations": 6, "init": "noise", "seed": 5, "color_mode": "luminance"},
    ),
}


def start_server(extra: list[str], ready: Path) -> subprocess.Popen[bytes]:
    command = [str(ROOT / ".venv" / "bin" / "stylize-server"), "--host", "127.0.0.1", "--port", "0"]
    return subprocess.Popen(
        [*command, "--ready-file", str(ready), "--state-dir", str(ready.parent / "state"), *extra],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def fingerprints() -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    by_flags: dict[tuple[str, ...], list[str]] = {}
    for name, (flags, _, _) in REQUESTS.items():
        by_flags.setdefault(tuple(flags), []).append(name)
    for flags, names in by_flags.items():
        ready = Path(tempfile.mkdtemp()) / "ready.json"
        process = start_server(list(flags), ready)
        try:
            address = wait_for_ready_file(ready, process).address
            with StylizeClient(address) as client:
                for name in names:
                    _, styles, options = REQUESTS[name]
                    result = client.run(CONTENT, styles, **options)
                    results[name] = {
                        "sha256": hashlib.sha256(result.image).hexdigest(),
                        "iterations": result.iterations,
                        "loss": result.final_losses.total,
                    }
        finally:
            process.terminate()
            process.wait(30)
    return dict(sorted(results.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the fingerprints to this JSON file")
    group.add_argument("--compare", type=Path, help="compare with fingerprints written earlier")
    args = parser.parse_args()
    now = fingerprints()
    print(json.dumps(now, indent=2))
    if args.out:
        args.out.write_text(json.dumps(now, indent=2) + "\n")
        return 0
    before = json.loads(args.compare.read_text())
    differ = [name for name in before if before[name] != now.get(name)]
    for name in differ:
        print(f"{name}: differs: before {before[name]}, now {now.get(name)}")
    print("identical" if not differ else f"{len(differ)} of {len(before)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
