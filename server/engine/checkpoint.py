"""A running stylization's checkpoint: where it is, the iterate, and the optimiser's state, as bytes.

Engine.stylize hands one to a CheckpointSink when the sink says one is due, and continues from one given
as `resume`. With the optimiser's state (OptimizerState) the continuation is bit-identical to the run that
was interrupted; without it (the public L-BFGS-B driver, or a changed plan) the stage's L-BFGS-B restarts
from the saved iterate, which loses its correction pairs but not its progress.

The format is an uncompressed .npz (a zip of .npy arrays; every entry carries a CRC-32, so a damaged blob
is detected), read with allow_pickle=False: a JSON header (format name, version, the integer and string
fields) stored as bytes, the floats as float64 arrays so that they round-trip bit for bit, the image, and
the optimiser's arrays under "optimizer/". Nearly all of its size is setulb's workspace, 2m + 5 float64
vectors of the image's size for m correction pairs (lbfgs_workspace.state_bytes).

Pure (numpy only, no scipy or onnxruntime): the job store reads, sizes and budgets checkpoints with it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

import numpy as np

from .lbfgs_workspace import OptimizerState, state_bytes
from .pyramid import Stage

FORMAT = "stylize-checkpoint"
VERSION = 1
_OPTIMIZER = "optimizer/"  # prefix of the optimiser's arrays in the archive
# The archive's bytes beyond its arrays' data, about: per entry a zip local header, a central directory
# record, zip64 extras and an .npy header (~300 bytes with the entry's name; 4 entries and 11 more for the
# optimiser's arrays), plus the JSON header, the floats and the end records.
_ARCHIVE_OVERHEAD = (4 + 11) * 300 + 1024
CHANNELS = 3  # the network's input channels: a stage's image has CHANNELS * width * height variables


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, not a checkpoint, an unknown version) or does not fit
    the job it is to resume."""


def plan_key(stages: Sequence[Stage], histories: Sequence[int]) -> str:
    """The fingerprint of a job's plan that a checkpoint depends on, readable: each stage's size, then
    its iterations and L-BFGS-B history. Example: "sizes=48x36,96x72 iterations=3,6 histories=10,10"."""
    sizes = ",".join(f"{s.width}x{s.height}" for s in stages)
    iterations = ",".join(str(s.iterations) for s in stages)
    return f"sizes={sizes} iterations={iterations} histories={','.join(map(str, histories))}"


def plan_sizes(key: str) -> str:
    """The stage sizes part of a plan_key (what a resume cannot do without)."""
    parts = dict(part.partition("=")[::2] for part in key.split())
    return parts.get("sizes", "")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The state of a stylization between two iterations of stage `stage`."""

    stage: int  # index of the stage in progress
    stage_iteration: int  # iterations done within it
    iterations_done: int  # in the whole job (as Progress.iteration)
    evaluations: int  # in the whole job
    elapsed_seconds: float  # of stylization time so far
    recent_losses: tuple[float, ...]  # the stage's early-stop window (optimizer.Convergence)
    image: np.ndarray  # the last accepted iterate, network space, float32 (1, 3, H, W)
    optimizer: OptimizerState | None  # None: restart the stage's L-BFGS-B from `image`
    plan_key: str  # plan_key() of the plan it was taken under

    @property
    def nbytes(self) -> int:
        """About the length of to_bytes() (its arrays' bytes plus the archive's overhead)."""
        arrays = self.image.nbytes + 8 * len(self.recent_losses)
        if self.optimizer is not None:
            arrays += sum(a.nbytes for a in self.optimizer.arrays().values())
        return arrays + _ARCHIVE_OVERHEAD

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def write(self, file: IO[bytes]) -> None:
        """to_bytes() into a file: spares a copy of the (large) blob in memory."""
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "stage": self.stage,
            "stage_iteration": self.stage_iteration,
            "iterations_done": self.iterations_done,
            "evaluations": self.evaluations,
            "plan_key": self.plan_key,
        }
        floats = [self.elapsed_seconds]
        arrays = {"image": np.ascontiguousarray(self.image, np.float32)}
        arrays["recent_losses"] = np.array(self.recent_losses, np.float64)
        state = self.optimizer
        if state is not None:
            header["optimizer"] = {
                "routine": state.routine,
                "history": state.history,
                "evaluations": state.evaluations,
                "iterations": state.iterations,
            }
            floats += [state.f, state.loss]
            arrays.update({_OPTIMIZER + name: a for name, a in state.arrays().items()})
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        arrays["floats"] = np.array(floats, np.float64)
        np.savez(file, allow_pickle=False, **arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Raises CheckpointError for a blob that is not a whole checkpoint of this version."""
        return cls.read(io.BytesIO(data))

    @classmethod
    def read(cls, file: IO[bytes]) -> Checkpoint:
        """from_bytes() from a file."""
        try:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
            # np.load tells a damaged archive by any of these (a bad CRC is a BadZipFile).
            raise CheckpointError(f"not a readable checkpoint: {error}") from error
        try:
            return _decode(arrays)
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as error:  # a field missing or malformed
            raise CheckpointError(f"damaged checkpoint: {error!r}") from error


