"""Whose state a peer adopts, and whom it waits for: a peer alone in claiming a far-ahead epoch is not followed
while other peers agree, a peer behind an agreeing swarm catches up, and a peer that announced it left is no longer
counted. The statuses come from an in-memory board; the decisions are SwarmPeer's and the barrier's own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.network.records import PeerStatus
from swarm.node.peer import SwarmPeer
from swarm.node.state import TrainingState
from swarm.training.strategies.sync import SyncGradientAveraging

pytestmark = pytest.mark.unit

LIAR_EPOCH = 1_000_000


class MemoryBoard:
    """The statuses other peers announced, as the DHT board would return them."""

    def __init__(self, fingerprint: str) -> None:
        self.statuses: dict[str, PeerStatus] = {}
        self.published: list[PeerStatus] = []
        self.fingerprint = fingerprint  # the peers of one swarm share their settings

    def add(self, name: str, epoch: int, state_hash: str, ready: bool = True, left: bool = False) -> None:
        self.statuses[name] = PeerStatus(
            peer_id=name,
            name=name,
            epoch=epoch,
            state_hash=state_hash,
            ready_epoch=epoch if ready else -1,
            samples=0,
            left=left,
            fingerprint=self.fingerprint,
        )

    def publish(self, status: PeerStatus) -> bool:
        self.published.append(status)
        return True

    def fetch(self) -> dict[str, PeerStatus]:
        return dict(self.statuses)


@pytest.fixture()
def make_peer(tmp_path: Path):
    identity = Identity.load_or_create(tmp_path / "identity.key")

    def make(epoch: int) -> tuple[SwarmPeer, MemoryBoard]:
        model = torch.nn.Linear(4, 2)
        state = TrainingState(model, torch.optim.AdamW(model.parameters()))
        config = SwarmConfig(workdir=tmp_path, network=dict(client_mode=False))  # as start() resolves it
        peer = SwarmPeer(config, identity, state, epoch=epoch)
        peer.board = MemoryBoard(peer.fingerprint)
        return peer, peer.board

    return make


def barrier(peer: SwarmPeer) -> tuple[str, int]:
    strategy = SyncGradientAveraging(peer, peer.state.optimizer, max_grad_norm=0.0)
    verdict = strategy._barrier(peer.epoch, deadline=time.monotonic() + 5.0)
    return verdict, strategy.expected_group


def test_a_lone_peer_claiming_a_far_ahead_epoch_is_not_followed(make_peer) -> None:
    peer, board = make_peer(epoch=5)
    board.add("honest-b", 5, peer.state_hash)
    board.add("honest-c", 5, peer.state_hash)
    board.add("liar", LIAR_EPOCH, "whatever-it-serves")
    assert peer.swarm_target(peer.other_peers()) is None
    assert barrier(peer) == ("go", 3)  # averages with the two that agree; the liar is not at this epoch


def test_a_peer_behind_an_agreeing_swarm_adopts_its_state_even_with_a_liar_around(make_peer) -> None:
    late, board = make_peer(epoch=0)  # e.g. a peer that joins late
    for name in ("a", "b", "c"):
        board.add(name, 7, "swarm-hash")
    board.add("liar", LIAR_EPOCH, "whatever-it-serves")
    assert late.swarm_target(late.other_peers()) == (7, "swarm-hash")
    assert barrier(late)[0] == "behind"


def test_the_member_whose_last_round_failed_follows_the_one_that_stepped(make_peer) -> None:
    # two peers, a one-sided all-reduce failure: one stepped to 6, the other is still at 5
    behind, board = make_peer(epoch=5)
    board.add("stepped", 6, "h6")
    assert behind.swarm_target(behind.other_peers()) == (6, "h6")
    assert barrier(behind)[0] == "behind"
    # the peer that stepped never goes back to follow the one behind
    ahead, board = make_peer(epoch=6)
    board.add("failed", 5, "h5")
    assert ahead.swarm_target(ahead.other_peers()) is None


def test_a_peer_one_epoch_behind_follows_its_honest_partner_not_a_far_ahead_liar(make_peer) -> None:
    # three peers, none agreeing: the tie goes to the nearer epoch, never to the far-ahead claim
    behind, board = make_peer(epoch=5)
    board.add("partner", 6, "h6")
    board.add("liar", LIAR_EPOCH, "whatever-it-serves")
    assert behind.swarm_target(behind.other_peers()) == (6, "h6")


def test_two_disagreeing_peers_at_one_epoch_settle_on_one_state(make_peer) -> None:
    first, board = make_peer(epoch=3)
    board.add("other", 3, "0" * 64)  # sorts before any real hash: the other peer's state wins the tie
    assert first.swarm_target(first.other_peers()) == (3, "0" * 64)
    second, board = make_peer(epoch=3)
    board.add("other", 3, "f" * 64)  # sorts after: keep our own, the other peer comes to us
    assert second.swarm_target(second.other_peers()) is None


def test_a_lone_peer_ahead_of_the_majority_is_not_followed_and_the_majority_goes_on(make_peer) -> None:
    # three peers, the one-sided failure the other way round: only one member stepped
    peer, board = make_peer(epoch=5)
    board.add("also-failed", 5, peer.state_hash)
    board.add("stepped-alone", 6, "h6")
    assert peer.swarm_target(peer.other_peers()) is None
    assert barrier(peer) == ("go", 2)


def test_same_epoch_disagreement_goes_to_the_majority(make_peer) -> None:
    peer, board = make_peer(epoch=3)
    board.add("b", 3, "majority")
    board.add("c", 3, "majority")
    assert peer.swarm_target(peer.other_peers()) == (3, "majority")


def test_a_peer_that_left_is_no_longer_waited_for(make_peer) -> None:
    peer, board = make_peer(epoch=4)
    board.add("busy", 4, peer.state_hash, ready=False)
    assert set(peer.other_peers()) == {"busy"}
    board.add("busy", 4, peer.state_hash, ready=False, left=True)  # its farewell replaces its last status
    assert peer.other_peers() == {}  # dropped at once, not after peer_timeout
    assert barrier(peer)[0] == "alone"


def test_shutdown_announces_leaving(make_peer) -> None:
    peer, board = make_peer(epoch=2)
    # as after start(); no network here: only the farewell
    peer._heartbeat = threading.Thread(target=lambda: None)
    peer._heartbeat.start()
    peer.shutdown()
    assert board.published and board.published[-1].left and board.published[-1].epoch == 2


class ServingAverager:
    """Serves, per holder, the snapshot that holder chooses to serve."""

    def __init__(self, served: dict[str, tuple[dict, list[torch.Tensor]]]) -> None:
        self.served, self.asked = served, []

    def download_state(self, peer_id, timeout: float):
        self.asked.append(str(peer_id))
        return self.served.get(str(peer_id))


def snapshot_at(epoch: int, fill: float) -> tuple[dict, list[torch.Tensor]]:
    """A self-consistent state (its hash matches its tensors) of the fixture's model shape."""
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(fill)
    return TrainingState(model, torch.optim.AdamW(model.parameters())).snapshot(epoch)


