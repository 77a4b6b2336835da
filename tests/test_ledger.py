"""The ledger: bad entries are rejected with a message naming them, tampering is detected and named, balances
and Merkle roots are the same for every peer holding the same entries, and proofs check without the ledger."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import random
import sqlite3
from pathlib import Path

import pytest

from swarm.errors import UserError
from swarm.identity import Identity
from swarm.ledger.anchor import FileAnchor, NoneAnchor
from swarm.ledger.balances import Balance, Rules, balances
from swarm.ledger.cli import add_ledger_parser, credits, run_ledger
from swarm.ledger.entries import GENESIS_HASH, MICRO, LedgerEntry, LedgerError, commitment_body
from swarm.ledger.merkle import MerkleTree, leaf_bytes, verify_proof
from swarm.ledger.store import DuplicateCredit, LedgerCorrupted, LedgerStore
from swarm.network.records import Commitment

pytestmark = pytest.mark.unit


def commitment(n: int) -> str:
    """A reference to a commitment nobody made (for entries refused before their references are checked)."""
    return f"{n:064x}"


def commit(subject: Identity, epoch: int, ref: int, samples: int = 8) -> Commitment:
    return Commitment(
        peer_id=str(subject.peer_id),
        epoch=epoch,
        state_hash="s" * 64,
        data_seed=f"{ref:064x}",
        samples=samples,
        tokens=samples * 100,
        rollouts_hash="r" * 64,
        gradient_hash="g" * 64,
        precision="fp32",
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity, Identity]:
    folder = tmp_path_factory.mktemp("keys")
    alice, bob, carol = (Identity.load_or_create(folder / name) for name in ("alice", "bob", "carol"))
    return alice, bob, carol


def credit(
    store: LedgerStore,
    author: Identity,
    epoch: int,
    ref: int,
    samples: int = 8,
    attests: tuple[str, ...] = (),
) -> LedgerEntry:
    """``author``'s contribution entry for a commitment of its own, attesting the commitment digests ``attests``."""
    mine = commit(author, epoch, ref, samples)
    return store.append(
        author,
        commitment=commitment_body(mine),
        kind="contribution",
        subject=str(author.peer_id),
        epoch=epoch,
        samples=samples,
        tokens=samples * 100,
        refs=[mine.digest(), *attests],
    )


@pytest.fixture
def store(tmp_path: Path):
    with LedgerStore(tmp_path / "ledger.db") as opened:
        yield opened


def test_entries_round_trip_and_survive_reopening(tmp_path: Path, keys):
    alice, bob, _ = keys
    with LedgerStore(tmp_path / "ledger.db") as store:
        written = [credit(store, alice, epoch, epoch) for epoch in range(3)]
        # its commitment is stored already
        written.append(
            store.append(
                bob, kind="audit", subject=str(alice.peer_id), epoch=1, refs=[commit(alice, 1, 1).digest()]
            )
        )
        assert store.verify() == 4
    with LedgerStore(tmp_path / "ledger.db") as store:
        assert sorted(store.entries(), key=lambda e: e.hash) == sorted(written, key=lambda e: e.hash)
        assert [e.seq for e in store.entries() if e.author == str(alice.peer_id)] == [0, 1, 2]
        assert written[1].prev_hash == written[0].hash and written[0].prev_hash == GENESIS_HASH


def test_forged_signature_is_rejected(store: LedgerStore, keys):
    alice, bob, _ = keys
    entry = LedgerEntry.create(
        alice,
        kind="contribution",
        seq=0,
        prev_hash=GENESIS_HASH,
        subject=str(alice.peer_id),
        epoch=0,
        samples=8,
        refs=[commitment(0)],
    )
    signed_by_bob = dataclasses.replace(entry, signature=bob.private_key.sign(entry.canonical_bytes()))
    inflated = dataclasses.replace(entry, samples=8000)  # alice's signature, but not over these bytes
    for forged in (signed_by_bob, inflated):
        with pytest.raises(LedgerError, match=f"entry {forged.hash} .*invalid signature"):
            store.add(forged)
    assert len(store) == 0


