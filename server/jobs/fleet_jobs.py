"""The job manager of a replica in a fleet that shares one Redis (--store-url): any replica serves any job.

- submit admits the job here (validation, the memory plan, room in the store), stores it and appends it
  to the fleet's queue (fleet_queue.py), within the client's bound and the queue's, counted across the
  fleet; it does not run it here unless this replica claims it;
- each replica runs `concurrency` workers; a free worker claims the head of the fleet's queue when its
  planned peak fits the memory this replica has free, and with it the job's lease (leases.py);
- the replica renews the lease of each job it runs, checks it at every event and before every checkpoint,
  and stops a job whose lease it lost at once, writing nothing more of it (its writes are fenced by the
  lease's token in Redis as well);
- any replica puts a job whose lease lapsed back at the front of the queue (takeover), and the replica
  that claims it resumes it from its last checkpoint;
- WatchJob, GetJob, CancelJob and ListJobs read the store, so they work through any replica; a cancel is
  a flag in Redis that the running replica checks several times a second;
- a store that cannot be reached refuses submits (UNAVAILABLE, naming the store) and reports through
  on_store_health; running jobs go on until their lease runs out, then stop, to be resumed by whoever
  claims them once the store is back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.admission import AcceptedJob, EngineLike, Refused, accept
from stylize_service.server.engine.checkpoint import Checkpoint, CheckpointError
from stylize_service.server.job_worker import JobLog, JobRun
from stylize_service.server.jobs.feed import FeedItem, JobEnd
from stylize_service.server.jobs.fleet_queue import (
    CancelRequest,
    Claim,
    ClientBound,
    FleetQueue,
    FleetQueueFull,
)
from stylize_service.server.jobs.leases import Lease, Leases, replica_id
from stylize_service.server.jobs.manager import (
    LOADING,
    POLL_SECONDS,
    JobManager,
    JobNotFound,
    JobSettings,
    _final_state,
    _LiveJob,
    _predicted_store_bytes,
    _response,
    _store_warnings_log,
    _stored_outcome,
)
from stylize_service.server.jobs.records import JobRecord, JobState, is_job_id, new_job_id
from stylize_service.server.jobs.redis_store import (
    SOCKET_TIMEOUT_SECONDS,
    LeaseLost,
    RedisStore,
    StoreUnavailable,
)
from stylize_service.server.jobs.store import StoredEvent
from stylize_service.server.jobs.views import JobView
from stylize_service.server.logsafe import LogThrottle
from stylize_service.server.metrics import ServerMetrics
from stylize_service.server.outcome import Outcome, Status
from stylize_service.server.scheduler import Scheduler, SchedulerClosed

logger = logging.getLogger("stylize.server")

CLAIM_POLL_SECONDS = 0.25  # how often an idle worker looks at the fleet's queue (a local submit wakes it)
MONITOR_SECONDS = 0.2  # how often cancels are looked for (a cancel reaches its job within this)
PING_SECONDS = 1.0  # how often the store's reachability is checked for health
NO_LIMIT = 1 << 62
RETRY_SECONDS = 1.0  # how often a job's end is tried again while the store is out of reach

_unreachable = LogThrottle()


@dataclass
class _FleetJob(_LiveJob):
    lease: Lease | None = None

    @property
    def claim(self) -> Claim:
        assert self.lease is not None
        return self.lease.claim

    def holds(self) -> bool:
        return self.lease is not None and self.lease.holds()


class FleetJobManager(JobManager):
    def __init__(
        self,
        scheduler: Scheduler,
        store: RedisStore,
        settings: JobSettings,
        metrics: ServerMetrics | None = None,
        *,
        lease_seconds: float,
        queue_bound: int,
        clock: Callable[[], float] = time.time,
        replica: str | None = None,
    ) -> None:
        super().__init__(scheduler, store, settings, metrics, clock=clock)
        self.redis = store
        self.replica = replica or replica_id()
        self.queue = FleetQueue(store, self.replica)
        self.leases = Leases(store, lease_seconds)
        self.queue_bound = queue_bound
        self.takeovers = 0
        self.on_store_health: Callable[[bool], None] | None = None
        self.store_reachable = True
        self._claim_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        logger.info("fleet replica %s, job store %s, lease %.0fs", self.replica, store.url, lease_seconds)

    # --- life of the manager -----------------------------------------------------------------------

    def set_engine(self, engine: EngineLike) -> None:
        """The model is loaded: claim jobs from the fleet's queue from now on."""
        self._engine = engine
        for index in range(self._scheduler.concurrency):
            self._threads.append(
                threading.Thread(
                    target=self._work, args=(engine,), name=f"stylize-worker-{index}", daemon=True
                )
            )
        self._threads.append(
            threading.Thread(target=self._monitor, name="stylize-fleet-monitor", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """Claim nothing more; running detached jobs checkpoint at their next iteration and go back to
        the front of the fleet's queue for another replica."""
        self._draining.set()
        self._wake()
        super().drain()

    def close(self) -> None:
        """Stop the workers and the monitor (before the store is closed under them)."""
        self._draining.set()
        self._wake()
        super().close()
        for thread in self._threads:
            thread.join(timeout=SOCKET_TIMEOUT_SECONDS + 1)

    def counts(self) -> dict[str, int]:
        self._refresh()
        return super().counts()

    def queued(self) -> int:
        return self.queue_depth()

    def queue_depth(self) -> int:
        """The fleet's queue (what the HPA scales on); the last known depth when the store is unreachable."""
        with contextlib.suppress(OSError):
            self._depth = self.queue.depth()
        return getattr(self, "_depth", 0)

    # --- the calls ---------------------------------------------------------------------------------

    def submit(
        self,
        request: pb.StylizeRequest,
        owner: str,
        *,
        bound_to_call: bool = False,
        deadline_passed: Callable[[], bool] = lambda: False,
    ) -> JobView:
        job_id = new_job_id()
        log = JobLog(id=job_id[:12], metrics=self._metrics, deadline_passed=deadline_passed, client=owner)
        try:
            engine = self._engine
            if engine is None:
                raise Refused(Outcome.refused(LOADING, Status.UNAVAILABLE))
            if self._draining.is_set():
                raise Refused(Outcome.refused("the server is shutting down", Status.UNAVAILABLE))
            job = accept(
                request,
                engine,
                job_id,
                max_pixels=self.settings.max_pixels,
                memory_capacity=self._scheduler.memory_capacity,
            )
            data = request.SerializeToString()
            reserved = len(data) + _predicted_store_bytes(job, self._store.retention)
            record = JobRecord(
                id=job_id,
                owner=owner,
                state=JobState.QUEUED,
                created=self._clock(),
                bound_to_call=bound_to_call,
                reserved_bytes=reserved,
            )
            position = self._store_and_enqueue(record, data, job, reserved)
        except Refused as refused:
            log.finish(refused.outcome)
            raise
        self._wake()
        return JobView(record, position)

    def _store_and_enqueue(self, record: JobRecord, data: bytes, job: AcceptedJob, reserved: int) -> int:
        try:
            with self._lock:
                self._records = {r.id: r for r in self._store.records()}
                self._make_room(reserved)
                self.redis.create(record, data, peak_bytes=job.plan.memory.peak_bytes, submitter=self.replica)
                self._records[record.id] = record
        except OSError as err:
            _store_warnings_log("cannot store a new job", err)
            raise Refused(Outcome.refused(str(err), Status.UNAVAILABLE)) from None
        client_bound = self._scheduler.max_per_client or NO_LIMIT
        try:
            return self.queue.enqueue(record.id, record.owner, client_bound, self.queue_bound)
        except ClientBound:
            refusal = Outcome.refused(
                f"this client already has {client_bound} job(s) running or queued in the fleet, the most "
                f"the servers allow one client (max_jobs_per_client = {client_bound}); retry when one has "
                "finished"
            )
        except FleetQueueFull:
            refusal = Outcome.refused(
                f"the fleet is busy: {self.queue_bound} job(s) waiting in its queue, the most it queues; "
                "retry later"
            )
        except OSError as err:
            refusal = Outcome.refused(str(err), Status.UNAVAILABLE)
        with contextlib.suppress(OSError):
            self._store.delete(record.id)
        with self._lock:
            self._records.pop(record.id, None)
        raise Refused(refusal)

    def watch(self, job_id: str, owner: str, after: int, wanted: Callable[[], bool]) -> Iterator[FeedItem]:
        """The job's events after `after`, from the store (whichever replica runs the job), ending with a
        JobEnd; Queued events while it waits. Stops early (no JobEnd) once wanted() is False."""
        self._owned(job_id, owner)
        cursor = after
        reported = 0
        try:
            while True:
                events = self.redis.wait_events(job_id, cursor, POLL_SECONDS)
                for event in events:
                    cursor = event.sequence
                    yield _response(event)
                if events:
                    continue
                record = self.redis.record(job_id)
                if record is None:
                    yield JobEnd(Outcome.refused("the job was deleted", Status.NOT_FOUND))
                    return
                if record.state.final:
                    for event in self._store.events(job_id, cursor):
                        yield _response(event)
                    yield JobEnd(
                        Outcome.ok() if record.state is JobState.SUCCEEDED else _stored_outcome(record)
                    )
                    return
                if record.state is JobState.QUEUED:
                    position = self.queue.position(job_id)
                    if position and position != reported:
                        reported = position
                        yield pb.StylizeResponse(queued=pb.Queued(position=position))
                if not wanted():
                    return
        except OSError as err:
            yield JobEnd(Outcome.refused(str(err), Status.UNAVAILABLE))

    def cancel(self, job_id: str, owner: str, outcome: Outcome | None = None) -> JobView:
        """Flag the cancel in the store for the replica that runs the job; a job still in the queue is
        taken out of it and ends here."""
        record = self._owned(job_id, owner)
        if record.state.final:
            return self._view(record, include_image=False)
        outcome = outcome or Outcome.cancelled("by CancelJob")
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            if live.cancel_outcome is None:
                live.cancel_outcome = outcome
            live.stop.set()
        try:
            self.queue.ask_cancel(
                job_id, CancelRequest(outcome.label, outcome.code.name, outcome.text, outcome.message)
            )
            if self.queue.unqueue(job_id, record.owner):
                record = record.with_changes(
                    state=JobState.CANCELLED,
                    ended=self._clock(),
                    error_code=outcome.code.name,
                    error_message=outcome.message or outcome.text,
                )
                self._store.save(record)  # nobody else holds a job that was waiting
                with self._lock:
                    self._records[job_id] = record
                JobLog(job_id[:12], self._metrics, lambda: False, client=owner).finish(
                    Outcome.cancelled("while queued") if outcome.label == "cancelled" else outcome
                )
        except OSError as err:
            raise Refused(Outcome.refused(str(err), Status.UNAVAILABLE)) from None
        return self._view(record, include_image=False)

    def jobs(self, owner: str, page_size: int, page_token: str) -> tuple[list[JobView], str]:
        self._refresh(strict=True)
        return super().jobs(owner, page_size, page_token)

    def reap(self) -> None:
        self._refresh()
        super().reap()

    def _refresh(self, *, strict: bool = False) -> None:
        """The records as the store has them now (a store out of reach keeps the last known, or raises
        Refused when strict)."""
        try:
            records = {r.id: r for r in self._store.records()}
        except OSError as err:
            if strict:
                raise Refused(Outcome.refused(str(err), Status.UNAVAILABLE)) from None
            return
        with self._lock:
            self._records = records

    def _owned(self, job_id: str, owner: str) -> JobRecord:
        if not is_job_id(job_id):
            raise ValueError(f"id must be 32 lowercase hex digits, got {job_id[:40]!r}")
        try:
            record = self.redis.record(job_id)
        except OSError as err:
            raise Refused(Outcome.refused(str(err), Status.UNAVAILABLE)) from None
        if record is None or record.owner != owner:
            raise JobNotFound(job_id)
        with self._lock:
            self._records[job_id] = record
        return record

    def _view(self, record: JobRecord, *, include_image: bool = True) -> JobView:
        try:
            view = super()._view(record, include_image=include_image)
            if view.record.state is JobState.QUEUED and not view.queue_position:
                view = dataclasses.replace(view, queue_position=self.queue.position(record.id))
        except OSError as err:
            raise Refused(Outcome.refused(str(err), Status.UNAVAILABLE)) from None
        return view

    # --- claiming and running ----------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _idle(self, seconds: float) -> None:
        with self._wakeup:
            self._wakeup.wait(seconds)

    def _work(self, engine: EngineLike) -> None:
        """One worker slot: claim the head of the fleet's queue when it fits here, run it, again."""
        while not self._closed.is_set() and not self._draining.is_set():
            try:
                with self._claim_lock:
                    live = self._claim(engine)
            except OSError as err:
                self._report_store(False, err)
                self._idle(1.0)
                continue
            if live is None:
                self._idle(CLAIM_POLL_SECONDS)
                continue
            self._run(live, engine)

    def _free_memory(self) -> int:
        capacity = self._scheduler.memory_capacity
        if capacity is None or self._scheduler.running == 0:
            return NO_LIMIT  # an idle replica takes any job its admission allowed
        return max(0, capacity - self._scheduler.reserved_memory)

    def _claim(self, engine: EngineLike) -> _FleetJob | None:
        if self._scheduler.running >= self._scheduler.concurrency:
            return None
        taken_at = time.monotonic()
        claim = self.queue.claim(self._free_memory(), self.leases.milliseconds)
        if claim is None:
            return None
        lease = Lease(claim, self.leases.seconds, taken_at)
        self.redis.fence(claim.job_id, claim.token, claim.generation)
        try:
            return self._adopt(engine, claim, lease)
        except OSError as err:  # the store went away mid-claim: the lease lapses and the job is taken over
            self.redis.unfence(claim.job_id)
            logger.warning(
                "job %s: claimed, but the store failed (%s); left to its lease", claim.job_id[:12], err
            )
            return None

    def _adopt(self, engine: EngineLike, claim: Claim, lease: Lease) -> _FleetJob | None:
        """The claimed job as a live job of this replica, from its checkpoint when it has one."""
        job_id = claim.job_id
        record = self.redis.record(job_id)
        if record is None:  # deleted meanwhile
            self.queue.release(claim, "", requeue=False)
            self.redis.unfence(job_id)
            return None
        log = JobLog(
            id=job_id[:12], metrics=self._metrics, deadline_passed=lambda: False, client=record.owner
        )
        taken_over = record.state is JobState.RUNNING or record.started is not None
        if record.bound_to_call and taken_over:
            submitter, previous = self.redis.fields(job_id, "submitter", "previous")
            if submitter == previous:  # the replica that held its Stylize call ran it: both are gone
                self._end_claimed(
                    claim, record, Outcome.cancelled("with its Stylize call, when its replica stopped"), log
                )
                return None
        try:
            request = pb.StylizeRequest.FromString(self._store.request(job_id))
            job = accept(
                request,
                engine,
                job_id,
                max_pixels=self.settings.max_pixels,
                memory_capacity=self._scheduler.memory_capacity,
            )
            ticket = self._scheduler.enqueue(record.owner, job.plan.memory.peak_bytes, admitted_before=True)
        except SchedulerClosed:
            self.queue.release(claim, record.owner, requeue=True)
            self.redis.unfence(job_id)
            return None
        except Refused as refused:
            self._end_claimed(claim, record, refused.outcome, log)
            return None
        except (KeyError, ValueError) as err:
            self._end_claimed(
                claim, record, Outcome.internal(f"the job's request cannot be read: {err}"), log
            )
            return None
        resume = None
        try:
            data = self._store.checkpoint(job_id)
            if data is not None:
                resume = Checkpoint.from_bytes(data)
        except CheckpointError as err:
            logger.warning("job %s: its checkpoint cannot be read (%s); it starts again", log.id, err)
        record = record.with_changes(resumes=record.resumes + (resume is not None))
        live = _FleetJob(record, job, ticket, log, resume=resume, lease=lease)
        live.last_sequence = self._store.last_sequence(job_id)
        for event in reversed(self._store.events(job_id, frames=False)):
            response = _response(event)
            if response.WhichOneof("event") == "progress":
                live.last_progress = response.progress
                break
        cancels = self.queue.cancels([job_id])
        if job_id in cancels:
            live.cancel_outcome = _outcome_of(cancels[job_id])
            live.stop.set()
        with self._lock:
            self._records[job_id] = record
            self._live[job_id] = live
        if resume is not None:
            self.jobs_resumed += 1
            self._metrics.job_resumed()
        if taken_over:
            logger.info(
                "job %s: taken over by replica %s (lease generation %d), %s",
                log.id,
                self.replica,
                claim.generation,
                f"resumed from its checkpoint at iteration {resume.iterations_done}"
                if resume is not None
                else "started again (no checkpoint)",
            )
        return live

    def _end_claimed(self, claim: Claim, record: JobRecord, outcome: Outcome, log: JobLog) -> None:
        self._end_stored(record, outcome, log)
        with contextlib.suppress(OSError):
            self.queue.release(claim, record.owner, requeue=False)
        self.redis.unfence(claim.job_id)

    def _finish(self, live: _LiveJob, run: JobRun | None) -> None:
        assert isinstance(live, _FleetJob)
        if run is not None and run.result is not None and live.holds():
            self._publish(live, pb.StylizeResponse(result=run.result))
            # Stored by now (tried again while the lease held), or the lease is lost (below).
        if not live.holds():
            self._lost(live, run)
            return
        if run is None:
            outcome = live.cancel_outcome or Outcome.cancelled("while queued")
        elif run.outcome.label == "cancelled" and live.cancel_outcome is not None:
            outcome = live.cancel_outcome
        else:
            outcome = run.outcome
        drained = live.interrupt and live.cancel_outcome is None and outcome.label == "cancelled"
        requeue = drained and not live.record.bound_to_call
        if requeue:
            self._update(live, state=JobState.QUEUED)
            outcome = Outcome.cancelled("by the server's shutdown, queued again for another replica")
        else:
            if drained:
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
            if live.holds():
                with contextlib.suppress(OSError):
                    self._store.drop_checkpoint(live.record.id)
        if not live.holds():
            self._lost(live, run)
            return
        try:
            if not self.queue.release(live.claim, live.record.owner, requeue=requeue):
                self._lose(live)
        except OSError as err:
            _store_warnings_log(f"job {live.log.id}: its lease cannot be released", err)
        self._forget(live)
        live.log.finish(outcome, run.iterations if run else 0, run.evaluations if run else 0)

    def _lost(self, live: _FleetJob, run: JobRun | None) -> None:
        """The job's lease is gone: another replica may run it now. Nothing more of it is written here."""
        self._forget(live)
        live.log.written = True  # its end is the new owner's to report
        logger.warning(
            "job %s: stopped here after %d iterations: this replica lost its lease (paused, or cut off from "
            "the store, past --lease-seconds); the replica that takes it over resumes it and reports its end",
            live.log.id,
            run.iterations if run is not None else 0,
        )

    def _forget(self, live: _LiveJob) -> None:
        with self._lock:
            self._live.pop(live.record.id, None)
        self.redis.unfence(live.record.id)
        self._wake()

    def _update(self, live: _LiveJob, **changes: object) -> None:
        record = live.record.with_changes(**changes)
        with live.cond:
            live.record = record
        with self._lock:
            self._records[record.id] = record
        if isinstance(live, _FleetJob) and not live.holds():
            live.stop.set()
            return
        # How a job ends (or goes back to the queue) must reach the store: tried again while the lease holds.
        ending = record.state is not JobState.RUNNING
        try:
            self._until_stored(live, lambda: self._store.save(record), retry=ending)
        except LeaseLost:
            self._lose(live)
        except OSError as err:
            _store_warnings_log(f"job {live.log.id}: its record cannot be saved", err)

    def _until_stored(self, live: _LiveJob, write: Callable[[], None], *, retry: bool) -> None:
        """write(); with retry, a store out of reach is tried again every second while the job's lease
        holds (a Redis back within the lease gets the write; past it, the job is another replica's)."""
        while True:
            try:
                write()
                return
            except StoreUnavailable as err:
                if not retry or not isinstance(live, _FleetJob) or not live.holds():
                    raise
                if _unreachable.admit("retry") is not None:
                    logger.warning("job %s: %s; trying again while its lease holds", live.log.id, err)
                time.sleep(RETRY_SECONDS)

    def _store_event(self, live: _LiveJob, event: StoredEvent, *, durable: bool) -> None:
        if isinstance(live, _FleetJob) and not live.holds():  # at every event: stop at once once lost
            live.stop.set()
            return
        try:
            # The Result (durable) must be stored before the job is reported SUCCEEDED.
            self._until_stored(
                live, lambda: self._store.append(live.record.id, event, durable=durable), retry=durable
            )
        except LeaseLost:
            self._lose(live)
        except OSError as err:
            if not live.store_failed:
                live.store_failed = True
                logger.warning("job %s: its events cannot be stored (%s)", live.log.id, err)

    def _save_checkpoint(self, live: _LiveJob, checkpoint: Checkpoint) -> bool:
        if isinstance(live, _FleetJob) and not live.holds():
            live.stop.set()
            return False
        started = time.perf_counter()
        try:
            self._store.put_checkpoint(live.record.id, checkpoint.write)
        except LeaseLost:
            self._lose(live)
            return False
        except OSError as err:
            logger.warning("job %s: checkpoint not saved (%s); the job goes on without it", live.log.id, err)
            return False
        seconds = time.perf_counter() - started
        self.checkpoints_written += 1
        self.checkpoint_seconds += seconds
        self._metrics.checkpoint_written(seconds)
        if live.interrupt:
            live.stop.set()
        return True

    def _lose(self, live: _LiveJob) -> None:
        if isinstance(live, _FleetJob) and live.lease is not None:
            live.lease.lose()
        live.stop.set()

    # --- leases, cancels, takeover, health ---------------------------------------------------------

    def _monitor(self) -> None:
        """Renew this replica's leases, pass on cancels, take over lapsed jobs, watch the store."""
        last_takeover = last_ping = 0.0
        takeover_every = max(MONITOR_SECONDS, self.leases.seconds / 10)
        while not self._closed.wait(MONITOR_SECONDS):
            with self._lock:
                running = [live for live in self._live.values() if isinstance(live, _FleetJob)]
            try:
                now = time.monotonic()
                for live in running:
                    assert live.lease is not None
                    if now - live.lease.renewed_at >= self.leases.seconds / 3 and not self.leases.renew(
                        live.lease
                    ):
                        live.stop.set()
                for job_id, request in self.queue.cancels([live.record.id for live in running]).items():
                    for live in running:
                        if live.record.id == job_id and not live.stop.is_set():
                            live.cancel_outcome = live.cancel_outcome or _outcome_of(request)
                            live.stop.set()
                if now - last_takeover >= takeover_every and not self._draining.is_set():
                    last_takeover = now
                    for job_id in self.queue.takeover():
                        self.takeovers += 1
                        logger.info(
                            "job %s: the lease of the replica that ran it lapsed; queued again at the front, "
                            "to resume from its last checkpoint",
                            job_id[:12],
                        )
                        self._wake()
                if now - last_ping >= PING_SECONDS:
                    last_ping = now
                    self.redis.client.ping()
                self._report_store(True)
            except OSError as err:
                self._report_store(False, err)
            for live in running:
                if not live.holds():
                    live.stop.set()

    def _report_store(self, reachable: bool, err: OSError | None = None) -> None:
        if reachable != self.store_reachable:
            self.store_reachable = reachable
            if reachable:
                logger.info("the job store %s is reachable again", self.redis.url)
            else:
                logger.error("%s; health NOT_SERVING until it is back", err)
            if self.on_store_health is not None:
                self.on_store_health(reachable)
        elif not reachable and err is not None and _unreachable.admit("store") is not None:
            logger.warning("%s", err)


def _outcome_of(request: CancelRequest) -> Outcome:
    code = Status[request.code] if request.code in Status.__members__ else Status.CANCELLED
    return Outcome(request.label, code, request.text, request.message)
