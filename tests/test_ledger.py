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
from swarm.ledger.entries import GENESIS_HASH, MICRO, LedgerEntry, LedgerError
from swarm.ledger.merkle import MerkleTree, leaf_bytes, verify_proof
from swarm.ledger.store import DuplicateCredit, LedgerCorrupted, LedgerStore


def commitment(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity, Identity]:
    folder = tmp_path_factory.mktemp("keys")
    alice, bob, carol = (Identity.load_or_create(folder / name) for name in ("alice", "bob", "carol"))
    return alice, bob, carol


def credit(store: LedgerStore, author: Identity, subject: Identity, epoch: int, ref: int, samples: int = 8):
    return store.append(author, kind="contribution", subject=str(subject.peer_id), epoch=epoch,
                        samples=samples, tokens=samples * 100, refs=[commitment(ref)])


@pytest.fixture
def store(tmp_path: Path):
    with LedgerStore(tmp_path / "ledger.db") as opened:
        yield opened


def test_entries_round_trip_and_survive_reopening(tmp_path: Path, keys):
    alice, bob, _ = keys
    with LedgerStore(tmp_path / "ledger.db") as store:
        written = [credit(store, alice, alice, epoch, epoch) for epoch in range(3)]
        written.append(store.append(bob, kind="audit", subject=str(alice.peer_id), epoch=1, refs=[commitment(1)]))
        assert store.verify() == 4
    with LedgerStore(tmp_path / "ledger.db") as store:
        assert sorted(store.entries(), key=lambda e: e.hash) == sorted(written, key=lambda e: e.hash)
        assert [e.seq for e in store.entries() if e.author == str(alice.peer_id)] == [0, 1, 2]
        assert written[1].prev_hash == written[0].hash and written[0].prev_hash == GENESIS_HASH


def test_forged_signature_is_rejected(store: LedgerStore, keys):
    alice, bob, _ = keys
    entry = LedgerEntry.create(alice, kind="contribution", seq=0, prev_hash=GENESIS_HASH,
                               subject=str(alice.peer_id), epoch=0, samples=8, refs=[commitment(0)])
    signed_by_bob = dataclasses.replace(entry, signature=bob.private_key.sign(entry.canonical_bytes()))
    inflated = dataclasses.replace(entry, samples=8000)  # alice's signature, but not over these bytes
    for forged in (signed_by_bob, inflated):
        with pytest.raises(LedgerError, match=f"entry {forged.hash} .*invalid signature"):
            store.add(forged)
    assert len(store) == 0


def test_entry_claiming_another_authors_peer_id_is_rejected(store: LedgerStore, keys):
    alice, bob, _ = keys
    honest = LedgerEntry.create(alice, kind="contribution", seq=0, prev_hash=GENESIS_HASH,
                                subject=str(bob.peer_id), epoch=0, samples=8, refs=[commitment(0)])
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
    first = credit(store, alice, alice, 0, 0)
    with pytest.raises(LedgerError, match=f"entry {first.hash} .*already in the ledger"):
        store.add(first)
    # a different, correctly signed entry at a position the author already used
    again = LedgerEntry.create(alice, kind="contribution", seq=0, prev_hash=GENESIS_HASH,
                               subject=str(alice.peer_id), epoch=0, samples=8, refs=[commitment(7)])
    with pytest.raises(LedgerError, match=f"author {alice.peer_id} seq 0\\): replayed position"):
        store.add(again)
    assert store.verify() == 1


def test_a_contribution_is_credited_once_whoever_submits_it(tmp_path: Path, keys):
    alice, bob, carol = keys
    with LedgerStore(tmp_path / "ledger.db") as store, LedgerStore(tmp_path / "ledger.db") as second_process:
        credit(store, alice, carol, 3, 42)
        with pytest.raises(DuplicateCredit, match=f"contribution:{carol.peer_id}:3:{commitment(42)} is already"):
            credit(store, bob, carol, 3, 42)  # another author
        with pytest.raises(DuplicateCredit):
            credit(second_process, alice, carol, 3, 42)  # the same peer again, through another connection
        credit(store, bob, carol, 4, 42)  # another epoch is another contribution
        assert store.verify() == 2
        table = balances(store.entries(), Rules(provisional_epochs=0), current_epoch=10)
    assert table[str(carol.peer_id)].final == 2 * 8 * MICRO