def test_entry_claiming_another_authors_peer_id_is_rejected(store: LedgerStore, keys):
    alice, bob, _ = keys
    honest = LedgerEntry.create(
        alice,
        kind="contribution",
        seq=0,
        prev_hash=GENESIS_HASH,
        subject=str(bob.peer_id),
        epoch=0,
        samples=8,
        refs=[commitment(0)],
    )
    # alice's key and a valid alice signature, but the entry claims bob wrote it
    claimed = dataclasses.replace(honest, author=str(bob.peer_id))
    claimed = dataclasses.replace(claimed, signature=alice.private_key.sign(claimed.canonical_bytes()))
    with pytest.raises(LedgerError, match=f"author {bob.peer_id} seq 0.*not the peer id of the key"):
        store.add(claimed)
    # bob's key and id, signed by alice
    bob_key = bob.private_key.get_public_key().to_bytes()
    posing = dataclasses.replace(claimed, author_public_key=bob_key)
    posing = dataclasses.replace(posing, signature=alice.private_key.sign(posing.canonical_bytes()))
    with pytest.raises(LedgerError, match="invalid signature"):
        store.add(posing)
    assert len(store) == 0


def test_replayed_entry_is_rejected(store: LedgerStore, keys):
    alice, _, _ = keys
    first = credit(store, alice, 0, 0)
    with pytest.raises(LedgerError, match=f"entry {first.hash} .*already in the ledger"):
        store.add(first)
    # a different, correctly signed entry at a position the author already used
    again = LedgerEntry.create(
        alice,
        kind="contribution",
        seq=0,
        prev_hash=GENESIS_HASH,
        subject=str(alice.peer_id),
        epoch=0,
        samples=8,
        refs=[commitment(7)],
    )
    with pytest.raises(LedgerError, match=f"author {alice.peer_id} seq 0\\): replayed position"):
        store.add(again)
    assert store.verify() == 1


def test_a_contribution_is_credited_once_whoever_submits_it(tmp_path: Path, keys):
    alice, bob, carol = keys
    digest = commit(carol, 3, 42).digest()
    with LedgerStore(tmp_path / "ledger.db") as store, LedgerStore(tmp_path / "ledger.db") as second_process:
        credit(store, carol, 3, 42)
        with pytest.raises(DuplicateCredit, match=f"contribution:{carol.peer_id}:3:{digest} is already"):
            credit(store, carol, 3, 42)  # submitted twice
        with pytest.raises(DuplicateCredit):
            credit(second_process, carol, 3, 42)  # the same peer again, through another connection
        with pytest.raises(LedgerError, match="can only be claimed by its contributor"):
            store.append(
                bob,
                commitment=commitment_body(commit(carol, 3, 42)),
                kind="contribution",
                subject=str(carol.peer_id),
                epoch=3,
                samples=8,
                tokens=800,
                refs=[digest],
            )
        credit(store, carol, 4, 42)  # another epoch is another contribution
        # alice saw both in her rounds
        credit(store, alice, 3, 1, attests=(digest, commit(carol, 4, 42).digest()))
        credit(store, bob, 4, 2, attests=(commit(carol, 4, 42).digest(),))
        assert store.verify() == 4
        entries = store.entries()
    # the same entry delivered again (a second copy, a replayed message) is still counted once
    table = balances(entries + entries, Rules(provisional_epochs=0), current_epoch=10)
    assert table[str(carol.peer_id)].final == 2 * 8 * MICRO


