"""Retention with real workers and Redis: ended jobs expire whole after ``job_ttl_s`` while a
running job is untouched; ``toolswarm jobs``; deleting a job now, from the CLI and the HTTP API,
with a worker still holding a chunk of a force-deleted one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_api
from cli.main import app as cli_app
from shared.jobs import Enqueuer, Submitted, submit_job
from shared.keys import Keys
from shared.models import JobSpec
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, wait_until

pytestmark = pytest.mark.integration

TTL_S = 3
KEPT_S = 3600
CHAIN_SLEEP_MS = 3000  # each link of the running job's chain: a worker holds one call this long


@pytest.fixture(scope="module")
def cluster(
    redis_url: str, demo_http_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = make_cluster(
        tmp_path_factory.mktemp("retention"),
        redis_url,
        {"demo": http_demo(demo_http_url, timeout_s=60)},
        extra=f"[state]\njob_ttl_s = {TTL_S}\n",
    )
    try:
        cluster.start_workers(1)
        yield cluster
    finally:
        cluster.stop_workers()


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[TestClient]:
    with TestClient(create_api(cluster.settings)) as client:
        yield client


@pytest.fixture(scope="module")
def enqueuer(cluster: Cluster) -> Enqueuer:
    from workers.app import CeleryEnqueuer, create_app

    return CeleryEnqueuer(create_app(cluster.settings), Keys(cluster.namespace))


def submit(
    cluster: Cluster,
    enqueuer: Enqueuer,
    job: dict[str, Any],
    idempotency_key: str | None = None,
    ttl_s: int = TTL_S,
) -> str:
    """Submit in this process (the API's wire model has no needs), kept ``ttl_s`` once ended."""
    spec = JobSpec.model_validate({"server": "demo", "idempotency_key": idempotency_key, **job})
    settings = cluster.settings
    settings = settings.model_copy(update={"state": settings.state.model_copy(update={"job_ttl_s": ttl_s})})

    async def go(store: JobStore) -> Submitted:
        return await submit_job(spec, settings, store, enqueuer)

    submitted: Submitted = cluster.run(cluster.with_store(go))
    return submitted.job_id


def toolswarm(cluster: Cluster, *args: str) -> Result:
    """The CLI, run in this process (a subprocess would spend seconds importing on a busy machine)."""
    env = {"TOOLSWARM_CONFIG": str(cluster.config_file), "TOOLSWARM_REDIS_URL": cluster.redis_url}
    return CliRunner().invoke(cli_app, list(args), env=env)


def state_of(api: TestClient, job_id: str) -> str | None:
    found = api.get(f"/v1/jobs/{job_id}")
    return None if found.status_code == 404 else str(found.json()["state"])


def wait_state(api: TestClient, job_id: str, *states: str) -> None:
    wait_until(lambda: state_of(api, job_id) in states, 60, f"job {job_id} {' or '.join(states)}")


def keys_of(cluster: Cluster, job_id: str) -> dict[str, int]:
    """Every Redis key naming the job, with its time to live in ms (-1: none)."""

    async def read(store: JobStore) -> dict[str, int]:
        found = [key async for key in store.client.scan_iter(match=f"{store.keys.prefix}*{job_id}*")]
        return {key: await store.client.pttl(key) for key in found}

    result: dict[str, int] = cluster.run(cluster.with_store(read))
    return result


def traces(cluster: Cluster, job_id: str) -> list[str]:
    """Where the job still shows outside its own keys: the global sets and the global stream."""

    async def read(store: JobStore) -> list[str]:
        keys = store.keys
        found = []
        if await store.client.zscore(keys.jobs, job_id) is not None:
            found.append("jobs index")
        if await store.client.sismember(keys.active, job_id):
            found.append("active")
        if await store.client.sismember(keys.backlogged, job_id):
            found.append("backlogged")
        if [m for m in await store.client.zrange(keys.leases, 0, -1) if m.startswith(f"{job_id}:")]:
            found.append("leases")
        events = await store.client.xrange(keys.events)
        if [entry for _, entry in events if entry.get("job_id") == job_id]:
            found.append("global events")
        return found

    result: list[str] = cluster.run(cluster.with_store(read))
    return result


def idempotency_ttl(cluster: Cluster, key: str) -> int:
    async def read(store: JobStore) -> int:
        return int(await store.client.pttl(store.keys.idempotency(key)))

    result: int = cluster.run(cluster.with_store(read))
    return result


def everything_job() -> dict[str, Any]:
    """An item pipeline, needs, a failure, a backlog (one item a chunk) and a reduce: every kind of key."""
    items: list[dict[str, Any]] = [
        {"key": f"e{i}", "tool": "echo", "arguments": {"text": f"e{i}"}} for i in range(20)
    ]
    items += [
        {"key": "fails", "tool": "fail", "arguments": {"message": "no"}},
        {
            "key": "piped",
            "needs": ["e0"],
            "steps": [
                {"name": "first", "tool": "echo", "arguments": {"text": {"$from": 'needs."e0".text'}}},
                {"name": "second", "tool": "echo", "arguments": {"text": {"$from": "steps.first.text"}}},
            ],
        },
    ]
    return {"items": items, "chunk_size": 1, "reduce": {"tool": "echo", "arguments": {"text": "done"}}}


def chain_job(links: int) -> dict[str, Any]:
    """Sleeps that run one after another (each needs the one before): running for links times the sleep."""
    items = [
        {
            "key": f"r{n}",
            "tool": "sleep",
            "arguments": {"ms": CHAIN_SLEEP_MS},
            **({"needs": [f"r{n - 1}"]} if n else {}),
        }
        for n in range(links)
    ]
    return {"items": items}


def test_ended_jobs_expire_whole_while_a_running_job_is_untouched_then_delete(
    cluster: Cluster, api: TestClient, enqueuer: Enqueuer
) -> None:
    everything = submit(cluster, enqueuer, everything_job(), idempotency_key="retention-everything")
    logged = submit(
        cluster,
        enqueuer,
        {"tool": "echo", "items": [{"arguments": {"text": "x"}}] * 3, "state_mode": "log"},
        idempotency_key="retention-logged",
    )
    running = submit(cluster, enqueuer, chain_job(links=6), idempotency_key="retention-running")
    # Each ended job's keys are read as soon as its record has an expiry (the log job's once its
    # snapshot, written just after its end, is there too), before any of them can expire.
    last_written = {everything: ":items", logged: ":snapshot"}
    seen: dict[str, dict[str, int]] = {}

    def ended_with_expiry() -> bool:
        for job_id, last in last_written.items():
            found = keys_of(cluster, job_id)
            record_ttl = found.get(Keys(cluster.namespace).job(job_id).meta, -1)
            if job_id not in seen and record_ttl > 0 and any(key.endswith(last) for key in found):
                seen[job_id] = found
        return len(seen) == len(last_written)

    wait_until(ended_with_expiry, 60, "both jobs ended, with their keys")
    for ended in seen.values():
        assert [key for key, ttl in ended.items() if ttl <= 0] == [], ended
    wait_state(api, running, "running")
    kinds = {key.rsplit("}", 1)[1] for key in seen[everything]}
    assert {"", ":items", ":results", ":epochs", ":events", ":failures", ":needs", ":dependents"} <= kinds
    assert ":waiting" in kinds
    assert 0 < idempotency_ttl(cluster, "retention-everything") <= TTL_S * 1000
    assert idempotency_ttl(cluster, "retention-running") == -1

    def expired() -> bool:
        return not keys_of(cluster, everything) and not keys_of(cluster, logged)

    wait_until(expired, 30, "the ended jobs' keys expire")
    wait_until(
        lambda: not traces(cluster, everything) and not traces(cluster, logged), 30, "the reaper drops them"
    )
    assert idempotency_ttl(cluster, "retention-everything") == -2
    assert state_of(api, everything) is None

    # The running job is untouched: all its keys, no expiry, still running.
    assert state_of(api, running) == "running"
    untouched = keys_of(cluster, running)
    assert untouched and all(ttl == -1 for ttl in untouched.values()), untouched

    refused = toolswarm(cluster, "delete", running)
    assert refused.exit_code == 1
    assert f"job {running} is running: cancel it first, or force the delete" in refused.stderr
    assert keys_of(cluster, running)

    forced = toolswarm(cluster, "delete", running, "--force", "--json")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(forced.stdout) == {"deleted": running, "state": "cancelled"}
    assert keys_of(cluster, running) == {}
    assert traces(cluster, running) == []
    assert idempotency_ttl(cluster, "retention-running") == -2

    # The worker still in a call of the deleted job commits when it ends: refused, nothing written.
    def refused_late() -> bool:
        lines = cluster.worker_logs(tail=50_000).splitlines()
        return any(f"'job_id': '{running}'" in line and "'refused': 1" in line for line in lines)

    wait_until(refused_late, 30, "the worker's late commit of the deleted job")
    assert keys_of(cluster, running) == {}
    assert traces(cluster, running) == []


def test_jobs_listed_and_deleted_over_http(cluster: Cluster, api: TestClient, enqueuer: Enqueuer) -> None:
    ended = submit(
        cluster,
        enqueuer,
        {"tool": "echo", "items": [{"arguments": {"text": "x"}}] * 2},
        idempotency_key="http-ended",
        ttl_s=KEPT_S,
    )
    logged = submit(
        cluster,
        enqueuer,
        {"tool": "echo", "items": [{"arguments": {"text": "x"}}] * 3, "state_mode": "log"},
        ttl_s=KEPT_S,
    )
    running = submit(cluster, enqueuer, chain_job(links=4), ttl_s=KEPT_S)
    wait_state(api, ended, "finished")
    wait_state(api, logged, "finished")
    wait_state(api, running, "running")

    # `jobs`: newest first with progress; --json gives the status models.
    listed = toolswarm(cluster, "jobs", "--json", "--limit", "3")
    assert listed.exit_code == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["job_id"] for row in rows] == [running, logged, ended]
    assert rows[0]["state"] == "running" and rows[0]["expires_at_ms"] is None
    assert rows[1]["state"] == "finished" and rows[1]["succeeded"] == 3 and rows[1]["expires_at_ms"]

    # DELETE: 409 while running unless forced.
    conflict = api.delete(f"/v1/jobs/{running}")
    assert conflict.status_code == 409
    assert conflict.json()["detail"].startswith(f"job {running} is running: cancel it first")
    forced = api.delete(f"/v1/jobs/{running}", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["state"] == "cancelled"
    assert keys_of(cluster, running) == {} and traces(cluster, running) == []

    # --state filters; the table shows progress.
    finished = toolswarm(cluster, "jobs", "--state", "finished", "--json")
    assert [row["job_id"] for row in json.loads(finished.stdout)] == [logged, ended]
    table = toolswarm(cluster, "jobs", "-n", "1")
    assert table.exit_code == 0, table.stderr
    assert logged in table.stdout and ended not in table.stdout and "3/3 (100%)" in table.stdout
    bad = toolswarm(cluster, "jobs", "--state", "done")
    assert bad.exit_code == 1
    assert "--state must be one of pending, running, finished, cancelled, not 'done'" in bad.stderr

    # An ended job goes at once, its idempotency key with it; then it is unknown (404).
    deleted = api.delete(f"/v1/jobs/{ended}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["state"] == "finished" and deleted.json()["succeeded"] == 2
    assert api.get(f"/v1/jobs/{ended}").status_code == 404
    assert keys_of(cluster, ended) == {} and traces(cluster, ended) == []
    gone = api.delete(f"/v1/jobs/{ended}")
    assert (gone.status_code, gone.json()) == (404, {"detail": f"job {ended} does not exist"})
    assert idempotency_ttl(cluster, "http-ended") == -2
