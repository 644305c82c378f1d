"""Process-level settings for toolswarm's long-running asyncio processes (workers, the demo
server) and for the bench's direct client, which must run like a worker."""

from __future__ import annotations

import asyncio
import gc

# Collect the youngest generation every 7000 net container allocations instead of 700. Each call
# keeps a few dozen objects alive for its whole length (request, context, scopes, futures), so
# at 700 nearly every one was walked by one to three young collections, promoted, and walked
# again in the older ones. At 7000 most are gone before a collection comes round.
YOUNG_THRESHOLD = 7000


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (not on Windows): the loop's own work per tool call is a
    sixth of a worker's CPU on the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def tune_gc() -> None:
    """Freeze what startup left (imports, app objects: never garbage, but walked by every full
    collection with the loop stopped) and collect young objects less often."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
