"""The DiLoCo strategy (swarm/training/strategies/diloco.py): inner steps, the pseudo-gradient, the outer Nesterov
step identical on every member, the shared state a peer announces and loads, the settings it refuses."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swarm.config import SwarmConfig
from swarm.errors import UserError
from swarm.node.rounds import Outcome, RoundResult
from swarm.shared_settings import shared_settings
from swarm.training.strategies import DiLoCo, make_strategy, strategy_class
from swarm.training.trainer import SwarmTrainer
from tests.conftest import read_json, read_metrics, run_local

LR, MOMENTUM = 0.7, 0.9


class _Peer:
    """What DiLoCo uses of a SwarmPeer: config, state, epoch, lock, advance."""

    def __init__(self, config: SwarmConfig, state) -> None:
        self.config, self.state, self.epoch, self.samples = config, state, 0, 0
        self.lock = threading.RLock()

    def advance(self, epoch: int, samples: int) -> None:
        self.epoch, self.samples = epoch, self.samples + samples


def _config(**diloco) -> SwarmConfig:
    return SwarmConfig.model_validate(
        dict(averaging=dict(strategy="diloco"), verify=dict(enabled=False), diloco=diloco)
    )


def _member(seed: int, config: SwarmConfig) -> tuple[torch.nn.Module, DiLoCo]:
    torch.manual_seed(0)  # every member starts from the same θ_0
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    peer = _Peer(config, DiLoCo.shared_state(model, inner, config))
    strategy = make_strategy("diloco", peer, inner, max_grad_norm=1.0, cls=DiLoCo)
    return model, strategy


def _gradient(model: torch.nn.Module, seed: int, step: int) -> list[torch.Tensor]:
    """A real gradient of this member's loss on its own data at its current parameters."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    gradient = [param.grad.detach().clone() for param in model.parameters()]
    model.zero_grad(set_to_none=True)
    return gradient


@pytest.mark.unit
def test_members_with_different_inner_steps_end_bit_identical_after_the_nesterov_outer_steps() -> None:
    config = _config(inner_steps=3, outer_lr=LR, outer_momentum=MOMENTUM)
    members = [_member(seed, config) for seed in (1, 2, 3)]
    theta = [param.detach().clone() for param in members[0][1].outer.params]
    momentum = None
    for epoch in range(2):
        pseudo = []
        for seed, (model, strategy) in enumerate(members, start=1):
            strategy.begin_epoch(epoch)
            for param, start in zip(model.parameters(), strategy.outer.params, strict=True):
                assert torch.equal(param.detach(), start.detach()), "an epoch's inner steps start from θ_e"
            for step in range(strategy.inner_steps - 1):
                strategy.inner_step(_gradient(model, seed, 10 * epoch + step))
            # round(): the last inner step, then the pseudo-gradient θ_e − θ_local
            strategy.inner_step(_gradient(model, seed, 10 * epoch + 9))
            pseudo.append(strategy.pseudo_gradient())
        assert not torch.equal(pseudo[0][0], pseudo[1][0]), "members trained on different data"
        for (model, _), delta in zip(members, pseudo, strict=True):
            for param, start, d in zip(model.parameters(), members[0][1].outer.params, delta, strict=True):
                assert torch.equal(start.detach() - param.detach(), d)
        averaged = [torch.stack(parts).mean(0) for parts in zip(*pseudo, strict=True)]
        for _, strategy in members:
            strategy.step(RoundResult(Outcome.AVERAGED, epoch, 3, update=averaged, samples=48))
        # SGD with Nesterov momentum, written out: b ← μ b + g; θ ← θ − lr (g + μ b)
        momentum = averaged if momentum is None else [MOMENTUM * b + g for b, g in zip(momentum, averaged)]
        theta = [t - LR * (g + MOMENTUM * b) for t, g, b in zip(theta, averaged, momentum, strict=True)]
        for model, strategy in members:
            assert strategy.peer.epoch == epoch + 1 and strategy.peer.samples == 48 * (epoch + 1)
            assert not strategy.optimizer.state, "the inner optimizer restarts every epoch"
            for param, outer, expected in zip(model.parameters(), strategy.outer.params, theta, strict=True):
                assert torch.equal(param.detach(), outer.detach()), (
                    "the model continues from the shared state"
                )
                assert torch.allclose(outer.detach(), expected, atol=1e-6)
    shared = [member[1].outer.state_hash(2) for member in members]
    assert len(set(shared)) == 1, "members of one round announce one state"
    flat = [torch.cat([param.detach().flatten() for param in model.parameters()]) for model, _ in members]
    assert all(torch.equal(flat[0], other) for other in flat[1:]), "members ended with different parameters"


