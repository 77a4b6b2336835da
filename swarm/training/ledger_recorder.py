"""The ledger's live side: a :class:`LedgerRecorder` follows verification on one peer, writes that peer's signed
entries into ``WORKDIR/ledger.db`` and replicates the ledger with every other peer through the DHT.

Who writes what (each peer writes only entries it can vouch for; :mod:`swarm.ledger.balances` decides what counts):

* after an averaged round (:meth:`~LedgerRecorder.on_round`), each member writes the **contribution** entry of its
  own commitment: ``refs[0]`` is its commitment digest, ``refs[1:]`` the digests of the other members' commitments
  it saw in the round — its attestation that those contributions exist;
* an auditor writes an **audit** entry for every verdict it publishes (:meth:`~LedgerRecorder.on_verdict`), and a
  **slash** entry when the verdict is a failure; a slash counts once a quorum of auditors wrote one;
* a peer that decides a final failure (:meth:`~LedgerRecorder.on_final`) writes a **ban** entry;
* every entry that rests on a commitment carries that commitment's body, so every reader checks that the
  contribution exists and that samples and tokens are the committed ones.

Replication (:mod:`swarm.network.ledger_records`): every ``ledger.sync_interval`` seconds a background thread
publishes this peer's new entries and pulls, for every author whose announced head is ahead of the local copy, the
entries it lacks, in chain order. Each pulled entry goes through :meth:`LedgerStore.add` — signature, author, chain
link, idempotency, commitment — and one that fails is logged once and never stored (nor anything after it in that
author's chain). A peer that was offline pulls everything it missed at :meth:`~LedgerRecorder.start`; so does a
peer whose database was lost, its own chain included, before it writes anything new.

Guarantees: writing is idempotent (a hook called twice, or by two processes of one peer, records one entry); a hook
never raises into verification (errors are logged); two peers holding the same entries compute the same balances
and, at the same epoch, the same Merkle root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hivemind

from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.ledger.anchor import anchor_meta, open_anchor
from swarm.ledger.balances import Balance, balances
from swarm.ledger.config import LEDGER_FILE, LedgerConfig, ledger_config, rules_of
from swarm.ledger.entries import LedgerEntry, LedgerError, commitment_body
from swarm.ledger.merkle import MerkleTree
from swarm.ledger.store import DuplicateCredit, LedgerStore
from swarm.network.ledger_records import LedgerBoard, LedgerHead, LedgerItem, encode_chunk
from swarm.network.records import MAX_RECORD_BYTES, AuditVerdict, Commitment, CommitmentBoard
from swarm.verify.auditor import VerificationObserver
from swarm.verify.selection import AuditAssignment

logger = logging.getLogger(__name__)

MAX_ATTESTED = 15  # refs hold at most 16 ids: the own commitment and 15 other members'
CLOSE_TIMEOUT = 5.0
STALL_SECONDS = 10.0  # settle stops waiting for an author without weight whose chain stopped arriving  # seconds a stopping peer gives replication to finish; swarm local allows 20 in all


@dataclass
class LedgerStats:
    """What this peer's recorder did (for logs, the status file and benchmarks)."""

    written: int = 0  # entries this peer wrote
    pulled: int = 0  # entries of other authors stored after verification
    rejected: int = 0  # entries refused (each logged once)
    chunks_published: int = 0
    bytes_published: int = 0
    syncs: int = 0


