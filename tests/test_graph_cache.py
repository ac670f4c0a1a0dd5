"""The compiled-graph cache is bounded by (estimated) memory, least recently used first, and reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from stylize_service.models import graphs
from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.server.engine.network import (
    SESSION_BYTES_PER_INITIALIZER_BYTE,
    SESSION_OVERHEAD_BYTES,
    FeatureNetwork,
    estimated_session_bytes,
    initializer_bytes,
)

# Shallow choices compile in a fraction of a second; their sizes differ (more layers, more weights).
SHALLOW = LayerChoice.of({"content": ["relu1_1"], "style": ["relu1_1"]})
MIDDLE = LayerChoice.of({"content": ["relu2_1"], "style": ["relu1_1"]})
DEEPER = LayerChoice.of({"content": ["relu3_1"], "style": ["relu1_1"]})


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"the model is not built ({path}); run `bash scripts/setup.sh`")
    return path


def _estimate(network: FeatureNetwork, choice: LayerChoice) -> int:
    features = network._features
    return estimated_session_bytes(
        graphs.build_targets_model(features, choice), graphs.build_loss_model(features, choice)
    )


def test_initializer_bytes_counts_the_weights_without_copying_them(model_path: Path) -> None:
    network = FeatureNetwork(model_path)
    loss = graphs.build_loss_model(network._features, DEEPER)
    expected = sum(numpy_helper.to_array(t).nbytes for t in loss.graph.initializer)
    assert initializer_bytes(loss) == expected > 0
    targets = graphs.build_targets_model(network._features, DEEPER)
    assert estimated_session_bytes(targets, loss) == (
        SESSION_OVERHEAD_BYTES + SESSION_BYTES_PER_INITIALIZER_BYTE * (expected + initializer_bytes(targets))
    )


def test_least_recently_used_choices_go_beyond_the_budget(model_path: Path) -> None:
    probe = FeatureNetwork(model_path)
    shallow, middle, deeper = (_estimate(probe, c) for c in (SHALLOW, MIDDLE, DEEPER))
    assert shallow < middle < deeper
    budget = middle + deeper  # room for the two larger ones, not for all three
    network = FeatureNetwork(model_path, cache_bytes=budget)

    first = network.compiled(SHALLOW)
    network.compiled(MIDDLE)
    assert network.compiled(SHALLOW) is first  # cached; and now the most recently used
    stats = network.cache_stats()
    assert (stats.entries, stats.used_bytes, stats.budget_bytes, stats.evictions) == (
        2,
        shallow + middle,
        budget,
        0,
    )

    network.compiled(DEEPER)  # over the budget: MIDDLE, the least recently used, goes
    stats = network.cache_stats()
    assert (stats.entries, stats.used_bytes, stats.evictions) == (2, shallow + deeper, 1)
    assert network.compiled(SHALLOW) is first
    assert stats.used_bytes <= budget


def test_a_choice_larger_than_the_whole_budget_is_still_served_and_kept_alone(model_path: Path) -> None:
    network = FeatureNetwork(model_path, cache_bytes=1)
    compiled = network.compiled(SHALLOW)
    assert network.compiled(SHALLOW) is compiled
    network.compiled(MIDDLE)
    stats = network.cache_stats()
    assert (stats.entries, stats.evictions) == (1, 1)
    # An evicted choice a job still holds keeps working.
    image = network.to_network(np.zeros((16, 16, 3), np.float32))
    assert compiled.targets(image).by_term["style"]["relu1_1"].shape == (64, 64)
