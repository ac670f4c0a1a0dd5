"""Property-based fuzzing of the Stylize RPC (hypothesis): hostile requests and what may come back.

Used by tests/test_fuzz.py (a short, seeded profile in CI) and scripts/fuzz.py (a long one). A request is a
cheap valid one (a tiny image, max_size <= 48, 1-2 iterations) in which one part is broken at a time: the
options (every field, including NaN, infinities, huge, negative and out-of-range enum values), the content
image, a style image or the init image (the bytes of every format Pillow reads, truncated, bit-flipped, or
with a lying header). Valid requests come through too, so the engine runs on what survives validation.

The property (check_response): every call ends with a Result, INVALID_ARGUMENT whose message starts with a
field of the request, or RESOURCE_EXHAUSTED; never INTERNAL, UNKNOWN or anything else.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from collections import Counter

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import procfs

CALL_TIMEOUT = 120.0  # a call that takes longer has hung: the property fails on DEADLINE_EXCEEDED
MAX_VALID_SIZE = (
    48  # valid requests stay this small (and frames too), so that each runs in well under a second
)

# CI: seeded (derandomize), few examples, no example database; the long run (scripts/fuzz.py) derives from it.
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

LAYERS = tuple(
    f"relu{block}_{index}"
    for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for index in range(1, count + 1)
)
BAD_LAYER_NAMES = (
    "",
    " ",
    "relu9_9",
    "RELU1_1",
    "relu1_1\x00",
    "conv1_1",
    "réłu1_1",
    "x" * 2000,
    "relu4_2 x",
)

# --- images --------------------------------------------------------------------------------------


def _pixels(width: int = 12, height: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def _saved(fmt: str) -> bytes | None:
    """A tiny image in a format Pillow writes, in the first mode the format takes; None if none does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # formats Pillow will drop still count
        for mode in ("RGB", "P", "L", "1", "RGBA"):
            try:
                image = Image.fromarray(_pixels()).convert(mode)
                buffer = io.BytesIO()
                image.save(buffer, fmt)
                data = buffer.getvalue()
                with Image.open(io.BytesIO(data)) as reopened:
                    reopened.load()
                return data
            except Exception:
                continue
    return None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _crafted() -> dict[str, bytes]:
    """Formats Pillow reads but cannot write, made by hand (valid where that is simple, else the
    format's signature and a plausible header), and the stub formats whose decoders are absent."""
    w, h = 4, 3
    rgb = _pixels(w, h).tobytes()
    planar = b"".join(_pixels(w, h)[..., c].tobytes() for c in range(3))
    fits_cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        f"NAXIS1  = {w:20d}",
        f"NAXIS2  = {h:20d}",
        "END",
    ]
    fits = "".join(card.ljust(80) for card in fits_cards).ljust(2880).encode() + bytes(w * h).ljust(
        2880, b"\0"
    )
    pcx = _saved("PCX") or b""
    dcx = struct.pack("<II", 0x3ADE68B1, 12) + struct.pack("<I", 0) + pcx
    ico = _saved("ICO") or b""
    return {
        "XPM": b'/* XPM */\nstatic char *x[] = {\n"4 3 2 1",\n"a c #FF0000",\n"b c #0000FF",\n'
        + b'"abab",\n"baba",\n"abab"};\n',
        "SUN": struct.pack(">8I", 0x59A66A95, w, h, 24, w * h * 3, 1, 0, 0) + rgb,
        "FITS": fits,
        "PSD": b"8BPS"
        + struct.pack(">H6sHIIHH", 1, b"", 3, h, w, 8, 3)
        + struct.pack(">III", 0, 0, 0)
        + struct.pack(">H", 0)
        + planar,
        "DCX": dcx,
        "CUR": ico[:2] + b"\x02\x00" + ico[4:],
        "XVTHUMB": b"P7 332\n#XVVERSION:3.10\n#END_OF_COMMENTS\n4 3 255\n" + bytes(range(12)),
        "GBR": struct.pack(">IIIII", 28 + 2, 2, w, h, 1)
        + b"GIMP"
        + struct.pack(">I", 10)
        + b"x\0"
        + bytes(w * h),
        "IMT": b"width 4\nheight 3\n\x0c" + bytes(w * h),
        "FLI": struct.pack("<IHHHHH", 128, 0xAF11, 1, w, h, 8) + bytes(114),
        "FTEX": b"FTEX" + struct.pack("<IIIIII", 0x0B, w, h, 1, 1, 0) + bytes(64),
        "MCIDAS": b"\x00\x00\x00\x00\x00\x00\x00\x04" + bytes(248) + bytes(w * h),
        "PIXAR": b"\200\350\000\000" + bytes(508),
        "PCD": bytes(2048) + b"PCD_IPI" + bytes(100),
        "IPTC": b"\x1c\x02\x00\x00\x02\x00\x04" + bytes(16),
        "MPEG": b"\x00\x00\x01\xb3" + bytes([0x00, 0x40, 0x03]) + bytes(9),
        "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 3\n%%EndComments\n",
        "BUFR": b"BUFR" + bytes(60),
        "GRIB": b"GRIB" + bytes(60),
        "HDF5": b"\x89HDF\r\n\x1a\n" + bytes(60),
        "WMF": b"\xd7\xcd\xc6\x9a" + bytes(60),
    }


