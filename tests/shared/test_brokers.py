"""The broker a URL names, and each broker's priorities putting chunks in the same order."""

from __future__ import annotations

import pytest

from cli.processes import free_port
from shared.broker_queues import amqp_queue_depths
from shared.brokers import AMQP_MAX_PRIORITY, broker_kind, priority_of
from shared.errors import ConfigError
from shared.models import Chunk


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", "redis"),
        ("rediss://:secret@cache.internal:6380/0", "redis"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp"),
        ("AMQPS://user:pw@rabbit.internal/vhost", "amqp"),
        ("pyamqp://rabbit//", "amqp"),
    ],
)
def test_broker_kind_follows_the_url_scheme(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


def test_an_unknown_scheme_is_one_line_naming_the_setting_without_the_url() -> None:
    with pytest.raises(ConfigError) as error:
        broker_kind("sqs://key:secret@queue")
    message = str(error.value)
    assert "TOOLSWARM_BROKER_URL" in message and "'sqs'" in message
    assert "secret" not in message and "\n" not in message


TAKEN_BACK = Chunk(job_id="j", server="s", items=[1, 2], urgent=True)
ISOLATED = Chunk(job_id="j", server="s", items=[3], urgent=True, isolated=True)
NEW = Chunk(job_id="j", server="s", items=[4, 5])


def test_redis_serves_the_lowest_number_first() -> None:
    order = sorted([NEW, ISOLATED, TAKEN_BACK], key=lambda c: priority_of(c, "redis"))
    assert order == [TAKEN_BACK, ISOLATED, NEW]


def test_amqp_serves_the_highest_number_first_within_the_declared_maximum() -> None:
    order = sorted([NEW, ISOLATED, TAKEN_BACK], key=lambda c: -priority_of(c, "amqp"))
    assert order == [TAKEN_BACK, ISOLATED, NEW]
    assert all(0 < priority_of(c, "amqp") <= AMQP_MAX_PRIORITY for c in order)


def test_queue_depths_of_an_unreachable_rabbitmq_are_unknown_not_an_error() -> None:
    assert amqp_queue_depths(f"amqp://guest:guest@127.0.0.1:{free_port()}//", {"demo": "ns.demo"}) is None
