"""Typed DHT records. This module and :mod:`swarm.network.dht` are the only places that speak to the DHT.

Every record a peer owns sits under a subkey holding its public key (``[owner:...]``), so hivemind's
``RSASignatureValidator`` lets only that key write it, and the reader checks that the claimed peer id is the one
derived from that key. Anything malformed is dropped, never raised: the network is untrusted input.

The verification layer's records (docs/design.md §2, steps 4 and 7) are also checked by the DHT nodes that store and
return them (:class:`VerificationRecordValidator`, registered by :func:`swarm.network.dht.start_dht`):

* ``<run_id>.commitments``, subkey ``b"<epoch>:[owner:<key>]"``: a :class:`Commitment`, one per (peer, epoch);
* ``<run_id>.verdicts``, subkey ``b"<epoch>:<audited>:[owner:<key>]"``: an :class:`AuditVerdict`, one per
  (auditor, epoch, audited peer).

An entry of these keys is accepted (by a node and by a reader) only if its subkey holds exactly one canonical
RSA public key, its value is a valid model of at most :data:`MAX_RECORD_BYTES` bytes, the peer id the value
claims (``peer_id`` / ``auditor``) is the one derived from that key, and the subkey is exactly the one the value
determines (so a record signed for one epoch or audited peer cannot stand for another).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import re
import time
from typing import Any, Literal, TypeVar

import hivemind
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.identity import Identity

logger = logging.getLogger(__name__)
_Model = TypeVar("_Model", bound=BaseModel)

MAX_RECORD_BYTES = 4096


class PeerStatus(BaseModel):
    """What a peer announces about itself every few seconds while it is alive."""

    model_config = ConfigDict(extra="forbid", strict=True)

    peer_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    epoch: int = Field(ge=0)
    state_hash: str = Field(max_length=128)
    # the epoch whose gradient this peer has computed and wants to average; -1: busy
    ready_epoch: int = Field(ge=-1)
    samples: int = Field(ge=0)  # samples this peer contributed since it started
    reward: float | None = None  # mean reward of its last round
    client_mode: bool = False
    left: bool = False  # its last word: it has left the swarm, so nobody waits for it, averages with it or loads from it
    fingerprint: str = Field("", max_length=16)  # of its shared settings (swarm/shared_settings.py)


def peer_id_from_public_key(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (same derivation as ``PeerID.from_identity``)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256")))


def owner_peer_id(subkey: bytes) -> str | None:
    """The peer id of the key that owns (signed) a record with this subkey, or None if it is not owned."""
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey) if isinstance(subkey, bytes) else []
    if len(keys) != 1:
        return None
    try:
        return str(peer_id_from_public_key(RSAPublicKey.from_bytes(keys[0])))
    except Exception:
        return None


class StatusBoard:
    """Publishes this peer's :class:`PeerStatus` and reads everybody's, under the key ``<run_id>.peers``.

    :param ttl: a status not refreshed for this many seconds expires, and its peer counts as gone
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float):
        self.dht, self.key, self.ttl = dht, f"{run_id}.peers", ttl
        self.subkey = RSASignatureValidator(identity.private_key).local_public_key

    def publish(self, status: PeerStatus) -> bool:
        return bounded_store(
            self.dht, self.key, status.model_dump(), get_dht_time() + self.ttl, subkey=self.subkey
        )

    def fetch(self) -> dict[str, PeerStatus]:
        """Peers by peer id (this one included once published), including those whose last status says they
        ``left``. Forged or malformed entries are skipped."""
        return {status.peer_id: status for status in owned_records(self.dht, self.key, PeerStatus, "peer_id")}


# ---- verification records (docs/design.md §2, steps 4 and 7) ---------------------------------------------------------------
Precision = Literal["fp32", "bf16", "fp16"]


