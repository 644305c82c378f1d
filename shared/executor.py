"""Run one chunk of items: claim → call (with retries) → classify → commit, all on one event loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.calls import AnswerElsewhere, call_tool, target_for
from shared.conversation import record_call
from shared.errors import HandoffRefused, JobNotFound, RedisUnavailable
from shared.execution import CALLING, RELEASED, WAITING, ChunkHandedBack, Draining, ExecutionContext
from shared.jobs import feed_next
from shared.log_context import context_with, log_context
from shared.models import Chunk, ChunkReport, ItemError, ResultRecord, StepRecord, StepSpec, item_id
from shared.pipeline import final_output, item_scope, unmet_need
from shared.pools import hand_off, hand_off_call, received
from shared.reduce import run_reduce
from shared.refs import resolve
from shared.settings import RetryPolicy
from shared.steps import HandOff, run_pipeline
from shared.store import HANDOFF_FIELD, Claim, JobPlan, Settlement, now_ms

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisUnavailable, RedisConnectionError, RedisTimeoutError)
# A chunk whose claim or feed met an unreachable Redis tries again this often, holding its message.
REDIS_RETRY_S = 2.0


async def call_item(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    policy: RetryPolicy | None = None,
    urgent: bool = False,
) -> ResultRecord:
    """Call a single-call item's tool with retries (``policy``, the job's override, or its
    server's) and turn whatever happens into its result record."""
    spec = claim.spec
    server = spec.server or ""
    tool = spec.tool or ""
    target = target_for(ctx, job_id, claim, server, tool, spec.arguments, retry=(policy,), urgent=urgent)
    outcome = await call_tool(ctx, target)
    await record_call(ctx.context, spec.session, server, tool, spec.arguments, outcome)
    return ResultRecord(
        item_id=item_id(job_id, claim.index),
        job_id=job_id,
        index=claim.index,
        tool=tool,
        server=server,
        key=spec.key,
        status="failed" if outcome.error else "succeeded",
        attempts=outcome.attempts,
        result=outcome.result,
        error=outcome.error,
        worker=ctx.worker_id,
        duration_ms=outcome.duration_ms,
        finished_at_ms=now_ms(),
        answered_by=outcome.answered_by,
    )


def unrun_record(ctx: ExecutionContext, job_id: str, claim: Claim, error: ItemError) -> ResultRecord:
    """The record of an item settled without a call (a need of it did not succeed)."""
    return ResultRecord(
        item_id=item_id(job_id, claim.index),
        job_id=job_id,
        index=claim.index,
        tool=claim.spec.tool or "pipeline",
        server=claim.spec.server or "",
        key=claim.spec.key,
        status="failed",
        error=error,
        worker=ctx.worker_id,
        finished_at_ms=now_ms(),
    )


def steps_of(claim: Claim, plan: JobPlan) -> list[StepSpec] | None:
    """A pipeline item's steps (its own, or its job's pipeline); None for a single-call item."""
    if claim.spec.steps is not None:
        return claim.spec.steps
    if claim.spec.tool is None and plan.pipeline is not None:
        return plan.pipeline.steps
    return None


