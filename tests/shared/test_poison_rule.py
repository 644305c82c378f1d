"""The poison rule and the isolation gate it relies on: pure logic, no Redis."""

from __future__ import annotations

import asyncio

import pytest

from shared.execution import IsolationGate
from shared.reaper import ISOLATE, POISON, REQUEUE, verdict
from shared.store import ISOLATED_CALL_LOST, ISOLATED_LOST_EARLY, LostLease
from tests.shared.loop import settle


@pytest.mark.parametrize(
    ("losses", "any_losses", "isolated", "expected", "suspect"),
    [
        (1, 1, 0, REQUEUE, False),  # a first loss: run again with the others
        (2, 5, 0, REQUEUE, False),  # within both budgets
        (3, 3, 0, ISOLATE, False),  # max_lease_losses with the call started: suspect, not yet guilty
        (0, 9, 0, ISOLATE, False),  # lost nine times before its call was ever recorded
        (4, 4, ISOLATED_CALL_LOST, POISON, False),  # its isolated run died with the call started
        (3, 4, ISOLATED_LOST_EARLY, ISOLATE, False),  # isolated run lost before the call: try it alone again
        (3, 9, ISOLATED_LOST_EARLY, POISON, False),  # ... but not without bound
        (1, 1, 0, ISOLATE, True),  # once a suspect, always isolated (a budget changed meanwhile)
    ],
)
def test_verdict(losses: int, any_losses: int, isolated: int, expected: str, suspect: bool) -> None:
    lost = LostLease(index=0, losses=losses, any_losses=any_losses, isolated=isolated, suspect=suspect)
    assert verdict(lost, budget=3) == expected


def test_an_isolated_chunk_waits_for_running_chunks_and_holds_back_new_ones() -> None:
    async def scenario() -> list[str]:
        gate = IsolationGate()
        order: list[str] = []
        release_first = asyncio.Event()

        async def normal(name: str, until: asyncio.Event | None = None) -> None:
            async with gate.shared():
                order.append(f"{name} starts")
                if until is not None:
                    await until.wait()
                order.append(f"{name} ends")

        async def isolated() -> None:
            async with gate.alone():
                order.append("isolated starts")
                await settle()
                order.append("isolated ends")

        first = asyncio.create_task(normal("first", release_first))
        await settle()
        alone = asyncio.create_task(isolated())
        await settle()
        later = asyncio.create_task(normal("later"))
        await settle()
        assert order == ["first starts"], "neither the isolated nor a later chunk starts beside it"
        release_first.set()
        await asyncio.gather(first, alone, later)
        return order

    assert asyncio.run(scenario()) == [
        "first starts",
        "first ends",
        "isolated starts",
        "isolated ends",
        "later starts",
        "later ends",
    ]


def test_chunks_share_the_gate_when_none_is_isolated() -> None:
    async def scenario() -> int:
        gate = IsolationGate()
        inside = peak = 0
        entered = asyncio.Event()

        async def normal() -> None:
            nonlocal inside, peak
            async with gate.shared():
                inside += 1
                peak = max(peak, inside)
                if peak == 3:
                    entered.set()
                await asyncio.wait_for(entered.wait(), 5)
                inside -= 1

        await asyncio.gather(*(normal() for _ in range(3)))
        return peak

    assert asyncio.run(scenario()) == 3
