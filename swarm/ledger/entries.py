"""Ledger entries: what was credited, audited, slashed or banned, signed by the peer that wrote it.

Guarantees of a :class:`LedgerEntry` that passes :meth:`LedgerEntry.verify`:

* its author wrote it: the signature over its canonical bytes checks against ``author_public_key``, and
  ``author`` is the peer id derived from that key (nobody can write in another peer's name);
* its identity is its content: ``hash`` is the sha256 of the canonical bytes, a deterministic JSON encoding of
  every field but the signature (sorted keys, no whitespace, ASCII, integers only — no floats anywhere);
* it names its place in its author's chain (``seq`` counts from 0, ``prev_hash`` is the hash of the author's
  entry ``seq - 1`` or :data:`GENESIS_HASH`); whether that place is free and the link holds is checked by the
  store, which holds the rest of the chain.

Amounts are integers: samples, tokens and micro-credits (1 credit = 1_000_000 micro-credits).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm.identity import Identity

KINDS = ("contribution", "audit", "slash", "ban")
GENESIS_HASH = "0" * 64
SCHEMA = "swarm.ledger/1"  # inside the signed bytes: a signature on a ledger entry can never pass as another record's
MICRO = 1_000_000  # micro-credits per credit

_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")  # base58
_HEX = re.compile(r"^[0-9a-f]{1,128}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_INT_BOUND = 2**62  # every integer stays exact in SQLite, JSON parsers and sums of many entries
_FIELDS = (
    "kind",
    "author",
    "author_public_key",
    "seq",
    "prev_hash",
    "subject",
    "epoch",
    "samples",
    "tokens",
    "credit",
    "refs",
    "created_at",
)


def commitment_body(commitment: Any) -> bytes:
    """The canonical JSON of a :class:`~swarm.network.records.Commitment`: its sha256 is ``commitment.digest()``."""
    return json.dumps(commitment.model_dump(), sort_keys=True, separators=(",", ":")).encode()


class LedgerError(Exception):
    """An entry or a store that breaks a ledger rule; the message names the entry (hash, author, seq)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One signed ledger entry. Construct with :meth:`create` (signs) or :meth:`from_canonical` (parses stored
    or received bytes); the constructor validates field types and ranges but not the signature.

    :param kind: ``contribution`` (credit for verified work), ``audit`` (an audit performed; credits the author,
      the auditor), ``slash`` (a failed audit; penalises the subject), ``ban`` (the subject is excluded)
    :param author: peer id of the writer; must be the one derived from ``author_public_key``
    :param author_public_key: ``RSAPublicKey.to_bytes()`` of the author (OpenSSH format, ASCII)
    :param seq: position in the author's chain, from 0, contiguous
    :param prev_hash: hash of the author's entry ``seq - 1``, or :data:`GENESIS_HASH` for ``seq == 0``
    :param subject: peer id the entry is about (the contributor, the audited peer, the slashed or banned peer)
    :param epoch: swarm epoch of the work the entry is about
    :param samples: verified samples (contribution) — what credit is proportional to
    :param tokens: verified tokens (contribution), informational under the default rules
    :param credit: micro-credits the author computed; informational — balances are recomputed from the rules,
      so no author can mint credit by writing a larger number
    :param refs: hex ids of what the entry rests on; ``refs[0]`` is the commitment id for contribution, audit
      and slash entries (verdict ids may follow)
    :param created_at: unix time in whole seconds, as the author's clock saw it
    :param signature: the author's signature over :meth:`canonical_bytes` (base64, as hivemind produces it)
    """

    kind: str
    author: str
    author_public_key: bytes
    seq: int
    prev_hash: str
    subject: str
    epoch: int
    samples: int = 0
    tokens: int = 0
    credit: int = 0
    refs: tuple[str, ...] = ()
    created_at: int = 0
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "refs", tuple(self.refs))
        problem = self._problem()
        if problem:
            raise LedgerError(f"malformed ledger entry (author {self.author!r} seq {self.seq!r}): {problem}")

    def _problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"kind {self.kind!r} is not one of {', '.join(KINDS)}"
        for name in ("author", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _PEER_ID.match(value):
                return f"{name} {value!r} is not a peer id"
        if not isinstance(self.author_public_key, bytes) or not self.author_public_key.isascii():
            return "author_public_key must be ASCII bytes (RSAPublicKey.to_bytes())"
        for name in ("seq", "epoch", "samples", "tokens", "credit", "created_at"):
            value = getattr(self, name)
            if type(value) is not int or not -_INT_BOUND < value < _INT_BOUND:
                return f"{name} must be an integer of at most 62 bits, got {value!r}"
            if name != "credit" and value < 0:
                return f"{name} must not be negative, got {value}"
        if not isinstance(self.prev_hash, str) or not _HASH.match(self.prev_hash):
            return f"prev_hash {self.prev_hash!r} is not a 64-digit lowercase hex hash"
        if (self.seq == 0) != (self.prev_hash == GENESIS_HASH):
            return "seq 0, and only seq 0, has the genesis prev_hash"
        if not all(isinstance(ref, str) and _HEX.match(ref) for ref in self.refs) or len(self.refs) > 16:
            return "refs must be at most 16 lowercase hex ids"
        if self.kind in ("contribution", "audit", "slash") and not self.refs:
            return f"a {self.kind} entry must reference the commitment it is about (refs[0])"
        if not isinstance(self.signature, bytes):
            return "signature must be bytes"
        return None

    # --- encoding ---------------------------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        payload["author_public_key"] = self.author_public_key.decode("ascii")
        payload["refs"] = list(self.refs)
        payload["schema"] = SCHEMA
        return payload

    def canonical_bytes(self) -> bytes:
        """The bytes that are hashed and signed: every field but the signature, deterministically encoded."""
        return json.dumps(self._payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @property
    def hash(self) -> str:
        """sha256 of :meth:`canonical_bytes`, hex: the entry's id and the next entry's ``prev_hash``."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def idempotency_key(self) -> str | None:
        """What may be credited or penalised only once, whoever writes it and however often:

        * contribution: (subject, epoch, commitment) — a contribution is credited once;
        * audit: (auditor, commitment) — an auditor is paid once per commitment it audited;
        * slash: (subject, epoch, commitment) — a failed contribution is slashed once;
        * ban: (subject, epoch).
        """
        if self.kind == "contribution":
            return f"contribution:{self.subject}:{self.epoch}:{self.refs[0]}"
        if self.kind == "audit":
            return f"audit:{self.author}:{self.refs[0]}"
        if self.kind == "slash":
            return f"slash:{self.subject}:{self.epoch}:{self.refs[0]}"
        return f"ban:{self.subject}:{self.epoch}"

    @classmethod
    def from_canonical(cls, data: bytes, signature: bytes) -> LedgerEntry:
        """Parse canonical bytes (as stored or received). Raises :class:`LedgerError` if they are not valid JSON
        of the current schema or are not in canonical form (one entry has exactly one encoding, hence one hash).
        """
        try:
            payload = json.loads(data)
            if not isinstance(payload, dict) or payload.pop("schema", None) != SCHEMA:
                raise ValueError(f"not a {SCHEMA} entry")
            if set(payload) != set(_FIELDS):
                raise ValueError(f"fields {sorted(payload)} are not {sorted(_FIELDS)}")
            if not isinstance(payload["author_public_key"], str) or not isinstance(payload["refs"], list):
                raise ValueError("author_public_key must be a string and refs a list")
            payload["author_public_key"] = payload["author_public_key"].encode("ascii")
            payload["refs"] = tuple(payload["refs"])
        except (ValueError, UnicodeError) as error:  # JSONDecodeError is a ValueError
            raise LedgerError(
                f"undecodable ledger entry sha256 {hashlib.sha256(data).hexdigest()}: {error}"
            ) from None
        entry = cls(**payload, signature=signature)
        if entry.canonical_bytes() != data:
            raise LedgerError(f"ledger entry {hashlib.sha256(data).hexdigest()} is not in canonical form")
        return entry

    # --- signing ----------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        kind: str,
        seq: int,
        prev_hash: str,
        subject: str,
        epoch: int,
        samples: int = 0,
        tokens: int = 0,
        credit: int = 0,
        refs: tuple[str, ...] | list[str] = (),
        created_at: int | None = None,
    ) -> LedgerEntry:
        """A new entry written and signed by ``identity``; ``created_at`` defaults to now."""
        public_key = identity.private_key.get_public_key().to_bytes()
        entry = cls(
            kind=kind,
            author=str(identity.peer_id),
            author_public_key=public_key,
            seq=seq,
            prev_hash=prev_hash,
            subject=subject,
            epoch=epoch,
            samples=samples,
            tokens=tokens,
            credit=credit,
            refs=tuple(refs),
            created_at=int(time.time()) if created_at is None else created_at,
        )
        return replace(entry, signature=identity.private_key.sign(entry.canonical_bytes()))

    def verify(self) -> None:
        """Check that the author wrote this entry: the signature is valid for ``author_public_key`` and ``author``
        is the peer id of that key. Raises :class:`LedgerError` naming the entry otherwise."""
        from hivemind.utils.crypto import RSAPublicKey

        from swarm.network.records import peer_id_from_public_key

        try:
            public_key = RSAPublicKey.from_bytes(self.author_public_key)
        except Exception as error:  # cryptography raises several types for a malformed key
            raise LedgerError(f"{self.describe()}: unreadable author public key ({error})") from None
        if str(peer_id_from_public_key(public_key)) != self.author:
            raise LedgerError(f"{self.describe()}: author is not the peer id of the key that signed it")
        if not public_key.verify(self.canonical_bytes(), self.signature):
            raise LedgerError(f"{self.describe()}: invalid signature")

    def check_references(self, commitment: bytes | None) -> None:
        """Check that what the entry rests on exists and agrees with it (``commitment``: the canonical JSON body of
        the commitment ``refs[0]`` names, see :func:`commitment_body`; None if unknown). The rules of who may write
        what:

        * contribution: only the contributor itself (``author == subject``), for a commitment of its own whose
          digest is ``refs[0]`` and whose epoch, samples and tokens the entry repeats;
        * audit and slash: never about the author itself, for the audited peer's commitment (``refs[0]``) of that
          epoch; a slash repeats the commitment's samples (its penalty grows with them);
        * ban: never about the author itself.

        :raises LedgerError: naming the entry and the first rule it breaks (``contribution does not exist`` when the
          commitment is missing or is not the one referenced)
        """
        if self.kind == "contribution" and self.author != self.subject:
            raise LedgerError(f"{self.describe()}: a contribution can only be claimed by its contributor")
        if self.kind in ("audit", "slash", "ban") and self.author == self.subject:
            raise LedgerError(f"{self.describe()}: a peer cannot {self.kind} itself")
        if self.kind == "ban":
            return
        from swarm.network.records import Commitment

        what = "contribution" if self.kind == "contribution" else "audited contribution"
        if commitment is None:
            raise LedgerError(
                f"{self.describe()}: {what} does not exist — no commitment with digest {self.refs[0]}"
            )
        if hashlib.sha256(commitment).hexdigest() != self.refs[0]:
            raise LedgerError(
                f"{self.describe()}: {what} does not exist — the commitment given is not {self.refs[0]}"
            )
        try:
            parsed = Commitment.model_validate_json(commitment)
        except ValueError as error:
            raise LedgerError(f"{self.describe()}: unreadable commitment {self.refs[0]} ({error})") from None
        if commitment_body(parsed) != commitment:
            raise LedgerError(f"{self.describe()}: commitment {self.refs[0]} is not in canonical form")
        expected = dict(peer_id=self.subject, epoch=self.epoch)
        if self.kind in ("contribution", "slash"):
            expected["samples"] = self.samples
        if self.kind == "contribution":
            expected["tokens"] = self.tokens
        for name, value in expected.items():
            if getattr(parsed, name) != value:
                raise LedgerError(
                    f"{self.describe()}: says {name}={value!r} but commitment {self.refs[0]} has "
                    f"{getattr(parsed, name)!r}"
                )

    def describe(self) -> str:
        """``entry <hash> (kind, author <id> seq <n>)``: how every error names an entry."""
        return f"entry {self.hash} ({self.kind}, author {self.author} seq {self.seq})"
