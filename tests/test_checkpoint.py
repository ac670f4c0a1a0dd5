"""Checkpoints of Engine.stylize and resuming from them: exact (bit-identical) with the optimiser's state,
close without it, refused when damaged or taken under other stages; and the format's size prediction."""

from __future__ import annotations

import dataclasses
import io
import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from stylize_service.server.engine import checkpoint as checkpoint_module
from stylize_service.server.engine import optimizer
from stylize_service.server.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_bytes,
    plan_key,
)
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.lbfgs_workspace import OptimizerState, workspace_lengths
from stylize_service.server.engine.pyramid import Stage
from stylize_service.server.engine.types import StylizeCancelled, StylizeResult, StylizeSettings

from .test_engine import CONTENT, STYLE, Recorder

SINGLE = StylizeSettings(max_size=64, iterations=14, frame_every=3, seed=3)
PYRAMID = StylizeSettings(max_size=96, min_size=48, iterations=16, frame_every=3, seed=3)  # 8 + 8


class SaveAt:
    """A sink that saves one checkpoint, at global iteration `at`, then has the observer stop the job:
    a server that crashed right after its last checkpoint."""

    def __init__(self, recorder: Recorder, at: int) -> None:
        self.recorder, self.at = recorder, at
        self.asked: list[int] = []
        self.saved: Checkpoint | None = None

    def due(self) -> bool:
        iteration = self.recorder.progress[-1].iteration  # the iteration just reported
        self.asked.append(iteration)
        return iteration == self.at

    def save(self, checkpoint: Checkpoint) -> None:
        assert self.saved is None
        self.saved = checkpoint
        self.recorder.cancelled = True


@pytest.fixture
def engine(real_engine: Engine) -> Engine:
    return real_engine


def interrupted(engine: Engine, settings: StylizeSettings, at: int) -> Checkpoint:
    """The checkpoint of a run stopped right after saving it at iteration `at`, through its bytes."""
    recorder = Recorder()
    sink = SaveAt(recorder, at)
    with pytest.raises(StylizeCancelled):
        engine.stylize(CONTENT, STYLE, settings, recorder, checkpoints=sink)
    assert sink.saved is not None, f"no checkpoint at iteration {at}"
    assert recorder.progress[-1].iteration == at
    return Checkpoint.from_bytes(sink.saved.to_bytes())


def same_result(resumed: StylizeResult, full: StylizeResult) -> None:
    assert np.array_equal(resumed.image, full.image)
    assert (resumed.iterations, resumed.evaluations) == (full.iterations, full.evaluations)
    assert resumed.losses == full.losses


def reports(recorder: Recorder, after: int) -> list[tuple]:
    return [
        (p.iteration, p.evaluations, p.losses.total, p.stage)
        for p in recorder.progress
        if p.iteration > after
    ]


@pytest.mark.parametrize(
    ("settings", "at", "stage", "size"),
    [(SINGLE, 7, 0, (48, 64)), (PYRAMID, 4, 0, (36, 48)), (PYRAMID, 11, 1, (72, 96))],
    ids=["single stage", "pyramid, first stage", "pyramid, second stage"],
)
def test_a_resumed_job_ends_exactly_as_the_uninterrupted_one(
    engine: Engine, settings: StylizeSettings, at: int, stage: int, size: tuple[int, int]
) -> None:
    full_recorder = Recorder()
    full = engine.stylize(CONTENT, STYLE, settings, full_recorder)
    checkpoint = interrupted(engine, settings, at)
    assert (checkpoint.stage, checkpoint.iterations_done) == (stage, at)
    assert checkpoint.optimizer is not None  # the direct driver runs here (test_optimizer checks it)
    assert checkpoint.image.shape == (1, 3, *size)

    recorder = Recorder()
    resumed = engine.stylize(CONTENT, STYLE, settings, recorder, resume=checkpoint)
    same_result(resumed, full)
    # The reports go on where the interrupted run's ended: same iterations, counts, losses and frames.
    assert reports(recorder, at) == reports(full_recorder, at)
    assert recorder.progress[0].iteration == at + 1
    assert [(i, f.tobytes()) for i, f in recorder.frames] == [
        (i, f.tobytes()) for i, f in full_recorder.frames if i > at
    ]
    assert resumed.elapsed_seconds > checkpoint.elapsed_seconds
    # A checkpoint can be resumed again (after a second crash, say): it is not consumed.
    same_result(engine.stylize(CONTENT, STYLE, settings, Recorder(), resume=checkpoint), full)


