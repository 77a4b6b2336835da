"""Weight instead of identities: who gains weight from the ledger (a pure function of the entries), and how the
catch-up and barrier decisions treat identities without weight — announcing a far epoch, 'busy' or 'lagging' from
any number of them changes nothing, while peers with weight and round members are followed and waited for."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.ledger.balances import Rules
from swarm.ledger.entries import GENESIS_HASH, MICRO, LedgerEntry
from swarm.ledger.weights import trusted_weights
from swarm.node.peer import SwarmPeer
from swarm.node.rounds import Outcome
from swarm.node.state import TrainingState
from swarm.node.trust import Trust, initial_peer_ids
from swarm.training.strategies import RoundInput
from swarm.training.strategies.sync import SyncGradientAveraging
from tests.test_catch_up import LIAR_EPOCH, MemoryBoard

pytestmark = pytest.mark.unit

RULES = Rules(provisional_epochs=2)
SAMPLES = 16


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> dict[str, Identity]:
    root = tmp_path_factory.mktemp("keys")
    return {
        name: Identity.load_or_create(root / f"{name}.key")
        for name in ("me", "alice", "bob", "sybil1", "sybil2", "sybil3")
    }


def digest(peer: Identity, epoch: int) -> str:
    return hashlib.sha256(f"{peer.peer_id}|{epoch}".encode()).hexdigest()


_seq = itertools.count()


def contribution(author: Identity, epoch: int, attests: list[Identity]) -> LedgerEntry:
    """``author``'s contribution entry of ``epoch``, listing the commitments of ``attests`` (as a round member)."""
    seq = next(_seq) + 1
    return LedgerEntry.create(
        author,
        kind="contribution",
        seq=seq,
        prev_hash="ab" * 32,
        subject=str(author.peer_id),
        epoch=epoch,
        samples=SAMPLES,
        refs=[digest(author, epoch), *(digest(other, epoch) for other in attests)],
    )


def slash(author: Identity, subject: Identity, epoch: int) -> LedgerEntry:
    return LedgerEntry.create(
        author,
        kind="slash",
        seq=0,
        prev_hash=GENESIS_HASH,
        subject=str(subject.peer_id),
        epoch=epoch,
        samples=SAMPLES,
        refs=[digest(subject, epoch)],
    )


def weights(entries, people, current_epoch: int, roots=("me",)) -> dict[str, float]:
    found = trusted_weights(
        entries, RULES, current_epoch, {str(people[name].peer_id) for name in roots}, MICRO
    )
    names = {str(identity.peer_id): name for name, identity in people.items()}
    return {names[peer]: credit / MICRO for peer, credit in found.items()}


def rounds(people, members: list[str], epochs: range) -> list[LedgerEntry]:
    """Every member writes its contribution entry for every epoch, attesting the other members."""
    return [
        contribution(people[name], epoch, [people[other] for other in members if other != name])
        for epoch in epochs
        for name in members
    ]


def test_work_attested_by_a_trusted_peer_gains_weight_once_its_audit_window_closed(people) -> None:
    entries = rounds(people, ["me", "alice"], range(3))
    assert "alice" not in weights(entries, people, current_epoch=1)  # nothing final yet
    found = weights(entries, people, current_epoch=3)  # epoch 0 closed at 2, epoch 1 at 3
    assert found["alice"] == 2 * SAMPLES and found["me"] == 2 * SAMPLES


def test_fresh_identities_attesting_each_other_never_gain_weight(people) -> None:
    entries = rounds(people, ["me", "alice"], range(5)) + rounds(
        people, ["sybil1", "sybil2", "sybil3"], range(50)
    )
    found = weights(entries, people, current_epoch=60)
    assert set(found) == {"me", "alice"}


def test_trust_is_transitive_from_the_roots_and_independent_of_entry_order(people) -> None:
    # bob never averaged with me, only with alice, whom I trust through my own rounds with her
    entries = rounds(people, ["me", "alice"], range(3)) + rounds(people, ["alice", "bob"], range(3, 6))
    found = weights(entries, people, current_epoch=10)
    assert found["bob"] == 3 * SAMPLES
    shuffled = list(entries)
    random.Random(0).shuffle(shuffled)
    assert weights(shuffled, people, current_epoch=10) == found


