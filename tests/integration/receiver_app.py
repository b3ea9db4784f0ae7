"""A producer app's own Celery worker, for the callback tests: it imports nothing from genqueue and
records every callback it receives in a Redis list."""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

BROKER = os.environ.get("RECEIVER_BROKER", "redis://127.0.0.1:1/0")
app = Celery("receiver", broker=BROKER)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)


@app.task(name="myapp.on_generation_done")
def on_generation_done(record: dict[str, Any]) -> None:
    redis.Redis.from_url(BROKER).rpush("receiver:got", json.dumps(record))
