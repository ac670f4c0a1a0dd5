"""The embedded job store: one directory (--state-dir), one sub-directory per job.

    STATE_DIR/FORMAT                 {"format": "stylize-job-store", "version": 1}
    STATE_DIR/LOCK                   held (flock) by the one server that uses the directory
    STATE_DIR/jobs/ID/record.json    records.JobRecord
    STATE_DIR/jobs/ID/request.binpb  the StylizeRequest
    STATE_DIR/jobs/ID/events.log     every retained non-frame event, appended
    STATE_DIR/jobs/ID/frames/SEQ     one file per retained frame
    STATE_DIR/jobs/ID/checkpoint     the latest checkpoint

Whole files are written atomically: a temporary file, fsync, rename, then fsync of the directory, so a
crash leaves the old content or the new, never a torn one. A job is created as a temporary directory that
is renamed into place. The events log is appended to, each entry framed with its length and a CRC-32: a
crash in the middle of an append leaves a torn last entry, which every reader stops before and the next
open cuts off. A record or log that cannot be read is logged and its job skipped; it never stops the
server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from stylize_service.server.jobs.records import JobRecord, is_job_id
from stylize_service.server.jobs.store import FrameRetention, StoredEvent, StoreError

logger = logging.getLogger("stylize.server")

FORMAT_NAME = "stylize-job-store"
FORMAT_VERSION = 1
_ENTRY = struct.Struct("<IIQ")  # payload length, CRC-32 of sequence and payload, sequence


class DirectoryStore:
    kind = "directory"

    def __init__(
        self, path: str | Path, capacity_bytes: int, retention: FrameRetention | None = None
    ) -> None:
        """Open (creating it if needed) and lock the directory. Raises StoreError: not writable, another
        server's, or of a format version this server does not know."""
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.retention = retention or FrameRetention()
        self._lock = threading.Lock()
        self._sizes: dict[str, dict[str, int]] = {}  # job -> file name -> bytes
        self._frames: dict[
            str, deque[tuple[int, int]]
        ] = {}  # job -> retained (sequence, bytes), oldest first
        self._jobs = self.path / "jobs"
        try:
            self._jobs.mkdir(parents=True, exist_ok=True)
            self._lock_file: IO[bytes] | None = open(self.path / "LOCK", "a+b")  # noqa: SIM115 - held open
        except OSError as err:
            raise StoreError(f"cannot use {self.path}: {err.strerror or err}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise StoreError(f"{self.path} is in use by another stylize server") from None
        try:
            self._check_format()
            _probe_writable(self.path)
        except StoreError:
            self.close()
            raise

    # --- the directory as a whole ------------------------------------------------------------------

    def _check_format(self) -> None:
        marker = self.path / "FORMAT"
        try:
            data = json.loads(marker.read_text())
        except FileNotFoundError:
            if any(self._jobs.iterdir()):
                raise StoreError(
                    f"{self.path} holds jobs but no FORMAT file: not a stylize state dir"
                ) from None
            try:
                _write_atomic(marker, json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}).encode())
            except OSError as err:
                raise StoreError(f"cannot write to {self.path}: {err.strerror or err}") from None
            return
        except (OSError, ValueError) as err:
            raise StoreError(f"{marker} cannot be read: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path} is not a stylize state dir ({marker} says {data!r})")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.path} is in job-store format version {version!r}; this server reads version "
                f"{FORMAT_VERSION} only (a newer server wrote it?): use another --state-dir"
            )

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def used_bytes(self) -> int:
        with self._lock:
            return sum(sum(files.values()) for files in self._sizes.values())

    def job_bytes(self, job_id: str) -> int:
        with self._lock:
            return sum(self._sizes.get(job_id, {}).values())

    def records(self) -> Sequence[JobRecord]:
        found = []
        for entry in sorted(self._jobs.iterdir()):
            if entry.name.startswith("."):  # a creation that a crash interrupted
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not is_job_id(entry.name):
                logger.warning("job store: %s is not a job; skipped", entry)
                continue
            try:
                record = JobRecord.from_json(json.loads((entry / "record.json").read_text()))
                if record.id != entry.name:
                    raise ValueError(f"its record names job {record.id}")
                self._load_sizes(entry)
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.warning("job store: job %s cannot be read (%s); skipped", entry.name, err)
                continue
            found.append(record)
        return found

    def _load_sizes(self, job_dir: Path) -> None:
        """Count the job's bytes and frames, and cut a torn last entry off its events log."""
        job_id = job_dir.name
        log = job_dir / "events.log"
        if log.exists():
            valid = _valid_length(log.read_bytes())
            if valid != log.stat().st_size:
                logger.warning("job store: job %s: a torn last event was cut off its log", job_id)
                os.truncate(log, valid)
        sizes = {p.name: p.stat().st_size for p in job_dir.iterdir() if p.is_file()}
        frames: deque[tuple[int, int]] = deque()
        frame_dir = job_dir / "frames"
        if frame_dir.is_dir():
            for p in sorted(frame_dir.iterdir()):
                if p.name.isdigit():
                    frames.append((int(p.name), p.stat().st_size))
                    sizes[f"frames/{p.name}"] = p.stat().st_size
                else:  # a temporary file of a write that a crash interrupted
                    p.unlink(missing_ok=True)
        with self._lock:
            self._sizes[job_id] = sizes
            self._frames[job_id] = frames

    # --- one job -----------------------------------------------------------------------------------

    def create(self, record: JobRecord, request: bytes) -> None:
        staging = self._jobs / f".new-{record.id}"
        staging.mkdir()
        try:
            _write_atomic(staging / "request.binpb", request, sync_dir=False)
            record_bytes = _record_bytes(record)
            _write_atomic(staging / "record.json", record_bytes, sync_dir=False)
            os.rename(staging, self._jobs / record.id)
            _fsync_dir(self._jobs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._lock:
            self._sizes[record.id] = {"request.binpb": len(request), "record.json": len(record_bytes)}
            self._frames[record.id] = deque()

    def save(self, record: JobRecord) -> None:
        data = _record_bytes(record)
        _write_atomic(self._dir(record.id) / "record.json", data)
        self._set_size(record.id, "record.json", len(data))

    def request(self, job_id: str) -> bytes:
        try:
            return (self._dir(job_id) / "request.binpb").read_bytes()
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def append(self, job_id: str, event: StoredEvent, *, durable: bool = False) -> None:
        job_dir = self._dir(job_id)
        if event.is_frame:
            self._append_frame(job_id, job_dir, event)
            return
        header = _ENTRY.pack(len(event.data), _crc(event.sequence, event.data), event.sequence)
        with open(job_dir / "events.log", "ab") as log:
            log.write(header + event.data)
            if durable:
                log.flush()
                os.fsync(log.fileno())
            size = log.tell()
        self._set_size(job_id, "events.log", size)

    def _append_frame(self, job_id: str, job_dir: Path, event: StoredEvent) -> None:
        frame_dir = job_dir / "frames"
        frame_dir.mkdir(exist_ok=True)
        _write_atomic(frame_dir / f"{event.sequence:020d}", event.data, sync=False)
        with self._lock:
            frames = self._frames.setdefault(job_id, deque())
            frames.append((event.sequence, len(event.data)))
            self._sizes.setdefault(job_id, {})[f"frames/{event.sequence:020d}"] = len(event.data)
            dropped = []
            # The newest frame stays whatever its size; older ones go past either bound.
            while len(frames) > 1 and (
                len(frames) > self.retention.count or sum(size for _, size in frames) > self.retention.nbytes
            ):
                sequence, _ = frames.popleft()
                self._sizes[job_id].pop(f"frames/{sequence:020d}", None)
                dropped.append(sequence)
        for sequence in dropped:
            (frame_dir / f"{sequence:020d}").unlink(missing_ok=True)

    def events(self, job_id: str, after: int = 0, *, frames: bool = True) -> list[StoredEvent]:
        job_dir = self._dir(job_id)
        found = [event for event in _read_log(job_dir / "events.log") if event.sequence > after]
        if not frames:
            return found
        with self._lock:
            frame_sequences = [s for s, _ in self._frames.get(job_id, ()) if s > after]
        for sequence in frame_sequences:
            try:
                data = (job_dir / "frames" / f"{sequence:020d}").read_bytes()
            except FileNotFoundError:  # dropped since: past the retention bound
                continue
            found.append(StoredEvent(sequence, data, is_frame=True))
        found.sort(key=lambda event: event.sequence)
        return found

    def last_sequence(self, job_id: str) -> int:
        logged = _read_log(self._dir(job_id) / "events.log")
        with self._lock:
            frames = self._frames.get(job_id, ())
            newest_frame = frames[-1][0] if frames else 0
        return max(logged[-1].sequence if logged else 0, newest_frame)

    def put_checkpoint(self, job_id: str, write: Callable[[IO[bytes]], None]) -> None:
        job_dir = self._dir(job_id)
        log = job_dir / "events.log"
        if log.exists():  # what the checkpoint continues from is on disk before it
            with open(log, "ab") as handle:
                os.fsync(handle.fileno())
        size = _write_atomic(job_dir / "checkpoint", write)
        self._set_size(job_id, "checkpoint", size)

    def checkpoint(self, job_id: str) -> bytes | None:
        try:
            return (self._dir(job_id) / "checkpoint").read_bytes()
        except FileNotFoundError:
            return None

    def drop_checkpoint(self, job_id: str) -> None:
        (self._dir(job_id) / "checkpoint").unlink(missing_ok=True)
        with self._lock:
            self._sizes.get(job_id, {}).pop("checkpoint", None)

    def delete(self, job_id: str) -> None:
        job_dir = self._dir(job_id)
        if job_dir.exists():
            # Renamed away first, so that a crash half-way leaves a temporary directory (removed at the
            # next open), never a job with half its files.
            doomed = self._jobs / f".del-{job_id}"
            os.rename(job_dir, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        with self._lock:
            self._sizes.pop(job_id, None)
            self._frames.pop(job_id, None)

    def _dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise KeyError(job_id)
        return self._jobs / job_id

    def _set_size(self, job_id: str, name: str, size: int) -> None:
        with self._lock:
            self._sizes.setdefault(job_id, {})[name] = size


def _record_bytes(record: JobRecord) -> bytes:
    return json.dumps(record.to_json(), sort_keys=True).encode()


def _crc(sequence: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(sequence.to_bytes(8, "little")))


def _read_log(path: Path) -> list[StoredEvent]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return list(_entries(data))


def _entries(data: bytes) -> Iterator[StoredEvent]:
    """The log's whole, valid entries, in order, up to the first torn or corrupt one."""
    offset = 0
    while offset + _ENTRY.size <= len(data):
        length, crc, sequence = _ENTRY.unpack_from(data, offset)
        start = offset + _ENTRY.size
        payload = data[start : start + length]
        if len(payload) < length or _crc(sequence, payload) != crc:
            return
        yield StoredEvent(sequence, payload)
        offset = start + length


def _valid_length(data: bytes) -> int:
    return sum(_ENTRY.size + len(event.data) for event in _entries(data))


def _write_atomic(
    path: Path, data: bytes | Callable[[IO[bytes]], None], *, sync: bool = True, sync_dir: bool = True
) -> int:
    """Write a whole file (the bytes, or what the callable writes into it) so that a crash leaves the old
    file or the new one, never a torn one; returns its size."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            size = handle.tell()
            if sync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync and sync_dir:
        _fsync_dir(path.parent)
    return size


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; nothing to do there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _probe_writable(path: Path) -> None:
    try:
        _write_atomic(path / ".probe", b"", sync=False)
        (path / ".probe").unlink()
    except OSError as err:
        raise StoreError(f"cannot write to {path}: {err.strerror or err}") from None
