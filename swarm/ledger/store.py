"""The ledger's embedded store: one SQLite file per peer, in WAL mode with ``synchronous=FULL``.

Guarantees:

* **Only valid entries get in.** :meth:`LedgerStore.add` checks the signature and author, the link to the
  author's stored previous entry, and that neither the entry, its (author, seq) place nor its idempotency key
  (see :attr:`LedgerEntry.idempotency_key`) is taken. The UNIQUE constraints enforce the same across processes
  sharing the file, so two processes of one peer can never credit one contribution twice.
* **Committed means durable.** Each insert is one transaction; once ``add``/``append`` returns, the entry
  survives ``kill -9`` or power loss, and a crash mid-write leaves the store as it was before that write.
* **Tampering is detected.** :meth:`LedgerStore.verify` recomputes every hash from the stored canonical bytes,
  checks every signature and every chain, and names the first bad entry in :meth:`entries` order.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.ledger.entries import GENESIS_HASH, LedgerEntry, LedgerError

if TYPE_CHECKING:
    from swarm.identity import Identity

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    hash TEXT PRIMARY KEY,
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    canonical BLOB NOT NULL,
    signature BLOB NOT NULL,
    UNIQUE (author, seq)
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

    def add(self, entry: LedgerEntry) -> None:
        """Store an entry written elsewhere (or by :meth:`append`) after checking it; raises
        :class:`LedgerError` (or :class:`DuplicateCredit`) naming the entry if it is not acceptable."""
        entry.verify()
        with self._write_transaction():
            self._check_place(entry)
            self._insert(entry)

    def append(self, identity: Identity, **fields: object) -> LedgerEntry:
        """Write, sign and store the next entry of ``identity``'s chain; ``fields`` are those of
        :meth:`LedgerEntry.create` other than ``seq`` and ``prev_hash``, which come from the store. Safe when
        several processes append for the same identity: the chain position is chosen under the write lock."""
        with self._write_transaction():
            last = self._db.execute(
                "SELECT seq, hash FROM entries WHERE author = ? ORDER BY seq DESC LIMIT 1", (str(identity.peer_id),)
            ).fetchone()
            seq, prev_hash = (0, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
            entry = LedgerEntry.create(identity, seq=seq, prev_hash=prev_hash, **fields)  # type: ignore[arg-type]
            self._check_place(entry)
            self._insert(entry)
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

    def _check_place(self, entry: LedgerEntry) -> None:
        if self._db.execute("SELECT 1 FROM entries WHERE hash = ?", (entry.hash,)).fetchone():
            raise LedgerError(f"{entry.describe()}: already in the ledger")
        taken = self._db.execute(
            "SELECT hash FROM entries WHERE author = ? AND seq = ?", (entry.author, entry.seq)
        ).fetchone()
        if taken:
            raise LedgerError(f"{entry.describe()}: replayed position — the author's seq {entry.seq} is {taken[0]}")
        if entry.seq > 0:
            previous = self._db.execute(
                "SELECT hash FROM entries WHERE author = ? AND seq = ?", (entry.author, entry.seq - 1)
            ).fetchone()
            if previous is None:
                raise LedgerError(f"{entry.describe()}: the author's previous entry (seq {entry.seq - 1}) is missing")
            if previous[0] != entry.prev_hash:
                raise LedgerError(f"{entry.describe()}: broken chain — prev_hash is not the author's seq "
                                  f"{entry.seq - 1} ({previous[0]})")
        credited = self._db.execute(
            "SELECT hash FROM entries WHERE idempotency_key = ?", (entry.idempotency_key,)
        ).fetchone()
        if credited:
            raise DuplicateCredit(f"{entry.describe()}: duplicate — {entry.idempotency_key} is already "
                                  f"recorded by entry {credited[0]}")

    def _insert(self, entry: LedgerEntry) -> None:
        self._db.execute(
            "INSERT INTO entries (hash, author, seq, kind, idempotency_key, canonical, signature) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.hash, entry.author, entry.seq, entry.kind, entry.idempotency_key, entry.canonical_bytes(),
             entry.signature),
        )

    # --- reading ----------------------------------------------------------------------------------------------

    def _rows(self) -> Iterator[tuple]:
        try:
            yield from self._db.execute(
                "SELECT hash, author, seq, kind, idempotency_key, canonical, signature FROM entries "
                "ORDER BY author, seq"
            )
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path}: the database file is damaged ({error})") from None

    def entries(self) -> list[LedgerEntry]:
        """Every entry, ordered by (author, seq) — the same order on every peer holding the same entries.
        Parses without verifying signatures; run :meth:`verify` to check the store."""
        return [LedgerEntry.from_canonical(bytes(row[5]), bytes(row[6])) for row in self._rows()]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def last_seq(self, author: str) -> int | None:
        row = self._db.execute("SELECT MAX(seq) FROM entries WHERE author = ?", (author,)).fetchone()
        return row[0]

    def verify(self) -> int:
        """Re-check every stored entry: its hash against its canonical bytes, its fields against the row, its
        signature and author, and each author's chain (seq contiguous from 0, prev_hash links).

        :returns: the number of entries verified
        :raises LedgerCorrupted: naming the first bad entry in (author, seq) order
        """
        count, previous_author, previous_hash, expected_seq = 0, None, GENESIS_HASH, 0
        for row in self._rows():
            stored_hash, author, seq = row[0], row[1], row[2]
            if author != previous_author:
                previous_author, previous_hash, expected_seq = author, GENESIS_HASH, 0
            problem = _row_problem(row, previous_hash, expected_seq)
            if problem:
                raise LedgerCorrupted(f"bad entry {stored_hash} (author {author} seq {seq}): {problem}",
                                      stored_hash, author, seq)
            previous_hash, expected_seq, count = stored_hash, seq + 1, count + 1
        return count


def _row_problem(row: tuple, previous_hash: str, expected_seq: int) -> str | None:
    """What is wrong with one stored row, given the hash and seq its author's chain expects next; None if fine."""
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
    return None