def test_an_entry_for_a_contribution_that_does_not_exist_is_rejected(store: LedgerStore, keys):
    alice, bob, _ = keys
    real = commit(alice, 0, 0)
    fields = dict(kind="contribution", subject=str(alice.peer_id), epoch=0, samples=8, tokens=800)
    with pytest.raises(LedgerError, match="contribution does not exist — no commitment with digest"):
        store.append(alice, refs=[real.digest()], **fields)  # no commitment anywhere
    with pytest.raises(LedgerError, match="contribution does not exist — the commitment given is not"):
        store.append(alice, commitment=commitment_body(commit(alice, 0, 1)), refs=[real.digest()], **fields)
    # a real commitment, but the entry claims fewer... or more samples
    inflated = commit(alice, 0, 0, samples=8000)
    with pytest.raises(LedgerError, match="says samples=8 but commitment"):
        store.append(alice, commitment=commitment_body(inflated), refs=[inflated.digest()], **fields)
    with pytest.raises(LedgerError, match="audited contribution does not exist"):
        store.append(bob, kind="audit", subject=str(alice.peer_id), epoch=0, refs=[real.digest()])
    with pytest.raises(LedgerError, match="cannot slash itself"):
        store.append(
            alice,
            commitment=commitment_body(real),
            kind="slash",
            subject=str(alice.peer_id),
            epoch=0,
            samples=8,
            refs=[real.digest()],
        )
    assert len(store) == 0
    credit(store, alice, 0, 0)
    assert store.commitment(real.digest()) == commitment_body(real)


def test_a_deleted_or_altered_commitment_fails_verification(tmp_path: Path, keys):
    alice, _, _ = keys
    path = tmp_path / "ledger.db"
    with LedgerStore(path) as store:
        entry = credit(store, alice, 0, 0)
    with sqlite3.connect(path) as db:
        (body,) = db.execute("SELECT body FROM commitments").fetchone()
        db.execute("UPDATE commitments SET body = ?", (bytes(body).replace(b'"samples":8', b'"samples":9'),))
    with LedgerStore(path) as store, pytest.raises(LedgerCorrupted, match=f"bad entry {entry.hash} .*not"):
        store.verify()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM commitments")
    with LedgerStore(path) as store, pytest.raises(LedgerCorrupted, match="contribution does not exist"):
        store.verify()


def test_broken_chain_and_gaps_are_rejected(store: LedgerStore, keys):
    alice, _, _ = keys
    credit(store, alice, 0, 0)
    fields = dict(kind="contribution", subject=str(alice.peer_id), epoch=1, samples=8, refs=[commitment(1)])
    wrong_link = LedgerEntry.create(alice, seq=1, prev_hash="ab" * 32, **fields)
    with pytest.raises(LedgerError, match=f"entry {wrong_link.hash} .*broken chain"):
        store.add(wrong_link)
    gap = LedgerEntry.create(alice, seq=5, prev_hash="ab" * 32, **fields)
    with pytest.raises(LedgerError, match="previous entry \\(seq 4\\) is missing"):
        store.add(gap)
    with pytest.raises(LedgerError, match="only seq 0, has the genesis"):
        LedgerEntry.create(alice, seq=1, prev_hash=GENESIS_HASH, **fields)
    with pytest.raises(LedgerError, match="kind 'bonus'"):
        LedgerEntry.create(alice, seq=1, prev_hash="ab" * 32, **{**fields, "kind": "bonus"})


def test_non_canonical_bytes_are_rejected(keys):
    alice, _, _ = keys
    entry = LedgerEntry.create(
        alice, kind="ban", seq=0, prev_hash=GENESIS_HASH, subject=str(alice.peer_id), epoch=2
    )
    assert LedgerEntry.from_canonical(entry.canonical_bytes(), entry.signature) == entry
    spaced = json.dumps(json.loads(entry.canonical_bytes()), sort_keys=True).encode()
    with pytest.raises(LedgerError, match="not in canonical form"):
        LedgerEntry.from_canonical(spaced, entry.signature)
    with pytest.raises(LedgerError, match="undecodable"):
        LedgerEntry.from_canonical(b"{not json", entry.signature)