@pytest.mark.unit
def test_a_downloaded_shared_state_carries_the_outer_momentum_and_restarts_the_model_from_it() -> None:
    config = _config(inner_steps=2)
    (model, strategy), (late_model, late) = _member(1, config), _member(2, config)
    strategy.inner_step(_gradient(model, 1, 0))
    strategy.inner_step(_gradient(model, 1, 1))
    strategy.step(RoundResult(Outcome.SOLO, 0, update=strategy.pseudo_gradient(), samples=8))
    metadata, tensors = strategy.outer.snapshot(1)
    assert any(key == "momentum_buffer" for _, key in metadata["layout"]), (
        "the served state holds the momentum"
    )
    late.inner_step(_gradient(late_model, 2, 0))  # inner progress of its own, to be discarded
    assert late.outer.load(metadata, tensors) == 1
    late.begin_epoch(1)
    assert late.outer.state_hash(1) == strategy.outer.state_hash(1)
    for mine, theirs in zip(late_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine.detach(), theirs.detach())


@pytest.mark.unit
def test_diloco_refuses_what_it_does_not_support_naming_the_key_and_is_a_shared_setting() -> None:
    diloco = strategy_class("diloco")
    # verification is supported (its inner steps are committed and audited: tests/test_inner_audit.py)
    diloco.check_config(SwarmConfig.model_validate(dict(averaging=dict(strategy="diloco"))))
    with pytest.raises(UserError, match="sharing.enabled=false"):
        diloco.check_config(
            SwarmConfig.model_validate(
                dict(
                    averaging=dict(strategy="diloco"), verify=dict(enabled=False), sharing=dict(enabled=True)
                )
            )
        )
    diloco.check_config(_config())
    assert shared_settings(_config(inner_steps=7))["diloco"]["inner_steps"] == 7
    assert shared_settings(_config(inner_steps=7)) != shared_settings(_config(inner_steps=8))


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_diloco_swarm_ends_on_one_checksum_with_a_better_reward(tmp_path: Path) -> None:
    """The acceptance run: 3 peers, 5 DiLoCo epochs of 4 inner steps each, verified (every inner step committed,
    the audits the beacon picks replayed: all pass)."""
    settings = ["averaging.strategy=diloco", "diloco.inner_steps=4"]
    result, summary = run_local(tmp_path, 3, 5, settings, 400)
    assert result.returncode == 0, result.stderr[-3000:]
    peers = summary["peers"]
    assert len(peers) == 3
    assert len({peer["param_checksum"] for peer in peers}) == 1, "peers ended with different parameters"
    first = [peer["history"][0]["reward"] for peer in peers if peer["history"][0]["epoch"] == 0]
    last = [peer["history"][-1]["reward"] for peer in peers if peer["history"][-1]["epoch"] == 4]
    assert first and last
    assert sum(last) / len(last) > sum(first) / len(first), f"reward did not improve: {first} -> {last}"
    records = [m for i in range(3) for m in read_metrics(tmp_path / "w" / f"peer_{i}")]
    assert sum(m["swarm"]["group_size"] == 3 for m in records) >= 3 * 3, "the peers averaged together"
    # one all-reduce per epoch of 4 inner steps (16 prompts x 8 completions each): a record counts all of them
    assert {m["train"]["samples"] for m in records} == {4 * 16 * 8}
    for index in range(3):
        status = read_json(tmp_path / "w" / f"peer_{index}" / "status.json")
        assert status["verify"]["banned"] == [] and status["verify"]["my_audits_failed"] == 0, status[
            "verify"
        ]


