"""What a swarm DHT node accepts: one record validator for every key the swarm (and hivemind's averager) uses.

Every DHT value is network input. A node that stores junk makes every reader pay for it: hivemind's ``DHT.get``
raises inside a background callback, and never answers, on a value that is not valid msgpack or on a dictionary
whose subkeys have mixed types; a subkey-less value with a later expiration replaces a whole dictionary (how a
hostile client "wiped" the peer list); a NaN or far-future expiration keeps a value forever. :class:`SwarmRecordValidator`
refuses all of that *before* it is stored (hivemind calls ``validate`` on every store it is asked to make, and on
every record another node returns to a read), so honest nodes never hold it and honest readers never see it.

Per key (``<run>`` is the run id, ``<avg>`` the averager's prefix, ``<run>_grads`` unless told otherwise):

=================================  =============================  ==================================================
key                                subkey                         value
=================================  =============================  ==================================================
``<run>.peers``                    ``[owner:K]``                  a :class:`~swarm.network.records.PeerStatus` whose
                                                                  ``peer_id`` is K's
``<run>.ledger.heads``             ``[owner:K]``                  a :class:`~swarm.network.ledger_records.LedgerHead`
                                                                  whose ``author`` is K's
``<run>.ledger.<author>``          ``<seq>:[owner:K]``, K the     ``{"first_seq": seq, "data": chunk}``, a chunk that
                                   author's                       decodes (:func:`~swarm.network.ledger_records.decode_chunk`)
``<run>.commitments``,             as :func:`~swarm.network.records.verify_entry` checks them (forged, replayed,
``<run>.verdicts``                 self-audits, malformed: what ``VerificationRecordValidator`` refuses)
``<run>.rollouts``                 ``<epoch>:[owner:K]``          ``{"bundle": bytes, "signature": bytes}``
``<avg>.0b<bits>`` (matchmaking)   a peer id's bytes              a bool (hivemind: looking for a group or not)
``<avg>.all_averagers``            a peer id's bytes              a number or None (hivemind: state-sharing priority)
``swarm.runs``                     ``[owner:K]``                  a :class:`~swarm.network.run_records.RunAnnouncement`
                                                                  whose ``peer_id`` is K's (any run's)
=================================  =============================  ==================================================

For each of these the value must be valid msgpack within a per-key size, and the expiration finite and at most
the key's bound (:class:`RecordBounds`) past now. Any other key (the DHT is the swarm's) gets the same generic
checks: no subkey-less value, a bytes subkey, msgpack, at most :data:`MAX_OTHER_BYTES` and the longest bound.
A refused record is logged once per (key kind, problem) at warning level, then at debug level; ``validate`` never
raises.

hivemind's averager keys carry no owner signature (hivemind does not sign them), so a node cannot tell who wrote
one: what is checked there is the shape, size and expiration that honest hivemind code writes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multihash
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ValidationError

from swarm.network.ledger_records import LedgerHead, chunks_key, decode_chunk, heads_key
from swarm.network.records import (
    MAX_RECORD_BYTES,
    AuditVerdict,
    Commitment,
    PeerStatus,
    RecordRejected,
    _canonical_owner,
    _short,
    commitments_key,
    verdicts_key,
    verify_entry,
)
from swarm.network.rollout_records import MAX_STORED_BYTES, rollouts_key
from swarm.network.run_records import MAX_ANNOUNCEMENT_BYTES, RUNS_KEY, RunAnnouncement

logger = logging.getLogger(__name__)

MAX_OTHER_BYTES = 64 << 10  # keys nobody in the swarm writes: at most this much per entry
MAX_AVERAGER_BYTES = 64  # hivemind's matchmaking and state-sharing entries hold a bool or a float
MAX_GROUP_BITS = 8  # matchmaking keys are known for group bits of up to this length (the swarm uses 8)
# ledger authors whose chunk key this node remembers (from their heads and statuses)
MAX_LEARNT_AUTHORS = 4096
_CHUNK_OVERHEAD = 64  # msgpack framing of {"first_seq": int, "data": <= MAX_RECORD_BYTES bytes}


@dataclass(frozen=True)
class RecordBounds:
    """The longest a writer may ask each kind of record to live, in seconds from now (plus ``clock_slack`` for
    clocks that disagree). A record asking for longer, or with a NaN or infinite expiration, is refused.

    The defaults are generous bounds for a swarm with default-ish settings; :meth:`from_config` gives the bounds
    the configured writers actually need."""

    status: float = 3600.0  # <run>.peers (writers: averaging.peer_timeout)
    verification: float = 24 * 3600.0  # commitments and verdicts (writers: audit_window * round_timeout * 2)
    rollouts: float = 24 * 3600.0  # (writers: (sharing.max_age_epochs + 1) * round_timeout * 2)
    ledger: float = 8 * 24 * 3600.0  # heads and chunks (writers: ledger.record_ttl, 7 days by default)
    # <avg>.0b... (hivemind: up to the end of a step's search, matchmaking_time * 3)
    matchmaking: float = 3600.0
    # <avg>.all_averagers (hivemind: declare_state_period = averaging.peer_timeout)
    averager_state: float = 3600.0
    clock_slack: float = 120.0

    @classmethod
    def from_config(cls, config: Any, margin: float = 2.0) -> RecordBounds:
        """Bounds from a :class:`~swarm.config.SwarmConfig`: ``margin`` times what each writer asks for."""
        averaging, verify = config.averaging, config.verify
        return cls(
            status=margin * averaging.peer_timeout,
            verification=margin * verify.audit_window * averaging.round_timeout * 2,
            rollouts=margin * (config.sharing.max_age_epochs + 1) * averaging.round_timeout * 2,
            ledger=margin * config.ledger.record_ttl,
            matchmaking=margin * max(averaging.round_timeout, averaging.matchmaking_time * 3),
            averager_state=margin * averaging.peer_timeout,
        )

    @property
    def longest(self) -> float:
        return max(
            self.status, self.verification, self.rollouts, self.ledger, self.matchmaking, self.averager_state
        )


class Refused(ValueError):
    """A record this node does not store; the message says why, in one line."""


def check_expiration(expiration_time: Any, max_ttl: float, slack: float, now: float | None = None) -> None:
    """:raises Refused: unless ``expiration_time`` is a finite number at most ``max_ttl + slack`` seconds from now"""
    if isinstance(expiration_time, bool) or not isinstance(expiration_time, int | float):
        raise Refused(f"expiration is a {type(expiration_time).__name__}")
    if not math.isfinite(expiration_time):
        raise Refused(f"expiration is {expiration_time}")
    ahead = expiration_time - (get_dht_time() if now is None else now)
    if ahead > max_ttl + slack:
        raise Refused(f"expiration {ahead:.0f}s ahead > {max_ttl + slack:.0f}s")


def _loads(data: bytes, what: str) -> Any:
    try:
        return DHTProtocol.serializer.loads(data)
    except Exception:
        raise Refused(f"{what} is not msgpack") from None


def _owner_of(subkey: bytes) -> tuple[str, bytes]:
    """(owner peer id, the ``[owner:...]`` marker) of a subkey holding exactly one canonical owner key."""
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(keys) != 1:
        raise Refused(f"subkey holds {len(keys)} owner keys, not 1")
    owner = _canonical_owner(keys[0])
    if owner is None:
        raise Refused("subkey owner is not a canonical RSA public key")
    return owner, RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", keys[0])


def _model(model: type[BaseModel], value: Any) -> BaseModel:
    if not isinstance(value, dict):
        raise Refused(f"value is a {type(value).__name__}, not a dict")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise Refused(f"not a valid {model.__name__} ({_short(where, 40)}: {first['msg']})") from None


def _is_peer_id(subkey: bytes) -> bool:
    try:
        multihash.decode(subkey)
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class _Spec:
    kind: str  # for log lines
    max_bytes: int
    max_ttl: float
    check: Callable[[bytes, Any], None] | None = None  # (subkey, value), deserialized; raises Refused


@functools.lru_cache(maxsize=MAX_LEARNT_AUTHORS)
def _key_id(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


class SwarmRecordValidator(RecordValidatorBase):
    """Refuses, before it is stored or returned to a reader, any record the swarm would not write (see the module
    docstring). Register it with ``RSASignatureValidator`` (which checks owner signatures first and strips them:
    this validator's priority, 4, is below its 10).

    :param run_id: the run whose keys are checked strictly
    :param bounds: expiration bounds per kind of record
    :param averager_prefix: the prefix of the run's averager (default ``<run_id>_grads``)
    :param local_peer_id: this node's own peer id (its ledger chunk key is known from the start)
    """

    def __init__(
        self,
        run_id: str,
        bounds: RecordBounds | None = None,
        averager_prefix: str | None = None,
        local_peer_id: str | None = None,
    ):
        self.bounds = bounds or RecordBounds()
        self._runs: dict[str, RecordBounds] = {run_id: self.bounds}
        self._specs: dict[bytes, _Spec] = {}
        self._chunk_keys: OrderedDict[bytes, tuple[str, str]] = OrderedDict()  # key id -> (run id, author)
        self._logged: set[tuple[str, str]] = set()
        self._add_run(run_id, self.bounds, averager_prefix or f"{run_id}_grads")
        if local_peer_id is not None:
            self._learn_author(run_id, local_peer_id)

    # ---- the keys ----------------------------------------------------------------------------------------------
    def _add_run(self, run_id: str, bounds: RecordBounds, averager_prefix: str) -> None:
        def owned_model(model: type[BaseModel], field: str, learn: bool) -> Callable[[bytes, Any], None]:
            def check(subkey: bytes, value: Any) -> None:
                owner, marker = _owner_of(subkey)
                if subkey != marker:
                    raise Refused("subkey is not exactly its owner's key")
                record = _model(model, value)
                claimed = getattr(record, field)
                if claimed != owner:
                    raise Refused(f"forged: signed by {owner} but claims {_short(claimed)}")
                if learn:
                    self._learn_author(run_id, owner)

            return check

        def verification(model: type[Commitment] | type[AuditVerdict]) -> Callable[[bytes, Any], None]:
            def check(subkey: bytes, value: Any) -> None:
                try:
                    verify_entry(model, subkey, value)
                except RecordRejected as error:
                    raise Refused(str(error)) from None

            return check

        def rollout(subkey: bytes, value: Any) -> None:
            _, marker = _owner_of(subkey)
            prefix = subkey[: len(subkey) - len(marker)]
            if not subkey.endswith(marker) or not prefix.endswith(b":") or not prefix[:-1].isdigit():
                raise Refused("subkey is not <epoch>:[owner:...]")
            if (
                not isinstance(value, dict)
                or set(value) != {"bundle", "signature"}
                or not all(isinstance(part, bytes) for part in value.values())
            ):
                raise Refused("value is not {bundle: bytes, signature: bytes}")

        def matchmaking(subkey: bytes, value: Any) -> None:
            if not _is_peer_id(subkey):
                raise Refused("subkey is not a peer id")
            if not isinstance(value, bool):
                raise Refused(f"value is a {type(value).__name__}, not a bool")

        def averager_state(subkey: bytes, value: Any) -> None:
            if not _is_peer_id(subkey):
                raise Refused("subkey is not a peer id")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise Refused(f"value is a {type(value).__name__}, not a number or None")

        specs = {
            f"{run_id}.peers": _Spec(
                "peer status", MAX_RECORD_BYTES, bounds.status, owned_model(PeerStatus, "peer_id", learn=True)
            ),
            heads_key(run_id): _Spec(
                "ledger head", MAX_RECORD_BYTES, bounds.ledger, owned_model(LedgerHead, "author", learn=True)
            ),
            commitments_key(run_id): _Spec(
                "commitment", MAX_RECORD_BYTES, bounds.verification, verification(Commitment)
            ),
            verdicts_key(run_id): _Spec(
                "verdict", MAX_RECORD_BYTES, bounds.verification, verification(AuditVerdict)
            ),
            rollouts_key(run_id): _Spec("rollout bundle", MAX_STORED_BYTES, bounds.rollouts, rollout),
            f"{averager_prefix}.all_averagers": _Spec(
                "averager state declaration", MAX_AVERAGER_BYTES, bounds.averager_state, averager_state
            ),
            RUNS_KEY: _Spec(
                "run announcement",
                MAX_ANNOUNCEMENT_BYTES,
                bounds.status,
                owned_model(RunAnnouncement, "peer_id", learn=False),
            ),
        }
        for length in range(MAX_GROUP_BITS + 1):
            for index in range(2**length):
                bits = format(index, f"0{length}b") if length else ""
                specs[f"{averager_prefix}.0b{bits}"] = _Spec(
                    "matchmaking", MAX_AVERAGER_BYTES, bounds.matchmaking, matchmaking
                )
        for key, spec in specs.items():
            self._specs[_key_id(key)] = spec

    def _learn_author(self, run_id: str, author: str) -> None:
        key_id = _key_id(chunks_key(run_id, author))
        self._chunk_keys[key_id] = (run_id, author)
        self._chunk_keys.move_to_end(key_id)
        while len(self._chunk_keys) > MAX_LEARNT_AUTHORS:
            self._chunk_keys.popitem(last=False)

    def _chunk_spec(self, key: bytes, subkey: Any) -> _Spec | None:
        """The spec of a ledger chunk key: a learnt author's, or the one the record's own owner key names."""
        found = self._chunk_keys.get(key)
        if found is None and isinstance(subkey, bytes):
            owners = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
            owner = _canonical_owner(owners[0]) if len(owners) == 1 else None
            if owner is not None:
                for run_id in self._runs:
                    if _key_id(chunks_key(run_id, owner)) == key:
                        found = (run_id, owner)
                        break
        if found is None:
            return None
        run_id, author = found

        def chunk(subkey: bytes, value: Any) -> None:
            owner, marker = _owner_of(subkey)
            if owner != author:
                raise Refused(f"a chunk of {author} signed by {owner}")
            if not isinstance(value, dict) or set(value) != {"first_seq", "data"}:
                raise Refused("value is not {first_seq, data}")
            first_seq = value["first_seq"]
            if type(first_seq) is not int or first_seq < 0 or subkey != f"{first_seq}:".encode() + marker:
                raise Refused("subkey is not <first_seq>:[owner:...] of its value")
            if decode_chunk(value["data"]) is None:
                raise Refused("data is not a ledger chunk")

        return _Spec("ledger chunk", MAX_RECORD_BYTES + _CHUNK_OVERHEAD, self._runs[run_id].ledger, chunk)

    # ---- hivemind's interface ----------------------------------------------------------------------------------
    @property
    def priority(self) -> int:
        return 4  # after RSASignatureValidator (10) verified and stripped the owner's signature

    def validate(self, record: DHTRecord) -> bool:
        try:
            self._problem(record)
            return True
        except Refused as error:
            kind, problem = error.args if len(error.args) == 2 else ("record", str(error))
        except Exception as error:  # never raise inside the DHT's handlers
            kind, problem = "record", f"{type(error).__name__} while checking"
        self._log(kind, problem)
        return False

    def _log(self, kind: str, problem: str) -> None:
        # once per (kind, problem) at warning level; problems carry numbers, so keep their words only
        shape = (kind, "".join(char for char in problem if not char.isdigit())[:60])
        level = logging.DEBUG if shape in self._logged else logging.WARNING
        if len(self._logged) < 1024:
            self._logged.add(shape)
        logger.log(level, f"Refused a DHT {kind} record: {problem}")

    def _problem(self, record: DHTRecord) -> None:
        """:raises Refused: with args (kind, problem) for a record this node must not store"""
        spec = self._specs.get(record.key)
        kind = spec.kind if spec is not None else "record"
        try:
            if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
                raise Refused("a value without a subkey (it would replace the whole dictionary)")
            subkey = _loads(record.subkey, "subkey")
            if not isinstance(subkey, bytes):
                raise Refused(f"subkey is a {type(subkey).__name__}, not bytes")
            if spec is None:
                spec = self._chunk_spec(record.key, subkey)
                kind = spec.kind if spec is not None else kind
            max_bytes = spec.max_bytes if spec is not None else MAX_OTHER_BYTES
            max_ttl = (
                spec.max_ttl if spec is not None else max(bounds.longest for bounds in self._runs.values())
            )
            slack = max(bounds.clock_slack for bounds in self._runs.values())
            check_expiration(record.expiration_time, max_ttl, slack)
            value_bytes = RSASignatureValidator._SIGNATURE_RE.sub(b"", record.value)
            if len(value_bytes) > max_bytes or len(record.subkey) > MAX_RECORD_BYTES:
                raise Refused(f"oversized: {len(value_bytes)} bytes > {max_bytes}")
            value = _loads(value_bytes, "value")
            if spec is not None and spec.check is not None:
                spec.check(subkey, value)
        except Refused as error:
            raise Refused(kind, str(error)) from None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, SwarmRecordValidator):
            return False
        self._runs.update(other._runs)
        self._specs.update(other._specs)
        self._chunk_keys.update(other._chunk_keys)
        return True
