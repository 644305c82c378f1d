"""The ``toolswarm`` command."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from cli import display
from shared.errors import ToolswarmError
from shared.redaction import redacted
from shared.settings import CONFIG_ENV, Settings, load_settings

if TYPE_CHECKING:
    from shared.jobs import Submitted

T = TypeVar("T")

app = typer.Typer(
    name="toolswarm",
    help="Bulk MCP tool calls on a swarm of stateless Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="text, or json: one object per line with job_id, chunk, item, server (default: log_format).",
    ),
]
LogLevelOption = Annotated[str, typer.Option(help="debug, info (with access logs), warning or error.")]


class Failure(Exception):
    """Ends the command with a one-line error and exit code 1."""


@app.callback()
def _global(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help=f"Config file (default: ${CONFIG_ENV} or ./toolswarm.toml)."),
    ] = None,
) -> None:
    if config is not None:
        # Every process this command starts (workers, Celery's config module) reads the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())


def settings() -> Settings:
    return load_settings()


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


@contextmanager
def _errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except (ToolswarmError, Failure) as exc:
        err_console.print(f"[red]error:[/red] {redacted(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


# --- jobs -------------------------------------------------------------------------------------


@app.command()
def submit(
    items_file: Annotated[
        Path,
        typer.Argument(
            help="JSON Lines: one {tool, arguments, server?, key?} or {steps, input?, key?} a line "
            "({input, key?} with --pipeline)."
        ),
    ],
    pipeline: Annotated[
        Path | None,
        typer.Option(help='A pipeline file ({"steps": [...]}) applied to every line of the items file.'),
    ] = None,
    reduce: Annotated[
        Path | None,
        typer.Option(
            help='A reduce file ({"tool", "arguments", ...}): one call over the job summary, at the end.'
        ),
    ] = None,
    server: Annotated[str | None, typer.Option(help="Server for items that name none.")] = None,
    tool: Annotated[str | None, typer.Option(help="Tool for items that name none.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting twice with it returns one job.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Items per Celery message.")] = None,
    state_mode: Annotated[
        str | None, typer.Option(help="cas (counters updated in place) or log (event log + snapshots).")
    ] = None,
    validate: Annotated[
        bool,
        typer.Option("--validate/--no-validate", help="Check arguments against the tools' input schemas."),
    ] = True,
    retry_attempts: Annotated[
        int | None, typer.Option(min=1, help="Attempts per item for this job (overrides the servers').")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Show progress until the job finishes.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Submit a bulk job from an items file."""
    from cli import commands

    with _errors_as_one_line():
        submitted = commands.submit(
            settings(),
            items_file,
            pipeline_file=pipeline,
            reduce_file=reduce,
            server=server,
            tool=tool,
            idempotency_key=idempotency_key,
            chunk_size=chunk_size,
            state_mode=state_mode,
            validate=validate,
            retry_attempts=retry_attempts,
        )
        _report_submitted(submitted, watch=watch, as_json=as_json)


def _report_submitted(submitted: Submitted, *, watch: bool, as_json: bool) -> None:
    from cli import commands

    if as_json:
        print(
            json.dumps({"job_id": submitted.job_id, "total": submitted.total, "existing": submitted.existing})
        )
    else:
        again = " (existing job for this idempotency key)" if submitted.existing else ""
        console.print(f"job [bold]{submitted.job_id}[/bold]: {submitted.total} items{again}")
    if watch:
        status = commands.watch(settings(), submitted.job_id, console=err_console if as_json else console)
        if not as_json:
            display.print_summary(console, status)