def test_a_slashed_peer_has_no_weight(people) -> None:
    entries = rounds(people, ["me", "alice", "bob"], range(4))
    entries += [slash(people["me"], people["bob"], 2), slash(people["alice"], people["bob"], 2)]
    found = weights(entries, people, current_epoch=10)
    assert "bob" not in found and found["alice"] > 0


def test_initial_peer_ids_are_read_from_multiaddrs() -> None:
    peer = "QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"
    assert initial_peer_ids([f"/ip4/127.0.0.1/tcp/1/p2p/{peer}", "not an address"]) == {peer}


# ---- decisions by weight -------------------------------------------------------------------------------------
@pytest.fixture()
def make_peer(tmp_path: Path):
    identity = Identity.load_or_create(tmp_path / "identity.key")

    def make(
        epoch: int, newcomer_wait: float = 1.0, newcomer_budget: float = 2.0
    ) -> tuple[SwarmPeer, MemoryBoard]:
        model = torch.nn.Linear(4, 2)
        state = TrainingState(model, torch.optim.AdamW(model.parameters()))
        config = SwarmConfig(
            workdir=tmp_path,
            network=dict(client_mode=False),
            averaging=dict(matchmaking_time=3.5),
            trust=dict(newcomer_wait=newcomer_wait, newcomer_budget=newcomer_budget),
        )
        # a ledger that is not there yet: weights come from the roots and round members only (as in the first
        # epochs of a swarm)
        trust = Trust(str(identity.peer_id), config, tmp_path / "no-ledger-yet.db", RULES)
        peer = SwarmPeer(config, identity, state, epoch=epoch, trust=trust)
        peer.board = MemoryBoard(peer.fingerprint)
        return peer, peer.board

    return make


def barrier(strategy: SyncGradientAveraging) -> tuple[str, int, float]:
    started = time.monotonic()
    verdict = strategy._barrier(strategy.peer.epoch, deadline=time.monotonic() + 20.0)
    return verdict, strategy.expected_group, time.monotonic() - started


def test_ten_sybils_announcing_a_far_epoch_are_not_followed(make_peer) -> None:
    peer, board = make_peer(epoch=5)
    peer.trust.note_round(4, ["member"])
    board.add("member", 5, peer.state_hash)
    for index in range(10):
        board.add(f"sybil{index}", LIAR_EPOCH, "poisoned")
    assert peer.swarm_target(peer.other_peers()) is None
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    assert barrier(strategy)[:2] == ("go", 2)


def test_a_late_joiner_follows_its_initial_peer_not_more_sybils(make_peer) -> None:
    late, board = make_peer(epoch=0)
    late.trust.roots.add("bootstrap")
    board.add("bootstrap", 7, "swarm-hash")
    for index in range(10):
        board.add(f"sybil{index}", 7, "poisoned")  # even at a nearer-looking, equally plausible state
    assert late.swarm_target(late.other_peers()) == (7, "swarm-hash")
    late.averager = None
    assert late._support((7, "poisoned"), late.other_peers()) == 0


def test_busy_and_lagging_sybils_cost_the_barrier_newcomer_wait_until_their_budget_is_spent(
    make_peer,
) -> None:
    peer, board = make_peer(epoch=5, newcomer_wait=1.0, newcomer_budget=2.0)
    peer.trust.note_round(4, ["member"])
    board.add("member", 5, peer.state_hash)
    for index in range(10):
        board.add(f"busy{index}", 5, peer.state_hash, ready=False)
        board.add(f"lagging{index}", 2, "old")
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    waits = []
    for _ in range(3):  # three epochs in a row
        verdict, group, waited = barrier(strategy)
        assert (verdict, group) == ("go", 2)  # never expects the Sybils in its group
        waits.append(waited)
    assert 0.9 <= waits[0] < 1.5, waits  # newcomer_wait per epoch at most...
    assert sum(waits) < 2.5 and waits[2] < 0.5, waits  # ...until each identity's budget (2 s) is spent


def test_ready_sybils_are_expected_in_a_group_only_until_their_budget_is_spent(make_peer) -> None:
    peer, board = make_peer(epoch=5, newcomer_wait=1.0, newcomer_budget=7.0)  # two rounds of matchmaking_time
    peer.trust.note_round(4, ["member"])
    board.add("member", 5, peer.state_hash)
    for index in range(10):
        board.add(f"ready{index}", 5, peer.state_hash)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    groups = []
    for _ in range(3):
        groups.append(barrier(strategy)[:2])
        strategy._charge_no_shows({"member": {}}, 0.0)  # the round: only the member came
    assert groups == [("go", 12), ("go", 12), ("go", 2)]
    board.add("honest-newcomer", 5, peer.state_hash)  # one that does come is expected, and becomes a member
    assert barrier(strategy)[:2] == ("go", 3)
    strategy._charge_no_shows({"member": {}, "honest-newcomer": {}}, 0.0)
    assert strategy._newcomer_budget("honest-newcomer") == peer.config.trust.newcomer_budget


