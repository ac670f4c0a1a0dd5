"""What `stylize jobs` and `stylize cancel` print: jobs as aligned lines (id, state, iterations done,
created time in UTC), or as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import json_format

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb


def state_name(job: pb.Job) -> str:
    """The job's state, e.g. "RUNNING"; a queued job's place in the queue, e.g. "QUEUED(2)"."""
    name = pb.JobState.Name(job.state) if job.state in pb.JobState.values() else str(job.state)
    if job.state == pb.QUEUED and job.queue_position:
        name += f"({job.queue_position})"
    return name


def created(job: pb.Job) -> str:
    if not job.HasField("create_time"):
        return "-"
    return datetime.fromtimestamp(job.create_time.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_jobs(jobs: Sequence[pb.Job], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([json_format.MessageToDict(job) for job in jobs], indent=2))
        return
    print(f"{'ID':<32}  {'STATE':<10}  {'ITERATION':>9}  CREATED (UTC)")
    for job in jobs:
        iteration = str(job.progress.iteration) if job.HasField("progress") else "-"
        print(f"{job.id:<32}  {state_name(job):<10}  {iteration:>9}  {created(job)}")


def print_cancelled(job: pb.Job) -> None:
    """One line per job of `stylize cancel`: ID STATE (CANCELLED, or the final state it had already)."""
    print(f"{job.id} {state_name(job)}")
