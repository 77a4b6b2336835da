"""The ledger recorder's rules, driven through verification's hooks without a network: honest work is credited
samples × rate (provisional, then final once the audit window closes), a cheater whose audited contribution failed
ends at or below zero and banned, auditors are paid, nothing is credited twice, and roots are recorded, anchored
and checked by ``swarm ledger verify``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from swarm.config import SwarmConfig
from swarm.errors import UserError
from swarm.identity import Identity
from swarm.ledger.balances import Balance
from swarm.ledger.config import LedgerConfig, rules_of
from swarm.ledger.entries import MICRO
from swarm.ledger.store import LedgerStore
from swarm.network.records import AuditVerdict, Commitment
from swarm.training.ledger_recorder import LedgerRecorder
from swarm.verify.selection import AuditAssignment
from tests.test_ledger import _ledger_cli

pytestmark = pytest.mark.unit

WINDOW = 3
SAMPLES = 32


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return [Identity.load_or_create(folder / name) for name in ("alice", "bob", "carol")]


def _config(workdir: Path) -> SwarmConfig:
    return SwarmConfig(
        workdir=workdir, verify=dict(audit_window=WINDOW, audit_probability=1.0, recheck_auditors=2)
    )


@pytest.fixture
def recorders(tmp_path: Path, keys: list[Identity]):
    started = []
    for identity in keys:
        recorder = LedgerRecorder(
            _config(tmp_path / identity.name), identity, None, settings=LedgerConfig(anchor_every=2)
        )
        recorder.start()
        started.append(recorder)
    yield started
    for recorder in started:
        recorder.close()


def commitment(identity: Identity, epoch: int, samples: int = SAMPLES) -> Commitment:
    return Commitment(
        peer_id=str(identity.peer_id),
        epoch=epoch,
        state_hash="s" * 64,
        data_seed=f"{epoch:064x}",
        samples=samples,
        tokens=samples * 10,
        rollouts_hash="r" * 64,
        gradient_hash="g" * 64,
        precision="fp32",
    )


def verdict(auditor: Identity, audited: Commitment, passed: bool, role: str = "primary") -> AuditVerdict:
    return AuditVerdict(
        auditor=str(auditor.peer_id),
        audited=audited.peer_id,
        epoch=audited.epoch,
        commitment=audited.digest(),
        verdict="pass" if passed else "gradient_mismatch",
        error=1e-7 if passed else 2.0,
        role=role,
    )


def exchange(recorders: list[LedgerRecorder]) -> None:
    """What replication does, without a DHT: every copy gets every other copy's entries, in chain order."""
    for source in recorders:
        for target in recorders:
            if target is source:
                continue
            have = target._store.heads().get(source.me, -1)
            for entry, body in source._store.rows_with_commitments(source.me, have + 1):
                target._store.add(entry, body)


def round_of(recorders: list[LedgerRecorder], epoch: int) -> dict[str, Commitment]:
    commitments = {r.me: commitment(r.identity, epoch) for r in recorders}
    for recorder in recorders:
        recorder.on_round(epoch, commitments)
    return commitments


def everyone(recorders: list[LedgerRecorder], epoch: int) -> list[dict[str, Balance]]:
    return [recorder.balances(epoch) for recorder in recorders]


def test_honest_work_is_credited_provisionally_then_finally(recorders: list[LedgerRecorder]):
    for epoch in range(2):
        round_of(recorders, epoch)
    exchange(recorders)
    credit = SAMPLES * MICRO
    copies = everyone(recorders, 1)
    assert all(copy == copies[0] for copy in copies)  # every copy holds the same entries: the same balances
    assert set(copies[0].values()) == {Balance(final=0, provisional=2 * credit)}
    # epoch 0's audit window closes at epoch 0 + WINDOW, epoch 1's one later
    assert set(recorders[0].balances(WINDOW).values()) == {Balance(final=credit, provisional=credit)}
    assert set(recorders[0].balances(WINDOW + 1).values()) == {Balance(final=2 * credit, provisional=0)}
    # the rules the copy was written with travel with it: the CLI reads the same balances
    code, text = _ledger_cli("balance", "--db", str(recorders[1].path), "--json", "--epoch", str(WINDOW + 1))
    assert code == 0 and {row["final"] for row in json.loads(text).values()} == {2 * credit}


def test_work_nobody_else_saw_earns_nothing(recorders: list[LedgerRecorder]):
    alice = recorders[0]
    alice.on_round(0, {alice.me: commitment(alice.identity, 0)})  # a "round" of one: unattested
    exchange(recorders)
    assert recorders[1].balances(10).get(alice.me, Balance()) == Balance()


