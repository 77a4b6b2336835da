"""The SFT warm start of a GRPO recipe (the ``warm_start`` section; the shipped default uses it): SFT rounds on the
recipe's reference answers for the first epochs, then GRPO, in lock-step on every peer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from swarm.errors import UserError
from swarm.recipe import Recipe, load_recipe
from swarm.training.trainer import SwarmTrainer
from tests.conftest import read_json, read_metrics, run_local


@pytest.mark.unit
def test_warm_start_rows_carry_the_recipes_reference_answer() -> None:
    recipe = load_recipe("arithmetic")
    rows = recipe.warm_start_rows("run", "peer", 3, 5)
    assert rows == [dict(row, completion=row["answer"]) for row in recipe.assigned_rows("run", "peer", 3, 5)]
    a, b = rows[0]["prompt"].rstrip("=").split("+")
    assert rows[0]["completion"] == str(int(a) + int(b))


def _recipe(reference) -> Recipe:
    return Recipe(
        name="sums",
        trainer="grpo",
        make_example=lambda rng: {"prompt": f"{rng.randint(0, 9)}="},
        reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
        warm_start_completion=reference,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "reference, expected",
    [
        (None, "recipe sums: warm_start.epochs needs the recipe's warm_start_completion"),
        (
            lambda row: 7,
            "recipe sums: warm_start_completion must return a non-empty string, got int 7 on row 0 of epoch 0",
        ),
        (lambda row: row["answer"], "recipe sums: warm_start_completion raised KeyError on row 0 of epoch 0"),
    ],
)
def test_a_recipe_that_cannot_be_warm_started_says_so(reference, expected) -> None:
    with pytest.raises(UserError) as caught:
        _recipe(reference).warm_start_rows("run", "peer", 0, 2)
    assert str(caught.value).startswith(expected)


@pytest.mark.unit
def test_the_rate_set_for_a_phase_survives_trls_constant_scheduler() -> None:
    """A constant scheduler built over the swarm's optimizer (as TRL builds one over the optimizer it is handed)
    multiplies the ``initial_lr`` it recorded the first time, so switching phases moves that too, or the warm
    start's rate would stick."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    get_scheduler("constant", optimizer=optimizer)  # the first epoch's scheduler records initial_lr

    holder = type("Holder", (), {"optimizer": optimizer})()
    SwarmTrainer._set_learning_rate(holder, 0.001)
    scheduler = get_scheduler("constant", optimizer=optimizer)  # the next epoch's
    parameter.grad = torch.ones(2)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_swarm_warm_starts_with_sft_then_trains_and_audits_grpo_in_lockstep(tmp_path: Path) -> None:
    """The shipped schedule, shortened: 2 peers, 3 warm-start epochs then GRPO. Both peers run the same kind of
    round at every epoch, end with identical parameters, and only the GRPO rounds carry rewards and are audited."""
    result, summary = run_local(
        tmp_path,
        2,
        6,
        ["warm_start.epochs=3", "verify.audit_probability=1.0", "monitor.eval_every=3"],
        timeout=400,
        schedule={},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peers = summary["peers"]
    assert len({peer["param_checksum"] for peer in peers}) == 1, "peers ended with different parameters"
    for index, peer in enumerate(peers):
        history = {row["epoch"]: row for row in peer["history"]}
        assert [history[epoch]["trainer"] for epoch in range(6)] == ["sft"] * 3 + ["grpo"] * 3
        assert all(history[epoch]["reward"] is None and history[epoch]["loss"] > 0 for epoch in range(3))
        assert all(isinstance(history[epoch]["reward"], float) for epoch in range(3, 6))
        status = read_json(tmp_path / "w" / f"peer_{index}" / "status.json")
        assert (
            status["verify"]["audits_done"] > 0
            and status["verify"]["my_audits_failed"] == 0
            and not status["verify"]["banned"]
        )
        assert "eval/greedy/correct" in peer["eval"]["figures"]
    # every warm-start epoch went through the all-reduce in a group of both peers; a peer whose side of it failed
    # under load (hivemind's all-reduce can fail one-sidedly) recovers by resyncing, which the checksums prove
    rounds = {
        index: [
            (m["epoch"], m["swarm"]["outcome"], m["swarm"]["group_size"])
            for m in read_metrics(tmp_path / "w" / f"peer_{index}")
        ]
        for index in range(2)
    }
    for epoch in range(3):
        assert any(row == (epoch, "averaged", 2) for rows in rounds.values() for row in rows), (
            f"warm-start epoch {epoch} was not averaged: {rounds}"
        )
    # a warm-start round is SFT on 128 reference answers (prompts_per_round x num_generations), a GRPO round 16 x 8
    assert all(m["train"]["samples"] == 128 for m in read_metrics(tmp_path / "w" / "peer_0"))


@pytest.mark.unit
def test_a_recipe_without_a_reference_answer_runs_no_warm_start(tmp_path: Path, caplog) -> None:
    """The shipped configs ask for a warm start; a researcher's GRPO recipe without a reference answer must still
    run with them (GRPO from the first epoch, said once), not fail."""
    from swarm.config import SwarmConfig

    config = SwarmConfig.model_validate(dict(workdir=str(tmp_path), warm_start=dict(epochs=5)))
    recipe = _recipe(None)
    recipe.alphabet = "0123456789="
    with caplog.at_level("WARNING"):
        trainer = SwarmTrainer(config, recipe=recipe)
    assert trainer.warm_start_epochs == 0
    assert (
        "recipe sums has no warm_start_completion" in caplog.text
        and "warm_start.epochs=5 is ignored" in caplog.text
    )


@pytest.mark.e2e
def test_the_shipped_default_warm_starts_the_arithmetic_recipe() -> None:
    """configs/default.yaml (what launch.sh and swarm local run) trains a model that can answer before GRPO starts:
    the warm start is on, and GRPO then runs at a rate that keeps what it taught."""
    from swarm.config import load_config

    config = load_config(environ={})
    assert config.recipe.name == "arithmetic" and config.warm_start.epochs > 0
    assert config.training.learning_rate < (config.warm_start.learning_rate or 0)
    row = load_recipe("arithmetic").warm_start_rows(config.run_id, "peer", 0, 1)[0]
    assert row["completion"].isdigit()
