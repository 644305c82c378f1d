"""Handoffs: work moving from one MCP server (or worker pool) to another without losing context
and without running twice (pattern 4 of the article).

The sender checkpoints a :class:`HandoffEnvelope` in Redis before the receiver is told. The
receiver :func:`receive` s it with one rule set, the same for workers and for the gateway's
``receive_handoff`` tool: refuse it when it is meant for another server or older than its TTL;
answer with the stored result when its idempotency token has completed; say "processing" (with
a time to come back) while another receiver holds it; else hold it (a lease it renews while the
work runs), do the work, and store the result. A receiver that dies mid-work stops renewing, so
a retry of the same envelope takes it over after the lease; the work itself must then be safe to
run again, which is why the gateway runs it as a job with the token as its idempotency key.

Tokens and ids never name a key directly: receipts are keyed by a digest of the token, and a
large context lives under the envelope's (validated) handoff id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PositiveInt

from shared.errors import HandoffExpired, HandoffMisdelivered, HandoffRefused
from shared.keys import Keys
from shared.lua import load_lua

MAX_INLINE_CONTEXT_BYTES = 64 * 1024  # past this the context is stored apart, by reference
CONTEXT_REF_PREFIX = "handoff-context:"
RECEIPT_LEASE_S = 30.0  # how long a receiver holds a handoff without renewing
RECEIPT_KEEP_S = 3600  # how long past its TTL a receipt is kept (its envelope is refused by then)


class HandoffEnvelope(BaseModel):
    """The article's envelope, field for field, plus where a large context went and the sending
    session's summary."""

    model_config = ConfigDict(extra="forbid")

    session_id: uuid.UUID = Field(description="Stable across the multi-server conversation.")
    handoff_id: uuid.UUID = Field(description="Unique per handoff event.")
    idempotency_token: str = Field(min_length=1, max_length=1000, description="The receiver dedupes on it.")
    source_server: str = Field(description="For tracing.")
    target_server: str = Field(description="The receiver checks it is the intended target.")
    next_tool_hint: str | None = Field(default=None, description="The tool to call first.")
    accumulated_context: dict[str, Any] = Field(
        default_factory=dict, description="Distilled key/value context, not a transcript."
    )
    continuation_token: str | None = Field(default=None, description="A cursor for resuming work.")
    created_at: AwareDatetime
    ttl_seconds: PositiveInt = 300
    context_ref: str | None = Field(
        default=None, description="Where an accumulated context over 64 KB is stored (set by the store)."
    )
    summary_before_window: str | None = Field(
        default=None, description="The sending session's summary of its context before its window."
    )

    def age_s(self, now: datetime | None = None) -> float:
        return ((now or datetime.now(UTC)) - self.created_at).total_seconds()


def new_envelope(
    *,
    session_id: uuid.UUID | str,
    idempotency_token: str,
    source_server: str,
    target_server: str,
    accumulated_context: dict[str, Any],
    ttl_seconds: int = 300,
    **fields: Any,
) -> HandoffEnvelope:
    return HandoffEnvelope(
        session_id=uuid.UUID(str(session_id)),
        handoff_id=uuid.uuid4(),
        idempotency_token=idempotency_token,
        source_server=source_server,
        target_server=target_server,
        accumulated_context=accumulated_context,
        created_at=datetime.now(UTC),
        ttl_seconds=ttl_seconds,
        **fields,
    )


class HandoffReceipt(BaseModel):
    """What a receiver answers: the work's result (now, or stored by an earlier receipt of the
    same token), or that another receiver has it in hand."""

    status: Literal["completed", "processing"]
    handoff_id: str
    result: Any = None
    retry_after_seconds: int | None = None
    replayed: bool = Field(default=False, description="The result was stored by an earlier receipt.")


