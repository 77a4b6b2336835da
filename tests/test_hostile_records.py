"""Poisoned DHT records under every key the swarm reads: honest nodes (``start_dht`` with the run id) refuse them
before storing, and every board read returns in time with the honest records intact and no traceback.

The attacker is :mod:`tests.hostile_client`: a plain hivemind node with a fresh key of its own, which stores raw
bytes on its own node (so honest reads meet them there) and asks each honest node to store them.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm.config import NetworkConfig, SwarmConfig
from swarm.identity import Identity
from swarm.network.dht import start_dht
from swarm.network.ledger_records import LedgerBoard, LedgerHead, chunks_key, encode_chunk, heads_key
from swarm.network.records import (
    AuditVerdict,
    Commitment,
    CommitmentBoard,
    PeerStatus,
    StatusBoard,
    VerdictBoard,
    bounded_get,
    commitments_key,
    dict_entries,
    peer_id_from_public_key,
    verdicts_key,
)
from swarm.network.rollout_records import RolloutBoard, rollouts_key
from swarm.network.run_records import RUNS_KEY, RunAnnouncement
from swarm.network.startup import start_retrying
from swarm.network.validation import RecordBounds, SwarmRecordValidator, check_expiration
from swarm.shared_settings import fingerprint, shared_settings
from tests.conftest import bare_dht
from tests.hostile_client import (
    JUNK,
    REGULAR,
    ChildLogs,
    HostileClient,
    RawRecord,
    dumps,
    far_future,
    poisoned,
)

RUN = "hostile-run"
GRADS = f"{RUN}_grads"
READ_BOUND = 5.0  # seconds any board read may take here (loopback)


def _status(peer_id: str, epoch: int = 3) -> PeerStatus:
    return PeerStatus(peer_id=peer_id, name="p", epoch=epoch, state_hash="h", ready_epoch=-1, samples=1)


def _commitment(peer_id: str, epoch: int = 3) -> Commitment:
    return Commitment(
        peer_id=peer_id,
        epoch=epoch,
        state_hash="s",
        data_seed="d",
        samples=4,
        tokens=40,
        rollouts_hash="r",
        gradient_hash="g",
        precision="fp32",
    )


def _verdict(auditor: str, audited: str, epoch: int = 3) -> AuditVerdict:
    return AuditVerdict(
        auditor=auditor,
        audited=audited,
        epoch=epoch,
        commitment="c" * 64,
        verdict="pass",
        error=0.0,
        role="primary",
    )


def _head(author: str) -> LedgerHead:
    return LedgerHead(author=author, seq=0, hash="ab" * 32)


def _announcement(peer_id: str, run: str) -> RunAnnouncement:
    settings = shared_settings(SwarmConfig(run_id=run))
    return RunAnnouncement(peer_id=peer_id, run_id=run, fingerprint=fingerprint(settings), settings=settings)


CHUNK = encode_chunk([(b"entry", b"signature", b"")])


def valid_records(own: str, marker: bytes, victim: str, run: str = RUN) -> list[tuple[str, bytes, bytes]]:
    """(key, subkey tag, value) of a valid record of the client's own under every key the swarm reads."""
    peer_bytes = b"\x12\x20" + b"p" * 32  # shaped like a peer id (a sha256 multihash)
    grads = f"{run}_grads"
    return [
        (f"{run}.peers", dumps(marker), dumps(_status(own).model_dump())),
        (heads_key(run), dumps(marker), dumps(_head(own).model_dump())),
        (chunks_key(run, own), dumps(b"0:" + marker), dumps(dict(first_seq=0, data=CHUNK))),
        # forged: not own
        (
            chunks_key(run, victim),
            dumps(b"0:" + marker),
            dumps(dict(first_seq=0, data=CHUNK)),
        ),
        (commitments_key(run), dumps(b"3:" + marker), dumps(_commitment(own).model_dump())),
        (
            verdicts_key(run),
            dumps(f"3:{victim}:".encode() + marker),
            dumps(_verdict(own, victim).model_dump()),
        ),
        (rollouts_key(run), dumps(b"3:" + marker), dumps(dict(bundle=b"zz", signature=b"sig"))),
        (f"{grads}.0b", dumps(peer_bytes), dumps(True)),
        (f"{grads}.0b00000011", dumps(peer_bytes), dumps(True)),
        (f"{grads}.all_averagers", dumps(peer_bytes), dumps(1.5)),
        (RUNS_KEY, dumps(marker), dumps(_announcement(own, run).model_dump())),
    ]


