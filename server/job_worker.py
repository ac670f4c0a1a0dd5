"""One run of an admitted job, on the thread that holds the job's slot: decode its images, run the
engine, encode every frame and the result, and say how it ended.

Everything the job costs is spent here, so that its CPU and memory count against its slot however large
or frequent its frames. The worker hands ready messages to the job manager's feed, which never blocks it.
JobLog writes the job's one log line and its metrics, once, whoever sees its end first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.admission import (
    AcceptedJob,
    EngineLike,
    decode,
    decode_mask_field,
    guides_of_request,
    plan_for,
)
from stylize_service.server.convert import progress_pb, result_pb
from stylize_service.server.engine.checkpoint import Checkpoint, CheckpointError, CheckpointSink
from stylize_service.server.engine.memory import MemoryExceeded, megabytes
from stylize_service.server.engine.plan import JobPlan
from stylize_service.server.engine.types import InvalidSettings, Progress, StyleSource, StylizeCancelled
from stylize_service.server.imageio import Encoding, encode_image
from stylize_service.server.logsafe import LogThrottle
from stylize_service.server.metrics import ServerMetrics
from stylize_service.server.options import InvalidOption, invalid_option
from stylize_service.server.outcome import Outcome

logger = logging.getLogger("stylize.server")

_refusal_log = LogThrottle()


class JobObserver:
    """The engine's view of one job: hands each Progress and frame, converted and encoded, to `publish`
    (the job manager's feed), and answers should_stop (asked before every evaluation) from `stop`."""

    def __init__(
        self,
        publish: Callable[[pb.StylizeResponse], None],
        stop: threading.Event,
        metrics: ServerMetrics,
    ) -> None:
        self._publish = publish
        self._stop = stop
        self._metrics = metrics
        self.last_progress: Progress | None = None
        self.frame_encoding = Encoding.JPEG
        self.frame_size: tuple[int, int] | None = None  # (width, height); set once the content is decoded

    def on_progress(self, progress: Progress) -> None:
        self.last_progress = progress
        self._metrics.evaluations(progress.evaluation_seconds)
        self._publish(pb.StylizeResponse(progress=progress_pb(progress)))

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        # Scaled and encoded here, in the worker thread between two iterations: the job's own slot pays
        # for it, however large or frequent its frames.
        encoded = encode_image(image, self.frame_encoding, self.frame_size)
        frame = pb.Frame(
            iteration=iteration,
            image=encoded.data,
            mime_type=encoded.mime_type,
            width=encoded.width,
            height=encoded.height,
        )
        self._publish(pb.StylizeResponse(frame=frame))

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def stop_if_asked(self) -> None:
        if self.should_stop():
            raise StylizeCancelled()


@dataclass
class JobLog:
    """The one log line of a job, and its metrics, written once, by whoever sees its end."""

    id: str
    metrics: ServerMetrics
    deadline_passed: Callable[[], bool]  # the call's deadline has passed (gRPC reports it as a cancel)
    client: str = "-"  # identity.context_identity: the name the per-client bound counts by
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    sizes: str = "-"
    written: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, outcome: Outcome, iterations: int = 0, evaluations: int = 0) -> None:
        with self.lock:
            if self.written:
                return
            self.written = True
        now = time.monotonic()
        ran = now - self.started_at if self.started_at is not None else 0.0
        waited = (self.started_at or now) - self.queued_at
        outcome = outcome.after_deadline(self.deadline_passed())
        started = self.started_at is not None
        self.metrics.job_finished(
            outcome.label, queue_wait=waited if started else None, ran=ran if started else None
        )
        if not started and outcome.label in ("invalid", "refused"):
            # A greedy client is refused many times a second: past a rate its refusals are only counted.
            held_back = _refusal_log.admit(outcome.label)
            if held_back is None:
                return
            if held_back:
                outcome = outcome.noting(f"({held_back} more {outcome.label} calls not logged)")
        logger.info(
            "job %s client=%s %s iterations=%d evaluations=%d queued=%.2fs ran=%.2fs outcome=%s",
            self.id,
            self.client,
            self.sizes,
            iterations,
            evaluations,
            waited,
            ran,
            outcome.text,
        )


@dataclass(frozen=True)
class DecodedInputs:
    """A job's images, decoded by its worker, and its plan made again for them: their sizes can differ
    from the headers', which the job's reservation was planned from (a 601x31 header, 600x31 decoded)."""

    content: np.ndarray
    styles: list[StyleSource]
    init_image: np.ndarray | None
    plan: JobPlan


