"""One tool call of one item (a single-call item, or a step of a pipeline): the server's call
slot and breaker, retries with backoff, and the outcome classified into a result or an error."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shared.errors import (
    RetriesExhausted,
    RetryableToolError,
    ServerUnavailable,
    ToolFailed,
    ToolswarmError,
    TransientError,
    UnknownTool,
)
from shared.execution import CALLING, Draining, ExecutionContext
from shared.log_context import log_context
from shared.metrics import SUCCEEDED
from shared.models import CallResult, ItemError, item_id
from shared.settings import RetryPolicy
from shared.store import Claim

UNKNOWN_TOOL_PREFIX = "Unknown tool:"
MAX_HELD_ATTEMPTS = 50  # calls that found the server unreachable and were not counted, per item
# The _meta key every tools/call carries: JOB:INDEX:STEP, the same on every retry and every worker,
# so a server that de-duplicates requests can.
IDEMPOTENCY_META_KEY = "io.toolswarm/idempotency-key"
SINGLE_CALL_STEP = "call"  # the step name of a single-call item (in errors and idempotency keys)


def idempotency_key(job_id: str, index: int, step: str) -> str:
    return f"{job_id}:{index}:{step}"


def retrying(policy: RetryPolicy, stop: Callable[[RetryCallState], bool] | None = None) -> AsyncRetrying:
    return AsyncRetrying(
        stop=stop or stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(
            multiplier=policy.initial_backoff_s, max=policy.max_backoff_s, jitter=policy.jitter_s
        ),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )


def error_of(
    exc: ToolswarmError, attempts: int, policy: RetryPolicy, step: str = SINGLE_CALL_STEP
) -> ItemError:
    if isinstance(exc, TransientError) and attempts >= policy.attempts:
        exhausted = RetriesExhausted(f"gave up after {attempts} attempts: {exc.message}")
        return ItemError(type=exhausted.error_type, message=exhausted.message, step=step, retryable=True)
    return ItemError(type=exc.error_type, message=exc.message, step=step, retryable=exc.retryable)


def tool_error_of(result: CallResult, tool: str) -> ToolswarmError:
    text = result.text()
    if text.startswith(UNKNOWN_TOOL_PREFIX):
        return UnknownTool(f"unknown tool {tool!r}")
    return ToolFailed(text or f"tool {tool!r} reported an error")


@dataclass(frozen=True)
class CallOutcome:
    """A call's last result (None if none came back) or its error, and the attempts it took;
    ``answered_by`` names the standby that took the call, if one did."""

    result: CallResult | None
    error: ItemError | None
    attempts: int
    duration_ms: float
    answered_by: str | None = None


class AnswerElsewhere(Exception):
    """The call's server is down and its standby is one this worker's pool does not serve: the
    item goes to the standby's pool instead of waiting here."""

    def __init__(self, server: str) -> None:
        super().__init__(f"answered by {server}, served by another pool")
        self.server = server


@dataclass(frozen=True)
class CallTarget:
    """What to call for which item, and how: its server's limits apply, ``policy`` and ``timeout_s``
    as the item's job or step sets them."""

    job_id: str
    index: int
    epoch: int
    server: str
    tool: str
    arguments: dict[str, Any]
    policy: RetryPolicy
    timeout_s: float
    step: str = SINGLE_CALL_STEP
    urgent: bool = False


def target_for(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    server: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    retry: Sequence[RetryPolicy | None] = (),
    timeout_s: float | None = None,
    step: str = SINGLE_CALL_STEP,
    urgent: bool = False,
) -> CallTarget:
    """A call for a claimed item: the first of ``retry`` that is set (a step's, then the job's),
    else the server's policy; ``timeout_s`` if set, else the server's."""
    config = ctx.settings.server(server)
    return CallTarget(
        job_id=job_id,
        index=claim.index,
        epoch=claim.epoch,
        server=server,
        tool=tool,
        arguments=arguments,
        policy=next((policy for policy in retry if policy is not None), config.retry),
        timeout_s=timeout_s or config.timeout_s,
        step=step,
        urgent=urgent,
    )


async def call_tool(ctx: ExecutionContext, target: CallTarget) -> CallOutcome:
    """:func:`call_with_retries`, its log lines naming the call's server and step."""
    with log_context(server=target.server, step=target.step):
        return await call_with_retries(ctx, target)


async def call_with_retries(ctx: ExecutionContext, target: CallTarget) -> CallOutcome:
    """Call with retries and turn whatever happens into a result or an error.

    ``target.policy`` bounds the attempts. While the server's breaker is open the call goes to
    its first healthy standby that lists the tool, or waits when there is none; a call that could
    not reach its server trips that server's breaker and does not spend an attempt (up to
    MAX_HELD_ATTEMPTS times). Raises Draining when the worker began shutting down before a call,
    and AnswerElsewhere when the standby that would answer is another pool's.
    """
    server, policy = target.server, target.policy
    config = ctx.settings.server(server)
    member = item_id(target.job_id, target.index)
    meta = {IDEMPOTENCY_META_KEY: idempotency_key(target.job_id, target.index, target.step)}
    started = time.perf_counter()
    attempts = spent = 0
    result: CallResult | None = None
    error: ItemError | None = None
    answering = server

    def out_of_budget(_: RetryCallState) -> bool:
        return spent >= policy.attempts

    async def attempt_once() -> CallResult:
        nonlocal attempts, spent, answering
        if ctx.breaker is not None:
            answering = await ctx.breaker.route(server, target.tool, (member, target.job_id))
            if answering not in ctx.served:
                raise AnswerElsewhere(answering)
        async with ctx.call_slot(answering, target.urgent):
            if ctx.draining:
                raise Draining(member)
            attempts += 1
            spent += 1
            if ctx.held.get(member) != CALLING:
                ctx.held[member] = CALLING
                ctx.started_calls[member] = (target.job_id, target.index, target.epoch)
            try:
                outcome = await ctx.caller.call(
                    answering, target.tool, target.arguments, target.timeout_s, meta
                )
            except ServerUnavailable as exc:
                if ctx.breaker is not None and attempts - spent < MAX_HELD_ATTEMPTS:
                    spent -= 1
                    await ctx.breaker.trip(answering, exc.message)
                raise
        if outcome.is_error and config.tool_errors_retryable:
            raise RetryableToolError(outcome.text() or f"tool {target.tool!r} reported an error")
        return outcome

    try:
        try:
            result = await attempt_once()  # most calls succeed at once: no retry machinery for them
        except TransientError:
            if spent >= policy.attempts:
                raise
            await asyncio.sleep(policy.initial_backoff_s + random.uniform(0, policy.jitter_s))
            async for attempt in retrying(policy, stop=out_of_budget):
                with attempt:
                    result = await attempt_once()
        assert result is not None
        if result.is_error:
            failure = tool_error_of(result, target.tool)
            error = ItemError(
                type=failure.error_type, message=failure.message, step=target.step, retryable=False
            )
    except ToolswarmError as exc:
        error = error_of(exc, spent, policy, target.step)
    took_s = time.perf_counter() - started
    ctx.metrics.call(answering, target.tool, SUCCEEDED if error is None else error.type, took_s, attempts)
    return CallOutcome(
        result=result,
        error=error,
        attempts=attempts,
        duration_ms=round(took_s * 1000, 3),
        answered_by=None if answering == server else answering,
    )
