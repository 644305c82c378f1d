"""Versioned records updated by compare-and-swap: read, apply a pure transform, write if unchanged.

    records = VersionedRecords(redis_client)
    await records.update("stock:42", lambda value: {"count": (value or {"count": 0})["count"] - 1})

The write is one Lua script that checks the version read is still current. On conflict the
update re-reads and re-applies the transform, backing off exponentially with jitter; after the
retry budget it raises :class:`ConflictError` naming the key, the attempts and the last version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from shared.errors import ConflictError
from shared.lua import load_lua

Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class Versioned:
    value: Any
    version: int


@dataclass(frozen=True)
class CasPolicy:
    """Retry budget of one update. Backoff is "full jitter": a random wait in [0, min(max, base * 2^n)],
    which spreads colliding writers apart fastest (and keeps the wait at 0 when base is 0)."""

    attempts: int = 200
    initial_backoff_s: float = 0.01
    max_backoff_s: float = 1.0


class _Lost(Exception):
    def __init__(self, version: int) -> None:
        self.version = version


class VersionedRecords:
    """Records stored as a hash ``{version, data}`` (data is JSON); a missing record is version 0."""

    def __init__(self, client: aioredis.Redis, policy: CasPolicy | None = None) -> None:
        self.client: Any = client
        self.policy = policy or CasPolicy()
        self._cas = client.register_script(load_lua("cas"))
        self.conflicts = 0
        self.updates = 0

    async def get(self, key: str) -> Versioned:
        version, data = await self.client.hmget(key, ["version", "data"])
        return Versioned(value=json.loads(data) if data is not None else None, version=int(version or 0))

    async def update(self, key: str, transform: Transform) -> Versioned:
        """Apply ``transform(current_value)`` atomically with respect to every other writer."""
        policy = self.policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_random_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s),
            retry=retry_if_exception_type(_Lost),
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    current = await self.get(key)
                    new_value = transform(current.value)
                    ok, version = await self._cas(keys=[key], args=[current.version, json.dumps(new_value)])
                    if not ok:
                        self.conflicts += 1
                        raise _Lost(int(version))
                    self.updates += 1
                    return Versioned(value=new_value, version=int(version))
        except RetryError as exc:
            lost = exc.last_attempt.exception()
            last_version = lost.version if isinstance(lost, _Lost) else -1
            raise ConflictError(key, attempts, last_version) from None
        raise AssertionError("unreachable: tenacity either returns or raises")
