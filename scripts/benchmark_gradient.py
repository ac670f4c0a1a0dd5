"""Seconds per loss+gradient evaluation: our ONNX gradient graph on onnxruntime against PyTorch eager.

Run: .venv/bin/python scripts/benchmark_gradient.py [--sizes 512x384 1024x768] [--repeats 5]
     [--provider cpu|cuda|auto]

Both sides compute the same default Gatys loss (content relu4_2; style relu1_1..relu5_1; tv) and dL/dx
from the same weights, measured side by side in one run, with the machine's SGEMM rate measured in the
same run, interleaved with the evaluations, for scale. PyTorch is optional (pip install torch==2.13.0); without it that column is skipped.

--provider picks onnxruntime's execution provider as the server's --provider does (default cpu). On CUDA
(the gpu extra installed, a GPU visible) PyTorch and the SGEMM run on the same GPU, through PyTorch; the
SGEMM column is left empty without a CUDA build of PyTorch. The first lines name the providers the
sessions really got and the card.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np
import onnx

from stylize_service.models import export
from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.models.vgg16 import BLOCK_ENDS, CONVS
from stylize_service.server.engine import providers
from stylize_service.server.engine.network import FeatureNetwork

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
WEIGHTS = {"content": 5.0, "style": 100.0, "tv": 1e-3}


def flops_per_evaluation(height: int, width: int, deepest: str = "relu5_1") -> float:
    """Multiply-adds x2 of the convolutions (forward, and backward to the input only) and the Grams."""
    total, h, w = 0.0, height, width
    for spec in CONVS:
        conv = 2.0 * spec.in_channels * spec.out_channels * 9 * h * w
        total += 2 * conv  # forward + input gradient
        if spec.relu in STYLE_LAYERS:
            total += 2 * (2.0 * spec.out_channels**2 * h * w)  # Gram + its gradient
        if spec.relu == deepest:
            break
        if spec.name in BLOCK_ENDS:
            h, w = h // 2, w // 2
    return total


SGEMM_N = 3072


def sgemm() -> Callable[[], object]:
    """A float32 SGEMM of SGEMM_N^3 with numpy's BLAS: the machine's attainable matrix-multiply rate."""
    rng = np.random.default_rng(0)
    a, b = rng.random((SGEMM_N, SGEMM_N), np.float32), rng.random((SGEMM_N, SGEMM_N), np.float32)
    return lambda: a @ b


def gpu_sgemm(torch) -> Callable[[], object]:
    """The same SGEMM on the GPU through PyTorch (cuBLAS), synchronised so that it is timed whole."""
    a = torch.rand((SGEMM_N, SGEMM_N), device="cuda")
    b = torch.rand((SGEMM_N, SGEMM_N), device="cuda")

    def run() -> None:
        a @ b
        torch.cuda.synchronize()

    return run


def gpu_name() -> str:
    """The card's name from nvidia-smi, for the figures' record."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    result = subprocess.run(
        [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return (
        result.stdout.strip().splitlines()[0]
        if result.returncode == 0 and result.stdout.strip()
        else "unknown"
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) so that a slow patch of a
    shared machine hits all of them alike. Two warm-up calls each first: they allocate and pick kernels."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def onnx_evaluation(network: FeatureNetwork, height: int, width: int):
    compiled = network.compiled(LayerChoice.of({"content": CONTENT_LAYERS, "style": STYLE_LAYERS}, "max"))
    rng = np.random.default_rng(0)
    content = rng.uniform(-120, 120, (1, 3, height, width)).astype(np.float32)
    x = rng.uniform(-120, 120, (1, 3, height, width)).astype(np.float32)
    targets = compiled.targets(content)
    layer_weights = {"content": dict.fromkeys(CONTENT_LAYERS, 1.0), "style": dict.fromkeys(STYLE_LAYERS, 1.0)}
    feeds = compiled.feeds(targets, WEIGHTS, layer_weights)
    return (lambda: compiled.evaluate(x, feeds)), content, x, targets


def torch_evaluation(
    features: onnx.ModelProto, content: np.ndarray, x: np.ndarray, targets, device: str = "cpu"
):
    """PyTorch eager on `device` ("cpu" or "cuda"); like ours, each evaluation takes the image from and
    returns the gradient to host memory."""
    import torch

    def tensor(array: np.ndarray):
        return torch.from_numpy(array).to(device)

    tensors = {t.name: tensor(onnx.numpy_helper.to_array(t).copy()) for t in features.graph.initializer}
    content_targets = {k: tensor(v) for k, v in targets.by_term["content"].items()}
    grams = {k: tensor(v) for k, v in targets.by_term["style"].items()}
    cw, sw, tw = WEIGHTS["content"], WEIGHTS["style"], WEIGHTS["tv"]

    def evaluate() -> None:
        xt = tensor(x).requires_grad_(True)
        h, loss = xt, 0.0
        for spec in CONVS:
            weight, bias = tensors[export.kernel_name(spec.name)], tensors[export.bias_name(spec.name)]
            h = torch.relu(torch.nn.functional.conv2d(h, weight, bias, padding=1))
            if spec.relu in content_targets:
                loss = loss + cw * torch.mean((h - content_targets[spec.relu]) ** 2)
            if spec.relu in grams:
                f = h.reshape(h.shape[1], -1)
                loss = loss + sw * torch.mean((f @ f.T / f.numel() - grams[spec.relu]) ** 2)
            if spec.relu == "relu5_1":
                break
            if spec.name in BLOCK_ENDS:
                h = torch.nn.functional.max_pool2d(h, 2)
        corner = xt[..., :-1, :-1]
        tv = 0.5 * torch.sum((corner - xt[..., :-1, 1:]) ** 2 + (corner - xt[..., 1:, :-1]) ** 2)
        loss = loss + tw * tv
        loss.backward()
        xt.grad.cpu()

    return evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"], help="WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument(
        "--provider",
        choices=providers.PROVIDER_CHOICES,
        default="cpu",
        help="onnxruntime execution provider, as the server's --provider (default: cpu)",
    )
    args = parser.parse_args()

    try:
        requested = providers.execution_providers(args.provider)
    except providers.ProviderUnavailable as err:
        raise SystemExit(f"--provider {args.provider}: {err}") from None
    network = FeatureNetwork(args.model, providers=requested)
    if missing := providers.not_started(requested, network.providers):
        raise SystemExit(f"onnxruntime could not start {', '.join(missing)}; see its messages above")
    on_gpu = providers.CUDA in network.providers
    try:
        import torch

        if on_gpu and not torch.cuda.is_available():
            torch, torch_version = None, f"torch {torch.__version__} has no CUDA: skipped"
        else:
            where = "CUDA" if on_gpu else f"{torch.get_num_threads()} threads"
            torch_version = f"torch {torch.__version__}, {where}"
    except ImportError:
        torch, torch_version = None, "not installed"
    features = onnx.load(args.model)
    print(f"onnxruntime execution providers: {', '.join(network.providers)}")
    if on_gpu:
        print(f"GPU: {gpu_name()}")
        where = "PyTorch on the GPU" if torch else "skipped (needs PyTorch with CUDA)"
        print(f"PyTorch: {torch_version}; SGEMM: float32 {SGEMM_N}^3, {where}, timed between the evaluations")
    else:
        print(f"PyTorch: {torch_version}; SGEMM: numpy float32 {SGEMM_N}^3, timed between the evaluations")
    print()
    print(
        "| size | ours s/eval | GFLOP/s | SGEMM GFLOP/s | % of SGEMM | PyTorch eager s/eval | ours / PyTorch |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        evaluate, content, x, targets = onnx_evaluation(network, height, width)
        fns: dict[str, Callable[[], object]] = {"ours": evaluate}
        if not on_gpu:
            fns["sgemm"] = sgemm()
        elif torch:
            fns["sgemm"] = gpu_sgemm(torch)
        if torch:
            fns["torch"] = torch_evaluation(features, content, x, targets, "cuda" if on_gpu else "cpu")
        seconds = interleaved_medians(fns, args.repeats)
        gflops = flops_per_evaluation(height, width) / seconds["ours"] / 1e9
        sgemm_rate = 2 * SGEMM_N**3 / seconds["sgemm"] / 1e9 if "sgemm" in seconds else float("nan")
        theirs = seconds.get("torch", float("nan"))
        print(
            f"| {width}x{height} | {seconds['ours']:.3f} | {gflops:.0f} | {sgemm_rate:.0f} | "
            f"{100 * gflops / sgemm_rate:.0f}% | {theirs:.3f} | {seconds['ours'] / theirs:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
