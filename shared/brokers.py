"""Which broker carries the chunk messages, and what differs between the two toolswarm supports.

State always lives in Redis; only chunk messages travel through the broker. Two things differ:

- Priorities. kombu's Redis transport serves 0 first (it keeps one list per priority step 0, 3, 6,
  9); AMQP serves the highest number first, and only on a queue declared with ``x-max-priority``.
  Both get the same order: chunks taken back from a dead worker, then suspects of poison run alone,
  then new work.
- What can be read of the queues. On Redis the coverage sweep reads the ids of every queued and
  unacknowledged message (kombu keeps them in Redis lists and a hash). AMQP shows a queue's depth
  only, so there the sweep leans on RabbitMQ's own guarantee instead: a message delivered and not
  acknowledged goes back to its queue the moment its consumer's connection is lost, publishes are
  confirmed, and queues and messages are durable (see shared/coverage.py).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal
from urllib.parse import urlsplit

from shared.errors import ConfigError
from shared.models import Chunk

BrokerKind = Literal["redis", "amqp"]

REDIS_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys", "redis+socket", "sentinel"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

# RabbitMQ keeps a sub-queue per priority level: a few levels are all three lanes need.
AMQP_MAX_PRIORITY = 9


class Lane(Enum):
    """How urgently a chunk should run, most urgent first."""

    TAKEN_BACK = "taken_back"  # items a dead worker held: their job is waiting on them
    # A suspect of poison stops its whole worker process from taking other work while it runs:
    # behind the other taken-back items, so their takeover does not queue behind it.
    ISOLATED = "isolated"
    NEW = "new"


REDIS_PRIORITY = {Lane.TAKEN_BACK: 0, Lane.ISOLATED: 3, Lane.NEW: 6}  # lower runs first
AMQP_PRIORITY = {Lane.TAKEN_BACK: 9, Lane.ISOLATED: 6, Lane.NEW: 3}  # higher runs first


def broker_kind(url: str) -> BrokerKind:
    """The broker a URL names; a ConfigError naming the setting for any other scheme."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    raise ConfigError(
        f"broker_url (TOOLSWARM_BROKER_URL) has scheme {scheme!r}: use redis://, rediss:// or amqp://"
    )


def lane_of(chunk: Chunk) -> Lane:
    if chunk.isolated:
        return Lane.ISOLATED
    return Lane.TAKEN_BACK if chunk.urgent else Lane.NEW


def priority_of(chunk: Chunk, kind: BrokerKind) -> int:
    """The message priority that puts ``chunk`` in its lane on this broker."""
    table = AMQP_PRIORITY if kind == "amqp" else REDIS_PRIORITY
    return table[lane_of(chunk)]
