"""Loss terms as data: the registry drives the graphs, so a new term is one builder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from stylize_service.models import export, terms
from stylize_service.models.onnx_builder import GraphBuilder
from stylize_service.models.terms import TERMS, LossTerm
from stylize_service.server.engine.network import FeatureNetwork, Targets
from tests.test_gradients import choice_of, random_weights


class MeanSquareTerm(LossTerm):
    """A term for the test only: mean(x^2) of the network input, whose gradient is 2x / N."""

    name = "mean_square"
    layered = False
    region_separable = True

    def image_loss(self, b: GraphBuilder, image: str) -> str:
        return b.op("ReduceMean", [b.op("Mul", [image, image])], keepdims=0)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "random_vgg16.onnx"
    onnx.save(export.export_features(random_weights(5)), str(path))
    return path


def evaluate(path, x: np.ndarray, weights: dict[str, float]):
    network = FeatureNetwork(path)  # a fresh one: compiled graphs are cached per network
    compiled = network.compiled(choice_of({"relu2_1": 1.0}, {"relu1_1": 1.0}))
    rng = np.random.default_rng(0)
    content = rng.normal(0, 50, x.shape).astype(np.float32)
    targets = Targets(
        {
            "content": compiled.targets(content).by_term["content"],
            "style": compiled.targets(content[..., ::-1].copy()).by_term["style"],
        }
    )
    feeds = compiled.feeds(targets, weights, {"content": {"relu2_1": 1.0}, "style": {"relu1_1": 1.0}})
    return compiled.evaluate(x, feeds)


def test_a_new_term_is_one_builder(model_path, monkeypatch):
    x = np.random.default_rng(1).normal(0, 50, (1, 3, 20, 28)).astype(np.float32)
    weights = {"content": 1.0, "style": 10.0, "tv": 1e-3}
    before = evaluate(model_path, x, weights)

    monkeypatch.setitem(TERMS, MeanSquareTerm.name, MeanSquareTerm())
    after = evaluate(model_path, x, {**weights, "mean_square": 0.5})

    expected = 0.5 * float(np.mean(x.astype(np.float64) ** 2))
    assert after.terms["mean_square"] == pytest.approx(expected, rel=1e-5)
    assert after.loss == pytest.approx(before.loss + expected, rel=1e-5)
    for name in ("content", "style", "tv"):
        assert after.terms[name] == pytest.approx(before.terms[name], rel=1e-6)
    # Its gradient joins the others': 0.5 * 2x / N.
    np.testing.assert_allclose(after.grad - before.grad, x / x.size, rtol=1e-3, atol=1e-6)


def test_the_registry_holds_the_papers_terms_in_order():
    assert list(TERMS) == ["content", "style", "tv"]
    assert terms.LAYERED_TERMS == ("content", "style")
    # The tiling seam: only the style term needs a whole-image statistic (its Gram matrix).
    assert [name for name, term in TERMS.items() if not term.region_separable] == ["style"]