def _decode(arrays: dict[str, np.ndarray]) -> Checkpoint:
    header = json.loads(arrays["header"].tobytes().decode())
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError("not a stylize checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint version {header.get('version')!r} is not supported (this engine reads {VERSION})"
        )
    floats = [float(v) for v in arrays["floats"]]
    image = arrays["image"]
    if image.dtype != np.float32 or image.ndim != 4 or image.shape[:2] != (1, CHANNELS):
        raise CheckpointError(f"checkpoint image is {image.dtype} {image.shape}, not float32 (1, 3, H, W)")
    state = None
    if "optimizer" in header:
        described = header["optimizer"]
        state = OptimizerState(
            routine=str(described["routine"]),
            history=int(described["history"]),
            f=floats[1],
            loss=floats[2],
            evaluations=int(described["evaluations"]),
            iterations=int(described["iterations"]),
            **{name[len(_OPTIMIZER) :]: a for name, a in arrays.items() if name.startswith(_OPTIMIZER)},
        )
        state.check()
        if state.variables != image.size:
            raise CheckpointError(f"optimizer state has {state.variables} variables, the image {image.size}")
    checkpoint = Checkpoint(
        stage=int(header["stage"]),
        stage_iteration=int(header["stage_iteration"]),
        iterations_done=int(header["iterations_done"]),
        evaluations=int(header["evaluations"]),
        elapsed_seconds=floats[0],
        recent_losses=tuple(float(v) for v in arrays["recent_losses"]),
        image=image,
        optimizer=state,
        plan_key=str(header["plan_key"]),
    )
    if min(checkpoint.stage, checkpoint.stage_iteration, checkpoint.evaluations) < 0 or (
        checkpoint.iterations_done < checkpoint.stage_iteration
    ):
        raise CheckpointError("checkpoint counts are out of range")
    return checkpoint


def checkpoint_bytes(width: int, height: int, history: int) -> int:
    """The predicted length of a checkpoint taken in a stage of width x height px keeping `history`
    correction pairs, with the optimiser's state (the larger case): for budgeting before a job runs."""
    variables = CHANNELS * width * height
    # The image (float32) and a full early-stop window beside the state.
    return 4 * variables + state_bytes(variables, history) + 8 * 11 + _ARCHIVE_OVERHEAD


class CheckpointSink(Protocol):
    """Where Engine.stylize puts checkpoints (a job manager implements it)."""

    def due(self) -> bool:
        """Asked after each accepted iteration that the stage goes on from: whether to take one now."""

    def save(self, checkpoint: Checkpoint) -> None:
        """Called at once when due() said so, on the optimising thread: the job waits for it. The
        checkpoint is the sink's (its arrays are copies)."""
