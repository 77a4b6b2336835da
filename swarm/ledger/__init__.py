"""The ledger that credits honest work: signed, per-author hash-chained entries (:mod:`.entries`) in an
embedded SQLite store (:mod:`.store`), balances that are a pure function of the set of entries
(:mod:`.balances`), a Merkle root with inclusion proofs (:mod:`.merkle`) and adapters that post roots anywhere
(:mod:`.anchor`). Nothing here speaks to the DHT or to a chain directly."""

from swarm.ledger.entries import GENESIS_HASH, KINDS, LedgerEntry, LedgerError

__all__ = ["GENESIS_HASH", "KINDS", "LedgerEntry", "LedgerError"]
