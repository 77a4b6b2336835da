"""Balances: a pure, deterministic function of a set of ledger entries, the rules and the current epoch.

Two peers holding the same set of entries compute identical balances, whatever order the entries arrived in:
the entries are deduplicated and sorted inside, and all arithmetic is on integers (micro-credits).
The entries are assumed valid (signed, chained): the store only holds such entries.

The rules (all amounts in micro-credits, 1 credit = 1_000_000):

* **Attestation** (``require_attestation``): a commitment c of peer S at epoch e is *attested* when a contribution
  entry of epoch e written by another peer lists c in its ``refs[1:]`` — every member of an averaged round lists
  the commitments of the other members it saw. Work nobody else saw in a round earns nothing, so no peer can credit
  itself (or have an audit or a slash counted) for a contribution that does not exist.
* **Contribution** (written by S itself, epoch e, ``samples`` n, commitment c, attested): S earns
  ``n × credit_per_sample``. It is *provisional* while ``current_epoch < e + provisional_epochs`` (the audit window
  is open) and *final* afterwards; ``current_epoch`` is by default the ledger's own clock, the latest epoch of its
  entries (:func:`ledger_epoch`), so copies holding the same entries agree on what is final.
* **Audit** (author A of an attested commitment, epoch e): the auditor A earns ``audit_credit``, provisional/final
  like a contribution; once per (auditor, commitment).
* **Slash** (subject S, attested commitment c, ``samples`` n of the failed contribution): counts once at least
  ``slash_quorum`` distinct auditors (other than S) wrote a slash for (S, c) — each auditor that failed the audit
  writes one, so no single peer can slash another — and those slashers outnumber the auditors that audited c and
  passed it (an audit entry without a slash) together with S itself, so colluders failing an honest contribution
  slash nobody unless they outnumber the rest of its round (a disputed failure is replayed by the whole round).
  Slashes are decided epoch by epoch, and a peer with a counted slash at an earlier epoch neither slashes nor
  passes from then on (the honest peers banned it), so colluders caught once cannot slash an honest peer in a
  later round in which they outnumber it (one that had not banned them yet). S then loses ``slash_amount + n × slash_per_sample``, final at once, and the contribution credit
  for c (if any) is void. A false accuser (an auditor whose failure the weighted re-check refuted) is slashed the
  same way, on its own commitment of that round, by every peer that saw the refutation.
  Deterrence: with audit probability p, cheating on n samples costs more than it gains when
  ``p × (slash_amount + n × slash_per_sample) > n × credit_per_sample`` — see :meth:`Rules.deters`.
* **Ban** (subject S, epoch b; counts only if S has a counted slash): S is marked banned; its contributions and
  audits count only if their window had closed before the ban (``e + provisional_epochs <= b``); everything else of
  S is void.
* Entries that break :meth:`~swarm.ledger.entries.LedgerEntry.check_references`'s who-may-write-what rules (a
  contribution claimed for someone else, an audit, slash or ban of oneself) count for nothing.
* **Idempotency**: entries with the same :attr:`~swarm.ledger.entries.LedgerEntry.idempotency_key` count once
  (the one with the smallest hash), so a contribution is never credited twice.
* The ``credit`` field written in entries is ignored: credit is always recomputed from these rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from swarm.ledger.entries import MICRO, LedgerEntry


@dataclass(frozen=True)
class Rules:
    """Credit rules. Every peer of a swarm must use the same rules to compute the same balances.

    :param credit_per_sample: micro-credits per verified sample of a contribution
    :param audit_credit: micro-credits an auditor earns per audit performed
    :param slash_amount: fixed micro-credits a failed audit costs the cheater
    :param slash_per_sample: further micro-credits per sample of the failed contribution
    :param provisional_epochs: epochs a credit stays provisional (the audit window) before it is final
    :param slash_quorum: distinct auditors whose slash entries a slash needs to count
    :param require_attestation: credit, audits and slashes count only for commitments another round member attested
    """

    credit_per_sample: int = MICRO
    audit_credit: int = 10 * MICRO
    slash_amount: int = 100 * MICRO
    slash_per_sample: int = 20 * MICRO
    provisional_epochs: int = 2
    slash_quorum: int = 2
    require_attestation: bool = True

    def __post_init__(self) -> None:
        if type(self.require_attestation) is not bool:
            raise ValueError(
                f"ledger rule require_attestation must be a bool, got {self.require_attestation!r}"
            )
        if type(self.slash_quorum) is not int or self.slash_quorum < 1:
            raise ValueError(
                f"ledger rule slash_quorum must be a positive integer, got {self.slash_quorum!r}"
            )
        for name in (
            "credit_per_sample",
            "audit_credit",
            "slash_amount",
            "slash_per_sample",
            "provisional_epochs",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"ledger rule {name} must be a non-negative integer, got {value!r}")

    def deters(self, audit_probability: float, samples: int) -> bool:
        """Whether cheating on a contribution of ``samples`` samples loses in expectation when each contribution
        is audited with ``audit_probability``: audit rate × penalty > credit gained."""
        penalty = self.slash_amount + samples * self.slash_per_sample
        return audit_probability * penalty > samples * self.credit_per_sample


@dataclass(frozen=True)
class Balance:
    """A peer's balance in micro-credits: ``final`` can no longer change except by a slash; ``provisional``
    is still inside its audit window. ``banned``: a ban entry names this peer."""

    final: int = 0
    provisional: int = 0
    banned: bool = False
    # where the total comes from (not part of equality: final and provisional are what is committed in roots)
    work: int = field(default=0, compare=False)  # credit for verified samples that still counts
    audits: int = field(default=0, compare=False)  # credit for audits performed
    penalties: int = field(default=0, compare=False)  # slashes (a positive number, subtracted)

    @property
    def total(self) -> int:
        return self.final + self.provisional


def _unique(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """One entry per idempotency key (the smallest hash), sorted by hash: order-independent."""
    chosen: dict[str, LedgerEntry] = {}
    for entry in sorted(set(entries), key=lambda e: e.hash):
        chosen.setdefault(entry.idempotency_key, entry)
    return sorted(chosen.values(), key=lambda e: e.hash)


def _well_formed(entry: LedgerEntry) -> bool:
    """Who may write what (see :meth:`LedgerEntry.check_references`), for entries that did not come from a store."""
    return (entry.author == entry.subject) == (entry.kind == "contribution")


def ledger_epoch(entries: Iterable[LedgerEntry]) -> int:
    """The ledger's own clock: the latest epoch any well-formed entry records (0 for none). Copies holding the same
    entries agree on it, and so on what is final — a copy's local view of the swarm's epoch would not."""
    return max((entry.epoch for entry in entries if _well_formed(entry)), default=0)


def balances(
    entries: Iterable[LedgerEntry], rules: Rules, current_epoch: int | None = None
) -> dict[str, Balance]:
    """Every peer's :class:`Balance` (keys sorted by peer id) under ``rules`` at ``current_epoch`` (default: the
    ledger's own clock, :func:`ledger_epoch`); see the module docstring for the rules. A pure function of the *set*
    of entries (and ``current_epoch``)."""
    entries = list(entries)
    if current_epoch is None:
        current_epoch = ledger_epoch(entries)
    everything = sorted({entry for entry in entries if _well_formed(entry)}, key=lambda e: e.hash)
    attested: dict[tuple[int, str], set[str]] = {}  # (epoch, commitment) -> the peers that attested it
    slashers: dict[tuple[str, str], set[str]] = {}
    auditors: dict[
        tuple[str, str], set[str]
    ] = {}  # (subject, commitment) -> every peer that wrote an audit of it
    for entry in everything:
        if entry.kind == "contribution":
            for ref in entry.refs[1:]:
                attested.setdefault((entry.epoch, ref), set()).add(entry.author)
        elif entry.kind == "slash":
            slashers.setdefault((entry.subject, entry.refs[0]), set()).add(entry.author)
        elif entry.kind == "audit":
            auditors.setdefault((entry.subject, entry.refs[0]), set()).add(entry.author)

    def exists(entry: LedgerEntry) -> bool:  # the commitment it rests on was seen in a round by someone else
        if not rules.require_attestation:
            return True
        return bool(attested.get((entry.epoch, entry.refs[0]), set()) - {entry.subject})

    unique = [entry for entry in _unique(everything) if entry.kind == "ban" or exists(entry)]

    def counted(key: tuple[str, str], disqualified: set[str]) -> bool:
        """A quorum of slashers outnumbering the passers and the subject, none of them slashed earlier."""
        against = slashers[key] - {key[0]} - disqualified
        passed = auditors.get(key, set()) - slashers[key] - {key[0]} - disqualified
        return len(against) >= rules.slash_quorum and len(against) > len(passed) + 1

    # epoch by epoch: a peer with a counted slash at an epoch before e no longer counts as a slasher or a passer
    # at e (honest peers had banned it), so colluders caught once cannot slash an honest peer later
    slash_epochs: dict[tuple[str, str], int] = {}
    for entry in unique:
        if entry.kind == "slash":
            key = (entry.subject, entry.refs[0])
            slash_epochs[key] = min(entry.epoch, slash_epochs.get(key, entry.epoch))
    slashed: set[tuple[str, str]] = set()
    slashed_since: dict[str, int] = {}
    for epoch in sorted(set(slash_epochs.values())):
        disqualified = {peer for peer, since in slashed_since.items() if since < epoch}
        now = {key for key, at in slash_epochs.items() if at == epoch and counted(key, disqualified)}
        slashed |= now
        for subject, _ in now:
            slashed_since.setdefault(subject, epoch)
    slashed_peers = set(slashed_since)
    banned_at: dict[str, int] = {}
    for entry in unique:
        if entry.kind == "ban" and entry.subject in slashed_peers:
            banned_at[entry.subject] = min(entry.epoch, banned_at.get(entry.subject, entry.epoch))

    final: dict[str, int] = {}
    provisional: dict[str, int] = {}
    sources: dict[str, dict[str, int]] = {}  # peer -> {"work"|"audits"|"penalties": micro-credits}

    def credit(peer: str, epoch: int, amount: int, source: str) -> None:
        closes = epoch + rules.provisional_epochs
        if peer in banned_at and closes > banned_at[peer]:
            return  # still open when the peer was banned: forfeited
        book = final if current_epoch >= closes else provisional
        book[peer] = book.get(peer, 0) + amount
        sources.setdefault(peer, {}).setdefault(source, 0)
        sources[peer][source] += amount

    for entry in unique:
        if entry.kind == "contribution":
            if (entry.subject, entry.refs[0]) not in slashed:
                credit(entry.subject, entry.epoch, entry.samples * rules.credit_per_sample, "work")
        elif entry.kind == "audit":
            credit(entry.author, entry.epoch, rules.audit_credit, "audits")
        elif entry.kind == "slash" and (entry.subject, entry.refs[0]) in slashed:
            penalty = rules.slash_amount + entry.samples * rules.slash_per_sample
            final[entry.subject] = final.get(entry.subject, 0) - penalty
            sources.setdefault(entry.subject, {}).setdefault("penalties", 0)
            sources[entry.subject]["penalties"] += penalty
    peers = sorted({entry.author if entry.kind == "audit" else entry.subject for entry in unique})
    return {
        peer: Balance(
            final.get(peer, 0), provisional.get(peer, 0), peer in banned_at, **sources.get(peer, {})
        )
        for peer in peers
    }
