"""Budget arithmetic and settings: cost units per kind, fixed windows, what a submit is checked against,
and clear errors for a bad budget configuration."""

from __future__ import annotations

import json

import pytest

from genq import keys
from genq.budgets import BudgetBook, cost_of, window_start
from genq.intake import routed, validate
from genq.schemas import JobKind, JobRecord, JobState, Lane, OnBudget
from genq.settings import BudgetSettings, CostTable, SettingsError, load_settings
from tests.helpers import environment


def test_cost_units_per_kind() -> None:
    costs = CostTable(image=0.5, upscale=3, video_second=0.25)
    assert cost_of(JobKind.IMAGE, {"num_images": 4}, costs) == 2.0
    assert cost_of(JobKind.IMAGE, {}, costs) == 0.5
    assert cost_of(JobKind.UPSCALE, {"factor": 4}, costs) == 3
    assert cost_of(JobKind.VIDEO, {"duration": 8}, costs) == 2.0
    assert cost_of(JobKind.VIDEO, {}, costs) == 1.25  # the request's default of 5 s


def test_windows_are_fixed_utc_hours_and_days() -> None:
    at = 1_764_553_234.5  # 2025-12-01 01:40:34.5 UTC
    assert window_start(at, "h") == 1_764_550_800  # 01:00
    assert window_start(at, "d") == 1_764_547_200  # midnight


def _record(producer: str = "shop", num_images: int = 2) -> JobRecord:
    return JobRecord(
        id="j1",
        kind=JobKind.IMAGE,
        state=JobState.PENDING,
        request={"prompt": "p", "num_images": num_images},
        created_at=0,
        updated_at=0,
        producer=producer,
    )


def test_a_plan_charges_the_producers_windows_and_the_totals_capped_ones() -> None:
    settings = BudgetSettings.model_validate(
        {
            "total": {"cost_per_day": 100},
            "producers": {"shop": {"triggers_per_hour": 10, "max_in_flight": 4}},
            "costs": {"image": 2},
        }
    )
    now = 1_764_552_000.0
    plan = BudgetBook(None, settings).plan(_record(), now)  # type: ignore[arg-type]
    assert plan.cost == 4
    # The total has a day cap only: its hour is not kept (a report adds up the producers' hours).
    assert [c[0] for c in plan.charge] == [
        keys.spend("shop", "h", 1_764_550_800),
        keys.spend("shop", "d", 1_764_547_200),
        keys.spend("*", "d", 1_764_547_200),
    ]
    assert [c[3] for c in plan.charge] == [0, 0, 1]  # unanswered cost kept where a cost cap is
    assert plan.seed == [(keys.spend("*", "d", 1_764_547_200), keys.SPEND_PREFIX, ":d:1764547200", 172800)]
    assert [(c[1], c[2], c[3], c[4], c[5]) for c in plan.checks] == [
        ("t", 10.0, 1.0, "producer shop triggers_per_hour=10", 1_764_554_400),
        ("c", 100.0, 4.0, "total cost_per_day=100", 1_764_633_600),
    ]
    assert plan.quota == (keys.inflight("shop"), 4, "producer shop max_in_flight=4")
    assert json.loads(plan.to_json())["producer"] == "shop"


def test_an_unlisted_producer_gets_the_others_policy() -> None:
    settings = BudgetSettings.model_validate({"others": {"triggers_per_day": 5}})
    plan = BudgetBook(None, settings).plan(_record("anyone"), 0.0)  # type: ignore[arg-type]
    assert [c[4] for c in plan.checks] == ["producer anyone triggers_per_day=5"]
    assert plan.quota is None


def test_routing_comes_from_the_request_then_the_producer_policy_then_the_defaults() -> None:
    nightly_policy = {"lane": "batch", "on_budget": "wait"}
    settings = BudgetSettings.model_validate({"producers": {"nightly": nightly_policy}})
    plain = routed(validate({"kind": "image", "prompt": "p"}), settings)
    assert (plain.producer, plain.lane, plain.on_budget) == ("default", Lane.INTERACTIVE, OnBudget.REJECT)
    nightly = routed(validate({"kind": "image", "prompt": "p"}), settings, "nightly")
    assert (nightly.producer, nightly.lane, nightly.on_budget) == ("nightly", Lane.BATCH, OnBudget.WAIT)
    rushed = routed(validate({"kind": "image", "prompt": "p", "lane": "interactive"}), settings, "nightly")
    assert rushed.lane is Lane.INTERACTIVE
    assert "lane" not in rushed.upstream_body() and "producer" not in rushed.upstream_body()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"GENQ_BUDGETS_PRODUCERS": '{"shop": {"triggers_per_hr": 3}}'},
            "GENQ_BUDGETS_PRODUCERS (field shop.triggers_per_hr): Extra inputs are not permitted",
        ),
        (
            {"GENQ_BUDGETS_PRODUCERS": '{"my shop": {}}'},
            "'my shop' is not a producer id",
        ),
        (
            {"GENQ_BUDGETS_TOTAL": '{"triggers_per_day": -1}'},
            "GENQ_BUDGETS_TOTAL (field triggers_per_day): Input should be greater than or equal to 0",
        ),
        (
            {"GENQ_BUDGETS_PRODUCERS": '{"shop": {"lane": "urgent"}}'},
            "GENQ_BUDGETS_PRODUCERS (field shop.lane): Input should be 'interactive' or 'batch'",
        ),
        (
            {"GENQ_BUDGETS_OTHERS": '{"max_in_flight": 0}'},
            "GENQ_BUDGETS_OTHERS (field max_in_flight): Input should be greater than or equal to 1",
        ),
        ({"GENQ_BUDGETS_COSTS": '{"image": 1'}, "GENQ_BUDGETS_COSTS: not valid JSON"),
        ({"GENQ_BUDGETS_BATCH_SHARE": "1"}, "GENQ_BUDGETS_BATCH_SHARE: Input should be less than 1"),
    ],
)
def test_a_bad_budget_configuration_names_the_variable(env: dict[str, str], message: str) -> None:
    with environment(env), pytest.raises(SettingsError) as raised:
        load_settings()
    assert message in str(raised.value)


def test_no_budget_settings_caps_nothing() -> None:
    with environment({}):
        budgets = load_settings().budgets
    plan = BudgetBook(None, budgets).plan(_record("default"), 0.0)  # type: ignore[arg-type]
    assert plan.checks == [] and plan.quota is None and plan.seed == []
    assert [c[0] for c in plan.charge] == [keys.spend("default", "h", 0), keys.spend("default", "d", 0)]