async def run_item(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    plan: JobPlan,
    checkpointed: dict[str, StepRecord] | None = None,
    urgent: bool = False,
    needs: dict[str, ResultRecord | None] | None = None,
    envelope: str | None = None,
) -> tuple[ResultRecord | None, bool] | None:
    """Run and commit one item; None when shutdown took it back before it finished. A pipeline
    item whose lease was taken over mid-way gives (None, False): nothing of it is committed here;
    one handed to another worker pool gives (None, True). ``envelope``: the handoff it came with."""
    member = item_id(job_id, claim.index)
    try:
        steps = steps_of(claim, plan)
        outputs = None if needs is None else {key: r and final_output(r) for key, r in needs.items()}
        unmet = None if needs is None else unmet_need(needs)
        names: list[str] = []
        if unmet is not None:
            record = unrun_record(ctx, job_id, claim, unmet)
        elif plan.reduce is not None and claim.index == plan.total:
            record = await run_reduce(ctx, job_id, claim, plan)
        elif steps is None:
            if outputs is not None:
                arguments = resolve(claim.spec.arguments, item_scope(claim.spec.input, {}, outputs))
                claim = replace(claim, spec=claim.spec.model_copy(update={"arguments": arguments}))
            try:
                record = await call_item(ctx, job_id, claim, plan.retry, urgent)
            except AnswerElsewhere as moved:
                return None, await hand_off_call(ctx, job_id, claim, moved.server)
        else:
            names = [step.name for step in steps] + [HANDOFF_FIELD]
            try:
                if envelope is not None:
                    checkpointed = await received(ctx, job_id, claim, envelope, steps, checkpointed or {})
            except HandoffRefused as exc:
                next_step = next((s.name for s in steps if s.name not in (checkpointed or {})), None)
                error = ItemError(type=exc.error_type, message=exc.message, step=next_step)
                record = unrun_record(ctx, job_id, claim, error)
            else:
                pipeline_result = await run_pipeline(
                    ctx, job_id, claim, steps, checkpointed or {}, plan.retry, urgent, outputs
                )
                if pipeline_result is None:
                    return None, False
                if isinstance(pipeline_result, HandOff):
                    return None, await hand_off(ctx, job_id, claim, pipeline_result)
                record = pipeline_result
        landed = await ctx.committer.commit(job_id, Settlement(record=record, epoch=claim.epoch, steps=names))
        if not (landed and plan.reduce is not None and claim.index == plan.total):  # a reduce is no item
            ctx.metrics.commit(record.status if landed else None)
        log.debug(
            "item %s %s after %d attempt(s)%s",
            claim.index,
            record.status,
            record.attempts,
            "" if landed else "; its commit was refused (the lease moved on)",
        )
        return record, landed
    except Draining:
        if ctx.held.get(member) != RELEASED:
            await ctx.store.release([member])
        return None
    finally:
        ctx.held.pop(member, None)
        ctx.item_tasks.pop(member, None)


async def execute_chunk(ctx: ExecutionContext, chunk: Chunk) -> ChunkReport:
    """Lease the chunk's unsettled items and run them concurrently; return what happened. An
    isolated chunk runs alone in this process (see IsolationGate)."""
    if chunk.isolated and ctx.breaker is not None:
        # Not while holding the whole process: an isolated item would wait out the outage alone.
        await ctx.breaker.wait_healthy(chunk.server)
    async with ctx.isolation.alone() if chunk.isolated else ctx.isolation.shared():
        if ctx.draining:
            raise ChunkHandedBack(chunk.id)
        try:
            claims = await ctx.store.claim(
                chunk.job_id, chunk.items, ctx.worker_id, ctx.settings.worker.lease_s, chunk.isolated
            )
        except JobNotFound:
            # Deleted (or expired) while this message waited: nothing of it is left to run or feed.
            log.info("chunk %s: job %s no longer exists; dropped", chunk.id, chunk.job_id)
            return ChunkReport(
                job_id=chunk.job_id,
                server=chunk.server,
                claimed=0,
                skipped=len(chunk.items),
                committed=0,
                refused=0,
                succeeded=0,
                failed=0,
            )
        plan = await ctx.job_plan(chunk.job_id) if claims else JobPlan()
        checkpointed = await resumed_steps(ctx, chunk.job_id, claims, plan)
        envelopes = (
            await ctx.store.handoff_envelopes(chunk.job_id, [claim.index for claim in claims])
            if chunk.handoff
            else {}
        )
        dependent = [claim.index for claim in claims if claim.spec.needs]
        needs = await ctx.store.needed(chunk.job_id, dependent) if dependent else {}
        tasks = []
        for claim in claims:
            member = item_id(chunk.job_id, claim.index)
            ctx.held[member] = WAITING
            task = asyncio.create_task(
                run_item(
                    ctx,
                    chunk.job_id,
                    claim,
                    plan,
                    checkpointed.get(claim.index),
                    chunk.urgent,
                    needs.get(claim.index),
                    envelopes.get(claim.index),
                ),
                context=context_with(item=claim.index),  # its log lines name the item
            )
            ctx.item_tasks[member] = task
            tasks.append(task)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    if ctx.enqueuer is not None:
        # Every claimed item is settled or leased now: the chunk's record is no longer needed.
        await feed_next(ctx.store, ctx.enqueuer, chunk.job_id, finished_chunk=chunk.id)
    finished = [o for o in outcomes if isinstance(o, tuple)]
    committed = [record for record, landed in finished if landed and record is not None]
    handed_off = sum(1 for record, landed in finished if landed and record is None)
    report = ChunkReport(
        job_id=chunk.job_id,
        server=chunk.server,
        claimed=len(claims),
        skipped=len(chunk.items) - len(claims),
        committed=len(committed),
        refused=len(finished) - len(committed) - handed_off,
        handed_off=handed_off,
        released=len(outcomes) - len(finished),
        succeeded=sum(1 for r in committed if r.status == "succeeded"),
        failed=sum(1 for r in committed if r.status == "failed"),
    )
    ctx.metrics.chunk(chunk.server, report.refused)
    return report


