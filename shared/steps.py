"""Run a pipeline item: its steps in order on the worker holding its lease, each step's output
checkpointed under the item's epoch before the next starts, resuming after the steps an earlier
run checkpointed."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jmespath.exceptions import JMESPathError

from shared.calls import AnswerElsewhere, call_tool, target_for
from shared.conversation import context_scope, reads_context, record_call
from shared.errors import InvalidArguments, ToolswarmError
from shared.execution import ExecutionContext
from shared.models import ItemError, ResultRecord, StepRecord, StepSpec, item_id
from shared.pipeline import CHECKPOINTED, failed_step, item_scope, pipeline_record, step_output
from shared.refs import find_references, resolve
from shared.settings import RetryPolicy
from shared.store import Checkpoint, Claim, now_ms


@dataclass(frozen=True)
class HandOff:
    """The item's next step runs on a server this worker's pool does not serve: it goes to that
    server's pool, with the steps finished so far."""

    step: StepSpec
    source_server: str
    records: dict[str, StepRecord]
    target_server: str  # the step's server, or the standby answering for it


async def run_pipeline(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    steps: Sequence[StepSpec],
    checkpointed: Mapping[str, StepRecord],
    job_retry: RetryPolicy | None = None,
    urgent: bool = False,
    needs: Mapping[str, Any] | None = None,
) -> ResultRecord | HandOff | None:
    """The item's result record; None when a checkpoint was refused: the lease was taken over and
    the item has a new holder, so this run stops where it is. ``needs``: its needs' outputs. A
    step this worker's pool does not serve ends the run here with a :class:`HandOff`."""
    started = time.perf_counter()
    records = dict(checkpointed)
    for position, step in enumerate(steps):
        if step.name in records:
            continue
        source = steps[position - 1].server or "" if position else claim.spec.server or ""
        answering = step.server or ""
        if answering not in ctx.served and ctx.breaker is not None:
            answering = await ctx.breaker.route(answering, step.tool)
        if answering not in ctx.served:
            return HandOff(step=step, source_server=source, records=records, target_server=answering)
        try:
            record = await run_step(ctx, job_id, claim, step, records, job_retry, urgent, needs)
        except AnswerElsewhere as moved:
            return HandOff(step=step, source_server=source, records=records, target_server=moved.server)
        records[step.name] = record
        if record.status == "failed":
            break
        if position < len(steps) - 1:  # the last step's checkpoint is the item's commit
            began = time.perf_counter()
            assert ctx.checkpointer is not None
            if not await ctx.checkpointer.checkpoint(Checkpoint(job_id, claim.index, claim.epoch, record)):
                return None
            checkpoint_ms = round((time.perf_counter() - began) * 1000, 3)
            records[step.name] = record.model_copy(update={"checkpoint_ms": checkpoint_ms})
    base = ResultRecord(
        item_id=item_id(job_id, claim.index),
        job_id=job_id,
        index=claim.index,
        tool=steps[-1].tool,
        server=steps[-1].server or "",
        key=claim.spec.key,
        status="succeeded",
        worker=ctx.worker_id,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        finished_at_ms=now_ms(),
    )
    return pipeline_record(base, steps, records)


async def run_step(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    step: StepSpec,
    records: Mapping[str, StepRecord],
    job_retry: RetryPolicy | None,
    urgent: bool,
    needs: Mapping[str, Any] | None = None,
) -> StepRecord:
    """Resolve the step's references, check what they gave against the tool's schema, call it."""
    server = step.server or ""
    completed = [name for name, record in records.items() if record.status in CHECKPOINTED]
    arguments: dict[str, Any] | None = step.arguments
    if any(True for _ in find_references(step.arguments)):
        session = claim.spec.session
        context = await context_scope(ctx.context, session) if reads_context(step.arguments) else None
        try:
            arguments = resolve(step.arguments, item_scope(claim.spec.input, records, needs, context))
            problem = await schema_problem(ctx, server, step.tool, arguments)
        except JMESPathError as exc:
            arguments, problem = None, f"a $from expression failed: {exc}"
        if problem is not None:
            invalid = InvalidArguments(problem)
            error = ItemError(type=invalid.error_type, message=invalid.message, retryable=invalid.retryable)
            return failed_step(step, error, 0, 0.0, completed, arguments)
    assert arguments is not None
    target = target_for(
        ctx,
        job_id,
        claim,
        server,
        step.tool,
        arguments,
        retry=(step.retry, job_retry),
        timeout_s=step.timeout_s,
        step=step.name,
        urgent=urgent,
    )
    outcome = await call_tool(ctx, target)
    await record_call(ctx.context, claim.spec.session, server, step.tool, arguments, outcome)
    if outcome.error is not None:
        return failed_step(step, outcome.error, outcome.attempts, outcome.duration_ms, completed, arguments)
    assert outcome.result is not None
    return StepRecord(
        name=step.name,
        server=server,
        tool=step.tool,
        status="succeeded",
        attempts=outcome.attempts,
        duration_ms=outcome.duration_ms,
        output=step_output(outcome.result),
        answered_by=outcome.answered_by,
    )


async def schema_problem(ctx: ExecutionContext, server: str, tool: str, arguments: Any) -> str | None:
    """Why resolved arguments do not fit the tool's input schema, or None. When the schema cannot
    be had now (the server is down), the call itself will say what is wrong."""
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {type(arguments).__name__}"
    try:
        validator = await ctx.validator(server, tool)
    except ToolswarmError:
        return None
    if validator is None:
        return None
    for problem in validator.iter_errors(arguments):
        where = ".".join(["arguments", *(str(p) for p in problem.path)])
        return f"{where}: {problem.message} (once its references were resolved)"
    return None