class LedgerRecorder(VerificationObserver):
    """Writes this peer's ledger entries from verification's hooks and replicates the ledger (module docstring).

    Call :meth:`start` once the peer has joined the swarm, :meth:`settle` when training is over (while the DHT is
    still up, before lingering), and :meth:`close` before the DHT shuts down.

    :param config: the peer's config (``ledger`` section, ``verify.audit_window``, run id, work directory)
    :param identity: this peer's identity: it signs every entry the recorder writes
    :param dht: the peer's DHT node; None records locally without replicating (tests, offline tools)
    :param settings: the ledger settings (default: ``config.ledger``)
    """

    def __init__(
        self,
        config: SwarmConfig,
        identity: Identity,
        dht: hivemind.DHT | None,
        settings: LedgerConfig | None = None,
    ):
        self.config, self.identity, self.dht = config, identity, dht
        self.settings = settings if settings is not None else ledger_config(config)
        self.rules = rules_of(config, self.settings)
        self.me = str(identity.peer_id)
        self.path = Path(config.workdir) / LEDGER_FILE
        self.anchor = open_anchor(self.settings, Path(config.workdir))
        self.stats = LedgerStats()
        self.epoch = 0  # the latest current epoch verification reported
        self.heads: dict[str, LedgerHead] = {}  # last heads read from the DHT
        self._store: LedgerStore | None = None  # the hooks' connection (training thread)
        self._commitments: dict[str, Commitment] = {}  # digest -> commitment seen in a round
        self._board: LedgerBoard | None = None
        self._commitment_board: CommitmentBoard | None = None
        self._thread: threading.Thread | None = None
        self._stop, self._wake = threading.Event(), threading.Event()
        self._sync_lock = threading.Lock()
        self._final = False
        self._published: dict[
            int, tuple[int, float]
        ] = {}  # first seq of a chunk -> (entries in it, when published)
        self._open_chunk = 0  # first seq of the chunk still being filled
        self._head_published: tuple[int, str, bool, float] | None = None
        self._reported: set[str] = set()  # rejections already logged
        self._stuck: dict[str, str] = {}  # author -> head hash at which its chain was refused

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, record the rules, catch up with the swarm's ledger and start replicating."""
        self._store = LedgerStore(self.path)
        self._store.set_meta("rules", json.dumps(asdict(self.rules), sort_keys=True))
        self._store.set_meta("anchor", json.dumps(anchor_meta(self.settings, Path(self.config.workdir))))
        self.epoch = int(self._store.get_meta("epoch") or 0)
        samples = self.config.training.prompts_per_round * self.config.training.num_generations
        if not self.rules.deters(self.config.verify.audit_probability, samples):
            logger.warning(
                f"ledger rules do not deter cheating: at audit probability "
                f"{self.config.verify.audit_probability} the expected slash on {samples} samples is below "
                f"their credit (raise ledger.slash_amount / slash_per_sample or verify.audit_probability)"
            )
        if self.dht is None:
            return
        ttl = self.config.verify.audit_window * self.config.averaging.round_timeout * 2
        self._board = LedgerBoard(self.dht, self.config.run_id, self.identity, self.settings.record_ttl)
        self._commitment_board = CommitmentBoard(self.dht, self.config.run_id, self.identity, ttl)
        self.sync(self._store)  # pull first: a peer that lost its database must not fork its own chain
        self._thread = threading.Thread(target=self._loop, name="swarm-ledger", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        store = LedgerStore(self.path)  # SQLite connections stay in the thread that opened them
        try:
            while not self._stop.is_set():
                self._wake.wait(self.settings.sync_interval)
                self._wake.clear()
                if not self._stop.is_set():
                    try:
                        self.sync(store)
                    except Exception as error:  # a DHT hiccup must not end replication
                        logger.warning(f"ledger sync failed: {type(error).__name__}: {error}")
        finally:
            store.close()

    def settle(
        self,
        timeout: float,
        live: Callable[[], Iterable[str]] | None = None,
        waits_for: Callable[[str], bool] | None = None,
    ) -> bool:
        """At the end of training: announce that this peer has written everything, and keep replicating until every
        author whose head is known has done the same and its entries are here, or ``timeout`` seconds pass.

        :param live: the peers still online; an author that has not finished writing and is not among them (it
          crashed or left) is not waited for — its published entries are still pulled
        :param waits_for: whether an author is worth waiting for until ``timeout`` (default: every author); anyone
          can announce a head it never backs with entries, so a peer passes its trust here. Any other author is
          waited for only while its chain keeps arriving: some of it is here and it grew in the last
          ``STALL_SECONDS`` (or ``4 × ledger.sync_interval``), so an author without weight (a banned cheater) still
          ends on every copy with the same entries, and a head nobody backs costs nothing

        :returns: whether the copy is complete (False on timeout)
        """
        if self._store is None or self._board is None:
            return True
        with self._sync_lock:  # a publish in flight must not record the last head as sent before it is final
            self._final = True
        started = time.monotonic()
        deadline = started + timeout
        stall = max(STALL_SECONDS, 4 * self.settings.sync_interval)
        arriving: dict[str, tuple[int, float]] = {}  # author -> (entries here, when that last changed)

        def worth_waiting(author: str, have: int, now: float) -> bool:
            if waits_for is None or waits_for(author):
                return True
            seen, since = arriving.get(author, (have, started))
            if seen != have:
                since = now
            arriving[author] = (have, since)
            return have >= 0 and now - since < stall

        with LedgerStore(self.path) as store:  # its own connection: settle may run in any thread
            while True:
                self.sync(store)
                local = store.heads()
                online = None if live is None else set(live())
                now = time.monotonic()
                pending = [
                    author
                    for author, head in self.heads.items()
                    if author != self.me
                    and author not in self._stuck
                    and not (head.final and local.get(author, -1) >= head.seq)
                    and (head.final or online is None or author in online)
                    and worth_waiting(author, local.get(author, -1), now)
                ]
                if not pending:
                    return True
                if time.monotonic() >= deadline:
                    waiting = ", ".join(
                        f"{author} (head {self.heads[author].seq}"
                        f"{' final' if self.heads[author].final else ''}, have {local.get(author, -1)})"
                        for author in pending
                    )
                    logger.warning(
                        f"ledger: {len(pending)} authors still writing or not replicated after "
                        f"{timeout:.0f}s: {waiting}"
                    )
                    return False
                time.sleep(min(1.0, self.settings.sync_interval))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop replicating (after a last publish) and close the store, within about ``timeout`` seconds: a peer
        that is stopping must not be held up by a slow DHT. Every entry is already committed to SQLite; a publish
        cut short only delays the other copies, which pull it from a later run. Safe to call twice."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                logger.warning(
                    f"ledger: replication still busy after {timeout:.0f}s; closing without waiting"
                )
            self._thread = None
        if self._store is not None:
            if self._board is not None and self._sync_lock.acquire(
                timeout=max(0.0, deadline - time.monotonic())
            ):
                try:
                    self._publish(self._store)
                except Exception as error:
                    logger.warning(f"ledger: last publish failed: {type(error).__name__}: {error}")
                finally:
                    self._sync_lock.release()
            self._store.close()
            self._store = None
        logger.info(
            f"ledger: {self.stats.written} entries written, {self.stats.pulled} pulled, "
            f"{self.stats.rejected} rejected, {self.stats.bytes_published} bytes published"
        )

    # ---- verification hooks -------------------------------------------------------------------------------------
    def on_round(self, epoch: int, commitments: dict[str, Commitment]) -> None:
        """Record this peer's contribution to an averaged round, attesting the other members' commitments."""
        for commitment in commitments.values():
            self._commitments[commitment.digest()] = commitment
        horizon = epoch - self.config.verify.audit_window - 2
        self._commitments = {d: c for d, c in self._commitments.items() if c.epoch >= horizon}
        mine = commitments.get(self.me)
        if mine is None:
            return
        others = sorted(c.digest() for peer, c in commitments.items() if peer != self.me)[:MAX_ATTESTED]
        self._append(
            kind="contribution",
            subject=self.me,
            epoch=mine.epoch,
            samples=mine.samples,
            tokens=mine.tokens,
            credit=mine.samples * self.rules.credit_per_sample,
            refs=[mine.digest(), *others],
            commitment=commitment_body(mine),
        )

    def on_verdict(self, verdict: AuditVerdict) -> None:
        """Record an audit this peer performed, and a slash if the contribution failed it."""
        commitment = self._find_commitment(verdict.commitment, verdict.epoch, verdict.audited)
        if commitment is None:
            logger.info(
                f"ledger: no commitment {verdict.commitment[:12]} of {verdict.audited}: audit not recorded"
            )
            return
        body = commitment_body(commitment)
        verdict_id = hashlib.sha256(json.dumps(verdict.model_dump(), sort_keys=True).encode()).hexdigest()
        refs = [verdict.commitment, verdict_id]
        self._append(
            kind="audit",
            subject=verdict.audited,
            epoch=verdict.epoch,
            samples=commitment.samples,
            tokens=commitment.tokens,
            credit=self.rules.audit_credit,
            refs=refs,
            commitment=body,
        )
        if not verdict.passed:
            penalty = self.rules.slash_amount + commitment.samples * self.rules.slash_per_sample
            self._append(
                kind="slash",
                subject=verdict.audited,
                epoch=verdict.epoch,
                samples=commitment.samples,
                credit=-penalty,
                refs=refs,
                commitment=body,
            )

    def on_final(
        self, assignment: AuditAssignment, passed: bool, verdicts: list[AuditVerdict], current_epoch: int
    ) -> None:
        """Record a ban when a contribution (not this peer's) finally failed its audit."""
        if not passed and assignment.audited != self.me:
            self._append(
                kind="ban", subject=assignment.audited, epoch=assignment.epoch, refs=[assignment.commitment]
            )

    def on_false_accusation(
        self,
        assignment: AuditAssignment,
        verdict: AuditVerdict,
        accuser_commitment: str | None,
        current_epoch: int,
    ) -> None:
        """Slash and ban an auditor whose failing verdict the weighted re-check refuted, on its own commitment of that
        round (a slash needs a quorum of distinct writers, as any other)."""
        accuser = verdict.auditor
        if accuser == self.me or accuser_commitment is None:
            return
        commitment = self._find_commitment(accuser_commitment, verdict.epoch, accuser)
        if commitment is None:
            logger.info(
                f"ledger: no commitment of false accuser {accuser} at epoch {verdict.epoch}: not slashed"
            )
            return
        verdict_id = hashlib.sha256(json.dumps(verdict.model_dump(), sort_keys=True).encode()).hexdigest()
        penalty = self.rules.slash_amount + commitment.samples * self.rules.slash_per_sample
        self._append(
            kind="slash",
            subject=accuser,
            epoch=verdict.epoch,
            samples=commitment.samples,
            credit=-penalty,
            refs=[accuser_commitment, verdict_id],
            commitment=commitment_body(commitment),
        )
        self._append(kind="ban", subject=accuser, epoch=verdict.epoch, refs=[accuser_commitment])

    def on_epoch_end(self, current_epoch: int) -> None:
        """Note the epoch, root every period that has closed, and replicate soon. Cheap when called repeatedly."""
        if self._store is None or current_epoch <= self.epoch:
            return
        self.epoch = current_epoch
        self._store.set_meta("epoch", str(current_epoch))
        self._root_closed_periods(self._store)
        self._wake.set()

    # ---- writing ------------------------------------------------------------------------------------------------
    def _append(self, commitment: bytes | None = None, **fields: Any) -> LedgerEntry | None:
        if self._store is None:
            logger.warning(f"ledger: {fields.get('kind')} entry dropped, the recorder is not started")
            return None
        try:
            entry = self._store.append(self.identity, commitment=commitment, **fields)
        except DuplicateCredit:
            return None  # already recorded: idempotent
        except LedgerError as error:
            logger.warning(f"ledger: could not write a {fields.get('kind')} entry: {error}")
            return None
        self.stats.written += 1
        self._wake.set()
        return entry

    def _find_commitment(self, digest: str, epoch: int, peer: str) -> Commitment | None:
        if digest in self._commitments:
            return self._commitments[digest]
        if self._commitment_board is None:
            return None
        found = self._commitment_board.fetch(epoch).get(peer)
        return found if found is not None and found.digest() == digest else None

    def _root_closed_periods(self, store: LedgerStore) -> None:
        """Root (and anchor) the period that closed last, if entries arrived since the last root: an empty period
        is not anchored, and periods skipped over (a jump in epochs, a peer offline) are not rooted afterwards
        with entries that came later."""
        every = self.settings.anchor_every
        roots = store.roots()
        latest = self.epoch // every - 1
        upto = store.max_id()
        if latest < 0 or any(period >= latest for period, *_ in roots):
            return
        if upto <= max((rooted_upto for _, _, rooted_upto, _, _ in roots), default=0):
            return  # nothing new since the last root
        root = MerkleTree(balances(store.entries(upto), self.rules, self.epoch)).root
        try:
            ref = self.anchor.post(root, latest)
        except LedgerError as error:
            logger.warning(f"ledger: period {latest} not anchored: {error}")
            return
        store.record_root(latest, self.epoch, upto, root, ref)
        logger.info(f"ledger: period {latest} root {root[:16]} ({upto} entries) anchored at {ref or 'none'}")

    # ---- replication --------------------------------------------------------------------------------------------
    def sync(self, store: LedgerStore) -> None:
        """Publish this peer's new entries and head, then pull what other authors have and this copy lacks."""
        if self._board is None:
            return
        with self._sync_lock:
            self._publish(store)
            self._pull(store)
            self.stats.syncs += 1

    def _publish(self, store: LedgerStore) -> None:
        assert self._board is not None
        now = time.monotonic()
        refresh = self.settings.record_ttl / 2
        chunks: list[tuple[int, list[LedgerItem]]] = []
        for entry, body in store.rows_with_commitments(self.me, self._open_chunk):
            item = (entry.canonical_bytes(), entry.signature, body or b"")
            if chunks and len(encode_chunk([*chunks[-1][1], item])) <= MAX_RECORD_BYTES:
                chunks[-1][1].append(item)
            else:
                chunks.append((entry.seq, [item]))
        for first_seq, items in chunks:
            count, published_at = self._published.get(first_seq, (0, -refresh))
            if count != len(items) or now - published_at >= refresh:
                data = encode_chunk(items)
                if self._board.publish_chunk(first_seq, data):
                    self._published[first_seq] = (len(items), now)
                    self.stats.chunks_published += 1
                    self.stats.bytes_published += len(data)
        if chunks:
            self._open_chunk = chunks[-1][0]
        for first_seq, (_, published_at) in list(self._published.items()):
            if first_seq < self._open_chunk and now - published_at >= refresh:  # closed chunk about to expire
                self._published[first_seq] = (0, -refresh)
                self._open_chunk = min(self._open_chunk, first_seq)  # repacked identically next time
        last = store.last_seq(self.me)
        if last is None:
            return
        head_hash = store.rows_with_commitments(self.me, last)[0][0].hash
        final = self._final  # what is recorded as sent is what was sent
        if (
            self._head_published is None
            or self._head_published[:3] != (last, head_hash, final)
            or now - self._head_published[3] >= refresh
        ):
            if self._board.publish_head(LedgerHead(author=self.me, seq=last, hash=head_hash, final=final)):
                self._head_published = (last, head_hash, final, now)

    def _pull(self, store: LedgerStore) -> None:
        assert self._board is not None
        self.heads = self._board.fetch_heads()
        local = store.heads()
        for author, head in self.heads.items():
            have = local.get(author, -1)
            if head.seq <= have or self._stuck.get(author) == head.hash:
                continue
            found: dict[int, tuple[bytes, bytes, bytes]] = {}
            for _, items in self._board.fetch_chunks(author):
                for item in items:
                    try:
                        seq = json.loads(item[0]).get("seq")
                    except (ValueError, AttributeError):
                        seq = None
                    if type(seq) is int and seq > have:
                        found.setdefault(seq, item)
            for seq in range(have + 1, max(found, default=have) + 1):
                if seq not in found or not self._ingest(store, author, *found[seq]):
                    if seq in found:
                        self._stuck[author] = head.hash
                    break

    def _ingest(
        self, store: LedgerStore, author: str, canonical: bytes, signature: bytes, body: bytes
    ) -> bool:
        """Verify and store one pulled entry; False (logged once) if it is refused."""
        try:
            entry = LedgerEntry.from_canonical(canonical, signature)
            if entry.author != author:
                raise LedgerError(f"{entry.describe()}: published in the chain of {author}")
            store.add(entry, body or None)
        except LedgerError as error:
            key = hashlib.sha256(canonical + signature).hexdigest()
            if key not in self._reported:
                self._reported.add(key)
                self.stats.rejected += 1
                logger.warning(f"ledger: rejected an entry from {author}: {error}")
            return False
        self.stats.pulled += int(author != self.me)
        return True

    # ---- reading ------------------------------------------------------------------------------------------------
    def balances(self, current_epoch: int | None = None) -> dict[str, Balance]:
        """Balances of this peer's copy at ``current_epoch`` (default: the ledger's own clock, so that copies holding
        the same entries show the same split between final and provisional)."""
        store = self._store or LedgerStore(self.path)
        try:
            return balances(store.entries(), self.rules, current_epoch)
        finally:
            if store is not self._store:
                store.close()