def test_ready_sybils_that_never_come_stop_holding_the_first_peer_of_a_swarm(make_peer) -> None:
    """Sybils present from a swarm's first epoch, announcing 'ready' and never joining: the founding peer (nobody
    has weight yet) expected them in every round and never stepped (bench/sybil.py: stuck at epoch 0, 15 skipped
    rounds). Each no-show now costs at least a quarter of the identity's budget, founding or not."""
    peer, board = make_peer(epoch=0, newcomer_wait=1.0, newcomer_budget=120.0)
    for index in range(10):
        board.add(f"ready{index}", 0, peer.state_hash)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    rounds = []
    for _ in range(5):
        rounds.append(barrier(strategy))
        strategy._charge_no_shows({}, 0.5)  # nobody came
    assert [verdict[:2] for verdict in rounds[:4]] == [("go", 11)] * 4
    # stepped on its own at once, not at the round's end
    assert rounds[4][0] == "alone" and rounds[4][2] < 1.0
    board.add("honest-newcomer", 0, peer.state_hash)  # a newcomer that does come is still expected
    assert barrier(strategy)[:2] == ("go", 2)


def test_a_round_member_is_waited_for_but_a_stranger_is_not(make_peer) -> None:
    peer, board = make_peer(epoch=5, newcomer_wait=0.5)
    peer.trust.note_round(4, ["member"])
    board.add("member", 5, peer.state_hash)
    board.add("stranger", 5, peer.state_hash, ready=False)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    verdict, group, waited = barrier(strategy)
    assert (verdict, group) == ("go", 2) and waited < 2.0  # a stranger that never gets ready does not hold it
    board.add("member", 5, peer.state_hash, ready=False)  # a member that is still computing is waited for
    deadline = time.monotonic() + 1.5
    assert strategy._barrier(5, deadline=deadline) == "go" and time.monotonic() >= deadline - 0.3


def test_the_first_peer_of_a_new_swarm_waits_for_newcomers_every_epoch(make_peer) -> None:
    peer, board = make_peer(epoch=0, newcomer_wait=1.5, newcomer_budget=1.0)  # nobody has weight yet
    board.add("newcomer", 0, peer.state_hash, ready=False)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    for _ in range(2):  # two epochs in a row, each longer than the whole budget of a swarm with members
        board.add("newcomer", 0, peer.state_hash, ready=False)
        threading.Timer(1.2, lambda: board.add("newcomer", 0, peer.state_hash)).start()
        verdict, group, waited = barrier(strategy)
        assert (verdict, group) == ("go", 2) and waited >= 1.0
    board.add("busy-sybil", 0, peer.state_hash, ready=False)
    board.add("newcomer", 0, peer.state_hash, left=True)
    # one that never gets ready holds it until the round's deadline: it has nobody else
    started = time.monotonic()
    assert strategy._barrier(0, deadline=time.monotonic() + 3.0) == "alone"
    assert 2.8 <= time.monotonic() - started < 4.0


def test_a_holder_that_serves_an_invalid_state_loses_its_weight(make_peer) -> None:
    from tests.test_catch_up import ServingAverager, snapshot_at

    late, board = make_peer(epoch=0)
    meta, tensors = snapshot_at(7, float("nan"))
    late.trust.roots.add("QmBootstrap")
    board.add("QmBootstrap", 7, meta["state_hash"])
    late.averager = ServingAverager({"QmBootstrap": (meta, tensors)})
    before = [param.detach().clone() for param in late.state.params]
    assert not late.sync_with_swarm()
    assert all(torch.equal(a, b) for a, b in zip(before, late.state.params))  # kept its own state
    assert late.trust.weight("QmBootstrap") == 0 and late.swarm_target(late.other_peers()) is None