async def resumed_steps(
    ctx: ExecutionContext, job_id: str, claims: list[Claim], plan: JobPlan
) -> dict[int, dict[str, StepRecord]]:
    """The steps earlier runs checkpointed, of the pipeline items claimed again (epoch > 1: a
    first claim has nothing to resume, so the common case costs no read)."""
    wanted: dict[int, list[str]] = {}
    for claim in claims:
        steps = steps_of(claim, plan) if claim.epoch > 1 else None
        if steps:
            wanted[claim.index] = [step.name for step in steps]
    return await ctx.store.checkpoints(job_id, wanted) if wanted else {}


async def execute_chunk_through_outages(ctx: ExecutionContext, chunk: Chunk) -> ChunkReport:
    """Run the chunk, and while Redis cannot be reached, wait and run it again: its message stays
    unacknowledged here meanwhile. Handing it back to the broker instead (Celery's retry) needs the
    broker too: when it is down or refuses writes the republish fails, Celery rejects the failed
    task's message without requeueing it, and its items were covered by nothing. Running again is
    safe: claims skip items that are settled or leased."""
    with log_context(job_id=chunk.job_id, chunk=chunk.id, server=chunk.server):
        while True:
            try:
                return await execute_chunk(ctx, chunk)
            except REDIS_ERRORS as exc:
                if ctx.draining:
                    raise
                log.warning(
                    "chunk %s of job %s: Redis unavailable (%s); holding it and trying again in %.0f s",
                    chunk.id,
                    chunk.job_id,
                    exc,
                    REDIS_RETRY_S,
                )
                await asyncio.sleep(REDIS_RETRY_S)


async def drain(ctx: ExecutionContext, grace_s: float) -> None:
    """Graceful shutdown: start nothing new, give back what has not started, let calls in flight
    finish within ``grace_s``, then give back the rest and stop them."""
    ctx.draining = True
    waiting = [m for m, state in ctx.held.items() if state == WAITING]
    await _release(ctx, waiting)
    calling = [task for m, task in ctx.item_tasks.items() if ctx.held.get(m) == CALLING]
    if calling:
        await asyncio.wait(calling, timeout=grace_s)
    late = [m for m, state in ctx.held.items() if state == CALLING]
    await _release(ctx, late)
    for member in late:
        task = ctx.item_tasks.get(member)
        if task is not None:
            task.cancel()


async def _release(ctx: ExecutionContext, members: list[str]) -> None:
    for member in members:
        ctx.held[member] = RELEASED
    await ctx.store.release(members)