@app.command()
def retry(
    job_id: str,
    status_filter: Annotated[
        str, typer.Option("--status", help="Which items to run again: failed or cancelled.")
    ] = "failed",
    error_type: Annotated[
        str | None, typer.Option("--error-type", help="Only items with this error type.")
    ] = None,
    step: Annotated[str | None, typer.Option("--step", help="Only items that failed at this step.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Show progress until the new job finishes.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Submit a new job of a job's failed (or cancelled) items: same specs, keys, pipeline and reduce."""
    from cli import commands

    with _errors_as_one_line():
        submitted = commands.retry(settings(), job_id, status_filter, error_type, step)
        _report_submitted(submitted, watch=watch, as_json=as_json)


@app.command()
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Show a job's counters and state."""
    from cli import commands

    with _errors_as_one_line():
        job = commands.status(settings(), job_id)
        if as_json:
            print(job.model_dump_json())
        else:
            display.print_status(console, job)


@app.command()
def doctor(
    job_id: Annotated[
        str | None, typer.Argument(help="The job to look at (default: every running job).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Why a job is not finished: what covers its unsettled items, what does not, the live workers."""
    from cli import commands

    with _errors_as_one_line():
        diagnosis = commands.doctor(settings(), job_id)
        if as_json:
            print(diagnosis.model_dump_json())
        else:
            display.print_diagnosis(console, diagnosis)


@app.command()
def watch(job_id: str) -> None:
    """Show a progress bar until the job finishes."""
    from cli import commands

    with _errors_as_one_line():
        display.print_summary(console, commands.watch(settings(), job_id, console=console))


@app.command()
def results(
    job_id: str,
    status_filter: Annotated[
        str | None,
        typer.Option("--status", help="Only results with this status: succeeded, failed, cancelled."),
    ] = None,
    step: Annotated[
        str | None, typer.Option("--step", help="Only failed items, whose failing step is this one.")
    ] = None,
    reduce: Annotated[
        bool, typer.Option("--reduce", help="The job's reduce record instead of items.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="jsonl (one whole record a line) or csv (index, key, status, error type, error, output).",
        ),
    ] = "jsonl",
    as_json: JsonFlag = False,
) -> None:
    """Stream the job's results in item order: one JSON record a line, or CSV rows."""
    from cli import commands

    with _errors_as_one_line():
        if reduce:
            record = commands.reduce_record(settings(), job_id)
            if record is None:
                raise Failure(f"job {job_id} has no reduce, or it has not settled yet")
            print(record.model_dump_json(exclude_none=True))
            return
        if status_filter not in (None, "succeeded", "failed", "cancelled"):
            raise Failure(f"--status must be succeeded, failed or cancelled, not {status_filter!r}")
        if step is not None and status_filter not in (None, "failed"):
            raise Failure("--step selects failed items: it cannot be combined with --status " + status_filter)
        if export_format not in ("jsonl", "csv"):
            raise Failure(f"--format must be jsonl or csv, not {export_format!r}")
        if output is None:
            commands.export_results(settings(), job_id, sys.stdout, export_format, status_filter, step)
            return
        with output.open("w", encoding="utf-8", newline="") as out:
            written = commands.export_results(settings(), job_id, out, export_format, status_filter, step)
        console.print(f"{written} results written to {output}", highlight=False, soft_wrap=True)
    _ = as_json  # result records are JSON Lines either way


@app.command()
def cancel(
    job_id: str,
    run_reduce: Annotated[
        bool, typer.Option("--reduce/--no-reduce", help="Still run the job's reduce over what settled.")
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Cancel a job: unsettled items end as cancelled, running ones' late results are refused."""
    from cli import commands

    with _errors_as_one_line():
        job = commands.cancel(settings(), job_id, run_reduce)
        if as_json:
            print(job.model_dump_json())
        else:
            display.print_status(console, job)


JOB_STATES = ("pending", "running", "finished", "cancelled")


@app.command()
def jobs(
    state: Annotated[
        str | None, typer.Option("--state", help="Only jobs in this state: " + ", ".join(JOB_STATES) + ".")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many jobs.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first, with their progress."""
    from cli import commands

    with _errors_as_one_line():
        if state is not None and state not in JOB_STATES:
            raise Failure(f"--state must be one of {', '.join(JOB_STATES)}, not {state!r}")
        found = commands.jobs(settings(), state, limit)
        if as_json:
            print(json.dumps([job.model_dump(mode="json") for job in found]))
        else:
            display.print_jobs(console, found)


@app.command()
def delete(
    job_id: str,
    force: Annotated[
        bool, typer.Option("--force", help="Delete a pending or running job too (it is cancelled first).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete a finished or cancelled job now: its results, events and every other key."""
    from cli import commands

    with _errors_as_one_line():
        job = commands.delete(settings(), job_id, force)
        if as_json:
            print(json.dumps({"deleted": job.job_id, "state": job.state}))
        else:
            console.print(f"deleted job {job.job_id} ({job.state}, {job.settled}/{job.total} settled)")


@app.command()
def events(
    job: Annotated[str | None, typer.Option("--job", "-j", help="Only this job's events.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    group: Annotated[
        str | None, typer.Option(help="Read the global stream as this consumer group (implies --follow).")
    ] = None,
    consumer: Annotated[str, typer.Option(help="Consumer name within --group.")] = "cli",
    as_json: JsonFlag = False,
) -> None:
    """Print item and job events (a job's stream, or the global stream)."""
    from cli import commands

    with _errors_as_one_line(), suppress(KeyboardInterrupt):
        commands.print_events(
            settings(),
            job=job,
            follow=follow,
            group=group,
            consumer=consumer,
            as_json=as_json,
            console=console,
        )


@app.command()
def servers(as_json: JsonFlag = False) -> None:
    """List the configured MCP servers and the live workers."""
    from cli import commands

    with _errors_as_one_line():
        config = settings()
        seen = commands.fleet(config)
        if as_json:
            views = {view.name: view for view in seen.servers}
            print(
                json.dumps(
                    {
                        "servers": {
                            name: {
                                **server.model_dump(exclude={"env", "headers"}),
                                **views[name].model_dump(mode="json", exclude={"name", "transport"}),
                            }
                            for name, server in config.servers.items()
                        },
                        "workers": [worker.model_dump(mode="json") for worker in seen.workers],
                    }
                )
            )
        else:
            display.print_servers(console, config, seen)


context_app = typer.Typer(help="Sessions' conversation context: show or clear one.", no_args_is_help=True)
app.add_typer(context_app, name="context")


@context_app.command("show")
def context_show(session: str, as_json: JsonFlag = False) -> None:
    """Show a session's context: its summary and the records of its window."""
    from cli import commands

    with _errors_as_one_line():
        found = commands.context_show(settings(), session)
        if as_json:
            print(found.model_dump_json() if found is not None else "null")
        elif found is None:
            console.print(f"session {session}: no context (never written, cleared, or evicted)")
        else:
            display.print_context(console, found)


@context_app.command("clear")
def context_clear(session: str) -> None:
    """Empty a session's context (between tasks of one long session)."""
    from cli import commands

    with _errors_as_one_line():
        cleared = commands.context_clear(settings(), session)
        console.print(f"session {session}: " + ("cleared" if cleared else "had no context"))


# --- processes --------------------------------------------------------------------------------


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name (default: celery@HOST).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No start-up banner.")] = False,
    servers: Annotated[
        str | None,
        typer.Option(help="A worker pool: serve only these servers (comma-separated); default all."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve Prometheus /metrics on this port (default: off)."),
    ] = None,
    metrics_address: Annotated[
        str | None, typer.Option(help="Address for /metrics (default: worker.metrics_address, 127.0.0.1).")
    ] = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run one worker process (a Celery worker of the toolswarm app)."""
    from cli import commands
    from workers.app import create_app, worker_argv
    from workers.output import prepare_worker_output

    with _errors_as_one_line():
        config = with_log_format(settings(), log_format)
        if servers is not None:
            config = with_pool(config, [name.strip() for name in servers.split(",") if name.strip()])
        commands.check_connections(config)
        config = with_metrics(config, metrics_port, metrics_address)
        celery_app = create_app(config)
        if config.worker.metrics_port is not None:
            from workers.metrics import serve_worker_metrics

            serve_worker_metrics(celery_app, config.worker.metrics_address, config.worker.metrics_port)
        quiet = quiet or config.log_format == "json"  # the banner is not JSON
        prepare_worker_output(config, loglevel=loglevel, quiet=quiet)
        celery_app.worker_main(argv=worker_argv(config, hostname=hostname, loglevel=loglevel, quiet=quiet))


@app.command()
def up(
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes to run.")] = 2,
    loglevel: Annotated[str, typer.Option(help="Worker log level.")] = "WARNING",
    api_port: Annotated[int | None, typer.Option(min=1, max=65535, help="Also run the API here.")] = None,
    flower_port: Annotated[int | None, typer.Option(min=1, max=65535, help="Also run Flower here.")] = None,
    gateway_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Also run the MCP gateway (HTTP) here.")
    ] = None,
) -> None:
    """Run Redis (embedded, unless one is configured), N workers and, if asked, the API, Flower and
    the gateway (on 127.0.0.1) in the foreground; say where each listens."""
    from cli import processes

    with _errors_as_one_line():
        ports = {processes.API: api_port, processes.FLOWER: flower_port, processes.GATEWAY: gateway_port}
        services = {service: port for service, port in ports.items() if port is not None}
        processes.up(settings(), workers=workers, loglevel=loglevel, console=console, services=services)


@app.command()
def demo(
    items: Annotated[int, typer.Option("--items", "-n", min=1, help="Items in the demo job.")] = 2000,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = 2,
    transport: Annotated[str, typer.Option(help="Demo server transport: stdio or http.")] = "http",
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="Three-step pipeline items: fetch → parse → score (optional).")
    ] = False,
) -> None:
    """Run a real job end to end: embedded Redis, the demo MCP server, workers, progress, summary."""
    from cli import processes

    with _errors_as_one_line():
        if transport not in ("stdio", "http"):
            raise Failure(f"--transport must be stdio or http, not {transport!r}")
        processes.demo(items=items, workers=workers, transport=transport, console=console, pipeline=pipeline)


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port to serve Flower on (127.0.0.1).")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No start-up banner; warnings only.")] = False,
) -> None:
    """Run Flower against the configured broker."""
    from cli import commands
    from workers.app import create_app

    with _errors_as_one_line():
        config = settings()
        commands.check_connections(config)
        celery_app = create_app(config)
        # Celery's --quiet drops Flower's banner (its broker and registered tasks); tornado's
        # --logging its info lines.
        quieter = ["--quiet", "flower", "--logging=warning"] if quiet else ["flower"]
        celery_app.start(argv=[*quieter, f"--address={address}", f"--port={port}"])


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
    max_body_mb: Annotated[int, typer.Option(min=1, help="Largest request body accepted (MiB).")] = 16,
    log_level: LogLevelOption = "warning",
    log_format: LogFormatOption = None,
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn). Set TOOLSWARM_API_TOKEN to require a bearer token."""
    import uvicorn

    from api.app import create_api
    from cli import commands

    with _errors_as_one_line():
        config = with_log_format(settings(), log_format)
        start_server_logs(config, log_level)
        commands.check_connections(config)
        uvicorn.run(
            create_api(config, max_body_bytes=max_body_mb * 1024 * 1024),
            host=host,
            port=port,
            log_level=log_level.lower(),
            # In JSON mode uvicorn's loggers (error and access) go to the JSON handler set up above.
            log_config=None if config.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        )


@app.command()
def gateway(
    transport: Annotated[str, typer.Option(help="stdio (for agent and IDE configs) or http.")] = "stdio",
    host: Annotated[str, typer.Option(help="Address to bind (http).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on (http); MCP at /mcp.")] = 8765,
    log_level: LogLevelOption = "warning",
    log_format: LogFormatOption = None,
) -> None:
    """Serve the MCP gateway: agents submit and map tool calls on the swarm through MCP tools.
    Over HTTP, set TOOLSWARM_GATEWAY_TOKEN to require a bearer token."""
    import anyio

    from api.gateway import serve_http, serve_stdio
    from cli import commands

    with _errors_as_one_line():
        config = with_log_format(settings(), log_format)
        start_server_logs(config, log_level)
        commands.check_connections(config)
        if transport == "stdio":
            anyio.run(serve_stdio, config)
        elif transport == "http":
            anyio.run(serve_http, config, host, port, log_level.lower())
        else:
            raise Failure(f"--transport must be stdio or http, not {transport!r}")


def with_log_format(config: Settings, log_format: str | None) -> Settings:
    """The settings with ``--log-format`` applied."""
    if log_format is None:
        return config
    if log_format not in ("text", "json"):
        raise Failure(f"--log-format must be text or json, not {log_format!r}")
    return config.model_copy(update={"log_format": log_format})


def start_server_logs(config: Settings, log_level: str) -> None:
    """JSON logs for the API and the gateway (a worker's are set up when Celery sets up logging),
    started before anything logs; text logs stay uvicorn's and the MCP SDK's own."""
    if config.log_format == "json":
        from shared.log_format import use_json_logs

        use_json_logs(log_level.upper())


def with_pool(config: Settings, servers: list[str]) -> Settings:
    """The settings of a worker pool that serves only ``servers``."""
    unknown = sorted(set(servers) - set(config.servers))
    if unknown or not servers:
        known = ", ".join(sorted(config.servers)) or "none configured"
        raise Failure(f"--servers: unknown servers {unknown or servers} (known: {known})")
    return config.model_copy(update={"worker": config.worker.model_copy(update={"servers": servers})})


def with_metrics(config: Settings, port: int | None, address: str | None) -> Settings:
    """The settings with the worker's /metrics port and address as given on the command line."""
    update = {
        key: value
        for key, value in (("metrics_port", port), ("metrics_address", address))
        if value is not None
    }
    return config.model_copy(update={"worker": config.worker.model_copy(update=update)}) if update else config


def main(argv: list[str] | None = None) -> Any:
    return app(args=argv)


if __name__ == "__main__":
    main()
