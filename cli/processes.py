"""Processes the CLI starts and stops: workers, the API, Flower and the gateway beside them, the demo
MCP server, the embedded Redis.

Everything started here binds 127.0.0.1 and is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

from rich.console import Console

from cli import display
from cli.commands import check_connections, open_store, submit, watch_job
from shared.embedded import EmbeddedRedis, read_embedded
from shared.errors import ToolswarmError
from shared.redaction import redacted_url
from shared.settings import CONFIG_ENV, Settings, load_settings
from shared.store import JobStore
from workers.runtime import PARENT_PID_ENV

WORKER_STOP_GRACE_S = 15.0
READY_TIMEOUT_S = 60.0


class Stop(Exception):
    """SIGTERM arrived: unwind and stop what we started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None, address: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ToolswarmError(f"process {process.pid} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise ToolswarmError(f"nothing listens on {address}:{port} after {timeout}s")


def spawn_worker(env: dict[str, str], loglevel: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--quiet", f"--loglevel={loglevel}", f"--hostname={name}@%h"],
        env={**env, PARENT_PID_ENV: str(os.getpid())},
        start_new_session=True,
    )


def workers_part(names: list[str], processes: list[subprocess.Popen[bytes]]) -> tuple[str, str]:
    """The workers' line of what runs: their Celery node names (``NAME@%h`` expanded) and pids."""
    host = socket.gethostname()
    ready = ", ".join(f"{name}@{host} (pid {p.pid})" for name, p in zip(names, processes, strict=True))
    return "workers", f"{len(names)} ready: {ready}"


@dataclass(frozen=True)
class Service:
    """A server `up` may run beside the workers: its command line and where it then listens."""

    name: str
    option: str  # of `toolswarm up`
    command: tuple[str, ...]
    path: str = ""

    def spawn(self, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *self.command, f"--port={port}"], env=env, start_new_session=True
        )

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}{self.path}"


API = Service("API", "api-port", ("api",))
FLOWER = Service("Flower", "flower-port", ("flower", "--quiet"))
GATEWAY = Service("gateway", "gateway-port", ("gateway", "--transport=http"), "/mcp")


