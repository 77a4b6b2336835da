"""Ledger replication between real DHT nodes on 127.0.0.1: copies converge to the same entries and balances, a node
that joins late catches up, and forged or junk records are rejected (logged once, never stored)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time

from swarm.config import NetworkConfig, SwarmConfig
from swarm.identity import Identity
from swarm.ledger.config import LedgerConfig
from swarm.ledger.entries import GENESIS_HASH, LedgerEntry, commitment_body
from swarm.ledger.store import LedgerStore
from swarm.network.dht import start_dht
from swarm.network.ledger_records import LedgerBoard, LedgerHead, encode_chunk
from swarm.training.ledger_recorder import LedgerRecorder
from tests.test_ledger_recorder import commitment, verdict

pytestmark = pytest.mark.unit

RUN = "ledger-run"
FAST = LedgerConfig(sync_interval=0.5, anchor="none")


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: Identity.load_or_create(folder / name) for name in ("alice", "bob", "carol", "mallory")}


class Swarm:
    """DHT nodes and recorders that are always shut down (the fixture's teardown)."""

    def __init__(self, root: Path, identities: dict[str, Identity]):
        self.root, self.identities = root, identities
        self.dhts: dict[str, hivemind.DHT] = {}
        self.recorders: dict[str, LedgerRecorder] = {}

    def node(self, name: str) -> hivemind.DHT:
        peers = [str(addr) for dht in self.dhts.values() for addr in dht.get_visible_maddrs()][:2]
        network = NetworkConfig(client_mode=False, initial_peers=peers)
        self.dhts[name] = start_dht(network, self.identities[name], self.root / name, run_id=RUN)
        return self.dhts[name]

    def recorder(self, name: str) -> LedgerRecorder:
        config = SwarmConfig(run_id=RUN, workdir=self.root / name, verify=dict(audit_window=2))
        recorder = LedgerRecorder(config, self.identities[name], self.node(name), settings=FAST)
        recorder.start()
        self.recorders[name] = recorder
        return recorder

    def close(self) -> None:
        for recorder in self.recorders.values():
            recorder.close()
        for dht in self.dhts.values():
            dht.shutdown()


@pytest.fixture
def swarm(tmp_path: Path, identities: dict[str, Identity]) -> Iterator[Swarm]:
    running = Swarm(tmp_path, identities)
    try:
        yield running
    finally:
        running.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the copies to converge"
        time.sleep(0.2)


def hashes(recorder: LedgerRecorder) -> set[str]:
    with LedgerStore(recorder.path) as store:
        return {entry.hash for entry in store.entries()}


def test_copies_converge_and_a_late_node_catches_up(swarm: Swarm):
    alice, bob = swarm.recorder("alice"), swarm.recorder("bob")
    for epoch in range(3):
        commitments = {r.me: commitment(r.identity, epoch) for r in (alice, bob)}
        for recorder in (alice, bob):
            recorder.on_round(epoch, commitments)
        bob.on_verdict(verdict(bob.identity, commitments[alice.me], passed=True))
    wait_for(lambda: len(hashes(alice)) == len(hashes(bob)) == 9)
    assert hashes(alice) == hashes(bob)
    assert alice.balances(2) == bob.balances(2) and alice.balances(2)[alice.me].provisional > 0

    carol = swarm.recorder("carol")  # joins after everything was written: catches up in start()
    assert hashes(carol) == hashes(alice)
    assert carol.balances(2) == alice.balances(2)
    with LedgerStore(carol.path) as store:
        assert store.verify() == 9
    # the end of a run: everyone announces it has finished and waits for the others' last entries
    alice.on_round(3, {r.me: commitment(r.identity, 3) for r in (alice, bob, carol)})
    with ThreadPoolExecutor(3) as pool:  # peers finish at about the same time, each in its own process
        assert all(pool.map(lambda recorder: recorder.settle(timeout=30), (bob, carol, alice)))
    assert hashes(alice) == hashes(bob) == hashes(carol) and len(hashes(carol)) == 10


def test_forged_and_junk_records_are_rejected(swarm: Swarm, caplog: pytest.LogCaptureFixture):
    alice = swarm.recorder("alice")
    mallory_id = swarm.identities["mallory"]
    board = LedgerBoard(swarm.node("mallory"), RUN, mallory_id, ttl=600)
    mallory = str(mallory_id.peer_id)

    def item(entry: LedgerEntry, body: bytes = b"") -> tuple[bytes, bytes, bytes]:
        return entry.canonical_bytes(), entry.signature, body

    fake = commitment(mallory_id, 0, samples=10_000)
    ok = LedgerEntry.create(mallory_id, kind="ban", seq=0, prev_hash=GENESIS_HASH, subject=alice.me, epoch=0)
    # its commitment is not given
    invented = LedgerEntry.create(
        mallory_id,
        kind="contribution",
        seq=1,
        prev_hash=ok.hash,
        subject=mallory,
        epoch=0,
        samples=10_000,
        refs=[fake.digest()],
    )
    after = LedgerEntry.create(
        mallory_id,
        kind="contribution",
        seq=2,
        prev_hash=invented.hash,
        subject=mallory,
        epoch=1,
        samples=5,
        refs=[commitment(mallory_id, 1, 5).digest()],
    )
    board.publish_chunk(
        0,
        encode_chunk([item(ok), item(invented), item(after, commitment_body(commitment(mallory_id, 1, 5)))]),
    )
    # junk: a chunk that is not zlib, a head and a chunk claiming to be alice's under mallory's own key
    board.dht.store(
        f"{RUN}.ledger.{mallory}",
        dict(first_seq=3, data=b"junk" * 10),
        get_dht_time() + 600,
        subkey=b"3:" + board.marker,
    )
    board.dht.store(
        f"{RUN}.ledger.heads",
        dict(author=alice.me, seq=99, hash="ab" * 32, final=True),
        get_dht_time() + 600,
        subkey=board.marker,
    )
    forged = LedgerEntry.create(
        mallory_id, kind="ban", seq=0, prev_hash=GENESIS_HASH, subject=mallory, epoch=0
    )
    board.dht.store(
        f"{RUN}.ledger.{alice.me}",
        dict(first_seq=0, data=encode_chunk([item(forged)])),
        get_dht_time() + 600,
        subkey=b"0:" + board.marker,
    )
    assert alice._board.fetch_heads() == {}  # a head claiming alice, signed by mallory: dropped
    board.publish_head(LedgerHead(author=mallory, seq=2, hash=after.hash))  # replaces the head claiming alice

    with caplog.at_level(logging.WARNING, logger="swarm.training.ledger_recorder"):
        for _ in range(3):  # pulled again and again: logged once
            alice.sync(alice._store)
    with LedgerStore(alice.path) as store:
        assert [(e.author, e.seq) for e in store.entries()] == [(mallory, 0)]  # valid, but counts for nothing
        assert store.verify() == 1
    rejected = [r.message for r in caplog.records if "rejected an entry" in r.message]
    assert (
        len(rejected) == 1
        and f"from {mallory}" in rejected[0]
        and "contribution does not exist" in rejected[0]
    )
    assert invented.hash in rejected[0]
    assert alice.balances(5).get(alice.me) is None or not alice.balances(5)[alice.me].banned
    assert alice.stats.rejected == 1


def test_settle_does_not_wait_for_a_head_nobody_backs(swarm: Swarm):
    """Anyone can announce a head (here: final, 5 entries) and never publish the entries: a peer that passes its
    trust to settle() does not wait for such an author; without it, settle waits out its timeout."""
    alice = swarm.recorder("alice")
    mallory_id = swarm.identities["mallory"]
    board = LedgerBoard(swarm.node("mallory"), RUN, mallory_id, ttl=600)
    mallory = str(mallory_id.peer_id)
    board.publish_head(LedgerHead(author=mallory, seq=4, hash="ab" * 32, final=True))
    wait_for(lambda: mallory in alice._board.fetch_heads())
    started = time.monotonic()
    assert not alice.settle(timeout=2.0)
    assert time.monotonic() - started >= 2.0
    started = time.monotonic()
    assert alice.settle(timeout=10.0, waits_for=lambda author: author != mallory)
    assert time.monotonic() - started < 5.0


def test_settle_still_waits_for_the_chain_of_an_author_without_weight_while_it_arrives(swarm: Swarm):
    """A banned cheater has no weight but keeps writing until it stops: every copy must end with the same entries,
    so settle() waits for its chain as long as it keeps arriving (here: written while alice is already settling)."""
    alice, bob = swarm.recorder("alice"), swarm.recorder("bob")
    commitments = {r.me: commitment(r.identity, 0) for r in (alice, bob)}
    for recorder in (alice, bob):
        recorder.on_round(0, commitments)
    wait_for(lambda: hashes(alice) == hashes(bob))

    with ThreadPoolExecutor(1) as pool:  # alice settles in her own thread; bob's hooks stay in this one
        settled = pool.submit(alice.settle, timeout=20, waits_for=lambda author: author != bob.me)
        time.sleep(1.0)  # alice is settling by now
        for epoch in (1, 2, 3):
            bob.on_round(epoch, {r.me: commitment(r.identity, epoch) for r in (alice, bob)})
        assert bob.settle(timeout=20, waits_for=lambda author: author == alice.me)
        assert settled.result()
    with LedgerStore(bob.path) as store:
        assert store.last_seq(bob.me) == 3
    assert hashes(alice) == hashes(bob)


def test_a_head_publish_in_flight_when_settle_starts_does_not_keep_the_final_head_from_being_sent(
    swarm: Swarm,
):
    """issue 14's race: the background sync is publishing alice's head (not final) when settle() marks it final.
    If that publish were then recorded as having sent the final head, alice would never send it, and bob would
    wait for her chain until his timeout (60 s on every peer at the end of a WAN run)."""
    alice, bob = swarm.recorder("alice"), swarm.recorder("bob")
    commitments = {r.me: commitment(r.identity, 0) for r in (alice, bob)}
    for recorder in (alice, bob):
        recorder.on_round(0, commitments)
    wait_for(lambda: hashes(alice) == hashes(bob))

    real_publish = alice._board.publish_head
    in_flight = threading.Event()
    sent: list[LedgerHead] = []

    def slow_publish(head: LedgerHead) -> bool:
        if not head.final and not in_flight.is_set():
            in_flight.set()
            time.sleep(1.5)  # a WAN round trip: settle() starts meanwhile
        sent.append(head)
        return real_publish(head)

    alice._board.publish_head = slow_publish
    alice._head_published = None  # the next sync publishes the (non-final) head again
    alice._wake.set()
    assert in_flight.wait(10), "the background sync did not publish the head"
    with ThreadPoolExecutor(1) as pool:
        settled = pool.submit(alice.settle, timeout=20)
        started = time.monotonic()
        assert bob.settle(timeout=15, waits_for=lambda author: author == alice.me), (
            "alice's final head never came"
        )
        assert time.monotonic() - started < 10
        assert settled.result()
    assert any(head.final for head in sent) and not sent[0].final
