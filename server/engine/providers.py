"""Which onnxruntime execution providers the engine's sessions use: the server's `--provider` choice
(auto, cpu, cuda) turned into onnxruntime's provider list, with the options each provider needs.

onnxruntime is imported only inside the functions that need it, so that the server's configuration
(server/config.py) can name the choices without paying for the import (`stylize-server --help`)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

logger = logging.getLogger("stylize.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")

# One entry of onnxruntime's `providers` argument: a name, or (name, options) with string values.
ProviderSpec = str | tuple[str, dict[str, str]]

# Options of the CUDA provider (onnxruntime's CUDA execution provider documentation). The device arena
# grows by exactly what each allocation asks instead of to the next power of two, like the CPU arena
# (network.py), so that shrinking it after a job (FeatureNetwork.release_memory) can give whole regions
# back; an arena that is never shrunk keeps the largest job's peak reserved on the card. The rest stays
# at onnxruntime's defaults (device 0; exhaustive cuDNN convolution search, paid once per image size and
# session; copies on the compute stream).
CUDA_OPTIONS: dict[str, str] = {
    "device_id": "0",
    "arena_extend_strategy": "kSameAsRequested",
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not offered by this onnxruntime, or did not start."""


def provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def available_providers() -> list[str]:
    """What the installed onnxruntime was built with (not whether a GPU is present: onnxruntime-gpu lists
    CUDAExecutionProvider on any machine)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def execution_providers(choice: str, available: Sequence[str] | None = None) -> list[ProviderSpec]:
    """The provider list for a `--provider` choice, most preferred first; the CPU provider always comes
    last, for the operators a GPU provider does not implement.

    auto: CUDA when onnxruntime offers it, else the CPU. cuda: raises ProviderUnavailable when this
    onnxruntime does not offer it (the CPU-only package is installed)."""
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {choice!r}")
    offered = available_providers() if available is None else list(available)
    if choice == "cuda" and CUDA not in offered:
        raise ProviderUnavailable(
            f"{CUDA} is not available: this onnxruntime offers {', '.join(offered) or 'no provider'}. "
            "Install the gpu extra (STYLIZE_EXTRAS=gpu bash scripts/setup.sh; README, GPU), or use "
            "auto or cpu"
        )
    if choice == "cpu" or CUDA not in offered:
        return [CPU]
    return [(CUDA, dict(CUDA_OPTIONS)), CPU]


def not_started(requested: Sequence[ProviderSpec], started: Sequence[str]) -> list[str]:
    """The requested providers that onnxruntime did not register for a session. A GPU provider that is
    offered can still fail to start (no GPU visible, no driver, CUDA or cuDNN libraries missing); then
    onnxruntime logs why and runs the session on the providers that did start."""
    return [provider_name(spec) for spec in requested if provider_name(spec) not in started]


def load_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries that the gpu extra installs as Python packages loadable by the
    CUDA provider (which looks only on the system's library path). A no-op for other onnxruntime builds;
    what onnxruntime prints about libraries it could not find is logged as a warning."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    if text := printed.getvalue().strip():
        logger.warning("loading the CUDA libraries: %s", text)