def _filled(path: Path, keys) -> list[LedgerEntry]:
    alice, bob, carol = keys
    with LedgerStore(path) as store:
        # three peers averaging together for 3 epochs, each attesting the two others' commitments
        written = [
            credit(
                store,
                author,
                epoch,
                epoch,
                samples=5 + epoch,
                attests=tuple(
                    commit(other, epoch, epoch, 5 + epoch).digest()
                    for other in (alice, bob, carol)
                    if other is not author
                ),
            )
            for epoch in range(3)
            for author in (alice, bob, carol)
        ]
        assert store.verify() == 9
    return written


def _ledger_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="swarm")
    add_ledger_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    code = run_ledger(parser.parse_args(["ledger", *argv]), out=out)
    return code, out.getvalue()


def test_modified_row_fails_verification_naming_that_entry(tmp_path: Path, keys):
    path = tmp_path / "ledger.db"
    target = _filled(path, keys)[4]
    with sqlite3.connect(path) as db:
        (canonical,) = db.execute("SELECT canonical FROM entries WHERE hash = ?", (target.hash,)).fetchone()
        tampered = bytes(canonical).replace(b'"samples":6', b'"samples":9')
        assert tampered != bytes(canonical)
        db.execute("UPDATE entries SET canonical = ? WHERE hash = ?", (tampered, target.hash))
    with LedgerStore(path) as store, pytest.raises(LedgerCorrupted) as caught:
        store.verify()
    assert (caught.value.entry_hash, caught.value.author, caught.value.seq) == (target.hash, target.author, 1)
    with pytest.raises(UserError, match=f"bad entry {target.hash} \\(author {target.author} seq 1\\)"):
        _ledger_cli("verify", "--db", str(path))


def test_one_flipped_byte_in_the_database_file_is_detected_and_named(tmp_path: Path, keys):
    path = tmp_path / "ledger.db"
    target = _filled(path, keys)[5]  # closing the last connection checkpoints the WAL into the main file
    blob = bytearray(path.read_bytes())
    canonical = target.canonical_bytes()
    assert blob.count(canonical) == 1
    offset = blob.index(canonical) + canonical.index(b'"epoch":') + len(b'"epoch":')
    blob[offset] ^= 0x01  # the epoch digit 1 becomes 0: still valid JSON, but not what was signed
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=f"bad entry {target.hash} \\(author {target.author} seq 1\\)"):
        _ledger_cli("verify", "--db", str(path))


