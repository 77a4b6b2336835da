"""Commitments, contribution files and audit selection: what binds a contribution before averaging, and who audits
it afterwards."""

from __future__ import annotations

import io
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from swarm.verify.commitment import (
    MalformedContribution,
    commitment_mismatch,
    contribution_bytes,
    contribution_path,
    load_contribution,
    make_commitment,
    save_contribution,
)
from swarm.verify.replay import Contribution, GRPOSettings
from swarm.verify.selection import assign_audits, auditors_for, is_selected, round_beacon

pytestmark = pytest.mark.unit


def make_contribution(seed: int = 0) -> Contribution:
    generator = torch.Generator().manual_seed(seed)
    return Contribution(
        state_hash="ab" * 32,
        rows=[{"prompt": "1+2=", "answer": 3}, {"prompt": "4+4=", "answer": 8}],
        settings=GRPOSettings(num_generations=2, seed=seed),
        prompt_token_ids=[[1, 2, 3]] * 2 + [[4, 5, 6]] * 2,
        completion_token_ids=[[7], [8, 9], [7], [9]],
        prompt_ids=torch.tensor([[1, 2, 3]] * 2 + [[4, 5, 6]] * 2),
        prompt_mask=torch.ones(4, 3, dtype=torch.long),
        completion_ids=torch.tensor([[7, 0], [8, 9], [7, 0], [9, 0]]),
        completion_mask=torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]]),
        reward_names=["correct"],
        rewards=torch.tensor([[1.0], [0.0], [0.0], [1.0]]),
        advantages=torch.tensor([0.7, -0.7, -0.7, 0.7]),
        order=[2, 0, 3, 1],
        param_names=["a", "b"],
        gradient=[torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)],
    )


def test_contribution_file_round_trips_and_matches_its_commitment(tmp_path: Path) -> None:
    contribution = make_contribution()
    commitment = make_commitment("peer", 7, contribution, "fp32")
    assert commitment.samples == 4 and commitment.tokens == 12 + 5
    path = save_contribution(tmp_path, 7, contribution, keep_epochs=3)
    assert path == contribution_path(tmp_path, 7)
    loaded = load_contribution(path.read_bytes())
    assert commitment_mismatch(loaded, commitment) is None
    assert loaded.rows == contribution.rows and loaded.order == contribution.order
    assert all(torch.equal(a, b) for a, b in zip(loaded.gradient, contribution.gradient))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(gradient=[torch.zeros(3, 4), torch.zeros(5)]), "gradient_hash"),
        (dict(rewards=torch.tensor([[1.0], [1.0], [1.0], [1.0]])), "rollouts_hash"),
        (dict(completion_token_ids=[[7], [8, 9], [7], [8]]), "rollouts_hash"),
        (dict(rows=[{"prompt": "1+2=", "answer": 3}]), "data_seed"),
        (dict(state_hash="cd" * 32), "state_hash"),
    ],
)
def test_a_contribution_that_differs_from_its_commitment_is_named(change: dict, field: str) -> None:
    contribution = make_contribution()
    commitment = make_commitment("peer", 7, contribution, "fp32")
    assert commitment_mismatch(contribution.with_changes(**change), commitment) == field


def test_old_contributions_are_deleted_after_the_window(tmp_path: Path) -> None:
    for epoch in range(6):
        save_contribution(tmp_path, epoch, make_contribution(epoch), keep_epochs=3)
    assert sorted(path.name for path in tmp_path.glob("epoch-*.pt")) == [
        "epoch-3.pt",
        "epoch-4.pt",
        "epoch-5.pt",
    ]


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a torch file at all",
        pickle.dumps(Evil()),
        b"\x80\x04" + b"\x00" * 100,
    ],
    ids=["empty", "garbage", "pickled-code", "truncated"],
)
def test_malformed_served_bytes_are_rejected_without_running_anything(data: bytes, capsys) -> None:
    with pytest.raises(MalformedContribution):
        load_contribution(data)
    assert "code ran" not in capsys.readouterr().out


def test_a_torch_file_with_wrong_fields_is_rejected() -> None:
    good = torch.load(io.BytesIO(contribution_bytes(make_contribution())), weights_only=True)
    for mutate in (
        lambda d: d.pop("gradient"),
        lambda d: d.update(gradient="nope"),
        lambda d: d.update(order=["x"]),
        lambda d: d.update(completion_token_ids=[[1.5]]),
        lambda d: d.update(settings={"num_generations": 2}),
    ):
        payload = dict(good)
        mutate(payload)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with pytest.raises(MalformedContribution):
            load_contribution(buffer.getvalue())


def test_selection_is_deterministic_and_auditors_are_other_peers() -> None:
    digests = {f"peer{i}": f"{i:064x}" for i in range(5)}
    first = assign_audits(3, digests, "avg", probability=1.0, rechecks=2)
    assert first == assign_audits(3, dict(reversed(digests.items())), "avg", probability=1.0, rechecks=2)
    assert [a.audited for a in first] == sorted(digests)
    for assignment in first:
        assert len(assignment.auditors) == 3 and assignment.audited not in assignment.auditors
        assert len(set(assignment.auditors)) == 3 and assignment.majority == 2
    # the averaged gradient is part of the beacon: another average, other auditors for someone
    other = assign_audits(3, digests, "another average", probability=1.0, rechecks=2)
    assert [a.auditors for a in other] != [a.auditors for a in first]
    assert assign_audits(3, {"alone": "0" * 64}, "avg", probability=1.0, rechecks=2) == []


def test_audit_probability_and_auditor_choice_are_fair() -> None:
    beacons = [round_beacon(epoch, {"a": "1", "b": "2"}, f"avg{epoch}") for epoch in range(4000)]
    rate = sum(is_selected(beacon, "a", 0.1) for beacon in beacons) / len(beacons)
    assert 0.085 < rate < 0.115
    firsts = Counter(auditors_for(beacon, "a", ["a", "b", "c", "d"], 1)[0] for beacon in beacons)
    assert set(firsts) == {"b", "c", "d"} and min(firsts.values()) > 1150
