"""Rich rendering of jobs, progress and servers."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.models import JobStatus
from shared.redaction import endpoint_of
from shared.settings import Settings

if TYPE_CHECKING:  # the doctor's models import the whole engine: not for every command's start-up
    from shared.context import SessionContext
    from shared.doctor import ChunkCount, Diagnosis, JobDiagnosis
    from shared.fleet import Fleet
    from shared.probes import ProbeResult


def job_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[succeeded]} ok[/green] [red]{task.fields[failed]} failed[/red]"),
        TextColumn("{task.fields[rate]:.0f} items/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def progress_fields(job: JobStatus, elapsed_s: float) -> dict[str, Any]:
    return {
        "succeeded": job.succeeded,
        "failed": job.failed,
        "rate": job.settled / elapsed_s if elapsed_s > 0 else 0.0,
    }


def print_status(console: Console, job: JobStatus) -> None:
    table = Table(title=f"job {job.job_id}", show_header=False)
    for name in ("state", "total", "succeeded", "failed", "cancelled", "running", "pending"):
        table.add_row(name, str(getattr(job, name)))
    table.add_row("servers", ", ".join(job.servers))
    if job.expires_at_ms is not None:
        table.add_row("expires", ago(job.expires_at_ms, int(time.time() * 1000)))
    if job.held:
        table.add_row("held", f"{job.held} ({job.held_reason})")
    if job.restored_items:
        table.add_row("restored_items", str(job.restored_items))
    if job.degraded:
        table.add_row("degraded", str(job.degraded))
    if job.reduce is not None:
        reduce = job.reduce.status + (
            f" ({job.reduce.error.type}: {job.reduce.error.message})" if job.reduce.error else ""
        )
        table.add_row("reduce", reduce)
    console.print(table)
    print_failures(console, job)


def progress_text(settled: int, total: int) -> str:
    """``settled/total (P%)``, the percentage rounded down so that 100% means every item settled."""
    percent = 100 * settled // total if total else 100
    return f"{settled}/{total} ({percent}%)"


def ago(at_ms: int, now_ms: int) -> str:
    """How long before or after ``now_ms`` in its largest unit: ``5s ago``, ``in 7d``."""
    seconds = abs(now_ms - at_ms) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            amount = f"{seconds // size}{unit}"
            break
    else:
        amount = f"{seconds}s"
    return f"{amount} ago" if at_ms <= now_ms else f"in {amount}"


def print_jobs(console: Console, jobs: list[JobStatus]) -> None:
    """One row per job, newest first: state, progress, outcomes, its age and when it expires."""
    if not jobs:
        console.print("no jobs")
        return
    now_ms = int(time.time() * 1000)
    table = Table()
    for column in ("job", "state", "progress", "ok", "failed", "created", "expires"):
        table.add_column(column, no_wrap=column == "job")
    for job in jobs:
        expires = "never" if job.done else "-"
        if job.expires_at_ms is not None:
            expires = ago(job.expires_at_ms, now_ms)
        table.add_row(
            job.job_id,
            job.state,
            progress_text(job.settled, job.total),
            str(job.succeeded),
            str(job.failed),
            ago(job.created_at_ms, now_ms),
            expires,
        )
    console.print(table)


def print_parts(console: Console, title: str, parts: Sequence[tuple[str, str]]) -> None:
    """Where each part of what runs listens: one aligned ``name  where`` line each."""
    console.print(title)
    width = max(len(name) for name, _ in parts)
    for name, where in parts:
        console.print(f"  {name:<{width}}  {where}", highlight=False, soft_wrap=True)


def print_steps(console: Console, outcomes: Mapping[str, Mapping[str, int]]) -> None:
    """Per step of a pipeline job: how many items it succeeded, degraded, failed or did not run for."""
    table = Table(title="steps")
    statuses = ("succeeded", "degraded", "failed", "not_run")
    for column in ("step", *statuses):
        table.add_column(column)
    for step, counts in outcomes.items():
        table.add_row(step, *(str(counts.get(status, 0)) for status in statuses))
    console.print(table)


def print_failures(console: Console, job: JobStatus) -> None:
    """Failed items by the step that failed and its error type, most frequent first."""
    if not job.failures:
        return
    table = Table(title="failures")
    for column in ("step", "error_type", "items"):
        table.add_column(column)
    for failure in job.failures:
        table.add_row(failure.step, failure.error_type, str(failure.count))
    console.print(table)


def print_summary(console: Console, job: JobStatus) -> None:
    elapsed = ((job.finished_at_ms or job.created_at_ms) - job.created_at_ms) / 1000
    rate = job.settled / elapsed if elapsed > 0 else 0.0
    console.print(
        f"job {job.job_id} {job.state}: [green]{job.succeeded} succeeded[/green], "
        f"[red]{job.failed} failed[/red], {job.cancelled} cancelled, {job.total} total "
        f"in {elapsed:.2f}s ({rate:.0f} items/s)"
        + (f", {job.degraded} of the succeeded degraded" if job.degraded else "")
    )
    if job.reduce is not None:
        console.print(
            f"reduce: {job.reduce.status}" + (f" ({job.reduce.error.message})" if job.reduce.error else "")
        )
    if job.failures:
        by = ", ".join(f"{f.count} at {f.step} ({f.error_type})" for f in job.failures[:5])
        console.print(f"failed: {by}")
    if job.failed or job.cancelled:
        which = "" if job.failed else " --status cancelled"
        console.print(f"to run them again: toolswarm retry {job.job_id}{which}")


def print_servers(console: Console, settings: Settings, fleet: Fleet) -> None:
    table = Table(title="servers")
    columns = ("name", "transport", "endpoint", "max_concurrency", "in_flight", "queued_chunks", "health")
    for column in columns:
        table.add_column(column)
    for view in fleet.servers:
        server = settings.servers[view.name]
        endpoint = endpoint_of(server)
        table.add_row(
            view.name,
            server.transport,
            endpoint,
            str(server.max_concurrency),
            str(view.in_flight),
            "unknown" if view.queued_chunks is None else str(view.queued_chunks),
            probe_text(view.probe) if view.probe is None or view.probe.ok else "[red]down[/red]",
        )
    console.print(table)
    for view in fleet.servers:
        if view.probe is not None and not view.probe.ok:
            console.print(f"{view.name}: {probe_text(view.probe)}", highlight=False, soft_wrap=True)
    console.print(
        f"{len(fleet.workers)} live worker process(es): " + ", ".join(w.worker for w in fleet.workers)
    )


def print_context(console: Console, context: SessionContext) -> None:
    console.print(
        f"session {context.session_id}: {context.appended} calls recorded, "
        f"{len(context.window)} in the window"
    )
    if context.summary_before_window:
        console.print(f"summary before the window: {context.summary_before_window}", highlight=False)
    table = Table(title="window (oldest first)")
    for column in ("at", "server", "tool", "error", "result"):
        table.add_column(column)
    for record in context.window:
        at = time.strftime("%H:%M:%S", time.localtime(record.at_ms / 1000))
        table.add_row(
            at, record.server, record.tool, "yes" if record.is_error else "", record.result_text[:80]
        )
    console.print(table)


def event_line(entry_id: str, fields: dict[str, str]) -> str:
    kind = fields.get("type", "?")
    rest = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("type", "job_id"))
    return f"{entry_id}  {kind:<14} job={fields.get('job_id', '?')} {rest}"


def probe_text(probe: ProbeResult | None) -> str:
    if probe is None:
        return "not probed yet"
    if probe.ok:
        return f"[green]ok[/green] {probe.latency_ms:.0f} ms, {probe.tool_count} tools"
    kind = f" ({probe.error_type})" if probe.error_type else ""
    down_for = ago(probe.outage_began_ms, int(time.time() * 1000)).removesuffix(" ago")
    return f"[red]down[/red] for {down_for}{kind}: {probe.error}"


def _count(count: ChunkCount) -> str:
    return f"{count.chunks} chunks, {count.items} items"


def print_diagnosis(console: Console, diagnosis: Diagnosis) -> None:
    if not diagnosis.jobs:
        console.print("no running jobs")
    for job in diagnosis.jobs:
        print_job_diagnosis(console, job)
    console.print(f"{len(diagnosis.workers)} live workers")
    for worker in diagnosis.workers:
        beat = "?" if worker.last_heartbeat_s is None else f"{worker.last_heartbeat_s:.1f} s ago"
        console.print(f"  {worker.worker}  last heartbeat {beat}", highlight=False, soft_wrap=True)


def print_job_diagnosis(console: Console, job: JobDiagnosis) -> None:
    console.print(
        f"[bold]job {job.job_id}[/bold] {job.state}: {job.settled} of {job.total} settled, "
        f"{job.unsettled} unsettled",
        highlight=False,
        soft_wrap=True,
    )
    if job.state not in ("finished", "cancelled"):
        broker = "" if job.broker_readable else " (the broker cannot be read: queued means recorded)"
        rows = [
            ("queued", _count(job.queued) + broker),
            ("delivered", _count(job.delivered)),
            ("backlog", _count(job.backlog)),
            ("leases", ", ".join(f"{w}: {n}" for w, n in job.leases.items()) or "none"),
            ("expired leases", str(job.expired_leases)),
            ("waiting on needs", str(job.waiting_on_needs)),
            (
                "uncovered",
                f"{_count(job.uncovered)}"
                + (f" for {job.uncovered.for_s:.0f} s" if job.uncovered.items else ""),
            ),
            ("restored items", str(job.restored_items)),
        ]
        for server in job.servers:
            health = "healthy" if server.healthy else f"unhealthy: {server.error}"
            rows.append((f"server {server.server}", f"{health}; {server.leased_items} items leased"))
        for name, value in rows:
            console.print(f"  {name:<17} {value}", highlight=False, soft_wrap=True)
    console.print(f"  [bold]why:[/bold] {job.why}", highlight=False, soft_wrap=True)