def test_a_failed_audit_slashes_and_bans_and_auditors_are_paid(recorders: list[LedgerRecorder]):
    alice, bob, carol = recorders  # carol cheats at epoch 0
    commitments = round_of(recorders, 0)
    cheat = commitments[carol.me]
    assignment = AuditAssignment(0, carol.me, cheat.digest(), (alice.me, bob.me))
    alice.on_verdict(verdict(alice.identity, cheat, passed=False))
    bob.on_verdict(verdict(bob.identity, cheat, passed=False, role="recheck"))
    for auditor in (alice, bob):
        auditor.on_final(assignment, False, [], 1)
    carol.on_final(assignment, False, [], 1)  # carol's own view: it writes nothing against itself
    exchange(recorders)
    rules = alice.rules
    copies = everyone(recorders, 1)
    assert all(copy == copies[0] for copy in copies)
    balance = copies[0][carol.me]
    assert balance.banned and balance.total <= 0
    # slashed once, not twice
    assert balance.total == -(rules.slash_amount + SAMPLES * rules.slash_per_sample)
    assert rules.deters(audit_probability=0.1, samples=SAMPLES)
    honest = Balance(final=0, provisional=SAMPLES * rules.credit_per_sample + rules.audit_credit)
    assert copies[0][alice.me] == copies[0][bob.me] == honest
    assert len({e.kind for e in LedgerStore(carol.path).entries()}) == 4  # contribution, audit, slash, ban


def test_one_failing_auditor_alone_slashes_nobody(recorders: list[LedgerRecorder]):
    alice, bob, carol = recorders
    commitments = round_of(recorders, 0)
    alice.on_verdict(verdict(alice.identity, commitments[bob.me], passed=False))  # a lying (or wrong) auditor
    exchange(recorders)
    assert carol.balances(0)[bob.me] == Balance(final=0, provisional=SAMPLES * MICRO)


def test_hooks_called_twice_or_by_two_processes_credit_once(tmp_path: Path, recorders: list[LedgerRecorder]):
    alice, bob, _ = recorders
    commitments = round_of(recorders, 0)
    round_of(recorders, 0)  # the same round reported again
    for _ in range(2):
        bob.on_verdict(verdict(bob.identity, commitments[alice.me], passed=True))
    # alice's second process
    twin = LedgerRecorder(_config(tmp_path / alice.identity.name), alice.identity, None)
    twin.start()
    try:
        twin.on_round(0, commitments)
    finally:
        twin.close()
    exchange(recorders)
    with LedgerStore(alice.path) as store:
        kinds = [(e.author, e.kind) for e in store.entries()]
        assert store.verify() == len(kinds) == 4  # three contributions and one audit
    assert alice.stats.written == 1 and bob.stats.written == 2


def test_roots_are_recorded_anchored_and_checked(recorders: list[LedgerRecorder]):
    alice = recorders[0]
    for epoch in range(5):
        round_of(recorders, epoch)
        exchange(recorders)
        for recorder in recorders:
            recorder.on_epoch_end(epoch + 1)
    roots = LedgerStore(alice.path).roots()
    assert [period for period, *_ in roots] == [0, 1]  # anchor_every=2: periods 0-1 and 2-3 have closed
    anchored = [
        json.loads(line) for line in (alice.path.parent / "ledger_roots.jsonl").read_text().splitlines()
    ]
    assert [(line["period"], line["root"]) for line in anchored] == [(p, root) for p, _, _, root, _ in roots]
    # the same entries at the same epoch: the same root on every peer
    assert len({LedgerStore(r.path).roots()[1][3] for r in recorders}) == 1
    path = str(alice.path)
    assert _ledger_cli("verify", "--db", path)[1].startswith(
        "ok: 15 entries from 3 authors verified, 2 roots"
    )
    with sqlite3.connect(alice.path) as db:
        db.execute("UPDATE roots SET root = ? WHERE period = 1", ("ab" * 32,))
    with pytest.raises(UserError, match="bad root of period 1: recorded abab"):
        _ledger_cli("verify", "--db", path)
    with sqlite3.connect(alice.path) as db:
        db.execute("UPDATE roots SET root = ? WHERE period = 1", (roots[1][3],))
    anchor_file = alice.path.parent / "ledger_roots.jsonl"
    anchor_file.write_text(anchor_file.read_text().replace(roots[0][3], "cd" * 32))
    with pytest.raises(UserError, match="bad root of period 0: the anchor holds cdcd"):
        _ledger_cli("verify", "--db", path)


def test_rules_come_from_the_config():
    config = SwarmConfig(verify=dict(audit_window=4, recheck_auditors=4))
    rules = rules_of(config, LedgerConfig(credit_per_sample=0.5, slash_amount=7))
    assert (rules.credit_per_sample, rules.slash_amount) == (MICRO // 2, 7 * MICRO)
    # the audit window; no single peer slashes
    assert rules.provisional_epochs == 4 and rules.slash_quorum == 2
    assert rules_of(config, LedgerConfig(provisional_epochs=0, slash_quorum=1)).slash_quorum == 1


def test_an_empty_period_is_not_anchored_and_skipped_periods_are_not_rooted_later(
    recorders: list[LedgerRecorder],
):
    """A solo peer writes no entries: its periods are not anchored with an empty root. After an epoch jump only
    the period that closed last is rooted, not the skipped ones with entries they never held."""
    alice = recorders[0]
    alice.on_epoch_end(4)  # periods 0 and 1 closed (anchor_every=2), nothing written
    assert LedgerStore(alice.path).roots() == []
    assert not (alice.path.parent / "ledger_roots.jsonl").exists()
    round_of(recorders, 4)
    alice.on_epoch_end(7)  # periods 2 (epochs 4-5) closed: it holds this round's entries
    assert [period for period, *_ in LedgerStore(alice.path).roots()] == [2]
    alice.on_epoch_end(9)  # period 3 closed with nothing new: no second root of the same entries
    assert [period for period, *_ in LedgerStore(alice.path).roots()] == [2]