def check_envelope(
    envelope: HandoffEnvelope, receivers: Collection[str], now: datetime | None = None
) -> None:
    """Refuse an envelope meant for another server, or older than its TTL."""
    if envelope.target_server not in receivers:
        here = ", ".join(repr(r) for r in sorted(receivers)) or "nothing"
        raise HandoffMisdelivered(
            f"handoff {envelope.handoff_id} misdelivered: intended {envelope.target_server!r}, got {here}"
        )
    age = envelope.age_s(now)
    if age > envelope.ttl_seconds:
        raise HandoffExpired(
            f"handoff {envelope.handoff_id} expired: {age:.0f}s old, TTL was {envelope.ttl_seconds}s"
        )


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class HandoffStore:
    """Envelopes and receipts in Redis."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._begin = client.register_script(load_lua("handoff_begin"))
        self._settle = client.register_script(load_lua("handoff_settle"))

    async def stow_context(self, envelope: HandoffEnvelope) -> HandoffEnvelope:
        """The envelope as it may travel: a context over 64 KB serialized is stored under the
        handoff's id and replaced by ``context_ref``."""
        raw = json.dumps(envelope.accumulated_context, separators=(",", ":"))
        if len(raw.encode()) <= MAX_INLINE_CONTEXT_BYTES:
            return envelope
        ref = f"{CONTEXT_REF_PREFIX}{envelope.handoff_id}"
        keep_ms = (envelope.ttl_seconds + RECEIPT_KEEP_S) * 1000
        await self.client.set(self.keys.handoff_context(str(envelope.handoff_id)), raw, px=keep_ms)
        return envelope.model_copy(update={"accumulated_context": {}, "context_ref": ref})

    async def load_context(self, envelope: HandoffEnvelope) -> HandoffEnvelope:
        """The envelope with its stored context back in place (the same envelope if it had none)."""
        if envelope.context_ref is None:
            return envelope
        handoff_id = envelope.context_ref.removeprefix(CONTEXT_REF_PREFIX)
        try:
            valid = str(uuid.UUID(handoff_id)) == handoff_id and envelope.context_ref.startswith(
                CONTEXT_REF_PREFIX
            )
        except ValueError:
            valid = False
        if not valid:
            raise HandoffRefused(
                f"context_ref {envelope.context_ref[:80]!r} is not a handoff context reference"
            )
        raw = await self.client.get(self.keys.handoff_context(handoff_id))
        if raw is None:
            raise HandoffExpired(f"the context of handoff {envelope.handoff_id} is gone (expired)")
        return envelope.model_copy(update={"accumulated_context": json.loads(raw), "context_ref": None})

    async def begin(self, envelope: HandoffEnvelope, owner: str) -> tuple[str, str]:
        keep_ms = (envelope.ttl_seconds + RECEIPT_KEEP_S) * 1000
        status, detail = await self._begin(
            keys=[self.keys.handoff(token_digest(envelope.idempotency_token))],
            args=[owner, _now_ms(), int(RECEIPT_LEASE_S * 1000), envelope.model_dump_json(), keep_ms],
        )
        return str(status), "" if detail is None else str(detail)

    async def settle(self, token: str, owner: str, action: str, result: Any = None) -> bool:
        key = self.keys.handoff(token_digest(token))
        args = [owner, action, _now_ms(), int(RECEIPT_LEASE_S * 1000), json.dumps(result)]
        return bool(await self._settle(keys=[key], args=args))

    async def receipt(self, token: str) -> dict[str, str]:
        return dict(await self.client.hgetall(self.keys.handoff(token_digest(token))))


Work = Callable[[HandoffEnvelope], Awaitable[Any]]


async def open_envelope(
    store: HandoffStore, envelope: HandoffEnvelope, receivers: Collection[str]
) -> HandoffEnvelope:
    """What every receiver does first, workers and the gateway alike: refuse an envelope meant for
    another server or older than its TTL, and load a context stored by reference."""
    check_envelope(envelope, receivers)
    return await store.load_context(envelope)


async def receive(
    store: HandoffStore, envelope: HandoffEnvelope, receivers: Collection[str], work: Work
) -> HandoffReceipt:
    """Act on a handoff at most once per idempotency token (see the module's docstring). ``work``
    gets the envelope with its context loaded; what it returns (JSON) is the stored result."""
    check_envelope(envelope, receivers)
    owner = uuid.uuid4().hex
    stowed = await store.stow_context(envelope)
    status, detail = await store.begin(stowed, owner)
    handoff_id = str(envelope.handoff_id)
    if status == "completed":
        return HandoffReceipt(
            status="completed", handoff_id=handoff_id, result=json.loads(detail), replayed=True
        )
    if status == "processing":
        wait_s = max(1, round((int(detail) - _now_ms()) / 1000))
        return HandoffReceipt(status="processing", handoff_id=handoff_id, retry_after_seconds=min(wait_s, 5))
    renewing = asyncio.create_task(_renew(store, envelope.idempotency_token, owner))
    try:
        result = await work(await open_envelope(store, stowed, receivers))
    except BaseException:
        renewing.cancel()
        with suppress(Exception):
            await store.settle(envelope.idempotency_token, owner, "release")
        raise
    renewing.cancel()
    await store.settle(envelope.idempotency_token, owner, "complete", result)
    return HandoffReceipt(status="completed", handoff_id=handoff_id, result=result)


async def _renew(store: HandoffStore, token: str, owner: str) -> None:
    while True:
        await asyncio.sleep(RECEIPT_LEASE_S / 3)
        with suppress(Exception):  # a missed renewal only shortens the lease
            await store.settle(token, owner, "renew")


def _now_ms() -> int:
    return int(time.time() * 1000)
