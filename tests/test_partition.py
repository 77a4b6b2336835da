"""Who is the swarm when a link breaks: a peer that sees at most half of the weight it saw lately waits instead of
stepping alone (SwarmPeer.has_quorum in the barrier), and once the network heals the lighter side adopts the
heavier side's state even at an earlier epoch when that state is on another branch (SwarmPeer.swarm_target); a
peer merely behind on this peer's own history is never a reason to go back. The statuses come from an in-memory
board; the decisions are SwarmPeer's and the barrier's own. The real-process partition is tests/test_partition_netns.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.node.peer import SwarmPeer
from swarm.node.state import TrainingState
from swarm.training.strategies.sync import SyncGradientAveraging
from swarm.training.trainer import SwarmTrainer
from tests.test_catch_up import MemoryBoard

pytestmark = pytest.mark.unit

LOW, HIGH = "1-low-id", "z-high-id"  # below and above any base58 peer id ('1' < digits and letters < 'z')


@pytest.fixture()
def make_peer(tmp_path: Path):
    identity = Identity.load_or_create(tmp_path / "identity.key")

    def make(epoch: int, grace: float = 60.0, lineage: dict[int, str] | None = None) -> SwarmPeer:
        model = torch.nn.Linear(4, 2)
        state = TrainingState(model, torch.optim.AdamW(model.parameters()))
        config = SwarmConfig(
            workdir=tmp_path,
            network=dict(client_mode=False),
            averaging=dict(peer_timeout=0.3, partition_grace=grace),
        )
        peer = SwarmPeer(config, identity, state, epoch=epoch, lineage=lineage)
        peer.board = MemoryBoard(peer.fingerprint)
        return peer

    return make


def start_barrier(peer: SwarmPeer) -> tuple[list[str], threading.Thread]:
    """The barrier in a thread: the list gets its verdict when it returns."""
    verdict: list[str] = []
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    thread = threading.Thread(
        target=lambda: verdict.append(strategy._barrier(peer.epoch, deadline=time.monotonic() + 0.5)),
        daemon=True,
    )
    thread.start()
    return verdict, thread


def run_barrier(peer: SwarmPeer, timeout: float) -> list[str]:
    """The barrier's verdict (empty while it still waits after ``timeout`` seconds)."""
    verdict, thread = start_barrier(peer)
    thread.join(timeout)
    return verdict


def test_a_peer_cut_off_from_the_others_waits_instead_of_stepping_alone_and_follows_them_after(
    make_peer,
) -> None:
    peer = make_peer(epoch=5)
    peer.board.add("b", 5, peer.state_hash, ready=False)
    peer.board.add("c", 5, peer.state_hash, ready=False)
    peer.other_peers()
    peer.board.statuses.clear()  # the link breaks: their statuses stop arriving
    time.sleep(0.4)  # past peer_timeout: they are no longer live
    verdict, thread = start_barrier(peer)
    thread.join(2.0)
    assert verdict == [], "a third of the swarm stepped alone (a fork)"
    # the network heals: the two went on without it
    peer.board.add("b", 7, "their-state")
    peer.board.add("c", 7, "their-state")
    thread.join(3.0)
    assert verdict == ["behind"]
    assert peer.swarm_target(peer.other_peers()) == (7, "their-state")


def test_the_majority_side_goes_on_without_the_missing_peer(make_peer) -> None:
    peer = make_peer(epoch=5)
    peer.board.add("b", 5, peer.state_hash)
    peer.board.add("c", 5, peer.state_hash)
    peer.other_peers()
    del peer.board.statuses["c"]
    time.sleep(0.4)
    assert peer.has_quorum(peer.other_peers())  # itself and b: 2 of 3
    assert run_barrier(peer, 3.0) == ["go"]