def test_balances_follow_the_rules_and_ignore_order(tmp_path: Path, keys):
    alice, bob, carol = keys
    rules = Rules(
        credit_per_sample=MICRO,
        audit_credit=3 * MICRO,
        slash_amount=50 * MICRO,
        slash_per_sample=10 * MICRO,
        provisional_epochs=2,
        slash_quorum=2,
    )
    a, b, c = (str(k.peer_id) for k in keys)
    d = {
        (who, epoch): commit(who, epoch, epoch, samples=samples).digest()
        for who, epoch, samples in ((alice, 0, 10), (alice, 3, 7), (carol, 1, 9), (carol, 2, 50), (bob, 0, 4))
    }
    cheat = commit(carol, 1, 1, samples=9)
    with LedgerStore(tmp_path / "ledger.db") as store:
        credit(store, alice, 0, 0, samples=10, attests=(d[bob, 0],))  # final at epoch 4
        credit(store, bob, 0, 0, samples=4)  # attests nothing: alice's epoch-0 work is unattested...
        credit(store, alice, 3, 3, samples=7)  # ... and so is this: neither counts
        credit(store, bob, 1, 1, samples=5, attests=(cheat.digest(),))
        credit(store, carol, 1, 1, samples=9)  # carol cheated on this one ...
        store.append(alice, kind="audit", subject=c, epoch=1, refs=[cheat.digest()])
        store.append(bob, kind="audit", subject=c, epoch=1, refs=[cheat.digest()])
        store.append(alice, kind="slash", subject=c, epoch=1, samples=9, refs=[cheat.digest()])
        one_slash = store.entries()
        # ... quorum reached
        store.append(bob, kind="slash", subject=c, epoch=1, samples=9, refs=[cheat.digest()])
        store.append(bob, kind="ban", subject=c, epoch=1)
        store.append(bob, kind="audit", subject=a, epoch=3, refs=[d[alice, 3]])  # an audit of unattested work
        credit(store, carol, 2, 2, samples=50)  # work after the ban: void
        credit(store, alice, 2, 2, samples=6, attests=(d[carol, 2],))
        entries = store.entries()
    # the same set seen by another peer: shuffled, with duplicates from a second copy
    expected = balances(entries, rules, current_epoch=4)
    for seed in range(10):
        shuffled = entries + random.Random(seed).sample(entries, 3)
        random.Random(seed).shuffle(shuffled)
        assert balances(shuffled, rules, current_epoch=4) == expected
    assert list(expected) == sorted(expected)
    # its audit of carol; its own work unattested
    assert expected[a] == Balance(final=3 * MICRO, provisional=0)
    # attested by alice, + one audit
    assert expected[b] == Balance(final=4 * MICRO + 3 * MICRO, provisional=0)
    assert expected[c] == Balance(final=-(50 + 9 * 10) * MICRO, provisional=0, banned=True)
    # one auditor alone cannot slash: the ban does not count either, and carol keeps what alice attested
    alone = balances(one_slash, rules, current_epoch=0)
    assert alone[c] == Balance(final=0, provisional=9 * MICRO) and not alone[c].banned
    unattested = balances(entries, dataclasses.replace(rules, require_attestation=False), current_epoch=4)
    assert unattested[a] == Balance(final=(10 + 6 + 3) * MICRO, provisional=7 * MICRO)
    assert rules.deters(audit_probability=0.1, samples=1000) and not Rules(slash_per_sample=0).deters(
        0.1, 1000
    )


def test_a_slash_must_outnumber_the_passing_auditors_and_the_accused(tmp_path: Path, keys):
    """Two auditors failing a contribution that a third passed are as many as the passer and the accused: an
    accusation, not a verdict (two colluders in a round of four slash nobody). A third failing auditor makes it
    count."""
    alice, bob, carol = keys
    dave, erin = (Identity.load_or_create(tmp_path / name) for name in ("dave", "erin"))
    a = str(alice.peer_id)
    rules = Rules(
        credit_per_sample=MICRO,
        audit_credit=0,
        slash_amount=50 * MICRO,
        slash_per_sample=0,
        provisional_epochs=2,
        slash_quorum=2,
    )
    work = commit(alice, 0, 0, samples=8)
    with LedgerStore(tmp_path / "ledger.db") as store:
        credit(store, alice, 0, 0, samples=8)
        credit(store, bob, 0, 1, attests=(work.digest(),))
        for auditor in (bob, carol, dave):
            store.append(auditor, kind="audit", subject=a, epoch=0, refs=[work.digest()])
        for slasher in (bob, carol):
            store.append(slasher, kind="slash", subject=a, epoch=0, samples=8, refs=[work.digest()])
        store.append(bob, kind="ban", subject=a, epoch=0)
        accused = balances(store.entries(), rules, current_epoch=4)[a]
        store.append(erin, kind="audit", subject=a, epoch=0, refs=[work.digest()])
        store.append(erin, kind="slash", subject=a, epoch=0, samples=8, refs=[work.digest()])
        outnumbered = balances(store.entries(), rules, current_epoch=4)[a]
    assert accused == Balance(final=8 * MICRO, provisional=0) and not accused.banned
    assert outnumbered.final == -50 * MICRO and outnumbered.banned