def test_checkpoints_are_offered_after_every_iteration_the_stage_goes_on_from(engine: Engine) -> None:
    recorder = Recorder()
    sink = SaveAt(recorder, at=-1)  # never saves
    engine.stylize(CONTENT, STYLE, replace(PYRAMID, tolerance=0.0), recorder, checkpoints=sink)
    # Stage 0 runs iterations 1-8, stage 1 9-16: not the starting points nor a stage's last iteration.
    assert sink.asked == [*range(1, 8), *range(9, 16)]


def test_a_resume_without_the_optimiser_state_lands_close(engine: Engine, caplog) -> None:
    """Restarted from the iterate alone, L-BFGS-B rebuilds its correction pairs over its next iterations:
    near the end of a stage that costs little. (Mid-descent it costs more: several % of the loss at these
    sizes, where the loss still falls fast.)"""
    settings = replace(SINGLE, max_size=32, iterations=120, style_weight=1.0, tolerance=0.0, frame_every=0)
    full = engine.stylize(CONTENT, STYLE, settings, Recorder())
    checkpoint = replace(interrupted(engine, settings, 100), optimizer=None)
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger="stylize_service.server.engine.engine"):
        resumed = engine.stylize(CONTENT, STYLE, settings, recorder, resume=checkpoint)
    assert "not exactly: it holds no L-BFGS-B state" in caplog.text
    assert resumed.iterations == full.iterations == 120
    assert [p.iteration for p in recorder.progress] == list(range(101, 121))
    assert recorder.progress[0].evaluations > checkpoint.evaluations
    assert resumed.losses.total == pytest.approx(full.losses.total, rel=0.01)


def test_with_the_public_driver_checkpoints_carry_no_state_and_resume_from_the_image(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    exact = interrupted(engine, SINGLE, 7)
    monkeypatch.setattr(optimizer, "driver", lambda: optimizer.minimize_public)
    public = interrupted(engine, SINGLE, 7)
    assert public.optimizer is None
    assert public.image.tobytes() == exact.image.tobytes()  # the drivers' iterates are the same
    with caplog.at_level(logging.INFO, logger="stylize_service.server.engine.engine"):
        resumed = engine.stylize(CONTENT, STYLE, SINGLE, Recorder(), resume=exact)
    assert "not exactly: scipy's L-BFGS-B routine cannot be driven directly here" in caplog.text
    assert resumed.iterations == 14


def test_a_checkpoint_of_another_iteration_count_restarts_from_its_image(engine: Engine, caplog) -> None:
    checkpoint = interrupted(engine, SINGLE, 7)
    with caplog.at_level(logging.INFO, logger="stylize_service.server.engine.engine"):
        resumed = engine.stylize(
            CONTENT, STYLE, replace(SINGLE, iterations=12), Recorder(), resume=checkpoint
        )
    assert "its plan (sizes=64x48 iterations=14 histories=10) differs" in caplog.text
    assert resumed.iterations == 12


def test_a_checkpoint_of_other_stage_sizes_is_refused(engine: Engine) -> None:
    checkpoint = interrupted(engine, SINGLE, 3)
    with pytest.raises(CheckpointError, match=r"other stages \(sizes=64x48 .*\) than this job's plan"):
        engine.stylize(CONTENT, STYLE, PYRAMID, Recorder(), resume=checkpoint)


def synthetic(width: int, height: int, history: int, *, seed: int = 0) -> Checkpoint:
    """A checkpoint with a state of the right shapes and random contents (no job run)."""
    rng = np.random.default_rng(seed)
    n = 3 * width * height
    wa_length, iwa_length = workspace_lengths(n, history)
    state = OptimizerState(
        routine="scipy test setulb",
        history=history,
        x=rng.normal(size=n),
        f=1.5,
        g=rng.normal(size=n),
        wa=rng.normal(size=wa_length),
        iwa=rng.integers(0, 9, iwa_length, dtype=np.int32),
        task=np.array([1, 0], np.int32),
        ln_task=np.zeros(2, np.int32),
        lsave=np.zeros(4, np.int32),
        isave=rng.integers(0, 9, 44, dtype=np.int32),
        dsave=rng.normal(size=29),
        evaluated_x=rng.normal(size=n),
        loss=1.5,
        grad=rng.normal(size=n).astype(np.float32),
        evaluations=9,
        iterations=7,
    )
    return Checkpoint(
        stage=0,
        stage_iteration=7,
        iterations_done=7,
        evaluations=9,
        elapsed_seconds=0.1 + 0.2,  # not a short decimal: floats must round-trip bit for bit
        recent_losses=tuple(rng.normal(size=11)),
        image=rng.normal(size=(1, 3, height, width)).astype(np.float32),
        optimizer=state,
        plan_key=plan_key([Stage(0, 1, width, height, 20)], [history]),
    )


def test_the_bytes_round_trip_every_field_bit_for_bit() -> None:
    original = synthetic(24, 16, 5)
    copy = Checkpoint.from_bytes(original.to_bytes())
    assert original.optimizer is not None and copy.optimizer is not None
    for field in dataclasses.fields(Checkpoint):
        if field.name not in ("image", "optimizer"):
            assert getattr(copy, field.name) == getattr(original, field.name), field.name
    assert copy.image.tobytes() == original.image.tobytes()
    for field in dataclasses.fields(OptimizerState):
        mine, theirs = getattr(copy.optimizer, field.name), getattr(original.optimizer, field.name)
        if isinstance(theirs, np.ndarray):
            assert mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes(), field.name
        else:
            assert mine == theirs, field.name
    without = replace(original, optimizer=None)
    assert Checkpoint.from_bytes(without.to_bytes()).optimizer is None
    # write/read: the same bytes through a file
    buffer = io.BytesIO()
    original.write(buffer)
    assert buffer.getvalue() == original.to_bytes()


def damaged(data: bytes) -> list[tuple[str, bytes]]:
    middle = len(data) // 2
    return [
        ("empty", b""),
        ("not an archive", b"stylize" * 100),
        ("truncated", data[: len(data) - 100]),
        ("a flipped byte", data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]),
    ]