class Commitment(BaseModel):
    """What a peer publishes BEFORE it averages its gradient for ``epoch``: hashes binding the contribution it
    serves to auditors. Immutable once built; :meth:`digest` is what averaging-group members exchange."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    peer_id: str = Field(max_length=128)
    epoch: int = Field(ge=0)
    state_hash: str = Field(max_length=128)  # param checksum of the model the gradient was computed at
    data_seed: str = Field(max_length=128)  # digest of the assigned rows
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    rollouts_hash: str = Field(max_length=128)  # sha256 over prompt/completion token ids and claimed rewards
    # sha256 over the gradient tensors actually sent into averaging
    gradient_hash: str = Field(max_length=128)
    precision: Precision
    # a strategy of several inner steps per epoch (DiLoCo): how many the peer took, and the Merkle root over them
    # (swarm/verify/inner.py) — then the fields above are the epoch's: its start state, totals over the steps, and
    # the hash of the pseudo-gradient sent
    inner_steps: int = Field(default=1, ge=1, le=1_000_000)
    steps_root: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of all fields (sorted keys, no whitespace): equal commitments give equal
        digests in every process, and any change of any field changes it."""
        return hashlib.sha256(
            json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()

    def subkey_prefix(self) -> bytes:
        return f"{self.epoch}:".encode()


class AuditVerdict(BaseModel):
    """What an auditor publishes after replaying ``audited``'s contribution of ``epoch``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    auditor: str = Field(max_length=128)
    audited: str = Field(max_length=128)
    epoch: int = Field(ge=0)
    commitment: str = Field(max_length=128)  # digest of the commitment audited
    verdict: str = Field(max_length=32, pattern=r"^[a-z_]+$")  # "pass" or a failure kind
    error: float | None = Field(default=None, allow_inf_nan=False)  # relative L2 error; finite or None
    role: Literal["primary", "recheck", "takeover"]
    # evidence another peer can check by replaying: the hash of the gradient this auditor replayed, and the flat
    # index where it differs most from the committed one (a gradient failure without it does not count)
    replayed_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    worst_index: int | None = Field(default=None, ge=0)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def subkey_prefix(self) -> bytes:
        return f"{self.epoch}:{self.audited}:".encode()


def commitments_key(run_id: str) -> str:
    return f"{run_id}.commitments"


def verdicts_key(run_id: str) -> str:
    return f"{run_id}.verdicts"


class RecordRejected(ValueError):
    """An entry of a verification key that is not acceptable; the message says why, in one line."""


@functools.lru_cache(maxsize=4096)
def _canonical_owner(key: bytes) -> str | None:
    """The peer id of an OpenSSH-encoded RSA public key, or None unless ``key`` is exactly its canonical encoding
    (a comment or other re-encoding of the same key would give one peer a second subkey for the same slot)."""
    try:
        public_key = RSAPublicKey.from_bytes(key)
        if public_key.to_bytes() != key:
            return None
        return str(peer_id_from_public_key(public_key))
    except Exception:
        return None


def _short(text: Any, limit: int = 80) -> str:
    """Untrusted text made safe for a one-line log message."""
    text = ascii(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SUBKEY_EPOCH_RE = re.compile(rb"^(\d{1,20}):")


def verify_entry(
    model: type[Commitment] | type[AuditVerdict], subkey: Any, value: Any
) -> Commitment | AuditVerdict:
    """Check one entry of a verification key (deserialized subkey and value, signature already verified and
    stripped) and return the record it holds.

    :raises RecordRejected: one line naming the first problem: no single canonical owner key in the subkey, a value
      that is not a valid ``model``, a claimed peer id that is not the owner's (forged), an auditor auditing itself,
      or a subkey other than the one the value determines (replayed under another epoch / audited peer)
    """
    if not isinstance(subkey, bytes):
        raise RecordRejected(f"subkey is a {type(subkey).__name__}, not bytes")
    if len(subkey) > MAX_RECORD_BYTES:
        raise RecordRejected(f"subkey of {len(subkey)} bytes > {MAX_RECORD_BYTES}")
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(keys) != 1:
        raise RecordRejected(f"subkey holds {len(keys)} owner keys, not 1")
    owner = _canonical_owner(keys[0])
    if owner is None:
        raise RecordRejected("subkey owner is not a canonical RSA public key")
    if not isinstance(value, dict):
        raise RecordRejected(f"value is a {type(value).__name__}, not a dict")
    try:
        record = model.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise RecordRejected(
            f"not a valid {model.__name__} ({error.error_count()} errors; {_short(where, 40)}: {first['msg']})"
        ) from None
    claimed = record.peer_id if isinstance(record, Commitment) else record.auditor
    if claimed != owner:
        raise RecordRejected(f"forged: signed by {owner} but claims {_short(claimed)}")
    if isinstance(record, AuditVerdict) and record.audited == record.auditor:
        raise RecordRejected(f"{owner} audits itself")
    if subkey != record.subkey_prefix() + RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", keys[0]):
        found = _SUBKEY_EPOCH_RE.match(subkey)
        raise RecordRejected(
            f"replayed: {owner} stored it under another subkey (epoch {found.group(1).decode() if found else '?'})"
            f" than its value's (epoch {record.epoch}"
            f"{'' if isinstance(record, Commitment) else f', audited {_short(record.audited)}'})"
        )
    return record


class VerificationRecordValidator(RecordValidatorBase):
    """A hivemind record validator that makes DHT nodes refuse to store, or to accept from others, any entry of
    ``<run_id>.commitments`` / ``<run_id>.verdicts`` that :func:`verify_entry` rejects, or whose value (signature
    stripped) exceeds :data:`MAX_RECORD_BYTES`. Regular (subkey-less) values of those keys are refused too: one
    with a later expiration would otherwise replace the whole dictionary. Every other key passes untouched.

    Use it together with ``RSASignatureValidator``, which proves the owner key signed the entry: hivemind's
    ``CompositeValidator`` runs validators by decreasing ``priority`` and strips each one's signature before the
    next, so this validator (priority 5 < 10) sees a verified value. It strips any signature itself as well, in
    case it runs alone. Each rejection is logged at warning level, one line; ``validate`` never raises.
    """

    def __init__(self, run_id: str):
        self._models: dict[bytes, tuple[str, type[Commitment] | type[AuditVerdict]]] = {
            DHTID.generate(source=commitments_key(run_id)).to_bytes(): (run_id, Commitment),
            DHTID.generate(source=verdicts_key(run_id)).to_bytes(): (run_id, AuditVerdict),
        }

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): validated after the signature is checked and stripped

    def validate(self, record: DHTRecord) -> bool:
        found = self._models.get(record.key)
        if found is None:
            return True
        run_id, model = found
        try:
            problem = self._problem(model, record)
        except Exception as error:  # never raise inside the DHT's RPC handlers
            problem = f"{type(error).__name__} while checking"
        if problem is None:
            return True
        logger.warning(f"Rejected a {model.__name__} record of run {run_id!r}: {problem}")
        return False

    @staticmethod
    def _problem(model: type[Commitment] | type[AuditVerdict], record: DHTRecord) -> str | None:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return "a value without a subkey"
        value_bytes = RSASignatureValidator._SIGNATURE_RE.sub(b"", record.value)
        if len(value_bytes) > MAX_RECORD_BYTES:
            return f"oversized: {len(value_bytes)} bytes > {MAX_RECORD_BYTES}"
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
            value = DHTProtocol.serializer.loads(value_bytes)
        except Exception:
            return "not msgpack"
        try:
            verify_entry(model, subkey, value)
        except RecordRejected as error:
            return str(error)
        return None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, VerificationRecordValidator):
            return False
        self._models.update(other._models)  # one validator guarding several runs
        return True


def owner_marker(identity: Identity) -> bytes:
    """The ``[owner:...]`` subkey part that makes a record writable only by ``identity``'s key."""
    return RSASignatureValidator(identity.private_key).local_public_key


READ_TIMEOUT = 10.0  # seconds a DHT read may take before the reader goes on with nothing
STORE_TIMEOUT = 10.0  # seconds a DHT store may take before the writer counts it as refused
_RATE_LIMIT = 60.0  # a timeout on the same key is logged at warning level at most once per this many seconds
_last_warned: dict[tuple[str, str], float] = {}


def _warn_limited(what: str, key: str, message: str) -> None:
    now = time.monotonic()
    if len(_last_warned) > 1024:
        _last_warned.clear()
    last = _last_warned.get((what, key))
    level = logging.DEBUG if last is not None and now - last < _RATE_LIMIT else logging.WARNING
    if level == logging.WARNING:
        _last_warned[(what, key)] = now
    logger.log(level, message)


def _bounded(future: Any, timeout: float, kind: str, key: str, late: str) -> tuple[bool, Any]:
    """(answered, result) of a DHT call's future within ``timeout`` seconds; a late or failed call is cancelled or
    dropped with one rate-limited log line (``late`` says what happens without it)."""
    try:
        return True, future.result(timeout=timeout)
    except (concurrent.futures.TimeoutError, TimeoutError):
        future.cancel()
        _warn_limited(kind, key, f"A DHT {kind} of {key!r} took over {timeout:.0f}s: {late}")
    except Exception as error:
        _warn_limited(kind, key, f"A DHT {kind} of {key!r} failed: {_short(repr(error), 160)}")
    return False, None


def bounded_get(dht: hivemind.DHT, key: str, timeout: float = READ_TIMEOUT) -> Any:
    """``dht.get(key, latest=True)`` that returns None after ``timeout`` seconds instead of waiting forever (hivemind's
    read never answers when it meets a value it cannot decode), or when the read fails; one log line either way."""
    return _bounded(
        dht.get(key, latest=True, return_future=True), timeout, "read", key, "going on without it"
    )[1]


def bounded_store(
    dht: hivemind.DHT,
    key: str,
    value: Any,
    expiration_time: float,
    subkey: Any = None,
    timeout: float = STORE_TIMEOUT,
) -> bool:
    """``dht.store(...)``: False if it was refused, failed or did not answer within ``timeout`` seconds."""
    kwargs = {} if subkey is None else dict(subkey=subkey)
    future = dht.store(key, value, expiration_time, return_future=True, **kwargs)
    answered, stored = _bounded(future, timeout, "store", key, "counted as refused")
    return answered and bool(stored)


def dict_entries(dht: hivemind.DHT, key: str, timeout: float = READ_TIMEOUT) -> list[tuple[Any, Any]]:
    """(subkey, value) of every entry stored under a dictionary ``key``, unvalidated (the caller validates); nothing
    if the read takes over ``timeout`` seconds or fails (:func:`bounded_get`)."""
    found = bounded_get(dht, key, timeout)
    if found is None or not isinstance(getattr(found, "value", None), dict):
        return []
    return [(subkey, getattr(item, "value", None)) for subkey, item in found.value.items()]


def owned_records(dht: hivemind.DHT, key: str, model: type[_Model], owner_field: str) -> list[_Model]:
    """The entries under ``key`` that parse as ``model`` and whose ``owner_field`` names the peer whose key signed
    them (the ``[owner:...]`` subkey); malformed and forged entries are dropped with a debug line, never raised."""
    records = []
    for subkey, value in dict_entries(dht, key):
        try:
            record = model.model_validate(value)
        except ValidationError:
            logger.debug(f"Dropped a malformed {model.__name__}")
            continue
        if owner_peer_id(subkey) != getattr(record, owner_field):
            logger.debug(
                f"Dropped a {model.__name__} for {getattr(record, owner_field)!r} not signed by its key"
            )
            continue
        records.append(record)
    return records


def _log_dropped(model: type[BaseModel], error: RecordRejected) -> None:
    text = str(error)
    level = (
        logging.WARNING
        if text.startswith(("forged", "replayed")) or "audits itself" in text
        else logging.DEBUG
    )
    logger.log(level, f"Dropped a {model.__name__}: {text}")


class CommitmentBoard:
    """Publishes this peer's :class:`Commitment` per epoch and reads everybody's, under ``<run_id>.commitments``.

    Only this identity's key can write its entries (``RSASignatureValidator``); :meth:`fetch` returns only entries
    :func:`verify_entry` accepts, so at most one commitment per (peer, epoch), each signed by the peer it names.
    Note that the owner may still overwrite its own entry with a later expiration: compare :meth:`Commitment.digest`
    with what it sent to its averaging group.

    :param ttl: seconds a published commitment stays in the DHT (the audit window)
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float):
        self.dht, self.key, self.ttl = dht, commitments_key(run_id), ttl
        self.peer_id = str(identity.peer_id)
        self.marker = owner_marker(identity)

    def publish(self, commitment: Commitment) -> bool:
        """Store ``commitment`` under its epoch's subkey; the DHT's answer (hivemind reports the status of the
        replica that answered last, so True does not prove every node took it).

        :raises ValueError: if ``commitment.peer_id`` is not this identity's peer id
        """
        if commitment.peer_id != self.peer_id:
            raise ValueError(f"a commitment for {commitment.peer_id} cannot be published as {self.peer_id}")
        subkey = commitment.subkey_prefix() + self.marker
        return bounded_store(
            self.dht, self.key, commitment.model_dump(), get_dht_time() + self.ttl, subkey=subkey
        )

    def fetch(self, epoch: int) -> dict[str, Commitment]:
        """Peer id → that peer's commitment for ``epoch`` (this peer's own included once published). Forged,
        replayed or malformed entries are dropped and logged, never raised."""
        commitments = {}
        for subkey, value in dict_entries(self.dht, self.key):
            if isinstance(subkey, bytes) and not subkey.startswith(f"{epoch}:".encode()):
                continue  # another epoch (a replay into this epoch's subkey is caught by verify_entry)
            try:
                commitment = verify_entry(Commitment, subkey, value)
            except RecordRejected as error:
                _log_dropped(Commitment, error)
                continue
            if commitment.epoch == epoch:
                commitments[commitment.peer_id] = commitment
        return commitments


class VerdictBoard:
    """Publishes this peer's :class:`AuditVerdict` records and reads everybody's, under ``<run_id>.verdicts``.

    :meth:`fetch` returns only entries :func:`verify_entry` accepts: each signed by the auditor it names, never a
    self-audit, at most one per (auditor, epoch, audited peer).

    :param ttl: seconds a published verdict stays in the DHT
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity, ttl: float):
        self.dht, self.key, self.ttl = dht, verdicts_key(run_id), ttl
        self.peer_id = str(identity.peer_id)
        self.marker = owner_marker(identity)

    def publish(self, verdict: AuditVerdict) -> bool:
        """Store ``verdict`` under its (epoch, audited) subkey; the DHT's answer (as :meth:`CommitmentBoard.publish`).

        :raises ValueError: if ``verdict.auditor`` is not this identity's peer id, or it audits this peer itself
        """
        if verdict.auditor != self.peer_id:
            raise ValueError(f"a verdict by {verdict.auditor} cannot be published as {self.peer_id}")
        if verdict.audited == self.peer_id:
            raise ValueError("a peer cannot publish a verdict on itself")
        subkey = verdict.subkey_prefix() + self.marker
        return bounded_store(
            self.dht, self.key, verdict.model_dump(), get_dht_time() + self.ttl, subkey=subkey
        )

    def fetch(self, epoch: int | None = None) -> list[AuditVerdict]:
        """Valid verdicts (of ``epoch`` only, unless None), sorted by (epoch, audited, auditor). Forged, replayed
        or malformed entries are dropped and logged, never raised."""
        verdicts = []
        for subkey, value in dict_entries(self.dht, self.key):
            if (
                epoch is not None
                and isinstance(subkey, bytes)
                and not subkey.startswith(f"{epoch}:".encode())
            ):
                continue
            try:
                verdict = verify_entry(AuditVerdict, subkey, value)
            except RecordRejected as error:
                _log_dropped(AuditVerdict, error)
                continue
            if epoch is None or verdict.epoch == epoch:
                verdicts.append(verdict)
        return sorted(verdicts, key=lambda v: (v.epoch, v.audited, v.auditor))
