"""Throughput of one toolswarm job with chunks on the Redis broker and on RabbitMQ, in one run.

The same cluster shape each way (state in one embedded Valkey, the demo MCP server's ``echo``
over streamable HTTP, the same workers and chunk settings); only ``broker_url`` differs. The
two alternate for several rounds and the medians are reported, because the machine is shared
and noisy. RabbitMQ is Debian's rabbitmq-server, started on free 127.0.0.1 ports as in the
tests (tests/rabbit.py). The last line is ``brokers: redis=X amqp=Y amqp/redis=Z.ZZ`` (items/s).

    python bench/brokers.py [--items 3000] [--rounds 3] [--workers 2] [--chunk-size 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import fmt, swarm  # noqa: E402
from cli.processes import free_port, stop_processes  # noqa: E402
from shared.embedded import EmbeddedRedis  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.harness import Cluster, http_demo, make_cluster, start_demo_http  # noqa: E402
from tests.rabbit import rabbitmq_missing, rabbitmq_node  # noqa: E402


def cluster_for(
    workdir: Path, redis_url: str, demo_url: str, broker_url: str | None, args: argparse.Namespace
) -> tuple[Cluster, Settings]:
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = make_cluster(
        workdir,
        redis_url,
        {"demo": http_demo(demo_url, max_concurrency=64, pool_size=1)},
        extra=f"[worker]\nchunk_size = {args.chunk_size}\n",
    )
    if broker_url:
        cluster.env["TOOLSWARM_BROKER_URL"] = broker_url
    return cluster, cluster.settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=50)
    args = parser.parse_args()
    missing = rabbitmq_missing()
    if missing:
        sys.exit(f"brokers: {missing}")
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-brokers-") as tmp:
        workdir = Path(tmp)
        valkey = EmbeddedRedis(Settings(state_dir=str(workdir / "redis-state")))
        redis_url = valkey.start(publish=False)
        port = free_port()
        demo = start_demo_http(port)
        demo_url = f"http://127.0.0.1:{port}/mcp"
        clusters: list[Cluster] = []
        try:
            with rabbitmq_node() as rabbit:
                shapes = {
                    "redis": cluster_for(workdir / "redis", redis_url, demo_url, None, args),
                    "amqp": cluster_for(workdir / "amqp", redis_url, demo_url, rabbit.url, args),
                }
                rates: dict[str, list[float]] = {name: [] for name in shapes}
                for cluster, settings in shapes.values():
                    clusters.append(cluster)
                    cluster.start_workers(args.workers)
                    swarm(cluster, settings, 200, cluster.config_file.parent)  # warm-up: sessions open
                for _ in range(args.rounds):
                    for name, (cluster, settings) in shapes.items():
                        rates[name].append(swarm(cluster, settings, args.items, cluster.config_file.parent))
                for cluster in clusters:
                    cluster.stop_workers()
        finally:
            for cluster in clusters:
                cluster.stop_workers()
            stop_processes([demo], grace_s=5)
            valkey.stop()
    redis_rate, amqp_rate = (statistics.median(rates[name]) for name in ("redis", "amqp"))
    for name, rate in (("redis", redis_rate), ("amqp", amqp_rate)):
        print(f"[{name}] {args.workers} workers, {args.items} items: {rate:8.1f} items/s  {fmt(rates[name])}")
    print(
        f"brokers: redis={redis_rate:.0f} amqp={amqp_rate:.0f} amqp/redis={amqp_rate / redis_rate:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
