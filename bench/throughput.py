"""Throughput of toolswarm's whole path against its ceiling and the naive pattern, in one run.

On the demo MCP server's ``echo`` tool, over streamable HTTP and over stdio, at the same total
concurrency:
- direct: one asyncio process with persistent sessions (the ceiling);
- naive: a new connection (HTTP) or a new server process (stdio) per call;
- swarm: toolswarm end to end — submit → Celery workers → committed results in Redis;
- celery: plain Celery (bench/plain_celery.py), one task per item, a persistent session per
  worker process, one HSET per result, as many worker processes and calls in flight.
Direct, swarm and celery alternate for several rounds and the median is reported, because the
machine is shared and noisy. The last line is
``ratios: swarm/direct=X.XX swarm/naive=Y.YY swarm/celery=Z.ZZ`` (HTTP).

    python bench/throughput.py [--items 3000] [--rounds 3] [--workers 2] [--concurrency 32]
                               [--profile bench/profiles]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import plain_celery  # noqa: E402
from bench.profiling import WorkerProfile, breakdown, components  # noqa: E402
from cli.commands import open_store, submit  # noqa: E402
from cli.processes import free_port, stop_processes  # noqa: E402
from shared.embedded import EmbeddedRedis  # noqa: E402
from shared.mcp_client import build_client, http_client_for  # noqa: E402
from shared.settings import ServerConfig, Settings, WorkerSettings, load_settings  # noqa: E402
from tests.harness import Cluster, http_demo, make_cluster, start_demo_http, stdio_demo  # noqa: E402
from workers.tuning import new_event_loop, tune_gc  # noqa: E402


def echo_call(i: int) -> tuple[str, dict[str, Any]]:
    return "echo", {"text": f"item {i}"}


async def direct(
    config: ServerConfig,
    items: int,
    concurrency: int,
    sessions: int,
    call: Callable[[int], tuple[str, dict[str, Any]]] = echo_call,
) -> float:
    """Persistent sessions, ``concurrency`` calls in flight: the ceiling. Over HTTP each session
    gets the HTTP client settings workers use, so both sides pay the same per request."""
    http = [http_client_for(config) if config.transport == "http" else None for _ in range(sessions)]
    clients = [build_client(config, h) for h in http]
    entered = [await c.__aenter__() for c in clients]
    try:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                result = await entered[i % sessions].call_tool(*call(i))
                assert not result.is_error

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(items)))
        return items / (time.perf_counter() - started)
    finally:
        for c in reversed(entered):
            await c.__aexit__(None, None, None)
        for h in http:
            if h is not None:
                await h.aclose()


async def naive(config: ServerConfig, items: int, concurrency: int) -> float:
    """A new connection per call: what a worker that keeps no sessions does."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore, build_client(config, None) as client:
            result = await client.call_tool("echo", {"text": f"item {i}"})
            assert not result.is_error

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(items)))
    return items / (time.perf_counter() - started)


def swarm(cluster: Cluster, settings: Settings, items: int, workdir: Path) -> float:
    """Submit → workers → every result committed; timed from submit to job.completed."""
    items_file = workdir / f"items-{items}.jsonl"
    if not items_file.exists():
        items_file.write_text(
            "".join(f'{{"tool": "echo", "arguments": {{"text": "item {i}"}}}}\n' for i in range(items))
        )
    started = time.perf_counter()
    submitted = submit(settings, items_file, server="demo")

    async def wait() -> None:
        async with open_store(settings) as store:
            await store.wait_until_done(submitted.job_id)

    asyncio.run(wait())
    elapsed = time.perf_counter() - started
    status = cluster.run(cluster.with_store(lambda store: store.status(submitted.job_id)))
    assert status.succeeded == items, status
    return items / elapsed