def forged_records(own: str, marker: bytes, victim: str) -> list[RawRecord]:
    """Records signed by the client's key that claim to be somebody else's."""
    ok = get_dht_time() + 60
    return [
        RawRecord(f"{RUN}.peers", dumps(marker), dumps(_status(victim, epoch=99).model_dump()), ok, "forged"),
        RawRecord(heads_key(RUN), dumps(marker), dumps(_head(victim).model_dump()), ok, "forged"),
        RawRecord(
            commitments_key(RUN), dumps(b"3:" + marker), dumps(_commitment(victim).model_dump()), ok, "forged"
        ),
        RawRecord(f"{RUN}.peers", dumps(marker + b"x"), dumps(_status(own).model_dump()), ok, "forged"),
        RawRecord(f"{GRADS}.0b", dumps(b"not a peer id"), dumps(True), ok, "wrong type"),
        RawRecord(RUNS_KEY, dumps(marker), dumps(_announcement(victim, RUN).model_dump()), ok, "forged"),
    ]


# ---- the validator alone (no processes) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: Identity.load_or_create(folder / name) for name in ("alice", "bob", "mallory")}


def _record(raw: RawRecord) -> DHTRecord:
    value = dumps(b"x" * raw.value) if isinstance(raw.value, int) else raw.value
    return DHTRecord(DHTID.generate(source=raw.key).to_bytes(), raw.tag, value, raw.expiration)


@pytest.mark.unit
def test_the_validator_takes_valid_records_and_refuses_every_poisoned_variant(keys, caplog) -> None:
    mallory, alice = keys["mallory"], keys["alice"]
    from hivemind.dht.crypto import RSASignatureValidator

    marker = RSASignatureValidator(mallory.private_key).local_public_key
    own, victim = str(mallory.peer_id), str(alice.peer_id)
    validator = SwarmRecordValidator(RUN, local_peer_id=victim)
    refused: dict[str, int] = {}
    with caplog.at_level(logging.DEBUG, logger="swarm.network.validation"):
        for key, tag, value in valid_records(own, marker, victim):
            for raw in poisoned(key, tag, value):
                accepted = validator.validate(_record(raw))
                expect = raw.family == "valid" and key != chunks_key(RUN, victim)
                assert accepted == expect, (key, raw.family)
                refused[raw.family] = refused.get(raw.family, 0) + (not accepted)
        for raw in forged_records(own, marker, victim):
            assert not validator.validate(_record(raw)), (raw.key, raw.family)
    assert set(refused) >= {
        "undecodable",
        "truncated",
        "mixed-type subkey",
        "far-future expiration",
        "nan expiration",
        "inf expiration",
        "oversized",
        "wipe",
        "wrong type",
    }
    assert not any(record.exc_info for record in caplog.records)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 0 < len(warnings) < sum(refused.values())  # once per (kind, problem), then at debug level


@pytest.mark.unit
def test_expirations_are_bounded_per_key() -> None:
    now = 1000.0
    check_expiration(now + 10, max_ttl=10, slack=0, now=now)
    for bad in (math.nan, math.inf, -math.inf, now + 11, "soon", True):
        with pytest.raises(ValueError):
            check_expiration(bad, max_ttl=10, slack=0, now=now)

    class Config:  # the fields RecordBounds.from_config reads
        class averaging:
            peer_timeout, round_timeout, matchmaking_time = 15.0, 60.0, 4.0

        class verify:
            audit_window = 3

        class sharing:
            max_age_epochs = 1

        class ledger:
            record_ttl = 7 * 24 * 3600.0

    bounds = RecordBounds.from_config(Config)
    assert bounds.status == 30 and bounds.ledger == 14 * 24 * 3600 and bounds.verification == 720
    validator = SwarmRecordValidator(RUN, bounds)
    status_key = DHTID.generate(source=f"{RUN}.peers").to_bytes()
    # a status asking to live an hour is refused with these bounds, but accepted under the defaults
    record = DHTRecord(status_key, dumps(b"x"), dumps({}), get_dht_time() + 3600)
    assert not validator.validate(record)
    assert "expiration" in _problem(validator, record)
    assert "expiration" not in _problem(SwarmRecordValidator(RUN), record)


def _problem(validator: SwarmRecordValidator, record: DHTRecord) -> str:
    try:
        validator._problem(record)
    except ValueError as error:
        return str(error.args)
    return ""


# ---- real nodes -----------------------------------------------------------------------------------------------