def test_a_holder_serving_another_state_than_the_announced_one_is_refused(make_peer) -> None:
    late, board = make_peer(epoch=0)
    announced_meta, announced = snapshot_at(7, 0.5)
    forged = snapshot_at(7, 9.0)  # self-consistent, but not what the swarm announced
    for name in ("QmHonestA", "QmHonestB", "QmCheat"):
        board.add(name, 7, announced_meta["state_hash"])  # the liar announces the swarm's state...
    late.averager = ServingAverager(
        {
            "QmCheat": forged,
            "QmHonestA": (announced_meta, announced),
            "QmHonestB": (announced_meta, announced),
        }
    )
    for _ in range(
        5
    ):  # holders are tried in random order: whoever comes first, the forged state is never loaded
        late.epoch, late.state_hash = 0, "before"
        assert late.sync_with_swarm()  # ...but serves its own
        assert late.round_key == (7, announced_meta["state_hash"])
        assert all(torch.equal(param, torch.full_like(param, 0.5)) for param in late.state.params)


def test_a_later_state_is_taken_only_when_the_swarm_announces_it(make_peer) -> None:
    peer, board = make_peer(epoch=3)
    target_meta, _ = snapshot_at(3, 0.25)
    newer = snapshot_at(4, 0.75)
    board.add("QmKeeperA", 3, target_meta["state_hash"])
    board.add("QmKeeperB", 3, target_meta["state_hash"])
    peer.averager = ServingAverager({"QmKeeperA": newer, "QmKeeperB": newer})
    target = (3, target_meta["state_hash"])
    # the holders moved on, but nobody announces the state they serve: refused
    assert not peer.download_state(["QmKeeperA", "QmKeeperB"], target)
    # once both announce it, it is the swarm's state
    board.add("QmKeeperA", 4, newer[0]["state_hash"])
    board.add("QmKeeperB", 4, newer[0]["state_hash"])
    assert peer.download_state(["QmKeeperA", "QmKeeperB"], target)
    assert peer.round_key == (4, newer[0]["state_hash"])
