"""Engine and job values -> stylize.v1 messages: the conversions the servicer and the job's worker share."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.engine.types import GraphCacheStats, Losses, Progress, StylizeResult
from stylize_service.server.imageio import encode_image
from stylize_service.server.jobs.views import JobView
from stylize_service.server.options import JobOptions
from stylize_service.server.outcome import Status


def graph_cache_pb(stats: GraphCacheStats) -> pb.GraphCache:
    return pb.GraphCache(
        budget_bytes=stats.budget_bytes,
        used_bytes=stats.used_bytes,
        entries=stats.entries,
        evictions=stats.evictions,
    )


def losses_pb(losses: Losses) -> pb.Losses:
    return pb.Losses(
        total=losses.total,
        terms=losses.terms,
        per_layer={term: pb.LayerLosses(layers=layers) for term, layers in losses.per_layer.items()},
        # The original three terms' own fields (deprecated), for clients written before `terms`.
        content=losses.terms.get("content", 0.0),
        style=losses.terms.get("style", 0.0),
        tv=losses.terms.get("tv", 0.0),
        content_per_layer=losses.per_layer.get("content", {}),
        style_per_layer=losses.per_layer.get("style", {}),
    )


def progress_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(
        iteration=progress.iteration,
        evaluations=progress.evaluations,
        losses=losses_pb(progress.losses),
        elapsed_seconds=progress.elapsed_seconds,
        eta_seconds=progress.eta_seconds,
        stage=progress.stage,
        stages=progress.stages,
        width=progress.width,
        height=progress.height,
        tile_size=progress.tile_size,
        tiles=progress.tiles,
        correction_pairs=progress.correction_pairs,
    )


def result_pb(result: StylizeResult, options: JobOptions) -> pb.Result:
    encoded = encode_image(result.image, options.output_encoding)
    return pb.Result(
        image=encoded.data,
        mime_type=encoded.mime_type,
        width=encoded.width,
        height=encoded.height,
        iterations=result.iterations,
        evaluations=result.evaluations,
        final_losses=losses_pb(result.losses),
        elapsed_seconds=result.elapsed_seconds,
    )


def timestamp_pb(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def job_pb(view: JobView) -> pb.Job:
    record = view.record
    job = pb.Job(
        id=record.id,
        state=pb.JobState.Value(record.state.value),  # type: ignore[arg-type]  # the stubs' enum type
        queue_position=view.queue_position,
        create_time=timestamp_pb(record.created),
        last_sequence=view.last_sequence,
        resumes=record.resumes,
    )
    if view.progress is not None:
        job.progress.CopyFrom(view.progress)
    if record.error_code:
        job.error.CopyFrom(
            pb.JobError(
                code=Status[record.error_code].value if record.error_code in Status.__members__ else 2,
                code_name=record.error_code,
                message=record.error_message,
            )
        )
    if record.started is not None:
        job.start_time.CopyFrom(timestamp_pb(record.started))
    if record.ended is not None:
        job.end_time.CopyFrom(timestamp_pb(record.ended))
    if view.result is not None:
        job.result.CopyFrom(view.result)
    return job
