"""Items held by the breaker: waiting on a server whose probes fail, as live workers report them.

A held item spends no attempt while it waits; it runs when a probe finds its server back, or fails
once the server has been down past its ``hold_timeout_s``. ``status`` shows how many items of a job
wait so, on which servers, and the probe's error, so a job that is not moving says why.
"""

from __future__ import annotations

import time

from shared.fleet import live_workers
from shared.models import JobStatus
from shared.probes import last_probe
from shared.settings import Settings
from shared.store import JobStore


async def with_holds(store: JobStore, settings: Settings, status: JobStatus) -> JobStatus:
    """``status`` with ``held`` and ``held_reason`` filled in (unchanged for an ended job)."""
    if status.done:
        return status
    by_server: dict[str, int] = {}
    for worker in await live_workers(store):
        for server, count in worker.held.get(status.job_id, {}).items():
            by_server[server] = by_server.get(server, 0) + count
    if not by_server:
        return status
    now_ms = int(time.time() * 1000)
    reasons = []
    for server in sorted(by_server):
        probe = await last_probe(store.client, store.keys, server)
        if probe is None or probe.ok:
            reasons.append(f"server {server}: waiting for its breaker to close")
            continue
        down_s = (now_ms - probe.outage_began_ms) / 1000
        hold = settings.servers[server].hold_timeout_s if server in settings.servers else None
        until = f", items fail after {hold:g}s" if hold is not None else ""
        reasons.append(f"server {server} down for {down_s:.0f}s{until}: {probe.error}")
    return status.model_copy(update={"held": sum(by_server.values()), "held_reason": "; ".join(reasons)})
