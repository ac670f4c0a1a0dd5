"""The job manager: owns every job from submission to deletion.

- submit: admission (server/admission.py: INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED naming
  memory), room in the store (the oldest finished jobs are evicted first; RESOURCE_EXHAUSTED naming the
  store), a place on the scheduler (its queue and per-client bounds), then a thread of its own that waits
  for a worker slot and runs the job (server/job_worker.py), whether anyone watches it or not;
- events: every Progress, frame and the Result gets the job's next sequence number, goes to the store
  (frames within its retention bound) and to the job's live watchers (feed.Subscription);
- checkpoints: every `checkpoint_seconds` a running job's engine state goes to the store; on drain, each
  running job checkpoints at its next iteration and stops, left unfinished for the next server;
- resume: set_engine() queues the store's unfinished jobs again, each from its checkpoint;
- retention: finished jobs are deleted `result_ttl_seconds` after they end.

Nothing here knows of gRPC: the servicer converts the messages and the status codes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.admission import AcceptedJob, EngineLike, Refused, accept
from stylize_service.server.engine.checkpoint import Checkpoint, CheckpointError, checkpoint_bytes
from stylize_service.server.engine.memory import megabytes
from stylize_service.server.engine.plan import JobPlan
from stylize_service.server.job_worker import JobLog, JobObserver, JobRun, run_job
from stylize_service.server.jobs.feed import FeedItem, JobEnd, Subscription
from stylize_service.server.jobs.records import JobRecord, JobState, is_job_id, new_job_id
from stylize_service.server.jobs.store import FrameRetention, JobStore, StoredEvent
from stylize_service.server.jobs.views import JobView
from stylize_service.server.logsafe import LogThrottle
from stylize_service.server.metrics import ServerMetrics
from stylize_service.server.outcome import Outcome, Status
from stylize_service.server.scheduler import ClientLimit, QueueFull, Scheduler, SchedulerClosed, Ticket

logger = logging.getLogger("stylize.server")

POLL_SECONDS = 0.5  # how often waiting threads re-check whether their watcher or job is still wanted
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# What a job's Progress events take in the store, each (measured: 250-600 bytes with five style layers).
PROGRESS_EVENT_BYTES = 1024
LOADING = "the model is still loading; retry shortly"

_store_warnings = LogThrottle()


@dataclass(frozen=True)
class JobSettings:
    max_pixels: int
    checkpoint_seconds: float = 30.0  # 0 = no checkpoints
    result_ttl_seconds: float = 24 * 3600.0


@dataclass
class _LiveJob:
    """An unfinished job held by this server."""

    record: JobRecord
    job: AcceptedJob
    ticket: Ticket
    log: JobLog
    resume: Checkpoint | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    cancel_outcome: Outcome | None = None  # why it was asked to stop (None: the server's drain)
    interrupt: bool = False  # drain: checkpoint at the next iteration, stop, and stay unfinished
    checkpointing: bool = False  # running, with checkpoints
    cond: threading.Condition = field(default_factory=threading.Condition)
    subscribers: list[Subscription] = field(default_factory=list)
    last_sequence: int = 0
    last_progress: pb.Progress | None = None
    store_failed: bool = False  # an event could not be stored; logged once


class JobNotFound(Exception):
    """No such job for this caller (an unknown id, or another identity's job: the same answer)."""


class JobManager:
    def __init__(
        self,
        scheduler: Scheduler,
        store: JobStore,
        settings: JobSettings,
        metrics: ServerMetrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._scheduler = scheduler
        self._store = store
        self.settings = settings
        self._metrics = metrics or ServerMetrics()
        self._clock = clock
        self._engine: EngineLike | None = None
        self._lock = threading.RLock()
        self._records: dict[str, JobRecord] = {record.id: record for record in store.records()}
        self._live: dict[str, _LiveJob] = {}
        self._log_ids = iter(range(1, 1 << 62))
        self.checkpoints_written = 0
        self.checkpoint_seconds = 0.0
        self.jobs_resumed = 0
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="stylize-job-reaper", daemon=True)
        self._reaper.start()

    @property
    def store(self) -> JobStore:
        return self._store

    # --- life of the manager -----------------------------------------------------------------------

    def set_engine(self, engine: EngineLike) -> None:
        """The model is loaded: run jobs from now on, starting with the store's unfinished ones."""
        self._engine = engine
        with self._lock:
            unfinished = [r for r in self._records.values() if not r.state.final]
        for record in sorted(unfinished, key=lambda r: r.created):
            self._resume(engine, record)

    def drain(self) -> None:
        """Stop taking jobs. Running detached jobs checkpoint at their next iteration and stop, left
        unfinished (QUEUED) for the next server; queued ones stay queued in the store."""
        with self._lock:
            live = list(self._live.values())
        for job in live:
            if not job.record.bound_to_call:
                job.interrupt = True
                if not job.checkpointing:
                    job.stop.set()  # queued, or running without checkpoints: nothing to save

    def stop_all(self) -> None:
        """The drain's grace is over: every job stops now (within one evaluation). Detached ones stay
        unfinished, to resume from their last checkpoint."""
        with self._lock:
            live = list(self._live.values())
        for job in live:
            if not job.record.bound_to_call:
                job.interrupt = True
            job.stop.set()
            job.ticket.cancel()

    def close(self) -> None:
        self._closed.set()
        self._reaper.join(timeout=5)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every job thread of this server has ended; False if the timeout passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live:
                    return True
            time.sleep(0.05)
        return False

    # --- the calls ---------------------------------------------------------------------------------

    def submit(
        self,
        request: pb.StylizeRequest,
        owner: str,
        *,
        bound_to_call: bool = False,
        deadline_passed: Callable[[], bool] = lambda: False,
    ) -> JobView:
        """Admit and start the job; raises Refused (with the status and message a caller gets)."""
        job_id = new_job_id()
        log = JobLog(id=job_id[:12], metrics=self._metrics, deadline_passed=deadline_passed, client=owner)
        try:
            engine = self._engine
            if engine is None:
                raise Refused(Outcome.refused(LOADING, Status.UNAVAILABLE))
            job = accept(
                request,
                engine,
                job_id,
                max_pixels=self.settings.max_pixels,
                memory_capacity=self._scheduler.memory_capacity,
            )
            data = request.SerializeToString()
            reserved = len(data) + _predicted_store_bytes(job, self._store.retention)
            with self._lock:
                self._make_room(reserved)
                ticket = self._enqueue(owner, job.plan.memory.peak_bytes)
                record = JobRecord(
                    id=job_id,
                    owner=owner,
                    state=JobState.QUEUED,
                    created=self._clock(),
                    bound_to_call=bound_to_call,
                    reserved_bytes=reserved,
                )
                try:
                    self._store.create(record, data)
                except OSError as err:
                    ticket.release()
                    _store_warnings_log("cannot store a new job", err)
                    raise Refused(
                        Outcome.refused(f"the job store cannot take the job: {err.strerror or err}")
                    ) from None
                self._records[job_id] = record
                live = _LiveJob(record, job, ticket, log)
                self._live[job_id] = live
        except Refused as refused:
            log.finish(refused.outcome)
            raise
        self._start(live, engine)
        return self._view(live.record)

    def watch(self, job_id: str, owner: str, after: int, wanted: Callable[[], bool]) -> Iterator[FeedItem]:
        """The job's events after `after`: the store's, then the live ones, ending with a JobEnd.
        Stops early (no JobEnd) once wanted() is False. Raises JobNotFound."""
        self._owned(job_id, owner)
        with self._lock:
            live = self._live.get(job_id)
        subscription = None
        if live is not None:
            with live.cond:
                if not live.record.state.final:
                    subscription = Subscription()
                    live.subscribers.append(subscription)
                    live_from = live.last_sequence
                    position = live.ticket.position
                    if position:
                        subscription.put(pb.StylizeResponse(queued=pb.Queued(position=position)))
        if subscription is None:
            yield from self._replay_finished(job_id, after)
            return
        assert live is not None
        try:
            cursor = after
            for event in self._store.events(job_id, after):
                if event.sequence > live_from:
                    break
                yield _response(event)
                cursor = event.sequence
            cursor = max(cursor, live_from)
            while True:
                item = subscription.get(POLL_SECONDS)
                if item is None:
                    if not wanted():
                        return
                    continue
                if isinstance(item, JobEnd):
                    yield item
                    return
                if item.sequence and item.sequence <= cursor:
                    continue  # replayed from the store already
                if item.sequence:
                    cursor = item.sequence
                yield item
        finally:
            with live.cond:
                if subscription in live.subscribers:
                    live.subscribers.remove(subscription)

    def get(self, job_id: str, owner: str, *, include_image: bool = True) -> JobView:
        record = self._owned(job_id, owner)
        return self._view(record, include_image=include_image)

    def cancel(self, job_id: str, owner: str, outcome: Outcome | None = None) -> JobView:
        """Ask the job to stop (a running one stops within one evaluation); a finished one is left as
        it is. Returns the job as it is now."""
        record = self._owned(job_id, owner)
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            if live.cancel_outcome is None:
                live.cancel_outcome = outcome or Outcome.cancelled("by CancelJob")
            live.stop.set()
            live.ticket.cancel()
            record = live.record
        return self._view(record, include_image=False)

    def jobs(self, owner: str, page_size: int, page_token: str) -> tuple[list[JobView], str]:
        """The owner's jobs, newest first, one page; raises ValueError naming a bad argument."""
        size = page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be at most {MAX_PAGE_SIZE}, got {page_size}")
        after = _read_page_token(page_token)
        with self._lock:
            owned = [r for r in self._records.values() if r.owner == owner]
        owned.sort(key=_newest_first)
        if after is not None:
            owned = [r for r in owned if _newest_first(r) > after]
        page = owned[:size]
        token = _page_token(page[-1]) if len(owned) > size else ""
        return [self._view(record, include_image=False) for record in page], token

    def queued(self) -> int:
        """Jobs waiting for a worker: this server's queue (a fleet's manager: the fleet's)."""
        return self._scheduler.waiting

    def counts(self) -> dict[str, int]:
        """Jobs held, by state name."""
        with self._lock:
            counts = dict.fromkeys((state.value for state in JobState), 0)
            for record in self._records.values():
                counts[record.state.value] += 1
        return counts

    # --- running -----------------------------------------------------------------------------------

    def _enqueue(self, owner: str, memory: int, *, admitted_before: bool = False) -> Ticket:
        try:
            return self._scheduler.enqueue(owner, memory, admitted_before=admitted_before)
        except ClientLimit as err:
            raise Refused(
                Outcome.refused(
                    f"this client already has {err.limit} job(s) running or queued, the most the server "
                    f"allows one client (max_jobs_per_client = {err.limit}); retry when one has finished"
                )
            ) from None
        except QueueFull:
            raise Refused(
                Outcome.refused(
                    f"the server is busy: {self._scheduler.concurrency} job(s) running and "
                    f"{self._scheduler.queue_size} waiting, the most it queues; retry later"
                )
            ) from None
        except SchedulerClosed:
            raise Refused(Outcome.refused("the server is shutting down", Status.UNAVAILABLE)) from None

    def _start(self, live: _LiveJob, engine: EngineLike) -> None:
        threading.Thread(
            target=self._run, args=(live, engine), name=f"stylize-job-{live.record.id[:12]}", daemon=True
        ).start()

    def _run(self, live: _LiveJob, engine: EngineLike) -> None:
        """The job's thread: wait for a worker slot (publishing the queue position), run, finish."""
        run: JobRun | None = None
        try:
            if self._wait_for_slot(live):
                run = self._execute(live, engine)
        except Exception as err:  # a bug of ours: the job must still end with a status
            logger.exception("job %s: the job manager failed", live.log.id)
            run = JobRun(Outcome.internal(f"internal error: {type(err).__name__}: {err}"))
        finally:
            live.ticket.finish()
            live.ticket.end_call()
            self._finish(live, run)

    def _wait_for_slot(self, live: _LiveJob) -> bool:
        """True once admitted; False when stopped (cancelled, or the server closed) while queued."""
        reported = 0
        while not live.stop.is_set():
            position = live.ticket.position
            if position == 0:
                return True
            if position != reported:
                reported = position
                self._publish(live, pb.StylizeResponse(queued=pb.Queued(position=position)), stored=False)
            try:
                live.ticket.wait(reported, timeout=POLL_SECONDS)
            except SchedulerClosed:
                live.interrupt = True  # the server is draining: it stays queued for the next one
                return False
        return False

    def _execute(self, live: _LiveJob, engine: EngineLike) -> JobRun:
        now = self._clock()
        live.log.started_at = time.monotonic()
        self._update(live, state=JobState.RUNNING, started=live.record.started or now)
        observer = JobObserver(lambda response: self._publish(live, response), live.stop, self._metrics)
        sink = _CheckpointSink(self, live) if self._checkpoints_fit(live) else None
        live.checkpointing = sink is not None
        if live.interrupt and sink is None:
            live.stop.set()  # a drain began as it started
        return run_job(
            engine,
            live.job,
            observer,
            live.log,
            max_pixels=self.settings.max_pixels,
            memory_capacity=self._scheduler.memory_capacity,
            checkpoints=sink,
            resume=live.resume,
        )

    def _publish(self, live: _LiveJob, response: pb.StylizeResponse, *, stored: bool = True) -> None:
        """Number the event, store it (Queued events are not stored and carry 0) and hand it to the
        watchers."""
        with live.cond:
            if stored:
                live.last_sequence += 1
                response.sequence = live.last_sequence
                kind = response.WhichOneof("event")
                if kind == "progress":
                    live.last_progress = response.progress
                self._store_event(
                    live,
                    StoredEvent(response.sequence, response.SerializeToString(), is_frame=kind == "frame"),
                    durable=kind == "result",
                )
            for subscription in live.subscribers:
                subscription.put(response)

    def _store_event(self, live: _LiveJob, event: StoredEvent, *, durable: bool) -> None:
        try:
            self._store.append(live.record.id, event, durable=durable)
        except OSError as err:
            if not live.store_failed:
                live.store_failed = True
                logger.warning(
                    "job %s: its events cannot be stored (%s); watchers still get them live",
                    live.log.id,
                    err.strerror or err,
                )

    def _finish(self, live: _LiveJob, run: JobRun | None) -> None:
        """Record how the job ended (or, interrupted by a drain, leave it unfinished), tell its watchers
        and write its log line."""
        if run is not None and run.result is not None:
            self._publish(live, pb.StylizeResponse(result=run.result))
        if run is None:
            outcome = live.cancel_outcome or Outcome.cancelled("while queued")
        elif run.outcome.label == "cancelled" and live.cancel_outcome is not None:
            outcome = live.cancel_outcome  # why it was asked to stop, e.g. its Stylize call's deadline
        else:
            outcome = run.outcome
        drained = live.interrupt and live.cancel_outcome is None and outcome.label == "cancelled"
        if drained and not live.record.bound_to_call:
            self._update(live, state=JobState.QUEUED)  # unfinished, for the next server to resume
            outcome = Outcome.cancelled("by the server's shutdown, to be resumed")
            end = JobEnd(
                Outcome.refused(
                    "the server is shutting down; the job resumes when it is back", Status.UNAVAILABLE
                )
            )
        else:
            if drained:  # a Stylize call's job, queued when the server began to shut down
                outcome = Outcome.refused(
                    "the server is shutting down", Status.UNAVAILABLE, when="while queued"
                )
            self._update(
                live,
                state=_final_state(outcome),
                ended=self._clock(),
                error_code="" if outcome.label == "ok" else outcome.code.name,
                error_message="" if outcome.label == "ok" else outcome.message or outcome.text,
            )
            with contextlib.suppress(OSError):
                self._store.drop_checkpoint(live.record.id)
            end = JobEnd(outcome)
        with live.cond:
            for subscription in live.subscribers:
                subscription.put(end)
        with self._lock:
            self._live.pop(live.record.id, None)
        iterations = run.iterations if run is not None else 0
        evaluations = run.evaluations if run is not None else 0
        live.log.finish(outcome, iterations, evaluations)

    def _update(self, live: _LiveJob, **changes: object) -> None:
        record = live.record.with_changes(**changes)
        with live.cond:
            live.record = record
        with self._lock:
            self._records[record.id] = record
        try:
            self._store.save(record)
        except OSError as err:
            _store_warnings_log(f"job {live.log.id}: its record cannot be saved", err)

    # --- resume ------------------------------------------------------------------------------------

    def _resume(self, engine: EngineLike, record: JobRecord) -> None:
        """Queue an unfinished job of the store again, from its checkpoint when it has one."""
        log = JobLog(
            id=record.id[:12], metrics=self._metrics, deadline_passed=lambda: False, client=record.owner
        )
        if record.bound_to_call:  # its caller went away with the old server
            self._end_stored(record, Outcome.cancelled("with its Stylize call, when the server stopped"), log)
            return
        try:
            request = pb.StylizeRequest.FromString(self._store.request(record.id))
            job = accept(
                request,
                engine,
                record.id,
                max_pixels=self.settings.max_pixels,
                memory_capacity=self._scheduler.memory_capacity,
            )
            ticket = self._enqueue(record.owner, job.plan.memory.peak_bytes, admitted_before=True)
        except Refused as refused:
            self._end_stored(record, refused.outcome, log)
            return
        except (OSError, KeyError, ValueError) as err:
            self._end_stored(record, Outcome.internal(f"the job's request cannot be read: {err}"), log)
            return
        resume = None
        try:
            data = self._store.checkpoint(record.id)
            if data is not None:
                resume = Checkpoint.from_bytes(data)
        except (OSError, CheckpointError) as err:
            logger.warning("job %s: its checkpoint cannot be read (%s); it starts again", log.id, err)
        record = record.with_changes(state=JobState.QUEUED, resumes=record.resumes + (resume is not None))
        live = _LiveJob(record, job, ticket, log, resume=resume)
        # Sequences go on after every stored event; the last Progress is all that is read back.
        live.last_sequence = self._store.last_sequence(record.id)
        for event in reversed(self._store.events(record.id, frames=False)):
            response = _response(event)
            if response.WhichOneof("event") == "progress":
                live.last_progress = response.progress
                break
        with self._lock:
            self._records[record.id] = record
            self._live[record.id] = live
        self._update(live)
        if resume is not None:
            self.jobs_resumed += 1
            self._metrics.job_resumed()
        logger.info(
            "job %s: %s", log.id, "resumed from its checkpoint" if resume is not None else "queued again"
        )
        self._start(live, engine)

    def _end_stored(self, record: JobRecord, outcome: Outcome, log: JobLog) -> None:
        final = record.with_changes(
            state=JobState.CANCELLED if outcome.label == "cancelled" else JobState.FAILED,
            ended=self._clock(),
            error_code=outcome.code.name,
            error_message=outcome.message or outcome.text,
        )
        with self._lock:
            self._records[record.id] = final
        try:
            self._store.save(final)
            self._store.drop_checkpoint(record.id)
        except OSError as err:
            _store_warnings_log(f"job {log.id}: its record cannot be saved", err)
        log.finish(outcome)

    # --- checkpoints -------------------------------------------------------------------------------

    def _checkpoints_fit(self, live: _LiveJob) -> bool:
        """Whether the job checkpoints: they are on, and the copy of L-BFGS-B's state that a checkpoint
        takes (as large as the state) fits in the memory for jobs beside the job's own planned peak."""
        if self.settings.checkpoint_seconds <= 0:
            return False
        capacity = self._scheduler.memory_capacity
        plan = live.job.plan
        needed = plan.memory.peak_bytes + _largest_checkpoint(plan)
        if capacity is None or needed <= capacity:
            return True
        logger.info(
            "job %s: no checkpoints: one needs %d MB beside the job's %d MB, over the %d MB for jobs",
            live.log.id,
            megabytes(_largest_checkpoint(plan)),
            megabytes(plan.memory.peak_bytes),
            megabytes(capacity),
        )
        return False

    def _save_checkpoint(self, live: _LiveJob, checkpoint: Checkpoint) -> bool:
        started = time.perf_counter()
        try:
            self._store.put_checkpoint(live.record.id, checkpoint.write)
        except OSError as err:
            logger.warning(
                "job %s: checkpoint not saved (%s); the job goes on without it",
                live.log.id,
                err.strerror or err,
            )
            return False
        seconds = time.perf_counter() - started
        self.checkpoints_written += 1
        self.checkpoint_seconds += seconds
        self._metrics.checkpoint_written(seconds)
        if live.interrupt:
            live.stop.set()  # the drain's checkpoint: stop now, the next server resumes from here
        return True

    # --- the store's room --------------------------------------------------------------------------

    def _make_room(self, needed: int) -> None:
        """Evict the oldest finished jobs until `needed` more bytes fit; raises Refused naming the store.
        Lock held."""
        capacity = self._store.capacity_bytes
        finished = sorted(
            (r for r in self._records.values() if r.state.final), key=lambda r: r.ended or r.created
        )
        while self._accounted_bytes() + needed > capacity:
            if not finished:
                raise Refused(
                    Outcome.refused(
                        f"the job store is full: the unfinished jobs hold {megabytes(self._accounted_bytes())} "
                        f"MB of its {megabytes(capacity)} MB (--store-mb) and this job needs "
                        f"{megabytes(needed)} MB; retry when a job has finished"
                    )
                )
            self._delete(finished.pop(0).id, "to make room in the store")

    def _accounted_bytes(self) -> int:
        """What the jobs hold or may still write: a finished job its bytes, an unfinished one at least
        what it reserved. Lock held."""
        total = 0
        for record in self._records.values():
            held = self._store.job_bytes(record.id)
            total += held if record.state.final else max(held, record.reserved_bytes)
        return total

    def _delete(self, job_id: str, why: str) -> None:
        try:
            self._store.delete(job_id)
        except OSError as err:
            _store_warnings_log(f"job {job_id[:12]} cannot be deleted", err)
            return
        self._records.pop(job_id, None)
        logger.info("job %s deleted %s", job_id[:12], why)

    def _reap_forever(self) -> None:
        interval = min(60.0, max(0.5, self.settings.result_ttl_seconds / 10))
        while not self._closed.wait(interval):
            self.reap()

    def reap(self) -> None:
        """Delete the finished jobs whose time to live has passed."""
        cutoff = self._clock() - self.settings.result_ttl_seconds
        with self._lock:
            expired = [r.id for r in self._records.values() if r.state.final and (r.ended or 0) <= cutoff]
            for job_id in expired:
                self._delete(job_id, "after its time to live (--result-ttl-seconds)")

    # --- views -------------------------------------------------------------------------------------

    def _owned(self, job_id: str, owner: str) -> JobRecord:
        if not is_job_id(job_id):
            raise ValueError(f"id must be 32 lowercase hex digits, got {job_id[:40]!r}")
        with self._lock:
            record = self._records.get(job_id)
        if record is None or record.owner != owner:
            raise JobNotFound(job_id)
        return record

    def _view(self, record: JobRecord, *, include_image: bool = True) -> JobView:
        with self._lock:
            live = self._live.get(record.id)
        if live is not None:
            with live.cond:
                if not live.record.state.final:
                    return JobView(
                        live.record,
                        live.ticket.position if live.record.state is JobState.QUEUED else 0,
                        live.last_progress,
                        None,
                        live.last_sequence,
                    )
                # Its thread is finishing it: its Result is in the store already (stored before its end).
                record = live.record
        progress = result = None
        for event in reversed(self._store.events(record.id, frames=False)):  # frames are not shown
            response = _response(event)
            kind = response.WhichOneof("event")
            if kind == "result" and result is None:
                result = response.result
                if not include_image:
                    result.ClearField("image")
            elif kind == "progress":
                progress = response.progress
                break
        return JobView(record, 0, progress, result, self._store.last_sequence(record.id))

    def _replay_finished(self, job_id: str, after: int) -> Iterator[FeedItem]:
        with self._lock:
            record = self._records.get(job_id)
        for event in self._store.events(job_id, after):
            yield _response(event)
        if record is None:  # deleted meanwhile
            yield JobEnd(Outcome.refused("the job was deleted", Status.NOT_FOUND))
            return
        if record.state is JobState.SUCCEEDED:
            yield JobEnd(Outcome.ok())
            return
        yield JobEnd(_stored_outcome(record))


class _CheckpointSink:
    """The engine's checkpoint seam for one job: due every checkpoint_seconds, or at once when the
    server drains."""

    def __init__(self, manager: JobManager, live: _LiveJob) -> None:
        self._manager = manager
        self._live = live
        self._last = time.monotonic()

    def due(self) -> bool:
        if self._live.interrupt:
            return True
        return time.monotonic() - self._last >= self._manager.settings.checkpoint_seconds

    def save(self, checkpoint: Checkpoint) -> None:
        self._manager._save_checkpoint(self._live, checkpoint)
        self._last = time.monotonic()


def _predicted_store_bytes(job: AcceptedJob, retention: FrameRetention) -> int:
    """What the job may write to the store: its largest stage's checkpoint, its Progress events, its
    frames (within the retention bound) and its Result (an uncompressed image, at most)."""
    plan: JobPlan = job.plan
    checkpoint = _largest_checkpoint(plan)
    out_w, out_h = plan.output_size
    progress = PROGRESS_EVENT_BYTES * (job.options.settings.iterations + len(plan.stages))
    frames = 0
    if job.options.settings.frame_every:
        assert plan.frame_size is not None  # planned for every job that has frames
        frame_w, frame_h = plan.frame_size
        count = min(job.options.settings.iterations // job.options.settings.frame_every, retention.count)
        frames = min(count * frame_w * frame_h * 3, retention.nbytes)
    return checkpoint + progress + frames + out_w * out_h * 3


def _largest_checkpoint(plan: JobPlan) -> int:
    """The bytes of the job's largest checkpoint (its largest stage's, with L-BFGS-B's state)."""
    return max(
        (
            checkpoint_bytes(stage.width, stage.height, history)
            for stage, history in zip(plan.stages, plan.memory.histories, strict=True)
        ),
        default=0,
    )


def _final_state(outcome: Outcome) -> JobState:
    if outcome.label == "ok":
        return JobState.SUCCEEDED
    if outcome.label in ("cancelled", "deadline"):
        return JobState.CANCELLED
    return JobState.FAILED


def _response(event: StoredEvent) -> pb.StylizeResponse:
    return pb.StylizeResponse.FromString(event.data)


def _stored_outcome(record: JobRecord) -> Outcome:
    code = Status[record.error_code] if record.error_code in Status.__members__ else Status.INTERNAL
    label = "cancelled" if record.state is JobState.CANCELLED else "error"
    return Outcome(label, code, record.error_message, record.error_message)


def _newest_first(record: JobRecord) -> tuple[float, str]:
    return (-record.created, record.id)


def _page_token(record: JobRecord) -> str:
    return base64.urlsafe_b64encode(f"{record.created!r}/{record.id}".encode()).decode()


def _read_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("/")
        if not is_job_id(job_id):
            raise ValueError
        return (-float(created), job_id)
    except ValueError:
        raise ValueError("page_token is not one this server gave") from None


def _store_warnings_log(what: str, err: OSError) -> None:
    held_back = _store_warnings.admit(what)
    if held_back is not None:
        logger.warning("%s: %s", what, err.strerror or err)