@pytest.mark.parametrize("caught_before", [True, False])
def test_colluders_slashed_at_an_earlier_epoch_cannot_slash_an_honest_peer_later(
    tmp_path: Path, keys, caught_before: bool
):
    """Two colluders refuted as false accusers at epoch 0 (slashed by the three honest peers) then fail an honest
    peer's epoch-1 contribution in a round of three where they outnumber it (it had not banned them yet): that
    slash does not count. Without the earlier slash the same two slashes would count, so the epoch order is what
    protects the honest peer."""
    alice, bob, carol = keys  # bob and carol collude
    dave, erin = (Identity.load_or_create(tmp_path / name) for name in ("dave", "erin"))
    rules = Rules(
        credit_per_sample=MICRO,
        audit_credit=0,
        slash_amount=50 * MICRO,
        slash_per_sample=0,
        provisional_epochs=2,
        slash_quorum=2,
    )
    with LedgerStore(tmp_path / "ledger.db") as store:
        round0 = {peer: commit(peer, 0, index) for index, peer in enumerate((alice, bob, carol, dave, erin))}
        digests0 = [made.digest() for made in round0.values()]
        for index, peer in enumerate(round0):
            credit(store, peer, 0, index, attests=tuple(d for d in digests0 if d != round0[peer].digest()))
        if caught_before:
            for colluder in (bob, carol):
                for honest in (alice, dave, erin):
                    store.append(
                        honest,
                        kind="slash",
                        subject=str(colluder.peer_id),
                        epoch=0,
                        samples=8,
                        refs=[round0[colluder].digest()],
                    )
                store.append(alice, kind="ban", subject=str(colluder.peer_id), epoch=0)
        round1 = {peer: commit(peer, 1, 10 + index) for index, peer in enumerate((dave, bob, carol))}
        digests1 = [made.digest() for made in round1.values()]
        for index, peer in enumerate(round1):
            credit(
                store, peer, 1, 10 + index, attests=tuple(d for d in digests1 if d != round1[peer].digest())
            )
        victim = str(dave.peer_id)
        for colluder in (bob, carol):
            store.append(colluder, kind="audit", subject=victim, epoch=1, refs=[round1[dave].digest()])
            store.append(
                colluder, kind="slash", subject=victim, epoch=1, samples=8, refs=[round1[dave].digest()]
            )
            store.append(colluder, kind="ban", subject=victim, epoch=1)
        table = balances(store.entries(), rules, current_epoch=6)
    if caught_before:
        assert table[victim].final == 16 * MICRO and not table[victim].banned
        assert all(table[str(colluder.peer_id)].banned for colluder in (bob, carol))
    else:
        assert table[victim].final == -50 * MICRO and table[victim].banned  # its epoch-0 work forfeited too


def test_merkle_proofs_verify_for_every_peer_and_fail_when_tampered():
    for size in (1, 2, 3, 5, 8, 11):
        table = {f"Qm{i:03d}": Balance(final=i * MICRO, provisional=-i) for i in range(size)}
        tree = MerkleTree(table)
        shuffled_tree = MerkleTree(dict(random.Random(size).sample(sorted(table.items()), size)))
        assert shuffled_tree.root == tree.root
        for peer, balance in table.items():
            proof = tree.proof(peer)
            leaf = leaf_bytes(peer, balance.final, balance.provisional)
            assert leaf == tree.leaf(peer) and verify_proof(tree.root, leaf, proof)
            assert not verify_proof(
                tree.root, leaf_bytes(peer, balance.final + 1, balance.provisional), proof
            )
            if proof:
                bad_step = [("00" * 32, proof[0][1])] + proof[1:]
                assert not verify_proof(tree.root, leaf, bad_step)
        changed = dict(table, Qm000=Balance(final=1, provisional=0))
        assert MerkleTree(changed).root != tree.root