def test_broken_chain_and_gaps_are_rejected(store: LedgerStore, keys):
    alice, _, _ = keys
    credit(store, alice, alice, 0, 0)
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
    entry = LedgerEntry.create(alice, kind="ban", seq=0, prev_hash=GENESIS_HASH, subject=str(alice.peer_id), epoch=2)
    assert LedgerEntry.from_canonical(entry.canonical_bytes(), entry.signature) == entry
    spaced = json.dumps(json.loads(entry.canonical_bytes()), sort_keys=True).encode()
    with pytest.raises(LedgerError, match="not in canonical form"):
        LedgerEntry.from_canonical(spaced, entry.signature)
    with pytest.raises(LedgerError, match="undecodable"):
        LedgerEntry.from_canonical(b"{not json", entry.signature)


def _filled(path: Path, keys) -> list[LedgerEntry]:
    alice, bob, carol = keys
    with LedgerStore(path) as store:
        written = [credit(store, author, author, epoch, epoch, samples=5 + epoch)
                   for epoch in range(3) for author in (alice, bob, carol)]
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
    rules = Rules(credit_per_sample=MICRO, audit_credit=3 * MICRO, slash_amount=50 * MICRO,
                  slash_per_sample=10 * MICRO, provisional_epochs=2)
    a, b, c = (str(k.peer_id) for k in keys)
    with LedgerStore(tmp_path / "ledger.db") as store:
        credit(store, alice, alice, 0, 100, samples=10)  # final at epoch 4
        credit(store, alice, alice, 3, 103, samples=7)  # provisional at epoch 4
        credit(store, bob, carol, 1, 201, samples=9)  # carol cheated on this one ...
        store.append(bob, kind="audit", subject=c, epoch=1, refs=[commitment(201)])
        store.append(bob, kind="slash", subject=c, epoch=1, samples=9, refs=[commitment(201)])  # ... and is slashed
        store.append(bob, kind="ban", subject=c, epoch=1)
        credit(store, carol, carol, 2, 302, samples=50)  # work after the ban: void
        entries = store.entries()
    # the same set seen by another peer: shuffled, with duplicates from a second copy
    expected = balances(entries, rules, current_epoch=4)
    for seed in range(10):
        shuffled = entries + random.Random(seed).sample(entries, 3)
        random.Random(seed).shuffle(shuffled)
        assert balances(shuffled, rules, current_epoch=4) == expected
    assert list(expected) == sorted(expected)
    assert expected[a] == Balance(final=10 * MICRO, provisional=7 * MICRO)
    assert expected[b] == Balance(final=3 * MICRO, provisional=0)  # audit of epoch 1: window closed at 3
    assert expected[c] == Balance(final=-(50 + 9 * 10) * MICRO, provisional=0, banned=True)
    assert balances(entries, rules, current_epoch=0)[a] == Balance(final=0, provisional=17 * MICRO)
    assert rules.deters(audit_probability=0.1, samples=1000) and not Rules(slash_per_sample=0).deters(0.1, 1000)


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
            assert not verify_proof(tree.root, leaf_bytes(peer, balance.final + 1, balance.provisional), proof)
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
    assert _ledger_cli("verify", "--db", str(path)) == (0, f"ok: 9 entries from 3 authors verified ({path})\n")
    code, text = _ledger_cli("balance", alice, "--db", str(path), "--json", "--epoch", "10")
    assert code == 0 and json.loads(text) == {alice: {"final": 18 * MICRO, "provisional": 0, "banned": False}}
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
