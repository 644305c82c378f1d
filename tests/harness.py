"""Real parts for tests: an embedded Redis on a free port, the demo MCP server, worker processes.

Everything binds 127.0.0.1 and is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.processes import free_port, stop_processes, wait_for_port
from shared.keys import Keys
from shared.models import JobStatus
from shared.settings import Settings, load_settings
from shared.store import JobStore, connect
from workers.runtime import PARENT_PID_ENV

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout}s: {what}")


async def wait_until_async(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """:func:`wait_until` on an event loop, for a predicate that awaits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"not within {timeout}s: {what}")


def holds_for(predicate: Callable[[], Any], duration: float, what: str, interval: float = 0.05) -> None:
    """Check ``predicate`` again and again for ``duration`` seconds; AssertionError naming ``what``
    the first time it is false."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers and arrays of them read the same in TOML


def server_toml(name: str, **fields: Any) -> str:
    """A [servers.NAME] table."""
    return f"[servers.{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in fields.items())


def stdio_demo(**overrides: Any) -> dict[str, Any]:
    return {"transport": "stdio", "command": "python", "args": ["-m", "workers.demo_server"], **overrides}


def http_demo(url: str, **overrides: Any) -> dict[str, Any]:
    return {"transport": "http", "url": url, **overrides}


@dataclass
class Cluster:
    """A config file, a namespace and the environment every process of one test shares."""

    config_file: Path
    redis_url: str
    namespace: str
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return load_settings(self.config_file)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            cwd=self.config_file.parent,
        )

    def start_workers(
        self,
        count: int,
        *,
        inside: Sequence[str] = (),
        loglevel: str = "INFO",
        wait: bool = True,
        **extra_env: str,
    ) -> list[subprocess.Popen[bytes]]:
        """``inside``: a command prefix the workers run under (``ip netns exec NS`` for a host);
        ``wait``: return once every live worker heartbeats (else at once)."""
        started = []
        for i in range(count):
            log = open(self.config_file.parent / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
            started.append(
                subprocess.Popen(
                    [
                        *inside,
                        sys.executable,
                        "-m",
                        "cli",
                        "worker",
                        f"--loglevel={loglevel}",
                        f"--hostname=t{len(self.workers)}-{i}@%h",
                    ],
                    # Exit with the test (or benchmark) process, even when it is killed.
                    env={**self.env, PARENT_PID_ENV: str(os.getpid()), **extra_env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.config_file.parent,
                    start_new_session=True,
                )
            )
            self.workers.append(started[-1])
        if wait:
            self.run(self.wait_for_workers(len([w for w in self.workers if w.poll() is None])))
        return started

    def stop_workers(self) -> None:
        stop_processes(self.workers, grace_s=10)
        self.workers = []

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    async def with_store(self, fn: Callable[[JobStore], Any]) -> Any:
        client = connect(self.redis_url)
        try:
            return await fn(JobStore(client, Keys(self.namespace)))
        finally:
            await client.aclose()

    async def wait_for_workers(self, count: int, timeout: float = 60) -> None:
        async def check(store: JobStore) -> None:
            async def ready() -> bool:
                live = [k async for k in store.client.scan_iter(match=store.keys.workers_pattern)]
                return len(live) >= count

            try:
                await wait_until_async(ready, timeout, f"{count} workers ready", interval=0.1)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}: {self.worker_logs()}") from None

        await self.with_store(check)

    def wait_for_job(self, job_id: str, timeout: float = 120) -> JobStatus:
        async def wait(store: JobStore) -> JobStatus:
            try:
                return await store.wait_until_done(job_id, timeout)
            except TimeoutError:
                status = await store.status(job_id)
                raise TimeoutError(
                    f"job {job_id} not done after {timeout}s: {status}\n{self.worker_logs()}"
                ) from None

        result: JobStatus = self.run(self.with_store(wait))
        return result

    def worker_logs(self, tail: int = 3000) -> str:
        out = []
        for log in sorted(self.config_file.parent.glob("worker-*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


def make_cluster(
    tmp_path: Path, redis_url: str, servers: Mapping[str, Mapping[str, Any]], extra: str = ""
) -> Cluster:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    config = tmp_path / "toolswarm.toml"
    body = f'namespace = "{namespace}"\n{extra}\n' + "".join(server_toml(n, **s) for n, s in servers.items())
    config.write_text(body, encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOOLSWARM_")},
        "TOOLSWARM_CONFIG": str(config),
        "TOOLSWARM_REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
    }
    return Cluster(config_file=config, redis_url=redis_url, namespace=namespace, env=env)


def start_demo_http(port: int, *args: str) -> subprocess.Popen[bytes]:
    """The demo MCP server over streamable HTTP on 127.0.0.1:port, listening when this returns."""
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.demo_server", "--transport", "http", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port, 30, process)
    return process


@contextmanager
def demo_http_server(*args: str) -> Iterator[str]:
    port = free_port()
    process = start_demo_http(port, *args)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_processes([process], grace_s=5)
