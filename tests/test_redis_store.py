"""The fleet job store (server/jobs/redis_store.py) against a real redis-server: the JobStore operations,
frame retention, fencing by lease, the URL's password never shown, and an unreachable Redis."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from stylize_service.server.app import open_store
from stylize_service.server.config import ConfigError, ServerConfig, load_config
from stylize_service.server.jobs.records import JobRecord, JobState, new_job_id
from stylize_service.server.jobs.redis_store import (
    LeaseLost,
    RedisStore,
    StoreUnavailable,
    key,
    redacted_url,
)
from stylize_service.server.jobs.store import FrameRetention, StoredEvent, StoreError
from tests.redis_server import free_port, redis_server

MB = 1024 * 1024


def _record(**changes: object) -> JobRecord:
    return JobRecord(id=new_job_id(), owner="client-a", state=JobState.QUEUED, created=1.5).with_changes(
        **changes
    )


def test_a_job_round_trips_through_redis(redis_url: str) -> None:
    store = RedisStore(redis_url, 64 * MB)
    record = _record()
    store.create(record, b"request-bytes")
    assert store.records() == [record]
    assert store.request(record.id) == b"request-bytes"
    running = record.with_changes(state=JobState.RUNNING, started=2.0)
    store.save(running)
    assert store.record(record.id) == running
    store.append(record.id, StoredEvent(1, b"progress-1"))
    store.append(record.id, StoredEvent(2, b"frame-2", is_frame=True))
    store.append(record.id, StoredEvent(3, b"result-3"), durable=True)
    assert [e.sequence for e in store.events(record.id)] == [1, 2, 3]
    assert [e.is_frame for e in store.events(record.id)] == [False, True, False]
    assert [e.data for e in store.events(record.id, after=1)] == [b"frame-2", b"result-3"]
    assert [e.sequence for e in store.events(record.id, frames=False)] == [1, 3]
    assert store.last_sequence(record.id) == 3
    store.put_checkpoint(record.id, lambda f: f.write(b"state" * 10))
    assert store.checkpoint(record.id) == b"state" * 10
    assert store.job_bytes(record.id) == store.used_bytes() > 50
    store.drop_checkpoint(record.id)
    assert store.checkpoint(record.id) is None
    store.delete(record.id)
    assert store.records() == []
    assert store.used_bytes() == 0
    with pytest.raises(KeyError):
        store.request(record.id)


def test_frames_are_kept_within_the_retention_bounds(redis_url: str) -> None:
    store = RedisStore(redis_url, 64 * MB, FrameRetention(count=3, nbytes=100))
    record = _record()
    store.create(record, b"r")
    for sequence in range(1, 7):
        store.append(record.id, StoredEvent(sequence, b"f" * 10, is_frame=True))
    assert [e.sequence for e in store.events(record.id)] == [4, 5, 6]
    store.append(record.id, StoredEvent(7, b"F" * 500, is_frame=True))  # over the bytes: only the newest
    assert [e.sequence for e in store.events(record.id)] == [7]
    assert store.job_bytes(record.id) == len(record.id) * 0 + store.job_bytes(record.id)
    assert store.last_sequence(record.id) == 7


def test_waiting_for_events_blocks_until_one_comes(redis_url: str) -> None:
    store = RedisStore(redis_url, 64 * MB)
    record = _record()
    store.create(record, b"r")
    assert store.wait_events(record.id, 0, timeout=0.05) == []
    store.append(record.id, StoredEvent(1, b"a"))
    store.append(record.id, StoredEvent(2, b"b", is_frame=True))
    assert [e.sequence for e in store.wait_events(record.id, 0, timeout=1)] == [1, 2]
    assert [e.sequence for e in store.wait_events(record.id, 1, timeout=1)] == [2]


def test_a_fenced_write_needs_the_lease(redis_url: str) -> None:
    store = RedisStore(redis_url, 64 * MB)
    record = _record()
    store.create(record, b"r")
    store.client.set(key("lease", record.id), "replica-a:1", px=60_000)
    store.fence(record.id, "replica-a:1", 1)
    store.append(record.id, StoredEvent(1, b"mine"))
    store.client.set(key("lease", record.id), "replica-b:2", px=60_000)  # another replica took it over
    with pytest.raises(LeaseLost):
        store.append(record.id, StoredEvent(2, b"stale"))
    with pytest.raises(LeaseLost):
        store.save(record.with_changes(state=JobState.SUCCEEDED))
    with pytest.raises(LeaseLost):
        store.put_checkpoint(record.id, lambda f: f.write(b"stale"))
    assert [e.data for e in store.events(record.id)] == [b"mine"]
    assert store.record(record.id) == record
    assert store.checkpoint(record.id) is None
    assert store.writers(record.id) == [(1, 1)]


def test_the_password_never_shows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert redacted_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted_url("rediss://user:s3cret@host/2") == "rediss://user:***@host/2"
    assert redacted_url("redis://host:6379/0") == "redis://host:6379/0"
    with redis_server(tmp_path, password="s3cret-pass") as server, caplog.at_level(logging.INFO):
        assert RedisStore(server.url, 64 * MB).ping()
        wrong = server.url.replace("s3cret-pass", "wrong-pass")
        with pytest.raises(ConfigError) as refused:
            open_store(ServerConfig(store_url=wrong))
        assert "wrong-pass" not in str(refused.value)
        assert "***" in str(refused.value)
        open_store(ServerConfig(store_url=server.url)).close()
    assert "s3cret-pass" not in caplog.text
    assert "redis://:***@127.0.0.1" in caplog.text


def test_an_unreachable_store_is_named(tmp_path: Path) -> None:
    url = f"redis://:pw-never-shown@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as refused:
        open_store(ServerConfig(store_url=url))
    assert "--store-url (STYLIZE_STORE_URL)" in str(refused.value)
    assert "unreachable" in str(refused.value)
    assert "pw-never-shown" not in str(refused.value)
    with redis_server(tmp_path) as server:
        store = RedisStore(server.url, 64 * MB)
        server.stop()
    with pytest.raises(StoreUnavailable, match=r"the job store redis://127\.0\.0\.1:\d+/0 is unreachable"):
        store.create(_record(), b"r")
    assert not store.ping()


def test_the_flags() -> None:
    config = load_config(["--store-url", "rediss://:pw@redis:6380/1", "--lease-seconds", "12"], environ={})
    assert config.store_url == "rediss://:pw@redis:6380/1"
    assert config.lease_seconds == 12
    assert load_config([], environ={"STYLIZE_STORE_URL": "redis://r:6379/0"}).store_url == "redis://r:6379/0"
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        load_config(["--store-url", "http://r"], environ={})
    with pytest.raises(ConfigError, match="--lease-seconds"):
        load_config(["--lease-seconds", "0.5"], environ={})


def test_tls_and_credentials_come_from_the_url() -> None:
    from redis.connection import SSLConnection

    from stylize_service.server.jobs.redis_store import connect

    client = connect("rediss://stylize:pw@redis.example:6380/3")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is SSLConnection
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.example", 6380, 3)
    assert (kwargs["username"], kwargs["password"]) == ("stylize", "pw")
    assert connect("redis://r:6379/0").connection_pool.connection_class is not SSLConnection


def test_a_url_that_is_not_redis_is_refused() -> None:
    with pytest.raises(StoreError, match="redis:// or rediss://"):
        RedisStore("memcached://x", 64 * MB)


def test_a_checkpoint_streams_through_a_buffer(redis_url: str) -> None:
    store = RedisStore(redis_url, 64 * MB)
    record = _record()
    store.create(record, b"r")

    def write(handle: io.BufferedIOBase) -> None:
        for _ in range(4):
            handle.write(b"x" * 1000)

    store.put_checkpoint(record.id, write)  # type: ignore[arg-type]
    assert store.checkpoint(record.id) == b"x" * 4000


def test_without_redis_server_the_tests_skip_naming_the_package_and_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tests.redis_server as redis_tests

    monkeypatch.setattr(redis_tests.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Debian package redis-server"):
        redis_tests.redis_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"Debian package redis-server"):
        redis_tests.redis_binary()


def test_ci_installs_redis_server_before_the_tests() -> None:
    script = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    install = script.index("apt-get install -y -q --no-install-recommends redis-server")
    assert script.index("command -v redis-server") < install < script.index("bash scripts/test.sh")
