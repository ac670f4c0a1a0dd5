"""Job admission: bounded concurrency, a bounded FIFO queue with positions (stylize_service.server.scheduler)."""

from __future__ import annotations

import threading

import pytest

from stylize_service.server.scheduler import QueueFull, Scheduler, SchedulerClosed

LIVENESS = 5.0  # generous bound for "happens promptly"


def test_admits_up_to_concurrency_then_queues_in_order() -> None:
    scheduler = Scheduler(concurrency=2, queue_size=2)
    a, b = scheduler.enqueue(), scheduler.enqueue()
    c, d = scheduler.enqueue(), scheduler.enqueue()
    assert [t.position for t in (a, b, c, d)] == [0, 0, 1, 2]
    assert (scheduler.running, scheduler.waiting) == (2, 2)
    with pytest.raises(QueueFull):
        scheduler.enqueue()

    a.release()
    assert (c.position, d.position) == (0, 1)
    assert (scheduler.running, scheduler.waiting) == (2, 1)
    a.release()  # idempotent: does not free a second slot
    assert scheduler.running == 2


def test_queue_size_zero_refuses_when_busy() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=0)
    scheduler.enqueue()
    with pytest.raises(QueueFull):
        scheduler.enqueue()


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=3)
    running = scheduler.enqueue()
    first, second, third = (scheduler.enqueue() for _ in range(3))
    first.cancel()
    first.release()
    assert (second.position, third.position) == (1, 2)
    assert scheduler.waiting == 2
    running.release()
    assert second.admitted and third.position == 1


def test_wait_wakes_on_position_change_and_on_cancel() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=2)
    running = scheduler.enqueue()
    waiter = scheduler.enqueue()
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(waiter.wait(1, timeout=LIVENESS)))
    thread.start()
    running.release()
    thread.join(LIVENESS)
    assert seen == [0] and waiter.admitted

    other = scheduler.enqueue()
    thread = threading.Thread(target=lambda: seen.append(other.wait(1, timeout=LIVENESS)))
    thread.start()
    other.cancel()
    thread.join(LIVENESS)
    assert not thread.is_alive() and seen[-1] == 1 and other.cancelled.is_set()


def test_close_refuses_new_and_queued_jobs_but_not_running_ones() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=2)
    running = scheduler.enqueue()
    queued = scheduler.enqueue()
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.enqueue()
    with pytest.raises(SchedulerClosed):
        queued.wait(1, timeout=LIVENESS)
    assert scheduler.waiting == 0 and running.admitted
    assert not scheduler.wait_idle(timeout=0.01)
    running.release()
    assert scheduler.wait_idle(timeout=LIVENESS)