def test_lagging_sybils_do_not_hold_a_finished_peer_but_a_lagging_member_does(make_peer) -> None:
    peer, board = make_peer(epoch=6)
    for index in range(10):
        board.add(f"lagging{index}", 0, "old")
    started = time.monotonic()
    peer.linger(timeout=3.0)
    assert time.monotonic() - started < 0.5
    peer.trust.note_round(5, ["member"])
    board.add("member", 5, "h5")  # a member whose last round failed: it is served until it catches up
    started = time.monotonic()
    peer.linger(timeout=1.0)
    assert time.monotonic() - started >= 0.9


def test_after_the_wait_ready_newcomers_still_join_while_busy_sybils_are_left_behind(make_peer) -> None:
    # the first peer of a swarm, with honest newcomers ready and Sybils that never are
    peer, board = make_peer(epoch=0, newcomer_wait=0.5)
    for name in ("newcomer-a", "newcomer-b"):
        board.add(name, 0, peer.state_hash)
    for index in range(10):
        board.add(f"busy{index}", 0, peer.state_hash, ready=False)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    verdict, group, waited = barrier(strategy)
    assert (verdict, group) == ("go", 3) and waited < 1.5
    assert strategy._expected == {"newcomer-a", "newcomer-b"}


def test_a_member_of_equal_weight_claiming_a_far_epoch_is_not_followed_but_an_initial_peer_is(
    make_peer,
) -> None:
    # the first peer averaged once with a liar only (the honest newcomers were slow); the liar then claims far ahead
    peer, board = make_peer(epoch=1)
    peer.trust.note_round(0, ["liar"])
    board.add("liar", LIAR_EPOCH, "poisoned")
    for index in range(10):
        board.add(f"sybil{index}", LIAR_EPOCH, "poisoned")
    assert peer.swarm_target(peer.other_peers()) is None
    board.add("liar", 2, "h2")  # one epoch ahead, as a member whose step this peer missed would be
    assert peer.swarm_target(peer.other_peers()) == (2, "h2")
    late, board = make_peer(epoch=0)  # a newcomer: its initial peer is far ahead, and followed
    late.trust.roots.add("bootstrap")
    board.add("bootstrap", 500, "swarm")
    assert late.swarm_target(late.other_peers()) == (500, "swarm")


def test_slash_entries_signed_by_fresh_identities_take_nobodys_weight(people) -> None:
    """Anybody can sign slash (and ban) entries on an attested commitment: two fresh identities doing so against
    alice's work would, counted by the ledger's rules alone, zero her weight. Only slashes by trusted peers count."""
    entries = rounds(people, ["me", "alice", "bob"], range(4))
    entries += [slash(people["sybil1"], people["alice"], 2), slash(people["sybil2"], people["alice"], 2)]
    found = weights(entries, people, current_epoch=10)
    assert found["alice"] > 0
    entries += [slash(people["me"], people["alice"], 2), slash(people["bob"], people["alice"], 2)]
    assert "alice" not in weights(entries, people, current_epoch=10)


def test_the_first_peer_whose_side_of_the_first_all_reduce_failed_follows_the_group_instead_of_stepping_alone(
    make_peer, monkeypatch
) -> None:
    """hivemind's all-reduce can fail on one side only: the others step with this peer's gradient averaged in. A
    founding peer (nobody has weight) that then stepped alone forked itself off the swarm it founded (its rounds,
    audits and bans were no longer the others'); it follows the peers it formed the round with instead."""
    peer, board = make_peer(epoch=0, newcomer_wait=1.0, newcomer_budget=120.0)
    others = ["second", "third"]
    for name in others:
        board.add(name, 0, peer.state_hash)
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)

    def failed_on_this_side(*_args) -> None:
        for name in others:  # the others' all-reduce succeeded: they stepped to epoch 1
            board.add(name, 1, "their-state")
        return None

    monkeypatch.setattr(strategy, "_average", failed_on_this_side)
    monkeypatch.setattr(peer, "check_alive", lambda: None)
    synced = []
    monkeypatch.setattr(
        peer, "sync_with_swarm", lambda: synced.append(peer.swarm_target(peer.other_peers())) or True
    )
    result = strategy.round(RoundInput(epoch=0, gradient=[torch.zeros(2)], samples=8, commitment=None))
    assert result.outcome == Outcome.RESYNCED and result.update is None
    assert synced == [(1, "their-state")]
    # a stranger announcing a later state that this peer never formed a round with is still not followed
    board.add("stranger", 2, "elsewhere")
    assert peer.swarm_target(peer.other_peers()) == (1, "their-state")