@dataclass
class Supervised:
    """A process `up` keeps running: started again whenever it exits."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.process = self.start()

    def restart_if_exited(self, console: Console) -> None:
        exited = self.process
        if exited.poll() is not None:
            console.print(f"{self.name} pid {exited.pid} exited with {exited.returncode}; restarting")
            self.process = self.start()


def stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float = WORKER_STOP_GRACE_S) -> None:
    """SIGTERM each by pid, wait for the grace period, then SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def sigterm_as_stop() -> Iterator[None]:
    """SIGTERM (and Ctrl-C) raise :class:`Stop` once; repeats are ignored so the teardown runs to the end."""
    stopping = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        stopping.append(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in stopping:
            signal.signal(sig, signal.SIG_IGN)
        raise Stop()

    previous = {sig: signal.signal(sig, handler) for sig in stopping}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


async def wait_for_workers(settings: Settings, count: int, timeout: float = READY_TIMEOUT_S) -> None:
    async with open_store(settings) as store:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [key async for key in store.client.scan_iter(match=store.keys.workers_pattern)]
            if len(live) >= count:
                return
            await asyncio.sleep(0.1)
    raise ToolswarmError(f"{count} workers did not become ready within {timeout}s")


def up(
    settings: Settings,
    *,
    workers: int,
    loglevel: str,
    console: Console,
    services: Mapping[Service, int] | None = None,
) -> None:
    """Embedded Redis (unless configured), N supervised workers and the ``services`` asked for (each
    on its port), until Ctrl-C or SIGTERM; then say where each part listens."""
    embedded: EmbeddedRedis | None = None
    env = dict(os.environ)
    supervised: list[Supervised] = []
    parts: list[tuple[str, str]] = []
    services = services or {}
    with sigterm_as_stop():
        try:
            if not settings.redis_url:
                running = read_embedded(settings)
                if running is not None:
                    raise ToolswarmError(
                        f"an embedded Redis started from this directory is already running at {running.url} "
                        f"(toolswarm up pid {running.pid})"
                    )
                embedded = EmbeddedRedis(settings)
                env["TOOLSWARM_REDIS_URL"] = embedded.start(publish=True)
                settings = settings.model_copy(update={"redis_url": embedded.url})
                parts.append(("Redis", f"{embedded.url} (embedded, pid {embedded.server_pid})"))
            else:
                # Nothing embedded starts; a wrong password or CA fails here, not in N restarting workers.
                check_connections(settings)
                parts.append(("Redis", f"{redacted_url(settings.redis_url)} (configured)"))
            if settings.broker_url and settings.broker_url != settings.redis_url:
                parts.append(("broker", redacted_url(settings.broker_url)))
            names = [f"w{i}" for i in range(workers)]
            supervised = [
                Supervised(f"worker {name}", partial(spawn_worker, env, loglevel, name)) for name in names
            ]
            asyncio.run(wait_for_workers(settings, workers))
            parts.append(workers_part(names, [s.process for s in supervised]))
            # After the workers: Flower asks them what they run when it starts.
            for service, port in services.items():
                supervised.append(Supervised(service.name, partial(service.spawn, env, port)))
                wait_for_port(port, READY_TIMEOUT_S, supervised[-1].process)
                parts.append((service.name, f"{service.url(port)} (pid {supervised[-1].process.pid})"))
            for service in (API, FLOWER, GATEWAY):
                if service not in services:
                    parts.append((service.name, f"not started (--{service.option} PORT to run it)"))
            display.print_parts(console, "toolswarm is up:", parts)
            console.print("Ctrl-C or SIGTERM stops everything.")
            while True:
                time.sleep(0.5)
                for process in supervised:
                    process.restart_if_exited(console)
        except (KeyboardInterrupt, Stop):
            console.print("stopping ...")
        finally:
            stop_processes([s.process for s in supervised])
            if embedded is not None:
                embedded.stop()


DEMO_TOOLS = ("echo", "add", "sleep", "flaky", "fail")


def demo_items(count: int, seed: int = 7) -> list[str]:
    """A mixed job: mostly quick successes, some sleeps, transient failures and tool errors."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        roll = i % 20
        if roll < 10:
            line = f'{{"tool": "echo", "arguments": {{"text": "item {i}"}}, "key": "echo-{i}"}}'
        elif roll < 14:
            line = f'{{"tool": "add", "arguments": {{"a": {i}, "b": {rng.randint(0, 100)}}}}}'
        elif roll < 17:
            line = f'{{"tool": "sleep", "arguments": {{"ms": {rng.randint(5, 50)}}}}}'
        elif roll < 19:
            line = '{"tool": "flaky", "arguments": {"fail_rate": 0.3}}'
        else:
            line = f'{{"tool": "fail", "arguments": {{"message": "demo failure {i}"}}}}'
        lines.append(line)
    return lines


# The pipeline demo: fetch a generated document, parse it, score it. Scoring is optional (it fails
# for some documents and falls back to no score); fetching is not (some ids do not exist).
DEMO_PIPELINE = {
    "steps": [
        {"name": "fetch", "tool": "fetch", "arguments": {"doc_id": {"$from": "input.doc"}}},
        {"name": "parse", "tool": "parse", "arguments": {"text": {"$from": "steps.fetch.text"}}},
        {
            "name": "score",
            "tool": "score",
            "arguments": {
                "words": {"$from": "steps.parse.structured.words"},
                "sentences": {"$from": "steps.parse.structured.sentences"},
            },
            "critical": False,
            "fallback": {"score": None},
        },
    ]
}
MISSING_DOCUMENT_EVERY = 40


def demo_pipeline_items(count: int) -> list[str]:
    """One document per line; every 40th names a document that does not exist."""
    return [
        json.dumps({"input": {"doc": -i if i % MISSING_DOCUMENT_EVERY == MISSING_DOCUMENT_EVERY - 1 else i}})
        for i in range(count)
    ]


async def step_outcomes(store: JobStore, job_id: str) -> dict[str, Counter[str]]:
    """How each step of a pipeline job's items ended: step -> status -> items."""
    outcomes: dict[str, Counter[str]] = {}
    async for record in store.results(job_id):
        for step in record.steps or []:
            outcomes.setdefault(step.name, Counter())[step.status] += 1
    return outcomes


def demo_config(transport: str, port: int) -> str:
    if transport == "http":
        server = f'transport = "http"\nurl = "http://127.0.0.1:{port}/mcp"\n'
    else:
        server = 'transport = "stdio"\ncommand = "python"\nargs = ["-m", "workers.demo_server"]\n'
    return f"[servers.demo]\n{server}max_concurrency = 64\ntimeout_s = 10\n"


def demo(*, items: int, workers: int, transport: str, console: Console, pipeline: bool = False) -> None:
    """Start everything, run a job of ``items`` mixed calls (or, with ``pipeline``, three-step
    pipeline items) with a progress bar, summarise, tear down."""
    with tempfile.TemporaryDirectory(prefix="toolswarm-demo-") as tmp, sigterm_as_stop():
        workdir = Path(tmp)
        port = free_port()
        config_file = workdir / "toolswarm.toml"
        config_file.write_text(demo_config(transport, port), encoding="utf-8")
        items_file = workdir / "items.jsonl"
        lines = demo_pipeline_items(items) if pipeline else demo_items(items)
        items_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        pipeline_file = workdir / "pipeline.json" if pipeline else None
        if pipeline_file is not None:
            pipeline_file.write_text(json.dumps(DEMO_PIPELINE), encoding="utf-8")
        os.environ[CONFIG_ENV] = str(config_file)
        os.environ.pop("TOOLSWARM_BROKER_URL", None)
        os.environ["TOOLSWARM_STATE_DIR"] = str(workdir / "state")

        redis = EmbeddedRedis(load_settings())
        processes: list[subprocess.Popen[bytes]] = []
        try:
            os.environ["TOOLSWARM_REDIS_URL"] = redis.start(publish=False)
            settings = load_settings()
            parts = [("Redis", f"{redis.url} (embedded, pid {redis.server_pid})")]
            names = [f"demo{i}" for i in range(workers)]
            worker_processes = [spawn_worker(dict(os.environ), "WARNING", name) for name in names]
            processes.extend(worker_processes)
            if transport == "http":
                server = subprocess.Popen(
                    [sys.executable, "-m", "workers.demo_server", "--transport", "http", "--port", str(port)],
                    start_new_session=True,
                )
                processes.append(server)
                wait_for_port(port, 30, server)
                parts.append(("demo MCP server", f"http://127.0.0.1:{port}/mcp (pid {server.pid})"))
            else:
                parts.append(("demo MCP server", "over stdio (each worker session runs its own)"))
            asyncio.run(wait_for_workers(settings, workers))
            parts.append(workers_part(names, worker_processes))
            display.print_parts(console, "toolswarm demo:", parts)
            if pipeline_file is None:
                console.print(f"submitting {items} items ({', '.join(DEMO_TOOLS)})")
            else:
                chain = " → ".join(step["name"] for step in DEMO_PIPELINE["steps"])
                console.print(f"submitting {items} pipeline items ({chain})")
            submitted = submit(settings, items_file, pipeline_file=pipeline_file, server="demo")

            async def follow() -> None:
                async with open_store(settings) as store:
                    job = await watch_job(store, submitted.job_id, console)
                    display.print_summary(console, job)
                    if pipeline_file is not None:
                        display.print_steps(console, await step_outcomes(store, submitted.job_id))
                        display.print_failures(console, job)

            asyncio.run(follow())
        except (KeyboardInterrupt, Stop):
            console.print("interrupted; stopping ...")
        finally:
            stop_processes(processes)
            redis.stop()
