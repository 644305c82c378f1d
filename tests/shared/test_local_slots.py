"""A process's own bound on calls in flight: urgent calls first, nothing leaked on cancellation."""

from __future__ import annotations

import asyncio

from shared.limiter import LocalSlots
from tests.shared.loop import settle


def test_a_freed_place_goes_to_an_urgent_call_before_earlier_normal_ones() -> None:
    async def scenario() -> list[str]:
        slots = LocalSlots(1)
        order: list[str] = []
        await slots.acquire()

        async def call(name: str, urgent: bool) -> None:
            async with slots.slot(urgent):
                order.append(name)

        waiting = [
            asyncio.create_task(call("normal-1", False)),
            asyncio.create_task(call("normal-2", False)),
        ]
        await settle()
        waiting.append(asyncio.create_task(call("urgent", True)))
        await settle()
        slots.release()
        await asyncio.gather(*waiting)
        assert slots.free == 1
        return order

    assert asyncio.run(scenario()) == ["urgent", "normal-1", "normal-2"]


def test_never_more_than_its_size_in_flight() -> None:
    async def scenario() -> int:
        slots = LocalSlots(3)
        in_flight = peak = 0

        async def call(i: int) -> None:
            nonlocal in_flight, peak
            async with slots.slot(urgent=i % 5 == 0):
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0)
                in_flight -= 1

        await asyncio.gather(*(call(i) for i in range(50)))
        assert slots.free == 3
        return peak

    assert asyncio.run(scenario()) == 3


def test_a_cancelled_waiter_leaks_no_place() -> None:
    async def scenario() -> None:
        slots = LocalSlots(1)
        await slots.acquire()
        cancelled = asyncio.create_task(slots.acquire())
        later = asyncio.create_task(slots.acquire(urgent=True))
        await settle()
        cancelled.cancel()
        await settle()
        slots.release()
        await asyncio.wait_for(later, 1)
        slots.release()
        assert slots.free == 1 and not slots.normal and not slots.urgent

    asyncio.run(scenario())


def test_a_place_granted_as_its_waiter_is_cancelled_passes_to_the_next() -> None:
    async def scenario() -> None:
        slots = LocalSlots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await settle()
        slots.release()  # grants `first`, which is cancelled before it runs
        first.cancel()
        await asyncio.wait_for(second, 1)
        slots.release()
        assert slots.free == 1

    asyncio.run(scenario())