@pytest.mark.parametrize("case", range(4))
def test_a_damaged_blob_is_refused(case: int) -> None:
    _, data = damaged(synthetic(24, 16, 5).to_bytes())[case]
    with pytest.raises(CheckpointError):
        Checkpoint.from_bytes(data)


def test_another_version_or_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = synthetic(24, 16, 5)
    monkeypatch.setattr(checkpoint_module, "VERSION", 2)
    newer = checkpoint.to_bytes()
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="checkpoint version 2 is not supported"):
        Checkpoint.from_bytes(newer)
    other = io.BytesIO()
    np.savez(other, header=np.frombuffer(b'{"format": "other"}', np.uint8))
    with pytest.raises(CheckpointError, match="not a stylize checkpoint"):
        Checkpoint.from_bytes(other.getvalue())
    pickled = io.BytesIO()
    np.savez(pickled, header=np.array([{"format": "stylize-checkpoint"}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):  # allow_pickle=False
        Checkpoint.from_bytes(pickled.getvalue())


def test_a_state_with_wrong_sizes_is_refused_on_reading() -> None:
    checkpoint = synthetic(24, 16, 5)
    assert checkpoint.optimizer is not None
    short = replace(checkpoint, optimizer=replace(checkpoint.optimizer, iwa=checkpoint.optimizer.iwa[:-3]))
    with pytest.raises(CheckpointError, match="iwa has shape"):
        Checkpoint.from_bytes(short.to_bytes())


@pytest.mark.parametrize(("width", "height", "history"), [(64, 48, 10), (160, 120, 10), (200, 150, 3)])
def test_checkpoint_bytes_predicts_the_blob_length(width: int, height: int, history: int) -> None:
    checkpoint = synthetic(width, height, history)
    length = len(checkpoint.to_bytes())
    assert checkpoint_bytes(width, height, history) == pytest.approx(length, rel=0.02)
    assert checkpoint.nbytes == pytest.approx(length, rel=0.02)


def test_checkpoint_bytes_of_a_real_checkpoint(engine: Engine) -> None:
    checkpoint = interrupted(engine, SINGLE, 2)
    assert checkpoint_bytes(64, 48, 10) == pytest.approx(len(checkpoint.to_bytes()), rel=0.02)


def test_the_checkpoint_module_imports_neither_scipy_nor_onnxruntime() -> None:
    code = (
        "import sys; import stylize_service.server.engine.checkpoint; "
        "print(sorted({'scipy', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