class Honest:
    def __init__(self, identity: Identity, dht):
        self.identity, self.dht, self.id = identity, dht, str(identity.peer_id)
        self.status = StatusBoard(dht, RUN, identity, ttl=60)
        self.commitments = CommitmentBoard(dht, RUN, identity, ttl=60)
        self.verdicts = VerdictBoard(dht, RUN, identity, ttl=60)
        self.ledger = LedgerBoard(dht, RUN, identity, ttl=600)
        self.rollouts = RolloutBoard(dht, RUN, identity, ttl=60, max_record_bytes=1 << 20)


@pytest.fixture(scope="module")
def swarm(keys, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    nodes = []
    logs = ChildLogs(root / "children.log").__enter__()
    try:
        alice_dht = start_dht(NetworkConfig(client_mode=False), keys["alice"], root / "alice", run_id=RUN)
        nodes.append(alice_dht)
        peers = [str(addr) for addr in alice_dht.get_visible_maddrs()]
        bob_dht = start_dht(
            NetworkConfig(client_mode=False, initial_peers=peers), keys["bob"], root / "bob", run_id=RUN
        )
        nodes.append(bob_dht)
        hostile = HostileClient.start(peers, start=lambda make: start_retrying(make, 60, what="DHT"))
        nodes.append(hostile.dht)
        yield Honest(keys["alice"], alice_dht), Honest(keys["bob"], bob_dht), hostile, logs
    finally:
        for dht in nodes:
            dht.shutdown()
        logs.__exit__()


def _publish_honest(alice: Honest, bob: Honest) -> None:
    assert alice.status.publish(_status(alice.id)) and bob.status.publish(_status(bob.id))
    assert alice.commitments.publish(_commitment(alice.id))
    assert bob.verdicts.publish(_verdict(bob.id, alice.id))
    assert alice.ledger.publish_head(_head(alice.id)) and alice.ledger.publish_chunk(0, CHUNK)
    assert alice.rollouts.publish(3, b"canonical bundle", b"signature")
    for honest in (alice, bob):  # what hivemind's averager writes (matchmaking, state sharing)
        peer_bytes = honest.dht.peer_id.to_bytes()
        assert honest.dht.store(f"{GRADS}.0b00000011", True, get_dht_time() + 30, subkey=peer_bytes)
        assert honest.dht.store(f"{GRADS}.all_averagers", 0.0, get_dht_time() + 30, subkey=peer_bytes)


def _timed(read, *args):
    started = time.monotonic()
    result = read(*args)
    elapsed = time.monotonic() - started
    assert elapsed < READ_BOUND, f"a read took {elapsed:.1f}s"
    return result


def _check_reads(alice: Honest, bob: Honest, hostile: str | None = None) -> None:
    """Every board returns the honest records intact, in time, on both honest nodes; besides them, at most the
    hostile client's own *valid* records (``hostile``: its record peer id), which anybody may publish."""
    honest = {alice.id, bob.id}
    mine = set() if hostile is None else {hostile}
    fake_averager = b"\x12\x20" + b"p" * 32
    for reader in (alice, bob):
        statuses = _timed(reader.status.fetch)
        assert {k: v for k, v in statuses.items() if k in honest} == {
            alice.id: _status(alice.id),
            bob.id: _status(bob.id),
        }, statuses
        assert set(statuses) <= honest | mine
        commitments = _timed(reader.commitments.fetch, 3)
        assert commitments.get(alice.id) == _commitment(alice.id) and set(commitments) <= {alice.id} | mine
        verdicts = _timed(reader.verdicts.fetch)
        assert [v for v in verdicts if v.auditor in honest] == [_verdict(bob.id, alice.id)]
        assert {v.auditor for v in verdicts} <= honest | mine
        heads = _timed(reader.ledger.fetch_heads)
        assert heads.get(alice.id) == _head(alice.id) and set(heads) <= {alice.id} | mine
        assert _timed(reader.ledger.fetch_chunks, alice.id) == [(0, [(b"entry", b"signature", b"")])]
        rollouts = [(owner, epoch) for owner, epoch, *_ in _timed(reader.rollouts.fetch, {3})]
        assert (alice.id, 3) in rollouts and {owner for owner, _ in rollouts} <= {alice.id} | mine
        for key in (f"{GRADS}.0b00000011", f"{GRADS}.all_averagers"):
            subkeys = {subkey for subkey, _ in _timed(dict_entries, reader.dht, key)}
            expected = {node.dht.peer_id.to_bytes() for node in (alice, bob)}
            assert expected <= subkeys <= expected | ({fake_averager} if hostile else set()), key


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_honest_nodes_refuse_poisoned_records_and_reads_stay_intact(swarm, caplog) -> None:
    alice, bob, hostile, logs = swarm
    _publish_honest(alice, bob)
    _check_reads(alice, bob)  # also: both nodes have seen alice's head, so both know her ledger chunk key

    own = str(peer_id_from_public_key(hostile.private_key.get_public_key()))  # whom its record key names
    records, expected = [], []
    for key, tag, value in valid_records(own, hostile.marker, alice.id):
        for raw in poisoned(key, tag, value):
            records.append(raw)
            # a valid record of the client's own is taken (it proves the path stores); under another's chunk key not
            expected.append(raw.family == "valid" and key != chunks_key(RUN, alice.id))
    records += forged_records(own, hostile.marker, alice.id)
    expected += [False] * (len(records) - len(expected))
    answers = hostile.store_raw(records, [alice.dht.peer_id, bob.dht.peer_id])
    for peer, stored in answers.items():
        assert isinstance(stored, list), (peer, stored)
        wrong = [(r.key, r.family) for r, ok, want in zip(records, stored, expected) if bool(ok) != want]
        assert not wrong, (peer, wrong)
    assert sum(expected) == 10

    with caplog.at_level(logging.DEBUG):
        # the client's node serves the junk to readers too: they refuse it on arrival
        _check_reads(alice, bob, hostile=own)
    assert alice.dht.is_alive() and bob.dht.is_alive()
    text = logs.text()
    assert "Traceback" not in text, text[-3000:]
    assert not any(record.exc_info for record in caplog.records)
    refused = [line for line in logs.lines(logging.WARNING) if "Refused a DHT" in line]
    assert any("peer status" in line for line in refused) and any("matchmaking" in line for line in refused)
    # once per (node, kind of record, problem): the same refusal again (a read meeting it, the other copy) is quiet
    shapes = Counter((line.split()[1], re.sub(r"\d", "", line.split(" ", 2)[2])) for line in refused)
    assert max(shapes.values()) == 1, shapes.most_common(3)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_read_that_hivemind_never_answers_returns_in_time(tmp_path: Path, caplog) -> None:
    """A node without the swarm's validators stores an undecodable value; hivemind's read of it never answers
    (it raises inside a callback). The swarm's reads give up after their timeout, with one log line."""
    victim = bare_dht()
    hostile = None
    try:
        hostile = HostileClient.start(
            [str(a) for a in victim.get_visible_maddrs()],
            start=lambda make: start_retrying(make, 60, what="DHT"),
        )
        answers = hostile.store_raw(
            [
                RawRecord(f"{RUN}.peers", dumps(b"x"), JUNK, get_dht_time() + 60, "junk"),
                RawRecord(f"{RUN}.peers", dumps(7), dumps(1), get_dht_time() + 60, "mixed"),
            ],
            [victim.peer_id],
            own=False,
        )
        assert answers[str(victim.peer_id)] == [True, True]  # an unguarded node takes anything
        hung = victim.get(f"{RUN}.peers", latest=True, return_future=True)
        with pytest.raises(TimeoutError):
            hung.result(timeout=3)  # hivemind alone: no answer
        with caplog.at_level(logging.WARNING, logger="swarm.network.records"):
            started = time.monotonic()
            assert dict_entries(victim, f"{RUN}.peers", timeout=2) == []
            assert bounded_get(victim, f"{RUN}.peers", timeout=1) is None
            assert time.monotonic() - started < 6
        lines = [r.message for r in caplog.records if "took over" in r.message]
        assert len(lines) == 1 and f"{RUN}.peers" in lines[0]  # the second timeout is rate-limited to debug
    finally:
        if hostile is not None:
            hostile.dht.shutdown()
        victim.shutdown()


@pytest.mark.unit
def test_regular_values_and_junk_are_refused_for_any_key() -> None:
    validator = SwarmRecordValidator(RUN)
    any_key = DHTID.generate(source="somebody.else").to_bytes()
    ok = get_dht_time() + 60
    assert validator.validate(DHTRecord(any_key, dumps(b"s"), dumps({"a": 1}), ok))
    assert not validator.validate(DHTRecord(any_key, REGULAR, dumps({"a": 1}), ok))
    assert not validator.validate(DHTRecord(any_key, dumps(3), dumps({"a": 1}), ok))
    assert not validator.validate(DHTRecord(any_key, dumps(b"s"), JUNK, ok))
    assert not validator.validate(DHTRecord(any_key, dumps(b"s"), dumps(b"x" * (1 << 17)), ok))
    assert not validator.validate(DHTRecord(any_key, dumps(b"s"), dumps(1), far_future()))
