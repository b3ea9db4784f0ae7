"""The Celery configuration derived from settings: limits that Celery itself would refuse at send time."""

from __future__ import annotations

from genq.celeryconf import BATCH_PRIORITY, TASK_QUEUES, TURN_PRIORITY, celery_config, lane_priority
from genq.settings import load_settings


def test_every_annotated_soft_limit_is_below_its_hard_limit() -> None:
    conf = celery_config(load_settings())
    default_soft, default_hard = conf["task_soft_time_limit"], conf["task_time_limit"]
    for name, limits in conf["task_annotations"].items():
        soft = limits.get("soft_time_limit", default_soft)
        hard = limits.get("time_limit", default_hard)
        assert soft <= hard, f"{name}: soft {soft} > hard {hard}; Celery refuses to send it"
        assert name in TASK_QUEUES


def test_every_task_runs_within_the_visibility_timeout() -> None:
    conf = celery_config(load_settings())
    hard = [limits.get("time_limit", conf["task_time_limit"]) for limits in conf["task_annotations"].values()]
    assert max([*hard, conf["task_time_limit"]]) < conf["visibility_timeout"]


def test_priorities_put_interactive_then_granted_turns_then_the_batch_backlog() -> None:
    # kombu's Redis transport keeps priorities 0, 3, 6, 9 in lists read in that order.
    assert lane_priority(False) is None and lane_priority(False, turn=True) is None
    assert lane_priority(True) == BATCH_PRIORITY == 9
    assert lane_priority(True, turn=True) == TURN_PRIORITY == 3
