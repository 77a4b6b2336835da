"""One peer's view of who counts (the ``trust`` config section): the weight behind every decision that other
peers' announcements could otherwise steer — which state to adopt, whom the barrier waits for, whose audit verdicts
decide.

* **Ledger weight** (:func:`swarm.ledger.weights.trusted_weights`): final credit for work attested by peers already
  trusted, from this peer, its initial peers and ``trust.peers`` outwards. Recomputed from this peer's ledger copy at
  most every ``trust.refresh_seconds``.
* **Known peers** count 1 while they have no ledger weight yet: the roots, and the members of this peer's averaged
  rounds of the last ``trust.member_epochs`` epochs (to be a member, a peer had to commit and send its gradient in a
  round with this peer, which auditors may replay).
* Everyone else — any fresh identity — weighs 0: its announcements change nothing, and it is waited for only
  briefly (``trust.newcomer_wait``).

Without a ledger (``ledger.enabled: false``, or verification off) there is no weight that costs work: every
announcing peer then weighs 1, as identities, and the run is not Sybil-resistant (logged once at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from swarm.config import SwarmConfig
from swarm.ledger.balances import Rules
from swarm.ledger.entries import MICRO
from swarm.ledger.store import LedgerStore
from swarm.ledger.weights import trusted_weights
from swarm.network.dht import peer_ids_of

logger = logging.getLogger(__name__)


def initial_peer_ids(addresses: Iterable[str]) -> set[str]:
    """The peer ids named by ``/p2p/<id>`` in multiaddrs (malformed ones are skipped: the DHT start reports them)."""
    return set(peer_ids_of(addresses))


class Trust:
    """Weights of peers as this peer sees them; cheap to query (no I/O outside :meth:`refresh`).

    :param me: this peer's id (always weighs at least 1)
    :param config: the ``trust`` section and the initial peers are used
    :param ledger_path: this peer's ledger database, or None when there is no ledger (identity counting)
    :param rules: the ledger's rules (credit per sample, audit window)
    """

    def __init__(self, me: str, config: SwarmConfig, ledger_path: Path | None, rules: Rules | None):
        self.me, self.settings = me, config.trust
        self.roots = {me, *initial_peer_ids(config.network.initial_peers), *config.trust.peers}
        self.ledger_path, self.rules = ledger_path, rules
        self.ledger: dict[str, int] = {}  # peer id -> micro-credits (trusted peers only)
        self.members: dict[
            str, int
        ] = {}  # peer id -> last epoch it was a member of this peer's averaged round
        self.refused: set[str] = set()  # peers that served a state that failed validation: never weigh again
        self._refreshed_at = -float("inf")
        self._epoch = 0
        if ledger_path is None:
            logger.warning(
                "no ledger: peers are counted as identities, so this run is not Sybil-resistant "
                "(enable verify and ledger for weights that cost work)"
            )

    @property
    def counts_identities(self) -> bool:
        return self.ledger_path is None

    def refresh(self, current_epoch: int, force: bool = False) -> None:
        """Recompute ledger weights from the ledger copy (at most every ``refresh_seconds`` unless ``force``)."""
        self._epoch = current_epoch
        self.members = {
            peer: epoch
            for peer, epoch in self.members.items()
            if epoch > current_epoch - self.settings.member_epochs
        }
        if self.ledger_path is None or self.rules is None or not self.ledger_path.is_file():
            return
        now = time.monotonic()
        if not force and now - self._refreshed_at < self.settings.refresh_seconds:
            return
        self._refreshed_at = now
        try:
            with LedgerStore(self.ledger_path) as store:
                entries = store.entries()
        except Exception as error:  # a busy or damaged database must not stop training: keep the last weights
            logger.warning(f"trust: could not read the ledger ({type(error).__name__}: {error})")
            return
        self.ledger = trusted_weights(
            entries, self.rules, current_epoch, self.roots, round(self.settings.min_credit * MICRO)
        )

    def note_round(self, epoch: int, members: Iterable[str]) -> None:
        """The members of an averaged round of ``epoch`` (this peer's view of its consensus), or the peers at this
        peer's state that a round of ``epoch`` whose all-reduce failed on this side was formed with."""
        for peer in members:
            if peer != self.me:
                self.members[peer] = max(epoch, self.members.get(peer, epoch))

    def refuse(self, peer_id: str) -> None:
        """``peer_id`` served something no honest peer would (a state that fails validation): weight 0 from now on."""
        if peer_id != self.me:
            self.refused.add(peer_id)

    def weight(self, peer_id: str) -> float:
        """In credits: the ledger weight, at least 1 for this peer, the roots and recent round members, else 0."""
        if peer_id in self.refused:
            return 0.0
        if self.counts_identities:
            return 1.0
        credit = self.ledger.get(peer_id, 0) / MICRO
        floor = 1.0 if peer_id == self.me or peer_id in self.roots or peer_id in self.members else 0.0
        return max(credit, floor)

    def known(self, peer_id: str) -> bool:
        """Whether ``peer_id`` weighs anything (the barrier waits for it; its announcements count)."""
        return self.weight(peer_id) > 0

    def figures(self) -> dict[str, float | int]:
        """For the status file and trackers: how many peers have ledger weight, and this peer's own."""
        return dict(
            trusted_peers=len([peer for peer, credit in self.ledger.items() if credit > 0]),
            my_weight=round(self.weight(self.me), 3),
        )