@pytest.mark.e2e
@pytest.mark.timeout(420)
@pytest.mark.parametrize("attack", ["wrong_data", "forged_pseudo_gradient"])
def test_a_peer_cheating_in_one_inner_step_is_caught_and_banned(tmp_path: Path, attack: str) -> None:
    """Issue 14's acceptance of verified DiLoCo: the last of 3 peers cheats in inner step 1 of its 3 only (it
    computes that step on rows it was not assigned), or commits and sends a pseudo-gradient that is not
    θ_e − θ_(e,n) of its steps;
    every contribution is audited (``swarm local`` with an attack), every step of it replayed."""
    settings = ["averaging.strategy=diloco", "diloco.inner_steps=3", "warm_start.epochs=0"]
    settings += [f"verify.attack={attack}", "verify.attack_step=1", "training.prompts_per_round=4"]
    result, summary = run_local(tmp_path, 3, 4, settings, 400)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = {index: (tmp_path / "w" / f"peer_{index}" / "stdout.log").read_text() for index in range(3)}
    assert "CHEATING" in logs[2]
    cheater = read_json(tmp_path / "w" / "peer_2" / "summary.json")["peers"][0]["peer_id"]
    honest = [peer for peer in summary["peers"] if peer["peer_id"] != cheater]
    assert len(honest) == 2 and len({peer["param_checksum"] for peer in honest}) == 1
    expected = {"wrong_data": "wrong_data", "forged_pseudo_gradient": "pseudo_gradient_mismatch"}[attack]
    for index in range(2):
        workdir = tmp_path / "w" / f"peer_{index}"
        status = read_json(workdir / "status.json")
        assert status["verify"]["banned"] == [cheater], logs[index][-3000:]
        assert status["verify"]["my_audits_failed"] == 0 and status["verify"]["my_audits_passed"] >= 1
        events = [json.loads(line) for line in (workdir / "audit_events.jsonl").read_text().splitlines()]
        assert {event["audited"] for event in events} == {cheater}
        assert {kind for event in events for kind in event["verdicts"]} == {expected}
        banned_at = min(event["epoch"] for event in events)
        later = [m for m in read_metrics(workdir) if m["epoch"] > banned_at + 1]
        assert later and all(m["swarm"]["group_size"] <= 2 for m in later), "the cheater was averaged with"


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_inner_time_budget_ends_an_epoch_early_and_the_samples_weigh_what_was_done(
    tmp_path: Path,
) -> None:
    """diloco.inner_seconds: a peer stops its inner steps once the budget is spent (here: after the first one),
    so a slow peer takes fewer steps instead of holding the round; its records count the steps it took."""
    settings = ["averaging.strategy=diloco", "verify.enabled=false", "diloco.inner_steps=6"]
    settings.append("diloco.inner_seconds=0.001")
    result, summary = run_local(tmp_path, 2, 2, settings, 250)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len({peer["param_checksum"] for peer in summary["peers"]}) == 1
    records = [m for i in range(2) for m in read_metrics(tmp_path / "w" / f"peer_{i}")]
    assert len(records) == 4 and {m["train"]["samples"] for m in records} == {16 * 8}


@pytest.mark.unit
@pytest.mark.parametrize("duty", [1.0, 0.5, 0.25])
def test_the_duty_cycle_idles_a_peer_for_the_rest_of_its_time(duty: float) -> None:
    """training.duty_cycle: after a computation of t seconds a peer idles t x (1 / duty - 1) (bench/wan.py's slow
    peer computes a third of the time), and not at all once it is asked to stop."""
    config = SwarmConfig.model_validate(dict(training=dict(duty_cycle=duty)))
    trainer = SimpleNamespace(config=config, _stopping=threading.Event())
    started = time.monotonic()
    SwarmTrainer._idle_for_duty_cycle(trainer, 0.2)
    idled = time.monotonic() - started
    expected = 0.2 * (1 / duty - 1)
    assert expected - 0.01 <= idled <= expected + 0.3, f"idled {idled:.3f}s, expected {expected:.3f}s"
    trainer._stopping.set()
    started = time.monotonic()
    SwarmTrainer._idle_for_duty_cycle(trainer, 10.0)
    assert time.monotonic() - started < 0.1
