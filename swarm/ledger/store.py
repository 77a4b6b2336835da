"""The ledger's embedded store: one SQLite file per peer, in WAL mode with ``synchronous=FULL``.

Guarantees:

* **Only valid entries get in.** :meth:`LedgerStore.add` checks the signature and author, the link to the
  author's stored previous entry, that neither the entry, its (author, seq) place nor the author's own use of its
  idempotency key (see :attr:`LedgerEntry.idempotency_key`) is taken, and that the commitment it rests on exists
  and agrees with it (:meth:`LedgerEntry.check_references`; the commitment's body is stored beside it). The UNIQUE
  constraints enforce the same across processes sharing the file, so two processes of one peer can never credit
  one contribution twice. Two *authors* may record the same key (every auditor that failed a contribution writes
  its slash): balances count each key once (:mod:`swarm.ledger.balances`).
* **Committed means durable.** Each insert is one transaction; once ``add``/``append`` returns, the entry
  survives ``kill -9`` or power loss, and a crash mid-write leaves the store as it was before that write.
* **Tampering is detected.** :meth:`LedgerStore.verify` recomputes every hash from the stored canonical bytes,
  checks every signature, every chain, every referenced commitment and every recorded Merkle root (against the
  entries it covered and against the anchor it was posted to), and names the first bad entry or root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.ledger.entries import GENESIS_HASH, LedgerEntry, LedgerError

if TYPE_CHECKING:
    from swarm.identity import Identity

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused: a root covers the entries up to an id
    hash TEXT NOT NULL UNIQUE,
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    canonical BLOB NOT NULL,
    signature BLOB NOT NULL,
    UNIQUE (author, seq),
    UNIQUE (author, idempotency_key)
);
CREATE TABLE IF NOT EXISTS commitments (
    digest TEXT PRIMARY KEY,  -- sha256 of body: what contribution, audit and slash entries reference in refs[0]
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS roots (
    period INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,  -- the current epoch the balances were computed at
    upto_id INTEGER NOT NULL,  -- the root covers the entries with id <= upto_id
    root TEXT NOT NULL,
    anchor_ref TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class DuplicateCredit(LedgerError):
    """The entry would credit or penalise something already in the ledger (same idempotency key).
    Callers that submit idempotently (retries, a second process of the same peer) can treat it as success."""


class LedgerCorrupted(LedgerError):
    """A stored entry fails verification. ``entry_hash``, ``author`` and ``seq`` name the first bad one."""

    def __init__(self, message: str, entry_hash: str, author: str, seq: int):
        super().__init__(message)
        self.entry_hash, self.author, self.seq = entry_hash, author, seq


class LedgerStore:
    """A peer's copy of the ledger in the SQLite file ``path`` (created with its directory if missing).

    :param path: the database file, e.g. ``WORKDIR/ledger.db``
    :param timeout: seconds to wait for another process holding the write lock
    """

    def __init__(self, path: Path | str, timeout: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each entry is exactly one transaction
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path}: not a readable ledger database ({error})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ----------------------------------------------------------------------------------------------

    def add(self, entry: LedgerEntry, commitment: bytes | None = None) -> None:
        """Store an entry written elsewhere (or by :meth:`append`) after checking it; ``commitment`` is the canonical
        body of the commitment it references (:func:`~swarm.ledger.entries.commitment_body`; may be omitted if this
        store already holds it). Raises :class:`LedgerError` (or :class:`DuplicateCredit`) naming the entry if it is
        not acceptable; nothing is stored then."""
        entry.verify()
        with self._write_transaction():
            self._check_place(entry, commitment)
            self._insert(entry, commitment)

    def append(self, identity: Identity, commitment: bytes | None = None, **fields: object) -> LedgerEntry:
        """Write, sign and store the next entry of ``identity``'s chain; ``fields`` are those of
        :meth:`LedgerEntry.create` other than ``seq`` and ``prev_hash``, which come from the store, and
        ``commitment`` is as in :meth:`add`. Safe when several processes append for the same identity: the chain
        position is chosen under the write lock."""
        with self._write_transaction():
            last = self._db.execute(
                "SELECT seq, hash FROM entries WHERE author = ? ORDER BY seq DESC LIMIT 1",
                (str(identity.peer_id),),
            ).fetchone()
            seq, prev_hash = (0, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
            entry = LedgerEntry.create(identity, seq=seq, prev_hash=prev_hash, **fields)  # type: ignore[arg-type]
            self._check_place(entry, commitment)
            self._insert(entry, commitment)
        return entry

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[None]:
        """One transaction holding SQLite's write lock: checks and insert see one state, across processes."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _check_place(self, entry: LedgerEntry, commitment: bytes | None) -> None:
        if self._db.execute("SELECT 1 FROM entries WHERE hash = ?", (entry.hash,)).fetchone():
            raise LedgerError(f"{entry.describe()}: already in the ledger")
        taken = self._db.execute(
            "SELECT hash FROM entries WHERE author = ? AND seq = ?", (entry.author, entry.seq)
        ).fetchone()
        if taken:
            raise LedgerError(
                f"{entry.describe()}: replayed position — the author's seq {entry.seq} is {taken[0]}"
            )
        if entry.seq > 0:
            previous = self._db.execute(
                "SELECT hash FROM entries WHERE author = ? AND seq = ?", (entry.author, entry.seq - 1)
            ).fetchone()
            if previous is None:
                raise LedgerError(
                    f"{entry.describe()}: the author's previous entry (seq {entry.seq - 1}) is missing"
                )
            if previous[0] != entry.prev_hash:
                raise LedgerError(
                    f"{entry.describe()}: broken chain — prev_hash is not the author's seq "
                    f"{entry.seq - 1} ({previous[0]})"
                )
        credited = self._db.execute(
            "SELECT hash FROM entries WHERE author = ? AND idempotency_key = ?",
            (entry.author, entry.idempotency_key),
        ).fetchone()
        if credited:
            raise DuplicateCredit(
                f"{entry.describe()}: duplicate — {entry.idempotency_key} is already "
                f"recorded by entry {credited[0]}"
            )
        if commitment is None and entry.refs and entry.kind != "ban":
            commitment = self.commitment(entry.refs[0])
        entry.check_references(commitment)

    def _insert(self, entry: LedgerEntry, commitment: bytes | None) -> None:
        self._db.execute(
            "INSERT INTO entries (hash, author, seq, kind, idempotency_key, canonical, signature) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry.hash,
                entry.author,
                entry.seq,
                entry.kind,
                entry.idempotency_key,
                entry.canonical_bytes(),
                entry.signature,
            ),
        )
        if commitment is not None and entry.kind != "ban":
            self._db.execute(
                "INSERT OR IGNORE INTO commitments (digest, body) VALUES (?, ?)", (entry.refs[0], commitment)
            )

    def commitment(self, digest: str) -> bytes | None:
        """The stored canonical body of the commitment with this digest, or None."""
        row = self._db.execute("SELECT body FROM commitments WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        return row[0].encode() if isinstance(row[0], str) else bytes(row[0])  # text if someone edited the row

    # --- metadata and roots -----------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def max_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0]

    def record_root(self, period: int, epoch: int, upto_id: int, root: str, anchor_ref: str) -> None:
        """Remember the root of ``period``: balances at ``epoch`` over the entries with id <= ``upto_id``."""
        self._db.execute(
            "INSERT OR REPLACE INTO roots (period, epoch, upto_id, root, anchor_ref) VALUES (?, ?, ?, ?, ?)",
            (period, epoch, upto_id, root, anchor_ref),
        )

    def roots(self) -> list[tuple[int, int, int, str, str]]:
        """(period, epoch, upto_id, root, anchor_ref) of every recorded root, by period."""
        return list(
            self._db.execute("SELECT period, epoch, upto_id, root, anchor_ref FROM roots ORDER BY period")
        )

    def rows_with_commitments(self, author: str, from_seq: int) -> list[tuple[LedgerEntry, bytes | None]]:
        """``author``'s entries from ``from_seq`` on, by seq, each with the body of the commitment it references."""
        rows = self._db.execute(
            "SELECT e.canonical, e.signature, c.body FROM entries e LEFT JOIN commitments c "
            "ON e.kind != 'ban' AND c.digest = json_extract(e.canonical, '$.refs[0]') "
            "WHERE e.author = ? AND e.seq >= ? ORDER BY e.seq",
            (author, from_seq),
        )
        return [
            (LedgerEntry.from_canonical(bytes(a), bytes(b)), None if c is None else bytes(c))
            for a, b, c in rows
        ]

    # --- reading ----------------------------------------------------------------------------------------------

    def _rows(self) -> Iterator[tuple]:
        try:
            yield from self._db.execute(
                "SELECT hash, author, seq, kind, idempotency_key, canonical, signature FROM entries "
                "ORDER BY author, seq"
            )
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path}: the database file is damaged ({error})") from None

    def entries(self, upto_id: int | None = None) -> list[LedgerEntry]:
        """Every entry (with id <= ``upto_id`` if given), ordered by (author, seq) — the same order on every peer
        holding the same entries. Parses without verifying signatures; run :meth:`verify` to check the store."""
        if upto_id is None:
            return [LedgerEntry.from_canonical(bytes(row[5]), bytes(row[6])) for row in self._rows()]
        rows = self._db.execute(
            "SELECT canonical, signature FROM entries WHERE id <= ? ORDER BY author, seq", (upto_id,)
        )
        return [LedgerEntry.from_canonical(bytes(a), bytes(b)) for a, b in rows]

    def heads(self) -> dict[str, int]:
        """Author -> its last stored seq."""
        return dict(self._db.execute("SELECT author, MAX(seq) FROM entries GROUP BY author"))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def last_seq(self, author: str) -> int | None:
        row = self._db.execute("SELECT MAX(seq) FROM entries WHERE author = ?", (author,)).fetchone()
        return row[0]

    def verify(self, anchored: dict[int, str] | None = None) -> int:
        """Re-check every stored entry: its hash against its canonical bytes, its fields against the row, its
        signature and author, each author's chain (seq contiguous from 0, prev_hash links) and the commitment it
        references; then every recorded root: recomputed from the entries it covered under the stored rules
        (:meth:`rules`), and equal to the root the anchor holds for its period (``anchored``: period -> root, e.g.
        from :meth:`~swarm.ledger.anchor.Anchor.roots`).

        :returns: the number of entries verified
        :raises LedgerCorrupted: naming the first bad entry in (author, seq) order, or the first bad root
        """
        count, previous_author, previous_hash, expected_seq = 0, None, GENESIS_HASH, 0
        for row in self._rows():
            stored_hash, author, seq = row[0], row[1], row[2]
            if author != previous_author:
                previous_author, previous_hash, expected_seq = author, GENESIS_HASH, 0
            problem = _row_problem(row, previous_hash, expected_seq, self.commitment)
            if problem:
                raise LedgerCorrupted(
                    f"bad entry {stored_hash} (author {author} seq {seq}): {problem}",
                    stored_hash,
                    author,
                    seq,
                )
            previous_hash, expected_seq, count = stored_hash, seq + 1, count + 1
        self._verify_roots(anchored or {})
        return count

    def rules(
        self,
    ):  # -> Rules (imported lazily: balances imports nothing from here, but keep the layers flat)
        """The credit rules this ledger was written under (stored by the recorder), or the defaults."""
        from swarm.ledger.balances import Rules

        stored = self.get_meta("rules")
        return Rules(**json.loads(stored)) if stored else Rules()

    def _verify_roots(self, anchored: dict[int, str]) -> None:
        from swarm.ledger.balances import balances
        from swarm.ledger.merkle import MerkleTree

        rules = self.rules()
        for period, epoch, upto_id, root, _ in self.roots():
            recomputed = MerkleTree(balances(self.entries(upto_id), rules, epoch)).root
            if recomputed != root:
                raise LedgerCorrupted(
                    f"bad root of period {period}: recorded {root}, but its entries give {recomputed}",
                    root,
                    "",
                    period,
                )
            if period in anchored and anchored[period] != root:
                raise LedgerCorrupted(
                    f"bad root of period {period}: the anchor holds {anchored[period]}, this ledger {root}",
                    root,
                    "",
                    period,
                )


def _row_problem(row: tuple, previous_hash: str, expected_seq: int, commitment) -> str | None:
    """What is wrong with one stored row, given the hash and seq its author's chain expects next and a lookup of
    stored commitment bodies by digest; None if fine."""
    stored_hash, author, seq, kind, key, canonical, signature = row
    canonical, signature = bytes(canonical), bytes(signature)
    if hashlib.sha256(canonical).hexdigest() != stored_hash:
        return "its bytes do not hash to its id (the stored entry was modified)"
    try:
        entry = LedgerEntry.from_canonical(canonical, signature)
        entry.verify()
    except LedgerError as error:
        return str(error)
    if (entry.author, entry.seq, entry.kind, entry.idempotency_key) != (author, seq, kind, key):
        return "the row's index columns do not match the signed entry"
    if seq != expected_seq:
        return f"chain gap — expected seq {expected_seq}"
    if entry.prev_hash != previous_hash:
        return f"broken chain — prev_hash should be {previous_hash}"
    try:
        entry.check_references(commitment(entry.refs[0]) if entry.refs and entry.kind != "ban" else None)
    except LedgerError as error:
        return str(error).split(": ", 1)[-1]
    return None
