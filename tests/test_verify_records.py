"""Commitments and audit verdicts (docs/design.md §2, steps 4 and 7): signed DHT records that the storing DHT nodes and the
readers both refuse when forged, replayed, malformed or oversized, without any node going down."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from pydantic import ValidationError

from swarm.config import NetworkConfig
from swarm.identity import Identity
from swarm.network.dht import start_dht
from swarm.network.records import (
    MAX_RECORD_BYTES,
    AuditVerdict,
    Commitment,
    CommitmentBoard,
    PeerStatus,
    StatusBoard,
    VerdictBoard,
    VerificationRecordValidator,
    commitments_key,
    verdicts_key,
)
from tests.conftest import bare_dht

RUN = "run"
LOGGER = "swarm.network.records"


def _commitment(identity: Identity | str, **changes: Any) -> Commitment:
    fields = dict(
        peer_id=str(getattr(identity, "peer_id", identity)),
        epoch=3,
        state_hash="s" * 64,
        data_seed="d" * 64,
        samples=8,
        tokens=512,
        rollouts_hash="r" * 64,
        gradient_hash="g" * 64,
        precision="fp32",
    )
    fields.update(changes)
    return Commitment(**fields)


def _verdict(auditor: Identity, audited: Identity | str, **changes: Any) -> AuditVerdict:
    fields = dict(
        auditor=str(auditor.peer_id),
        audited=str(getattr(audited, "peer_id", audited)),
        epoch=3,
        commitment="c" * 64,
        verdict="pass",
        error=3e-7,
        role="primary",
    )
    fields.update(changes)
    return AuditVerdict(**fields)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: Identity.load_or_create(directory / f"{name}.key") for name in ("alice", "bob", "mallory")}


# ---- the models ---------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_models_are_strict_and_the_digest_is_canonical(identities) -> None:
    alice = identities["alice"]
    commitment = _commitment(alice)
    assert commitment.digest() == Commitment.model_validate(commitment.model_dump()).digest()
    assert commitment.digest() != _commitment(alice, tokens=513).digest()
    assert len(commitment.digest()) == 64
    for bad in (
        dict(samples=True),
        dict(samples=1.0),
        dict(epoch=-1),
        dict(precision="int8"),
        dict(extra=1),
        dict(state_hash="x" * 129),
    ):
        with pytest.raises(ValidationError):
            _commitment(alice, **bad)
    verdict = _verdict(alice, identities["bob"])
    assert verdict.passed and not _verdict(alice, "x", verdict="gradient_mismatch").passed
    assert _verdict(alice, "x", error=None).error is None
    for bad in (
        dict(error=math.nan),
        dict(error=math.inf),
        dict(verdict="Pass!"),
        dict(verdict="a" * 33),
        dict(role="judge"),
        dict(error="0.1"),
    ):
        with pytest.raises(ValidationError):
            _verdict(alice, "x", **bad)


# ---- the DHT-level validator, in-process ----------------------------------------------------------------------------
class _Signer:
    """Builds DHT records exactly as a node does (serialized subkey/value, signed by the owner's key)."""

    def __init__(self, identity: Identity):
        self.rsa = RSASignatureValidator(identity.private_key)
        self.marker = self.rsa.local_public_key
        self.validator = CompositeValidator([self.rsa, VerificationRecordValidator(RUN)])

    def record(self, key: str, subkey: Any, value: Any, signed: bool = True, raw: bool = False) -> DHTRecord:
        record = DHTRecord(
            DHTID.generate(source=key).to_bytes(),
            MSGPackSerializer.dumps(subkey),
            value if raw else MSGPackSerializer.dumps(value),
            get_dht_time() + 30,
        )
        if signed:  # sign whatever owner key the subkey holds with this key (as a forger would)
            signature = self.rsa._private_key.sign(self.rsa._serialize_record(record))
            record = dataclasses.replace(record, value=record.value + b"[signature:" + signature + b"]")
        return record


@pytest.mark.unit
def test_validator_rejects_each_bad_record_with_one_warning_line(identities, caplog) -> None:
    alice, bob = _Signer(identities["alice"]), _Signer(identities["bob"])
    honest_c = _commitment(identities["alice"])
    honest_v = _verdict(identities["alice"], identities["bob"])
    # validated in reverse: the signature first
    assert [type(v).__name__ for v in alice.validator._validators] == [
        "VerificationRecordValidator",
        "RSASignatureValidator",
    ]
    good = [
        alice.record(commitments_key(RUN), b"3:" + alice.marker, honest_c.model_dump()),
        alice.record(
            verdicts_key(RUN),
            f"3:{identities['bob'].peer_id}:".encode() + alice.marker,
            honest_v.model_dump(),
        ),
        alice.record(
            verdicts_key(RUN),
            f"3:{identities['bob'].peer_id}:".encode() + alice.marker,
            _verdict(identities["alice"], identities["bob"], error=None, role="recheck").model_dump(),
        ),
        alice.record("run.peers", alice.marker, {"anything": "goes here"}),  # other keys pass untouched
        alice.record("other-run.commitments", b"anon", "not checked"),
    ]
    assert all(alice.validator.validate(record) for record in good)

    mallory = identities["mallory"]
    oversized = _commitment(mallory).model_dump() | {"state_hash": "x" * MAX_RECORD_BYTES}
    bad = {
        "forged": bob.record(commitments_key(RUN), b"3:" + bob.marker, honest_c.model_dump()),
        "replayed": alice.record(commitments_key(RUN), b"4:" + alice.marker, honest_c.model_dump()),
        "non-canonical epoch": alice.record(
            commitments_key(RUN), b"03:" + alice.marker, honest_c.model_dump()
        ),
        "missing field": alice.record(
            commitments_key(RUN),
            b"3:" + alice.marker,
            {k: v for k, v in honest_c.model_dump().items() if k != "tokens"},
        ),
        "wrong type": alice.record(
            commitments_key(RUN), b"3:" + alice.marker, honest_c.model_dump() | {"samples": "8"}
        ),
        "oversized": alice.record(commitments_key(RUN), b"3:" + alice.marker, oversized),
        "not a dict": alice.record(commitments_key(RUN), b"3:" + alice.marker, [1, 2, 3]),
        "no subkey": alice.record(commitments_key(RUN), None, honest_c.model_dump()),
        "unowned": alice.record(commitments_key(RUN), b"3:", honest_c.model_dump(), signed=False),
        "key with a comment": alice.record(
            commitments_key(RUN), b"3:" + alice.marker[:-1] + b" c]", honest_c.model_dump()
        ),
        "nan error": alice.record(
            verdicts_key(RUN),
            f"3:{identities['bob'].peer_id}:".encode() + alice.marker,
            honest_v.model_dump() | {"error": math.nan},
        ),
        "verdict for another auditor": bob.record(
            verdicts_key(RUN), f"3:{identities['bob'].peer_id}:".encode() + bob.marker, honest_v.model_dump()
        ),
        "other audited": alice.record(
            verdicts_key(RUN), f"3:{mallory.peer_id}:".encode() + alice.marker, honest_v.model_dump()
        ),
        "self audit": alice.record(
            verdicts_key(RUN),
            f"3:{identities['alice'].peer_id}:".encode() + alice.marker,
            _verdict(identities["alice"], identities["alice"]).model_dump(),
        ),
        "garbage bytes": alice.record(commitments_key(RUN), b"3:" + alice.marker, b"\xc1\xff" * 10, raw=True),
    }
    # a third party re-storing alice's signed record under another subkey: the signature no longer matches
    moved = dataclasses.replace(good[0], subkey=MSGPackSerializer.dumps(b"4:" + alice.marker))
    assert not bob.validator.validate(moved)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for name, record in bad.items():
            assert not alice.validator.validate(record), name
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == len(bad) and all("\n" not in line for line in warnings)  # one line each
    text = "\n".join(warnings)
    for phrase in (
        "forged",
        "replayed",
        "oversized",
        "not a valid Commitment",
        "not a valid AuditVerdict",
        "audits itself",
        "not a canonical RSA public key",
        "without a subkey",
        "not msgpack",
        "0 owner keys",
    ):
        assert phrase in text, phrase


# ---- real DHT nodes ------------------------------------------------------------------------------------------------
class Peer(NamedTuple):
    identity: Identity
    dht: hivemind.DHT
    commitments: CommitmentBoard
    verdicts: VerdictBoard


async def _stored_subkeys(_dht: hivemind.DHT, node: Any, key: str) -> list[Any] | str | None:
    """What this node holds in its own storage under ``key`` (run inside the DHT process)."""
    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None:
        return None
    items = getattr(found.value, "items", None)
    return sorted(subkey for subkey, _ in items()) if items is not None else "a regular value"


def stored_subkeys(peer: Peer, key: str) -> list[Any] | str | None:
    return peer.dht.run_coroutine(functools.partial(_stored_subkeys, key=key))


@pytest.fixture
def swarm(tmp_path: Path, identities):
    """alice and bob run guarded nodes (start_dht with the run id); mallory runs an unguarded node (signatures only),
    as an attacker with modified code would, so everything she stores lands at least in her own storage."""
    nodes: list[hivemind.DHT] = []
    try:
        first = start_dht(
            NetworkConfig(client_mode=False), identities["alice"], tmp_path / "alice", run_id=RUN
        )
        nodes.append(first)
        joining = NetworkConfig(client_mode=False, initial_peers=[str(a) for a in first.get_visible_maddrs()])
        nodes.append(start_dht(joining, identities["bob"], tmp_path / "bob", run_id=RUN))
        nodes.append(
            bare_dht(
                initial_peers=first.get_visible_maddrs(),
                record_validators=[RSASignatureValidator(identities["mallory"].private_key)],
            )
        )
        yield {
            name: Peer(
                identities[name],
                dht,
                CommitmentBoard(dht, RUN, identities[name], ttl=60),
                VerdictBoard(dht, RUN, identities[name], ttl=60),
            )
            for name, dht in zip(("alice", "bob", "mallory"), nodes)
        }
    finally:
        for dht in nodes:
            dht.shutdown()


def _raw_store(peer: Peer, key: str, subkey: bytes | None, value: Any) -> bool:
    if subkey is None:
        return bool(peer.dht.store(key, value, get_dht_time() + 60))
    return bool(peer.dht.store(key, value, get_dht_time() + 60, subkey=subkey))


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_records_round_trip_and_attacks_are_refused_by_nodes_and_readers(swarm, caplog) -> None:
    alice, bob, mallory = swarm["alice"], swarm["bob"], swarm["mallory"]
    started = time.perf_counter()

    # round trip between two guarded nodes, and from the attacker's node (valid records of hers are accepted)
    commitment = _commitment(alice.identity)
    assert alice.commitments.publish(commitment)
    assert bob.commitments.publish(_commitment(bob.identity))
    assert mallory.commitments.publish(_commitment(mallory.identity))
    seen = bob.commitments.fetch(3)
    assert seen[str(alice.identity.peer_id)] == commitment
    assert seen[str(alice.identity.peer_id)].digest() == commitment.digest()
    assert set(seen) == {str(p.identity.peer_id) for p in (alice, bob, mallory)}
    assert bob.commitments.fetch(4) == {}
    verdict = _verdict(bob.identity, alice.identity, commitment=commitment.digest())
    assert bob.verdicts.publish(verdict)
    assert alice.verdicts.fetch() == [verdict] and alice.verdicts.fetch(3) == [verdict]
    assert alice.verdicts.fetch(4) == []
    # peer statuses on the same guarded nodes are unaffected
    status = PeerStatus(
        peer_id=str(alice.identity.peer_id), name="a", epoch=3, state_hash="h", ready_epoch=-1, samples=1
    )
    assert StatusBoard(alice.dht, RUN, alice.identity, ttl=60).publish(status)
    assert StatusBoard(bob.dht, RUN, bob.identity, ttl=60).fetch()[str(alice.identity.peer_id)] == status

    # boards refuse to publish for somebody else
    with pytest.raises(ValueError):
        mallory.commitments.publish(_commitment(alice.identity))
    with pytest.raises(ValueError):
        mallory.verdicts.publish(_verdict(bob.identity, alice.identity))
    with pytest.raises(ValueError):
        alice.verdicts.publish(_verdict(alice.identity, alice.identity))
    # a guarded node refuses to store even its own peer's bad record (checked with the storage below; the value
    # store() returns is the status of whichever replica answered last, and mallory's node accepts anything)
    _raw_store(
        bob, commitments_key(RUN), b"4:" + bob.commitments.marker, _commitment(bob.identity).model_dump()
    )

    # mallory's attacks, each signed with her own key under her own owner marker
    m = mallory.commitments.marker
    honest_m = _commitment(mallory.identity).model_dump()
    attacks = [
        (commitments_key(RUN), b"5:" + m, _commitment(alice.identity, epoch=5).model_dump()),  # forged
        # malformed
        (
            commitments_key(RUN),
            b"6:" + m,
            {"peer_id": str(mallory.identity.peer_id), "epoch": 6},
        ),
        (commitments_key(RUN), b"7:" + m, honest_m | {"epoch": 7, "samples": "many"}),  # wrong type
        (commitments_key(RUN), b"8:" + m, honest_m | {"epoch": 8, "state_hash": "x" * 3 * MAX_RECORD_BYTES}),
        (commitments_key(RUN), b"4:" + m, honest_m),  # her epoch-3 commitment replayed for epoch 4
        (commitments_key(RUN), b"3:" + m, ["not", "a", "dict"]),  # overwrite her own epoch 3 with junk
        # claims bob audited
        (
            verdicts_key(RUN),
            f"3:{alice.identity.peer_id}:".encode() + m,
            _verdict(bob.identity, alice.identity, verdict="gradient_mismatch").model_dump(),
        ),
        # NaN error
        (
            verdicts_key(RUN),
            f"3:{bob.identity.peer_id}:".encode() + m,
            _verdict(mallory.identity, bob.identity).model_dump() | {"error": math.nan},
        ),
        # replayed epoch
        (
            verdicts_key(RUN),
            f"4:{alice.identity.peer_id}:".encode() + m,
            _verdict(mallory.identity, alice.identity, verdict="gradient_mismatch").model_dump(),
        ),
        # self-audit
        (
            verdicts_key(RUN),
            f"3:{mallory.identity.peer_id}:".encode() + m,
            _verdict(mallory.identity, mallory.identity).model_dump(),
        ),
    ]
    for key, subkey, value in attacks:
        _raw_store(mallory, key, subkey, value)  # her own node may accept; the guarded ones must not

    # the storing nodes: alice and bob hold only the valid entries (the junk reached mallory's own storage only)
    valid_commitments = sorted(b"3:" + p.commitments.marker for p in (alice, bob, mallory))
    valid_verdicts = [f"3:{alice.identity.peer_id}:".encode() + bob.verdicts.marker]
    for peer in (alice, bob):
        assert stored_subkeys(peer, commitments_key(RUN)) == valid_commitments
        assert stored_subkeys(peer, verdicts_key(RUN)) == valid_verdicts
    assert len(stored_subkeys(mallory, commitments_key(RUN))) > len(valid_commitments)

    # the readers: a guarded node's raw get drops mallory's whole (poisoned) answer; every board drops each bad
    # entry, also on mallory's own node, where the junk is stored
    for peer in (alice, bob):
        raw = peer.dht.get(commitments_key(RUN), latest=True).value
        assert sorted(raw) == valid_commitments
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for peer in (alice, bob, mallory):
            by_epoch = {epoch: peer.commitments.fetch(epoch) for epoch in range(3, 9)}
            # on her own node mallory's epoch-3 slot holds her later junk, which wins over the valid copies
            expected = {alice, bob} if peer is mallory else {alice, bob, mallory}
            assert set(by_epoch[3]) == {str(p.identity.peer_id) for p in expected}
            assert by_epoch[3][str(alice.identity.peer_id)] == commitment
            assert all(by_epoch[epoch] == {} for epoch in range(4, 9))
            assert peer.verdicts.fetch() == [verdict]
    dropped = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("forged" in line for line in dropped) and any("replayed" in line for line in dropped)

    # a subkey-less value with a later expiration would replace the whole dictionary on a node that accepted it
    _raw_store(mallory, commitments_key(RUN), None, {"junk": 1})
    assert stored_subkeys(alice, commitments_key(RUN)) == valid_commitments

    # nobody went down, and a valid record still round-trips
    assert all(peer.dht.is_alive() for peer in (alice, bob, mallory))
    later = _commitment(alice.identity, epoch=9)
    assert alice.commitments.publish(later)
    assert bob.commitments.fetch(9) == {str(alice.identity.peer_id): later}
    print(f"attack scenario took {time.perf_counter() - started:.1f}s")
