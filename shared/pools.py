"""Worker pools: a pipeline item moves to the pool that serves its next step's server.

A worker started with ``--servers a,b`` consumes only those servers' queues and opens sessions
only to them. When an item it runs reaches a step on another server, the worker checkpoints a
:class:`~shared.handoff.HandoffEnvelope` beside the item's step checkpoints, records the
continuation chunk and gives up the item's lease in one script (``handoff.lua``, fenced by the
item's epoch), then sends the chunk to the target server's queue. A worker there claims the item
(a new epoch), opens the envelope with the same checks as the gateway's ``receive_handoff``
(target, TTL, context by reference) and resumes at that step; the later steps see the outputs
the envelope carries.

Once-only comes from the item's fencing epoch and its step checkpoints, not from a token
receipt: a finished step has a checkpoint and never runs again, whoever resumes the item, and a
worker whose lease was taken over cannot write one. A crash on either side is the failover the
engine already has: a lost lease goes back to the item's first queue, whose pool resumes it from
its checkpoints and hands it off again (the same token); a continuation whose message never
reached the broker is restored by the coverage sweep.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Sequence

from shared.batching import Coalescer
from shared.calls import SINGLE_CALL_STEP
from shared.committer import BATCH_LINGER_S
from shared.errors import HandoffMisdelivered
from shared.execution import ExecutionContext
from shared.handoff import HandoffEnvelope, HandoffStore, new_envelope, open_envelope
from shared.jobs import Enqueuer
from shared.models import Chunk, StepRecord, StepSpec
from shared.pipeline import CHECKPOINTED
from shared.steps import HandOff
from shared.store import Claim, Handing, JobStore

SESSION_NAMESPACE = uuid.UUID("6f1d1c1e-3b52-4d4a-9a1c-2f6c6b1f0a11")  # item session ids when none is given


def handoff_token(job_id: str, index: int, step: str) -> str:
    """The idempotency token of an item's handoff to a step: the same for every attempt of it."""
    return f"{job_id}:{index}:{step}"


def item_session(job_id: str, index: int) -> uuid.UUID:
    """The envelope's session id of an item without a session of its own: stable per item."""
    return uuid.uuid5(SESSION_NAMESPACE, f"{job_id}:{index}")


def handoffs(ctx: ExecutionContext) -> HandoffStore:
    if ctx.handoffs is None:
        ctx.handoffs = HandoffStore(ctx.store.client, ctx.store.keys)
    return ctx.handoffs


class HandoffSender:
    """Coalesces the handoffs of a worker's items: one script call and one chunk message per job
    and target server per round, instead of a one-item chunk each (which would hold the receiving
    pool to ``chunks_in_flight`` items at a time)."""

    def __init__(self, store: JobStore, enqueuer: Enqueuer, max_batch: int) -> None:
        self.store = store
        self.enqueuer = enqueuer
        self._batches: Coalescer[tuple[str, str, Handing], bool] = Coalescer(
            self._send, max_batch, linger_s=BATCH_LINGER_S
        )

    async def send(self, job_id: str, server: str, handing: Handing) -> bool:
        return await self._batches.submit((job_id, server, handing))

    async def _send(self, entries: list[tuple[str, str, Handing]]) -> list[bool]:
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for position, (job_id, server, _) in enumerate(entries):
            groups[(job_id, server)].append(position)
        landed = [False] * len(entries)
        sent = []
        for (job_id, server), positions in groups.items():
            items = [entries[p][2] for p in positions]
            chunk = Chunk(job_id=job_id, server=server, items=[h.index for h in items], handoff=True)
            for position, ok in zip(positions, await self.store.hand_off(chunk, items), strict=True):
                landed[position] = ok
            if any(landed[p] for p in positions):
                sent.append(chunk)
        if sent:
            await asyncio.to_thread(self.enqueuer.enqueue, sent)
        return landed


async def hand_off(ctx: ExecutionContext, job_id: str, claim: Claim, handing: HandOff) -> bool:
    """Send the item to its next step's pool; False when its lease was taken over meanwhile."""
    step = handing.step
    finished = [name for name, record in handing.records.items() if record.status in CHECKPOINTED]
    carried = finished if step.carry is None else [name for name in step.carry if name in finished]
    session = claim.spec.session
    summary = None
    if session is not None and ctx.context is not None:
        found = await ctx.context.get(session)
        summary = found.summary_before_window if found is not None else None
    envelope = new_envelope(
        session_id=session or item_session(job_id, claim.index),
        summary_before_window=summary,
        idempotency_token=handoff_token(job_id, claim.index, step.name),
        source_server=handing.source_server,
        target_server=handing.target_server,
        next_tool_hint=step.tool,
        accumulated_context={name: handing.records[name].output for name in carried},
        ttl_seconds=ctx.settings.worker.handoff_ttl_s,
    )
    stowed = await handoffs(ctx).stow_context(envelope)
    return await send(ctx, job_id, claim, handing.target_server, stowed)


async def hand_off_call(ctx: ExecutionContext, job_id: str, claim: Claim, server: str) -> bool:
    """Send a single-call item to the pool of the standby answering for its server."""
    envelope = new_envelope(
        session_id=item_session(job_id, claim.index),
        idempotency_token=handoff_token(job_id, claim.index, SINGLE_CALL_STEP),
        source_server=claim.spec.server or "",
        target_server=server,
        next_tool_hint=claim.spec.tool,
        accumulated_context={},
        ttl_seconds=ctx.settings.worker.handoff_ttl_s,
    )
    return await send(ctx, job_id, claim, server, envelope)


async def send(
    ctx: ExecutionContext, job_id: str, claim: Claim, server: str, envelope: HandoffEnvelope
) -> bool:
    if ctx.handoff_sender is None:
        assert ctx.enqueuer is not None, "a worker pool hands off through its enqueuer"
        ctx.handoff_sender = HandoffSender(ctx.store, ctx.enqueuer, ctx.settings.worker.chunk_size)
    entry = Handing(index=claim.index, epoch=claim.epoch, envelope=envelope.model_dump_json())
    return await ctx.handoff_sender.send(job_id, server, entry)


async def received(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    raw_envelope: str,
    steps: Sequence[StepSpec],
    checkpointed: dict[str, StepRecord],
) -> dict[str, StepRecord]:
    """Open a handed-over item's envelope (refusing it as the gateway would: see
    :func:`~shared.handoff.open_envelope`) and give its finished steps the outputs it carries: a
    step it does not carry is still done, but later steps do not see its output.

    A message can be older than the item's envelope: redelivered after the item had already been
    handed on to a third pool. Such an envelope is not for this claim (it names another step, or a
    server this pool does not serve): the item resumes from its checkpoints as after any takeover,
    and hands itself on again where its next step runs."""
    sent = HandoffEnvelope.model_validate_json(raw_envelope)
    next_step = next((step.name for step in steps if step.name not in checkpointed), None)
    if next_step is None or sent.idempotency_token != handoff_token(job_id, claim.index, next_step):
        return checkpointed
    try:
        envelope = await open_envelope(handoffs(ctx), sent, ctx.served)
    except HandoffMisdelivered:
        return checkpointed
    if envelope.summary_before_window and claim.spec.session and ctx.context is not None:
        # a store this side does not share with the sender starts from its summary, not its history
        await ctx.context.init_from_summary(claim.spec.session, envelope.summary_before_window)
    carried = envelope.accumulated_context
    return {
        name: record.model_copy(update={"output": carried.get(name)}) for name, record in checkpointed.items()
    }