@dataclass(frozen=True)
class JobRun:
    """How one run of a job ended: its outcome, and its Result when it succeeded."""

    outcome: Outcome
    result: pb.Result | None = None
    iterations: int = 0
    evaluations: int = 0


def run_job(
    engine: EngineLike,
    job: AcceptedJob,
    observer: JobObserver,
    log: JobLog,
    *,
    max_pixels: int,
    memory_capacity: int | None,
    checkpoints: CheckpointSink | None = None,
    resume: Checkpoint | None = None,
) -> JobRun:
    """The body of the thread that holds the job's slot: decode the images, run the engine (from `resume`
    when given, saving to `checkpoints`), encode the result, and say how it ended. Never raises."""
    try:
        inputs = _decode_inputs(engine, job, observer, max_pixels, memory_capacity)
        log.sizes = _describe_sizes(inputs, job)
        observer.frame_encoding = job.options.frame_encoding
        observer.frame_size = inputs.plan.frame_size
        result = engine.stylize(
            inputs.content,
            inputs.styles,
            job.options.settings,
            observer,
            init_image=inputs.init_image,
            plan=inputs.plan,
            checkpoints=checkpoints,
            resume=resume,
        )
        return JobRun(Outcome.ok(), result_pb(result, job.options), result.iterations, result.evaluations)
    except StylizeCancelled:
        outcome = Outcome.cancelled()
    except (InvalidSettings, InvalidOption) as err:
        outcome = Outcome.invalid(str(invalid_option(err) if isinstance(err, InvalidSettings) else err))
    except CheckpointError as err:
        outcome = Outcome.internal(f"the job's checkpoint cannot be resumed: {err}")
    except MemoryExceeded as err:  # the decoded image planned larger than its header did
        outcome = Outcome.refused(f"memory: {err}")
    except Exception as err:
        logger.exception("job %s: the engine failed", job.id)
        failure = f"{type(err).__name__}: {err}"
        outcome = Outcome.internal(f"the engine failed: {failure}", log_text=failure)
    progress = observer.last_progress
    if progress is None:
        return JobRun(outcome)
    return JobRun(outcome, None, progress.iteration, progress.evaluations)


def _decode_inputs(
    engine: EngineLike,
    job: AcceptedJob,
    observer: JobObserver,
    max_pixels: int,
    memory_capacity: int | None,
) -> DecodedInputs:
    """Decode (raises InvalidOption naming the image, StylizeCancelled if the call ended), shrunk to the
    sizes the plan says, and plan again for the decoded sizes."""
    request, admitted = job.request, job.plan
    observer.stop_if_asked()
    content = decode(request.content_image, "content_image", max_pixels, admitted.content_side)
    init_image = None
    if request.options.init_image:
        observer.stop_if_asked()
        init_image = decode(
            request.options.init_image, "options.init_image", max_pixels, admitted.content_side
        )
    styles = []
    for index, style in enumerate(request.styles):
        observer.stop_if_asked()
        image = decode(style.image, f"styles[{index}].image", max_pixels, admitted.style_side)
        mask = (
            decode_mask_field(style.mask, f"styles[{index}].mask", max_pixels, admitted.content_side)
            if style.mask
            else None
        )
        style_mask = (
            decode_mask_field(
                style.style_mask, f"styles[{index}].style_mask", max_pixels, admitted.style_side
            )
            if style.style_mask
            else None
        )
        styles.append(StyleSource(image, style.blend_weight, mask, style_mask))
    decoded_plan = plan_for(
        engine,
        (content.shape[1], content.shape[0]),
        [(style.image.shape[1], style.image.shape[0]) for style in styles],
        job.options,
        memory_capacity,
        guides=guides_of_request(request),
    )
    return DecodedInputs(content, styles, init_image, decoded_plan)


def _describe_sizes(inputs: DecodedInputs, job: AcceptedJob) -> str:
    height, width = inputs.content.shape[:2]
    out_w, out_h = inputs.plan.output_size
    styles = ",".join(f"{s.image.shape[1]}x{s.image.shape[0]}" for s in inputs.styles) or "none"
    tiles = ",".join(str(t or 0) for t in inputs.plan.memory.schemes)
    style_tiles = ",".join(str(t or 0) for t in inputs.plan.memory.style_schemes)
    histories = ",".join(str(h) for h in inputs.plan.memory.histories)
    return (
        f"content={width}x{height} styles={styles} output={out_w}x{out_h} "
        f"memory={megabytes(job.plan.memory.peak_bytes)}MB tiles={tiles} style_tiles={style_tiles} "
        f"correction_pairs={histories}"
    )
