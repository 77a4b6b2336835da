"""Trust weights: how much each peer's word counts, as a pure function of a set of ledger entries and a root set.

An identity costs nothing, so a peer never counts identities; it counts *weight*, and weight is work that others
who are already trusted saw and that survived its audit window:

* the **roots** (the viewer itself, its initial peers, operator-listed peers) are trusted from the start;
* a peer's **credit** is the ``samples × credit_per_sample`` of each of its contribution entries whose audit window
  has closed (``epoch + provisional_epochs <= current_epoch``) and whose commitment a *trusted* peer other than
  itself attested (listed it in the ``refs[1:]`` of its own contribution entry of that epoch);
* a peer whose credit reaches ``min_credit`` becomes trusted, and its attestations then count for others; this is
  repeated until nothing changes (a fixpoint, so the order of entries does not matter);
* a peer that was slashed has no weight at all — by a slash that counts under the ledger rules among the peers
  trusted before any slash counts (fresh identities signing slash entries slash nobody's weight).

So a swarm of fresh identities that only attest each other never gains weight, however many they are: their
attestations never reach a trusted peer. What weighted liars could still do is bounded by the work they did in
rounds with trusted peers and kept passing audits for.
"""

from __future__ import annotations

from collections.abc import Iterable

from swarm.ledger.balances import Rules
from swarm.ledger.entries import LedgerEntry


def _slashed_by(entries: set[LedgerEntry], rules: Rules, judges: set[str]) -> set[str]:
    """The peers with a slash that counts when only ``judges`` may slash or pass: at least ``slash_quorum`` of them
    (other than the subject) slashed one commitment, outnumbering those of them that passed it plus the subject."""
    slashers: dict[tuple[str, str], set[str]] = {}
    auditors: dict[tuple[str, str], set[str]] = {}
    for entry in entries:
        if entry.kind in ("slash", "audit") and entry.refs and entry.author in judges:
            book = slashers if entry.kind == "slash" else auditors
            book.setdefault((entry.subject, entry.refs[0]), set()).add(entry.author)
    slashed = set()
    for (subject, commitment), against in slashers.items():
        against = against - {subject}
        passed = auditors.get((subject, commitment), set()) - against - {subject}
        if len(against) >= rules.slash_quorum and len(against) > len(passed) + 1:
            slashed.add(subject)
    return slashed


def trusted_weights(
    entries: Iterable[LedgerEntry], rules: Rules, current_epoch: int, roots: Iterable[str], min_credit: int
) -> dict[str, int]:
    """Peer id → weight in micro-credits, for every trusted peer that earned attested, final credit (roots included,
    possibly with 0); peers that are not trusted are absent. Deterministic in the *set* of entries.

    A slash takes a peer's weight only when trusted peers wrote it (:func:`_slashed_by` over the peers trusted
    before any slash counts): anybody can sign slash entries, and two fresh identities slashing every honest
    peer must not zero the swarm's weight."""
    entries = set(entries)
    attesters: dict[tuple[int, str], set[str]] = {}
    work: dict[str, dict[tuple[int, str], int]] = {}  # peer -> (epoch, commitment) -> micro-credits
    for entry in entries:
        if entry.kind != "contribution" or entry.author != entry.subject or not entry.refs:
            continue
        for ref in entry.refs[1:]:
            attesters.setdefault((entry.epoch, ref), set()).add(entry.author)
        if entry.epoch + rules.provisional_epochs <= current_epoch:
            work.setdefault(entry.subject, {})[(entry.epoch, entry.refs[0])] = (
                entry.samples * rules.credit_per_sample
            )

    def credit(peer: str, trusted: set[str]) -> int:
        return sum(
            amount
            for key, amount in work.get(peer, {}).items()
            if (attesters.get(key, set()) - {peer}) & trusted
        )

    def spread(excluded: set[str]) -> set[str]:
        trusted = set(roots) - excluded
        changed = True
        while changed:
            changed = False
            for peer in sorted(set(work) - trusted - excluded):
                if credit(peer, trusted) >= max(1, min_credit):
                    trusted.add(peer)
                    changed = True
        return trusted

    excluded = _slashed_by(entries, rules, spread(set()))
    trusted = spread(excluded)
    return {peer: credit(peer, trusted) for peer in sorted(trusted)}
