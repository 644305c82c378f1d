"""Celery settings, read from toolswarm's typed settings (toml + env) and nothing else."""

from shared.embedded import broker_url as _broker_url
from shared.settings import load_settings

_settings = load_settings()

broker_url = _broker_url(_settings)
broker_connection_retry_on_startup = True
broker_transport_options = {
    # Redelivery by the broker is only a backstop: a message unacked this long is delivered again.
    "visibility_timeout": 3600,
    "global_keyprefix": f"{_settings.namespace}:celery:",
}

# JSON only: a pickle from the broker is code execution.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Results live in toolswarm's own records, committed exactly once; Celery's would be a second copy.
task_ignore_result = True

# Ack after the chunk ran, one message at a time per slot, and give it back if the worker is lost.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Task events for Flower.
worker_send_task_events = True
task_send_sent_event = True

task_default_queue = f"{_settings.namespace}.default"
task_create_missing_queues = True
worker_hijack_root_logger = False