def _corpus() -> dict[str, bytes]:
    Image.init()
    writable = sorted(set(Image.SAVE) & set(Image.OPEN))
    corpus = {fmt: data for fmt in writable if (data := _saved(fmt)) is not None}
    for fmt, data in _crafted().items():
        corpus.setdefault(fmt, data)
    return corpus


CORPUS = _corpus()


def _png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(width, height, seed)).save(buffer, "PNG")
    return buffer.getvalue()


VALID_CONTENT = _png(40, 28, seed=1)
VALID_STYLE = _png(24, 24, seed=2)


def _lying_png(width: int, height: int) -> bytes:
    """A PNG whose header (with a correct CRC) announces width x height over one tiny row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x7f" * 3 * min(width, 16))
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", row) + _png_chunk(b"IEND", b"")
    )


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """Image bytes of any format Pillow reads, usually broken: truncated, bits flipped, header bytes
    overwritten with extreme values, bytes inserted, or a lying PNG header; sometimes intact."""
    fmt = draw(st.sampled_from(sorted(CORPUS)))
    data = bytearray(CORPUS[fmt])
    mutation = draw(st.sampled_from(("intact", "truncate", "flip", "header", "insert", "lying_png", "empty")))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "header":
        # A size, count or offset field of the header made extreme (a "lying header").
        position = draw(st.integers(0, max(0, min(len(data), 64) - 4)))
        value = draw(st.sampled_from((0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000)))
        packed = struct.pack(draw(st.sampled_from(("<I", ">I"))), value)
        data[position : position + 4] = packed
    elif mutation == "insert":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    elif mutation == "lying_png":
        side = st.sampled_from((0, 1, 17, 5000, 65535, 100_000, 2**31 - 1))
        return _lying_png(draw(side), draw(side))
    elif mutation == "empty":
        return b""
    return bytes(data)


# --- options -------------------------------------------------------------------------------------

WILD_DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        (math.nan, math.inf, -math.inf, 1e308, -1e308, 3.4e38, 1e12, 1.0000001e12, -1.0, -0.0, 5e-324)
    ),
)
WILD_FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from((math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e12, 2e12, -1.0, 1e-45)),
)
UINT32 = st.integers(0, 2**32 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ENUM = st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))


def _layer_lists(
    names: st.SearchStrategy[str], weights: st.SearchStrategy[float], *, unique: bool = True
) -> st.SearchStrategy:
    layer = st.builds(
        lambda name, weight: (
            pb.LayerWeight(layer=name, weight=weight) if weight is not None else pb.LayerWeight(layer=name)
        ),
        names,
        st.none() | weights,
    )
    # Valid lists name each layer once (a layer listed twice is refused); wild ones may repeat.
    return st.lists(layer, max_size=5, unique_by=(lambda lw: lw.layer) if unique else None)


# Cheap valid values: what a valid request may carry. Layer lists are mostly the default (each new choice
# of layers compiles the network's graphs, up to a few seconds).
VALID: dict[str, st.SearchStrategy] = {
    # The valid content image is 40x28: from 23 px up its short side fits the deepest layer (16 px).
    "max_size": st.integers(23, MAX_VALID_SIZE),
    "min_size": st.integers(23, MAX_VALID_SIZE),  # drawn at most max_size by requests()
    "iterations": st.integers(1, 2),
    "content_weight": st.floats(0, 1e3),
    "style_weight": st.floats(0, 1e4),
    "tv_weight": st.floats(0, 1.0),
    "content_layers": st.one_of(
        st.just([]), _layer_lists(st.sampled_from(LAYERS[:8]), st.floats(0, 10, width=32))
    ),
    "style_layers": st.one_of(
        st.just([]), _layer_lists(st.sampled_from(LAYERS[:8]), st.floats(0, 10, width=32))
    ),
    "pooling": st.integers(0, 2),
    "init": st.sampled_from((0, 1, 2)),
    "seed": st.integers(0, 2**63 - 1),
    "style_scale": st.floats(0.05, 2.0),
    "color_mode": st.integers(0, 3),
    "preserve_colors": st.booleans(),
    "frame_every": st.integers(0, 2),
    "frame_format": st.integers(0, 3),
    "frame_max_size": st.integers(16, MAX_VALID_SIZE),
    "output_format": st.integers(0, 3),
    "tolerance": st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
}
# Anything the field's type can carry, except valid values that would make a job expensive.
WILD: dict[str, st.SearchStrategy] = {
    "max_size": UINT32.filter(lambda v: not MAX_VALID_SIZE < v <= 4096),
    "min_size": UINT32,
    "iterations": UINT32.filter(lambda v: not 2 < v <= 100_000),
    "content_weight": WILD_DOUBLES,
    "style_weight": WILD_DOUBLES,
    "tv_weight": WILD_DOUBLES,
    "content_layers": _layer_lists(
        st.sampled_from(LAYERS + BAD_LAYER_NAMES) | st.text(max_size=20), WILD_FLOAT32, unique=False
    ),
    "style_layers": _layer_lists(
        st.sampled_from(LAYERS + BAD_LAYER_NAMES) | st.text(max_size=20), WILD_FLOAT32, unique=False
    ),
    "pooling": ENUM,
    "init": ENUM,
    "seed": INT64,
    "style_scale": WILD_DOUBLES,
    "color_mode": ENUM,
    "preserve_colors": st.booleans(),
    "frame_every": UINT32.filter(lambda v: not 2 < v <= 100_000),
    "frame_format": ENUM,
    "frame_max_size": UINT32.filter(lambda v: not MAX_VALID_SIZE < v <= 4096),
    "output_format": ENUM,
    "tolerance": WILD_DOUBLES,
}
assert set(VALID) == set(WILD) == set(pb.StylizeOptions.DESCRIPTOR.fields_by_name) - {"init_image"}


def _set(options: pb.StylizeOptions, name: str, value: object) -> None:
    if isinstance(value, list):
        getattr(options, name).extend(value)
    else:
        setattr(options, name, value)


@st.composite
def requests(draw: st.DrawFn) -> pb.StylizeRequest:
    """A cheap valid request with (usually) one part broken: options, content, a style or the init image."""
    options = pb.StylizeOptions(max_size=draw(VALID["max_size"]), iterations=draw(VALID["iterations"]))
    for name in sorted(VALID):
        if name not in ("max_size", "iterations", "min_size") and draw(st.booleans()):
            _set(options, name, draw(VALID[name]))
    if draw(st.booleans()):
        options.min_size = draw(st.integers(23, options.max_size))
    content = VALID_CONTENT
    styles = [pb.StyleImage(image=VALID_STYLE, blend_weight=draw(st.floats(0, 10, width=32)))]
    broken = draw(
        st.sampled_from(("nothing", "nothing", "options", "options", "content", "style", "init_image"))
    )
    if broken == "options":
        for name in draw(st.lists(st.sampled_from(sorted(WILD)), min_size=1, max_size=3, unique=True)):
            options.ClearField(name)
            _set(options, name, draw(WILD[name]))
    elif broken == "content":
        content = draw(mutated_images())
    elif broken == "style":
        count = draw(st.integers(0, 3))
        styles = [
            pb.StyleImage(
                image=draw(mutated_images() | st.just(VALID_STYLE)), blend_weight=draw(WILD_FLOAT32)
            )
            for _ in range(count)
        ]
        if draw(st.booleans()):
            styles *= draw(st.integers(1, 6))  # up to 18: past the most a request may have
    elif broken == "init_image":
        options.init_image = draw(mutated_images())
        options.init = draw(st.sampled_from((0, 1, 2, 3)))
    return pb.StylizeRequest(content_image=content, styles=styles, options=options)


# --- the property ----------------------------------------------------------------------------------

_OPTION_FIELDS = set(pb.StylizeOptions.DESCRIPTOR.fields_by_name)
_FIELD = re.compile(
    r"^(?P<field>content_image|styles(\[\d+\]\.(image|blend_weight))?"
    r"|options\.(?P<option>[a-z_]+)(\[\d+\]\.(layer|weight))?) "
)


def named_field(details: str) -> str | None:
    """The request field an INVALID_ARGUMENT message starts with, or None if it names none."""
    match = _FIELD.match(details)
    if match is None or (match.group("option") and match.group("option") not in _OPTION_FIELDS):
        return None
    return re.sub(r"\[\d+\]", "[]", match.group("field"))


class Tally:
    """Outcomes seen, by kind: "result", "INVALID_ARGUMENT <field>", "RESOURCE_EXHAUSTED"."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()


