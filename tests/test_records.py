"""Peer status records: signed by their owner, and forged or malformed ones are dropped by readers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarm.identity import Identity
from swarm.network.records import PeerStatus, StatusBoard
from tests.conftest import bare_dht

pytestmark = pytest.mark.integration


def _status(identity: Identity, **changes) -> PeerStatus:
    fields = dict(
        peer_id=str(identity.peer_id), name=identity.name, epoch=3, state_hash="h", ready_epoch=-1, samples=10
    )
    fields.update(changes)
    return PeerStatus(**fields)


@pytest.fixture
def two_peers(tmp_path: Path):
    alice, mallory = (Identity.load_or_create(tmp_path / name) for name in ("alice.key", "mallory.key"))
    first = bare_dht(record_validators=[RSASignatureValidator(alice.private_key)])
    second = bare_dht(
        initial_peers=first.get_visible_maddrs(),
        record_validators=[RSASignatureValidator(mallory.private_key)],
    )
    try:
        yield (
            (alice, StatusBoard(first, "run", alice, ttl=30)),
            (mallory, StatusBoard(second, "run", mallory, ttl=30)),
        )
    finally:
        first.shutdown()
        second.shutdown()


@pytest.mark.timeout(60)
def test_statuses_round_trip_and_forgeries_are_dropped(two_peers) -> None:
    (alice, alice_board), (mallory, mallory_board) = two_peers
    assert alice_board.publish(_status(alice))
    # mallory signs with her own key but claims to be alice (a record under her own owner subkey)
    assert mallory_board.publish(_status(mallory, peer_id=str(alice.peer_id), epoch=99))
    # a malformed value stored under mallory's owner subkey, and an unowned entry anyone could write
    mallory_board.dht.store(
        "run.peers", {"epoch": "not a number"}, get_dht_time() + 30, subkey=mallory_board.subkey + b"x"
    )
    mallory_board.dht.store("run.peers", _status(mallory).model_dump(), get_dht_time() + 30, subkey=b"anon")
    seen = alice_board.fetch()
    assert set(seen) == {str(alice.peer_id)}
    assert seen[str(alice.peer_id)].epoch == 3  # not mallory's forged epoch 99

    assert mallory_board.publish(_status(mallory, epoch=5))
    seen = alice_board.fetch()
    assert seen[str(mallory.peer_id)].epoch == 5 and seen[str(alice.peer_id)].epoch == 3


@pytest.mark.timeout(60)
def test_a_peer_cannot_overwrite_another_peers_status(two_peers) -> None:
    (alice, alice_board), (mallory, mallory_board) = two_peers
    assert alice_board.publish(_status(alice))
    # mallory writes under alice's owner subkey: hivemind's validator refuses a record not signed by that key
    stored = mallory_board.dht.store(
        "run.peers", _status(alice, epoch=77).model_dump(), get_dht_time() + 60, subkey=alice_board.subkey
    )
    assert not stored
    assert alice_board.fetch()[str(alice.peer_id)].epoch == 3
