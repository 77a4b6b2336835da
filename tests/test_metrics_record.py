"""One metrics record per epoch (swarm/monitor/record.py): grouped by concern, the same figures under the same names
for metrics.jsonl, status.json, the dashboard and W&B."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from swarm.monitor.dashboard import DashboardCallback, DashboardState, render
from swarm.monitor.record import EpochMetrics
from swarm.monitor.tracking import WandbCallback

pytestmark = pytest.mark.unit


def record(**groups) -> EpochMetrics:
    base = dict(
        epoch=3,
        time=1.5,
        train=dict(
            trainer="grpo",
            reward=0.25,
            loss=None,
            samples=16,
            total_samples=64,
            compute_s=0.5,
            rewards={"correct": 0.125, "format": 1.0},
        ),
        swarm=dict(
            outcome="averaged",
            group_size=3,
            sync_s=1.5,
            bytes_sent=1000,
            epoch=4,
            peers_online=3,
            swarm_samples=192,
            trusted_peers=2,
            my_weight=1.5,
        ),
        verify=dict(
            audit_s=0.25,
            audits_done=2,
            cheats_found=1,
            my_audits_passed=2,
            my_audits_failed=0,
            banned_peers=1,
            banned=["QmCheater"],
        ),
        ledger=dict(my_credit=12.0, my_credit_provisional=4.0, swarm_credit=30.0, banned=False),
    )
    base.update(groups)
    return EpochMetrics(**base)


def test_flat_figures_are_grouped_numeric_and_flag_every_kind_of_round() -> None:
    flat = record().flat()
    assert flat["epoch"] == 3
    assert flat["train/reward"] == 0.25 and "train/loss" not in flat  # a missing figure is left out
    assert flat["train/rewards/correct"] == 0.125
    assert flat["swarm/outcome/averaged"] == 1 and flat["swarm/outcome/skipped"] == 0
    assert flat["train/trainer/grpo"] == 1 and flat["train/trainer/sft"] == 0
    assert flat["verify/banned_peers"] == 1 and "verify/banned" not in flat  # a list is not a tracker figure
    assert flat["ledger/banned"] == 0
    assert not any(key.startswith("sharing/") for key in flat)  # sharing off: no group
    assert all(isinstance(value, int | float) for value in flat.values())


def test_a_record_survives_its_json_line_and_leaves_out_the_parts_that_are_off() -> None:
    off = record(verify={}, ledger={})
    line = json.loads(json.dumps(off.as_json()))
    assert set(line) == {"epoch", "time", "train", "swarm"}
    assert EpochMetrics.from_json(line) == off
    on = record(sharing=dict(published_groups=2, received_groups=1, used_groups=1, dropped=0))
    assert EpochMetrics.from_json(json.loads(json.dumps(on.as_json()))).flat() == on.flat()


class Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, figures: dict, step: int) -> None:
        self.logged.append((figures, step))


def test_the_dashboard_and_wandb_show_the_records_figures() -> None:
    metrics = record()
    wandb = WandbCallback()
    wandb.tracker = Tracker()
    wandb.on_epoch_end(None, metrics)
    assert wandb.tracker.logged == [(metrics.flat(), 3)]

    state = DashboardState(name="peer", run_id="run")
    DashboardCallback(state).on_epoch_end(None, metrics)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(state))
    text = console.export_text()
    assert "averaged (group of 3)" in text and "64 / 192" in text and "0.250" in text
    assert "12.000000 (4.000000 provisional)" in text
    solo = record(swarm=dict(record().swarm, group_size=1), ledger=dict(record().ledger, my_credit=0.0))
    DashboardCallback(state).on_epoch_end(None, solo)
    assert "nothing credited" in (state.credit or "")