def test_file_anchor_appends_roots_durably(tmp_path: Path):
    anchor = FileAnchor(tmp_path / "anchors" / "roots.jsonl")
    first, second = "ab" * 32, "cd" * 32
    anchor.post(first, 0)
    anchor.post(second, 1)
    assert anchor.post(second, 1) == anchor.roots()[1].ref  # reposting the same root is a no-op
    with pytest.raises(LedgerError, match="period 1 is already anchored"):
        anchor.post(first, 1)
    with anchor.path.open("a") as file:
        file.write('{"period": 2, "ro')  # a line torn by a crash
    anchor.post("ef" * 32, 2)
    assert [(r.period, r.root) for r in anchor.roots()] == [(0, first), (1, second), (2, "ef" * 32)]
    assert len(anchor.path.read_text().splitlines()) == 4
    assert NoneAnchor().post(first, 0) == "" and NoneAnchor().roots() == []


def test_cli_balance_show_export_and_proof(tmp_path: Path, keys):
    path = tmp_path / "ledger.db"
    written = _filled(path, keys)
    alice = str(keys[0].peer_id)
    assert _ledger_cli("verify", "--db", str(path)) == (
        0,
        f"ok: 9 entries from 3 authors verified, 0 roots ({path})\n",
    )
    code, text = _ledger_cli("balance", alice, "--db", str(path), "--json", "--epoch", "10")
    assert code == 0 and json.loads(text) == {
        alice: {
            "final": 18 * MICRO,
            "provisional": 0,
            "banned": False,
            "work": 18 * MICRO,
            "audits": 0,
            "penalties": 0,
        }
    }
    assert credits(18 * MICRO) in _ledger_cli("balance", "--db", str(path), "--epoch", "10")[1]
    assert len(_ledger_cli("show", "--db", str(path))[1].splitlines()) == 9
    exported = json.loads(_ledger_cli("export", "--db", str(path), "--format", "json")[1])
    assert {row["hash"] for row in exported} == {e.hash for e in written}
    rows = list(csv.DictReader(io.StringIO(_ledger_cli("export", "--db", str(path), "--format", "csv")[1])))
    assert len(rows) == 9 and rows[0]["signature"]
    proof = json.loads(_ledger_cli("proof", alice, "--db", str(path))[1])
    assert verify_proof(proof["root"], proof["leaf"].encode(), proof["proof"])
    with pytest.raises(UserError, match="no ledger database"):
        _ledger_cli("show", "--db", str(tmp_path / "missing.db"))
    with pytest.raises(UserError, match="has no balance"):
        _ledger_cli("proof", "nobody", "--db", str(path))
    assert credits(-1_500_000) == "-1.500000"


def test_copies_with_the_same_entries_agree_on_what_is_final_whatever_epoch_each_saw(tmp_path: Path, keys):
    """Finality is counted in the ledger's own epochs: a copy whose peer saw a later swarm epoch (its recorder noted
    epoch 40) shows the same final/provisional split as one that stopped earlier."""
    alice, bob, _ = keys
    copies = []
    for name, seen_epoch in (("early", 3), ("late", 40)):
        with LedgerStore(tmp_path / f"{name}.db") as store:
            work = commit(alice, 0, 0, samples=5)
            credit(store, alice, 0, 0, samples=5)
            credit(store, bob, 0, 1, attests=(work.digest(),))
            credit(store, bob, 4, 4, samples=3, attests=(commit(alice, 4, 4, samples=3).digest(),))
            credit(store, alice, 4, 4, samples=3, attests=(commit(bob, 4, 4, samples=3).digest(),))
            store.set_meta("epoch", str(seen_epoch))
        code, shown = _ledger_cli("balance", "--json", "--db", str(tmp_path / f"{name}.db"))
        assert code == 0
        copies.append(json.loads(shown))
    assert copies[0] == copies[1]
    mine = copies[0][str(alice.peer_id)]
    # the epoch-4 work is still in its window
    assert mine["final"] == 5 * MICRO and mine["provisional"] == 3 * MICRO
