"""Slot waiters in one process hear when another process gives slots back (pub/sub), and still
find slots that came back unannounced (a dead holder's, by expiry)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared import limiter
from shared.keys import Keys
from shared.limiter import ClusterLimiter
from shared.store import connect
from tests.harness import wait_until_async

pytestmark = pytest.mark.integration


async def hold_then_release(owner: ClusterLimiter, holding: asyncio.Event, release: asyncio.Event) -> None:
    async with owner.slot("demo", 1):
        holding.set()
        await release.wait()


async def listening(waiting: ClusterLimiter, server: str, timeout: float = 10.0) -> None:
    async def waits() -> bool:
        return server in waiting.freed.bumped

    await wait_until_async(waits, timeout, "the waiter waits for word", interval=0.01)


async def _waiter_hears_release(redis_url: str) -> None:
    keys = Keys(f"wake-{uuid.uuid4().hex[:8]}")
    client = connect(redis_url)
    first, second = (ClusterLimiter(client, keys, name, lease_s=30) for name in ("w1", "w2"))
    try:
        holding, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold_then_release(first, holding, release))
        await holding.wait()

        waiter = asyncio.create_task(second.slot("demo", 1).__aenter__())
        await listening(second, "demo")  # it has asked once, been refused, and now waits for word
        assert not waiter.done()
        release.set()  # no call of its own waits for it: the holder gives it back after IDLE_HOLD_S
        await holder
        await asyncio.wait_for(waiter, timeout=10)  # the timer alone would take an hour
    finally:
        await first.close()
        await second.close()
        await client.aclose()


async def _unannounced_slot_is_found(redis_url: str) -> None:
    keys = Keys(f"wake-{uuid.uuid4().hex[:8]}")
    client = connect(redis_url)
    dead = ClusterLimiter(client, keys, "dead", lease_s=0.5)
    alive = ClusterLimiter(client, keys, "alive", lease_s=30)
    try:
        assert await dead.servers.setdefault("demo", limiter.ServerSlots(dead, "demo", 1))._acquire_tokens(
            ["dead:0"]
        )
        # The holder dies: nobody renews or gives back its slot, nobody says a word.
        await asyncio.wait_for(alive.slot("demo", 1).__aenter__(), timeout=10)
    finally:
        await alive.close()
        await client.aclose()


def test_a_waiter_hears_when_another_process_gives_a_slot_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limiter, "UNANNOUNCED_POLL_S", (3600.0, 3600.0))
    asyncio.run(_waiter_hears_release(redis_url))


def test_a_slot_that_expires_unannounced_is_found_by_the_timer(redis_url: str) -> None:
    asyncio.run(_unannounced_slot_is_found(redis_url))
