"""A job's reduce: the fan-in that runs once every item has settled, whatever failed, over the job
summary ``{total, successful: [{index, key, output}], failed: [{index, key, error}]}`` (the shape
of Promise.allSettled's map-reduce). It is leased, fenced and committed like an item, at index =
total; its commit is the job's last."""

from __future__ import annotations

import json
import time
from typing import Any

from shared.calls import call_tool, target_for
from shared.errors import InvalidArguments, ToolswarmError
from shared.execution import ExecutionContext
from shared.models import ItemError, ReduceSpec, ResultRecord, item_id
from shared.pipeline import final_output
from shared.refs import resolve
from shared.store import Claim, JobPlan, JobStore, now_ms

REDUCE_STEP = "reduce"  # its name in errors and idempotency keys
SUMMARY_BATCH = 1000


class SummaryTooLarge(ToolswarmError):
    error_type = "summary_too_large"


def summary_entry(record: ResultRecord) -> tuple[bool, dict[str, Any]]:
    """(succeeded?, the item's entry in the summary). A cancelled item counts as failed."""
    if record.status == "succeeded":
        return True, {"index": record.index, "key": record.key, "output": final_output(record)}
    error = record.error or ItemError(type=record.status, message=f"the item was {record.status}")
    return False, {"index": record.index, "key": record.key, "error": error.model_dump(exclude_none=True)}


async def job_summary(store: JobStore, job_id: str, total: int) -> dict[str, Any]:
    successful: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    async for record in store.results(job_id, batch=SUMMARY_BATCH):
        ok, entry = summary_entry(record)
        (successful if ok else failed).append(entry)
    return {"total": total, "successful": successful, "failed": failed}


async def run_reduce(ctx: ExecutionContext, job_id: str, claim: Claim, plan: JobPlan) -> ResultRecord:
    reduce = plan.reduce
    assert reduce is not None
    started = time.perf_counter()
    server = reduce.server or ""
    base = ResultRecord(
        item_id=item_id(job_id, claim.index),
        job_id=job_id,
        index=claim.index,
        tool=reduce.tool,
        server=server,
        status="failed",
        worker=ctx.worker_id,
    )
    error, arguments = await reduce_arguments(ctx, job_id, plan.total, reduce)
    if error is not None or arguments is None:
        return base.model_copy(
            update={"error": error, "duration_ms": _ms(started), "finished_at_ms": now_ms()}
        )
    target = target_for(
        ctx,
        job_id,
        claim,
        server,
        reduce.tool,
        arguments,
        retry=(reduce.retry, plan.retry),
        timeout_s=reduce.timeout_s,
        step=REDUCE_STEP,
        urgent=True,
    )
    outcome = await call_tool(ctx, target)
    return base.model_copy(
        update={
            "status": "failed" if outcome.error else "succeeded",
            "attempts": outcome.attempts,
            "result": outcome.result,
            "error": outcome.error,
            "duration_ms": _ms(started),
            "finished_at_ms": now_ms(),
        }
    )


async def reduce_arguments(
    ctx: ExecutionContext, job_id: str, total: int, reduce: ReduceSpec
) -> tuple[ItemError | None, dict[str, Any] | None]:
    """The reduce's arguments resolved over the job summary, or why they cannot be."""
    summary = await job_summary(ctx.store, job_id, total)
    size = len(json.dumps(summary, separators=(",", ":")).encode())
    limit = ctx.settings.worker.reduce_max_summary_bytes
    if size > limit:
        too_large = SummaryTooLarge(
            f"the job summary is {size} bytes, over reduce_max_summary_bytes ({limit}): "
            "raise the limit or reduce over less"
        )
        return _error(too_large), None
    try:
        arguments = resolve(reduce.arguments, summary)
    except Exception as exc:  # a JMESPath function given the wrong types raises at run time
        return _error(InvalidArguments(f"a $from expression failed: {exc}")), None
    return None, arguments


def _error(exc: ToolswarmError) -> ItemError:
    return ItemError(type=exc.error_type, message=exc.message, step=REDUCE_STEP, retryable=exc.retryable)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