@pytest.mark.parametrize("other, goes_on", [(HIGH, True), (LOW, False)])
def test_of_two_halves_exactly_one_goes_on_the_same_one_on_both_sides(make_peer, other, goes_on) -> None:
    peer = make_peer(epoch=5)
    peer.board.add(other, 5, peer.state_hash, ready=False)
    peer.other_peers()
    peer.board.statuses.clear()
    time.sleep(0.4)
    # the half holding the smallest peer id of the two goes on; the other waits for the link
    assert peer.has_quorum(peer.other_peers()) is goes_on
    assert run_barrier(peer, 2.0) == (["alone"] if goes_on else [])


def test_peers_gone_for_longer_than_the_grace_count_as_gone(make_peer) -> None:
    peer = make_peer(epoch=5, grace=1.0)
    peer.board.add("b", 5, peer.state_hash, ready=False)
    peer.board.add("c", 5, peer.state_hash, ready=False)
    peer.other_peers()
    peer.board.statuses.clear()
    started = time.monotonic()
    assert run_barrier(peer, 4.0) == ["alone"]
    assert time.monotonic() - started >= 0.9  # not before the grace was over


def test_peers_that_left_are_not_waited_for(make_peer) -> None:
    peer = make_peer(epoch=5)
    peer.board.add("b", 5, peer.state_hash, ready=False)
    peer.other_peers()
    peer.board.add("b", 5, peer.state_hash, left=True)
    assert run_barrier(peer, 2.0) == ["alone"]


def test_the_heavier_side_of_a_healed_split_is_adopted_even_at_an_earlier_epoch(make_peer) -> None:
    # this peer stepped alone from epoch 6 to 9 (a split longer than the grace, or a restart after one)
    peer = make_peer(epoch=9, lineage={6: "shared", 7: "mine-7", 8: "mine-8"})
    peer.board.add("b", 7, "theirs-7")
    peer.board.add("c", 7, "theirs-7")
    assert peer.swarm_target(peer.other_peers()) == (7, "theirs-7")
    peer.board.statuses.pop("c")  # one of equal weight: not heavier, it keeps its state
    time.sleep(0.4)
    assert peer.swarm_target(peer.other_peers()) is None


def test_peers_behind_on_this_peers_own_history_are_never_a_reason_to_go_back(make_peer) -> None:
    # the two stepped with this peer at epoch 6 and have not announced epoch 7 yet, or restarted from a checkpoint
    peer = make_peer(epoch=7, lineage={5: "state-5", 6: "state-6"})
    peer.board.add("b", 6, "state-6")
    peer.board.add("c", 6, "state-6")
    peer.board.add("d", 5, "state-5")
    assert peer.swarm_target(peer.other_peers()) is None
    # nor is a state at an epoch this peer has no record of (it downloaded its state at epoch 7)
    fresh = make_peer(epoch=7)
    fresh.board.add("b", 6, "unknown-6")
    fresh.board.add("c", 6, "unknown-6")
    assert fresh.swarm_target(fresh.other_peers()) is None


@pytest.mark.unit
def test_the_lineage_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    """A peer restarted after a split still knows the hashes of its branch (SwarmPeer.lineage is saved in the
    checkpoint and restored by the trainer), so after the heal it can tell the other side's state from its own
    history instead of treating its own later epoch as the swarm."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = TrainingState(model, torch.optim.AdamW(model.parameters()))
    lineage = {5: "a" * 64, 6: "b" * 64, 7: state.state_hash(7)}
    peer = SimpleNamespace(snapshot=lambda: state.snapshot(7), samples=40, lineage=lineage)
    path = tmp_path / "checkpoint.pt"
    SwarmTrainer.save_checkpoint(SimpleNamespace(peer=peer, history={}, checkpoint_path=path))
    fresh = torch.nn.Linear(3, 2)
    restarted = SimpleNamespace(
        checkpoint_path=path, state=TrainingState(fresh, torch.optim.AdamW(fresh.parameters())), history={}
    )
    assert SwarmTrainer._resume(restarted) == (7, 40, lineage)
    assert torch.equal(fresh.weight, model.weight)