class PlainCelery:
    """Plain Celery workers (bench/plain_celery.py) on the same Redis, for one server."""

    def __init__(
        self, redis_url: str, config: ServerConfig, workers: int, threads: int, workdir: Path
    ) -> None:
        self.env = {
            **os.environ,
            plain_celery.BROKER_ENV: redis_url,
            plain_celery.SERVER_ENV: config.model_dump_json(),
            "PYTHONPATH": str(ROOT),
        }
        self.redis_url, self.workdir, self.rounds = redis_url, workdir, 0
        self.results = redis.Redis.from_url(redis_url)
        self.results.delete(plain_celery.READY_KEY)
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.plain_celery",
                    "worker",
                    "--pool",
                    "threads",
                    f"--concurrency={threads}",
                    "--loglevel=WARNING",
                    f"--hostname=plain{i}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env=self.env,
                stdout=open(workdir / f"plain-celery-{i}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
            for i in range(workers)
        ]
        deadline = time.monotonic() + 60
        while int(self.results.get(plain_celery.READY_KEY) or 0) < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"plain Celery workers did not start: see {workdir}/plain-celery-*.log")
            time.sleep(0.1)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def run(self, items: int) -> float:
        """Send one task per item, wait until every result is in Redis; items per second."""
        self.rounds += 1
        job = f"round-{self.rounds}"
        started = time.perf_counter()
        with plain_celery.app.connection_for_write() as connection:
            for i in range(items):
                plain_celery.call.apply_async((job, str(i), *echo_call(i)), connection=connection)
        while self.results.hlen(f"plain-celery:{job}") < items:
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        failed = [v for v in self.results.hvals(f"plain-celery:{job}") if b'"ok": true' not in v]
        assert not failed, failed[:3]
        return items / elapsed

    def stop(self) -> None:
        stop_processes(self.processes, grace_s=10)
        self.results.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU milliseconds per item spent by this process, the workers and the MCP server (if known)."""

    def __init__(self, cluster: Cluster, server_pid: int | None) -> None:
        self.cluster, self.server_pid = cluster, server_pid
        self.samples: dict[str, list[float]] = {}

    def measure(
        self, label: str, items: int, run: Callable[[], float], workers: list[int] | None = None
    ) -> float:
        workers = [w.pid for w in self.cluster.workers] if workers is None else workers
        pids = {"workers": workers, "server": [self.server_pid or 0]}
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        own = time.process_time()
        rate = run()
        spent = {k: sum(cpu_seconds(p) for p in v) - before[k] for k, v in pids.items()}
        spent["client"] = time.process_time() - own
        for part, seconds in spent.items():
            self.samples.setdefault(f"{label}.{part}", []).append(seconds * 1000 / items)
        return rate

    def per_item(self, key: str) -> float:
        return statistics.median(self.samples.get(key) or [0.0])


def run_like_a_worker(coroutine: Coroutine[Any, Any, float]) -> float:
    """On the event loop workers run (uvloop): the ceiling is the best direct client."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def median_of(rounds: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    samples = [measure() for _ in range(rounds)]
    return statistics.median(samples), samples


