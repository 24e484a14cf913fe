import asyncio

import pytest

from bot.core.admission import FairQueue


async def test_limit_and_round_robin_order():
    q = FairQueue(1)
    await q.acquire(0, "a")  # takes the only slot
    started: list[int] = []

    async def job(job_id, user):
        await q.acquire(job_id, user)
        started.append(job_id)

    tasks = [asyncio.create_task(job(i, "greedy")) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(job(4, "other")), asyncio.create_task(job(5, "third"))]
    await asyncio.sleep(0)
    assert q.order() == [1, 4, 5, 2, 3]
    assert q.position(5) == 3 and q.position(0) is None
    for _ in range(5):
        q.release()
        await asyncio.sleep(0)
    assert started == [1, 4, 5, 2, 3]
    await asyncio.gather(*tasks)


async def test_cancelled_waiter_leaves_the_queue():
    q = FairQueue(1)
    await q.acquire(0, "a")
    waiting = asyncio.create_task(q.acquire(1, "b"))
    later = asyncio.create_task(q.acquire(2, "c"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert q.order() == [2]
    q.release()
    await later
    assert q.running == 1 and len(q) == 0


async def test_free_slots_are_taken_at_once():
    q = FairQueue(2)
    await q.acquire(1, "a")
    await q.acquire(2, "a")
    assert q.running == 2
    blocked = asyncio.create_task(q.acquire(3, "a"))
    await asyncio.sleep(0)
    assert not blocked.done()
    q.release()
    await blocked
