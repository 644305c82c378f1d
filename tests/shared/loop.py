"""Helpers for tests of asyncio code without I/O."""

from __future__ import annotations

import asyncio


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks again (a few passes of the loop, no wall time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