def run_transport(
    name: str,
    server: dict[str, object],
    args: argparse.Namespace,
    redis_url: str,
    workdir: Path,
    server_pid: int | None = None,
) -> dict[str, float]:
    per_worker = max(1, args.concurrency // args.workers)
    cluster = make_cluster(
        workdir,
        redis_url,
        {"demo": {**server, "max_concurrency": args.concurrency, "pool_size": 1, "timeout_s": 30}},
        extra=f"[worker]\ncalls_in_flight = {per_worker}\nchunk_size = {args.chunk_size}\n"
        f"chunks_in_flight = {args.chunks_in_flight}\n",
    )
    os.environ.update(cluster.env)
    settings = load_settings(cluster.config_file)
    config = settings.servers["demo"]
    plain_celery.app.conf.broker_url = redis_url
    celery: PlainCelery | None = None
    try:
        cluster.start_workers(args.workers)
        celery = PlainCelery(redis_url, config, args.workers, per_worker, workdir)
        plain = celery
        plain.run(200)  # warm-up
        swarm(cluster, settings, 200, workdir)  # warm-up: open every worker's sessions
        run_like_a_worker(direct(config, 200, args.concurrency, args.workers))
        meter = CpuMeter(cluster, server_pid)
        direct_rates: list[float] = []
        swarm_rates: list[float] = []
        celery_rates: list[float] = []
        for _ in range(args.rounds):
            direct_rates.append(
                meter.measure(
                    "direct",
                    args.items,
                    lambda: run_like_a_worker(direct(config, args.items, args.concurrency, args.workers)),
                )
            )
            swarm_rates.append(
                meter.measure("swarm", args.items, lambda: swarm(cluster, settings, args.items, workdir))
            )
            celery_rates.append(
                meter.measure("celery", args.items, lambda: plain.run(args.items), plain.pids)
            )
        if args.profile is not None:  # one more swarm round, sampled, left out of the figures
            args.profile.mkdir(parents=True, exist_ok=True)
            recording = WorkerProfile(cluster.workers[0].pid, args.profile / f"throughput-{name}-worker.txt")
            swarm(cluster, settings, args.items, workdir)
            raw = recording.stop()
            lines = breakdown(components(raw), meter.per_item("swarm.workers"))
            (args.profile / f"throughput-{name}-components.txt").write_text("\n".join(lines) + "\n")
            print(f"[{name}] where a worker's CPU goes (py-spy, own time by component; {raw}):")
            for line in lines[:14]:
                print(f"[{name}]   {line}")
        naive_items = args.naive_items if name == "http" else max(16, args.naive_items // 10)
        naive_rate = asyncio.run(naive(config, naive_items, args.concurrency))
    finally:
        cluster.stop_workers()
        if celery is not None:
            celery.stop()
    d, s, c = statistics.median(direct_rates), statistics.median(swarm_rates), statistics.median(celery_rates)
    print(
        f"[{name}] direct (persistent sessions, c={args.concurrency}): {d:8.1f} items/s  {fmt(direct_rates)}"
    )
    print(
        f"[{name}] naive  (new connection per call):       {naive_rate:8.1f} items/s  ({naive_items} items)"
    )
    print(
        f"[{name}] swarm  ({args.workers} workers, submit→committed):  {s:8.1f} items/s  {fmt(swarm_rates)}"
    )
    print(f"[{name}] celery ({args.workers} plain Celery workers):     {c:8.1f} items/s  {fmt(celery_rates)}")
    client, workers = meter.per_item("direct.client"), meter.per_item("swarm.workers")
    print(
        f"[{name}] CPU ms/item: direct client {client:.2f}, swarm workers {workers:.2f} "
        f"({workers / client if client else 0:.2f}x), swarm submit+wait {meter.per_item('swarm.client'):.2f}"
        + (
            f", server {meter.per_item('direct.server'):.2f} (direct) / {meter.per_item('swarm.server'):.2f}"
            " (swarm)"
            if server_pid
            else ""
        )
    )
    print(
        f"[{name}] CPU ms/item: plain Celery workers {meter.per_item('celery.workers'):.2f}, "
        f"sending {meter.per_item('celery.client'):.2f}; toolswarm's own (swarm workers - direct client) "
        f"{workers - client:.2f}"
    )
    print(
        f"[{name}] swarm/direct={s / d:.2f} swarm/naive={s / naive_rate:.2f} swarm/celery={s / c:.2f}",
        flush=True,
    )
    return {"direct": d, "naive": naive_rate, "swarm": s, "celery": c}


def fmt(samples: list[float]) -> str:
    return "[" + ", ".join(f"{x:.0f}" for x in samples) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--naive-items", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=WorkerSettings().chunk_size)
    parser.add_argument("--chunks-in-flight", type=int, default=WorkerSettings().chunks_in_flight)
    parser.add_argument("--transports", default="http,stdio")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="Also sample one worker with py-spy in an extra round; write its stacks and breakdown here.",
    )
    args = parser.parse_args()

    tune_gc()  # the direct client (the ceiling) runs here: on the workers' collector settings too
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-") as tmp:
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        redis_url = redis.start(publish=False)
        results: dict[str, dict[str, float]] = {}
        try:
            transports = args.transports.split(",")
            if "stdio" in transports:
                (Path(tmp) / "stdio").mkdir()
                results["stdio"] = run_transport("stdio", stdio_demo(), args, redis_url, Path(tmp) / "stdio")
            if "http" in transports:
                (Path(tmp) / "http").mkdir()
                port = free_port()
                http_server = start_demo_http(port)
                try:
                    results["http"] = run_transport(
                        "http",
                        http_demo(f"http://127.0.0.1:{port}/mcp"),
                        args,
                        redis_url,
                        Path(tmp) / "http",
                        server_pid=http_server.pid,
                    )
                finally:
                    stop_processes([http_server], grace_s=5)
        finally:
            redis.stop()
    last = results.get("http") or next(iter(results.values()))
    to_direct, to_naive = last["swarm"] / last["direct"], last["swarm"] / last["naive"]
    to_celery = last["swarm"] / last["celery"]
    print(f"ratios: swarm/direct={to_direct:.2f} swarm/naive={to_naive:.2f} swarm/celery={to_celery:.2f}")


if __name__ == "__main__":
    main()
