"""The loss graph of this checkout against the one an earlier revision's autodiff builds: outputs and time.

Run: .venv/bin/python scripts/benchmark_graph_change.py --revision db15475 --size 1024x768 --repeats 4

Both graphs are built from the same model and layer choice (the defaults), run in one process on one
random image against the same targets, first to compare every output bit for bit, then alternately
`--repeats` times each, so that the machine's load falls on both alike. Only models/autodiff.py is taken
from the revision; the rest of the graph builder is this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stylize_service.models import graphs
from stylize_service.models.paths import default_model_path
from stylize_service.server.engine.network import FeatureNetwork
from stylize_service.server.engine.plan import layer_choice
from stylize_service.server.engine.types import StylizeSettings

ROOT = Path(__file__).resolve().parents[1]


def autodiff_at(revision: str):
    """models/autodiff.py as it was at `revision`, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:models/autodiff.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "autodiff_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("autodiff_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["autodiff_then"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="a git revision of this repository")
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    settings = StylizeSettings()
    network = FeatureNetwork(default_model_path())
    choice = layer_choice(settings, styles=1)
    now = graphs.build_loss_model(network._features, choice)
    current = graphs.add_gradient
    graphs.add_gradient = autodiff_at(args.revision).add_gradient  # what build_loss_model calls
    try:
        then = graphs.build_loss_model(network._features, choice)
    finally:
        graphs.add_gradient = current
    sessions = {"then": network._session(then), "now": network._session(now)}

    compiled = network.compiled(choice)
    image = np.random.default_rng(0).uniform(-100, 100, (1, 3, height, width)).astype(np.float32)
    weights = settings.term_weights()
    layer_weights = {term: dict(layers) for term, layers in settings.term_layers().items()}
    feeds = {**compiled.feeds(compiled.targets(image), weights, layer_weights), "image": image}

    outputs = {name: session.run(None, feeds) for name, session in sessions.items()}
    same = all(np.array_equal(a, b) for a, b in zip(outputs["then"], outputs["now"], strict=True))
    seconds: dict[str, list[float]] = {"then": [], "now": []}
    for repeat in range(args.repeats):
        order = ("then", "now") if repeat % 2 == 0 else ("now", "then")
        for name in order:
            started = time.perf_counter()
            sessions[name].run(None, feeds)
            seconds[name].append(time.perf_counter() - started)
    then_s, now_s = np.median(seconds["then"]), np.median(seconds["now"])
    print(
        f"{width}x{height}: outputs {'bit-identical' if same else 'DIFFERENT'}; {args.revision} {then_s:.3f} s, "
        f"this checkout {now_s:.3f} s per evaluation (medians of {args.repeats}); now / then {now_s / then_s:.3f}"
    )


if __name__ == "__main__":
    main()
