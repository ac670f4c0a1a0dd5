"""Where the model build puts its outputs and caches its downloads."""

from __future__ import annotations

import os
from pathlib import Path

FEATURES_FILE = "vgg16_features.onnx"


def default_model_dir() -> Path:
    """models/build/ beside this package, or $STYLIZE_MODEL_DIR."""
    env = os.environ.get("STYLIZE_MODEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "build"


def default_model_path() -> Path:
    """The exported feature network the server loads: $STYLIZE_MODEL or models/build/vgg16_features.onnx."""
    env = os.environ.get("STYLIZE_MODEL")
    return Path(env) if env else default_model_dir() / FEATURES_FILE


def default_cache_dir() -> Path:
    """Downloaded weight packages: $STYLIZE_CACHE_DIR, else ~/.cache/stylize."""
    env = os.environ.get("STYLIZE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stylize"