def check_response(
    stub: pb_grpc.StyleTransferStub, request: pb.StylizeRequest, tally: Tally | None = None
) -> None:
    """Run one call and assert the property (raises AssertionError with what came back)."""
    results = 0
    try:
        for response in stub.Stylize(request, timeout=CALL_TIMEOUT):
            if response.HasField("result"):
                results += 1
                result = response.result
                assert result.image and result.width > 0 and result.height > 0, result
                assert math.isfinite(result.final_losses.total), result.final_losses
        outcome = "result"
        assert results == 1, f"the stream ended OK with {results} results"
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field = named_field(details)
            assert field is not None, f"INVALID_ARGUMENT naming no request field: {details!r}"
            outcome = f"INVALID_ARGUMENT {field}"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            outcome = "RESOURCE_EXHAUSTED"
        else:
            raise AssertionError(f"{code.name}: {details}") from None
    if tally is not None:
        tally.counts[outcome] += 1


def assert_still_serving(stub: pb_grpc.StyleTransferStub) -> None:
    """A plain valid request still completes."""
    request = pb.StylizeRequest(
        content_image=VALID_CONTENT,
        styles=[pb.StyleImage(image=VALID_STYLE)],
        options=pb.StylizeOptions(max_size=32, iterations=1),
    )
    responses = list(stub.Stylize(request, timeout=CALL_TIMEOUT))
    assert responses[-1].HasField("result")


def rss_bytes() -> int:
    return procfs.status_value("self", "VmRSS")
