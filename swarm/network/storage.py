"""Bounded DHT storage for a node that runs for days: a periodic sweep inside the DHT process, and a report of
what the node holds (for the soak benchmark and tests).

hivemind 1.1.12's storage (``hivemind.dht.storage.DHTLocalStorage``, a ``TimedStorage``) only forgets lazily:

* an expired *key* is dropped only when some later call on the whole storage walks its expiration heap;
* an expired *subkey* of a dictionary value is dropped only when that one dictionary is touched again — a key
  nobody writes or reads any more keeps all its expired entries for ever;
* every ``store`` pushes a new heap entry, also when it overwrites or refreshes a key that is already there: the
  old entry stays in the heap as a "ghost" until its own expiration time comes. A record republished every few
  seconds with a week's TTL (a ledger head) leaves a week of ghosts behind, in the dictionary's heap and in the
  storage's heap (whose entry is refreshed with every later expiration);
* the node's cache (values fetched from other nodes) behaves the same and has no size bound by default.

:func:`sweep` fixes all of this for one node, in place: expired keys and subkeys go, empty dictionaries go, heaps
are rebuilt without ghosts, and keys that hold *epoch-windowed* entries (subkey ``b"<epoch>:..."``, e.g. the run's
commitments and verdicts) keep only the last ``epochs`` epochs behind the newest epoch *this node's own key*
published under that key (only its owner can write that, so a forged far-future epoch moves nothing).
:func:`install_sweeper` runs it every ``interval`` seconds inside the DHT process (one task of its event loop);
it is what :func:`swarm.network.dht.start_dht` should call once the node is up.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time
from hivemind.utils.timed_storage import TimedStorage

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 5.0  # seconds between two sweeps of a node's storage
# a subkey as stored: msgpack bytes (bin 8/16/32 header) of b"<epoch>:...", or the raw bytes
_EPOCH_SUBKEY_RE = re.compile(rb"^(?:\xc4.|\xc5..|\xc6....)?(\d{1,20}):", re.DOTALL)


@dataclass(frozen=True)
class EpochWindow:
    """Entries of ``key`` whose subkey starts with ``b"<epoch>:"`` are kept for ``epochs`` epochs behind the newest
    epoch this node's owner published there (an owner that published nothing there prunes nothing)."""

    key: str
    epochs: int


@dataclass
class SweepStats:
    """What one sweep removed."""

    keys: int = 0  # expired or emptied keys
    subkeys: int = 0  # expired subkeys
    windowed: int = 0  # subkeys older than their epoch window
    ghosts: int = 0  # stale heap entries
    seconds: float = 0.0


def _epoch_of(subkey: bytes) -> int | None:
    """The epoch a (serialized) subkey starts with: ``b"<epoch>:"`` as msgpack bytes, or raw."""
    found = _EPOCH_SUBKEY_RE.match(subkey) if isinstance(subkey, bytes) else None
    if found is None:
        return None
    return int(found.group(1))


def _rebuild_heap(storage: TimedStorage) -> int:
    """Drop the ghost entries of ``storage``'s expiration heap (those no key points to any more); how many."""
    before = len(storage.expiration_heap)
    storage.key_to_heap = {key: entry for key, entry in storage.key_to_heap.items() if key in storage.data}
    storage.expiration_heap = list(storage.key_to_heap.values())
    heapq.heapify(storage.expiration_heap)
    return before - len(storage.expiration_heap)


def _drop(storage: TimedStorage, key: Any) -> None:
    storage.data.pop(key, None)
    storage.key_to_heap.pop(key, None)


def sweep_storage(
    storage: TimedStorage,
    windows: dict[bytes, int] | None = None,
    own_marker: bytes | None = None,
    now: float | None = None,
) -> SweepStats:
    """Sweep one ``DHTLocalStorage`` (or cache) in place; see the module docstring.

    :param windows: serialized key id (``DHTID.to_bytes()``) -> epochs to keep, for epoch-windowed keys
    :param own_marker: this node's ``[owner:...]`` subkey part; the newest epoch it published sets the window
    :param now: DHT time (default: now)
    """
    started = time.perf_counter()
    now = get_dht_time() if now is None else now
    stats = SweepStats()
    windows = windows or {}
    for key, item in list(storage.data.items()):
        value = item.value
        if item.expiration_time < now:
            _drop(storage, key)
            stats.keys += 1
            continue
        if not isinstance(value, DictionaryDHTValue):
            continue
        for subkey, sub in list(value.data.items()):
            if sub.expiration_time < now:
                _drop(value, subkey)
                stats.subkeys += 1
        keep = windows.get(key.to_bytes()) if isinstance(key, DHTID) else None
        if keep is not None and own_marker is not None:
            own = [_epoch_of(subkey) for subkey in value.data if own_marker in subkey]
            own = [epoch for epoch in own if epoch is not None]
            if own:
                horizon = max(own) - keep
                for subkey in list(value.data):
                    epoch = _epoch_of(subkey)
                    if epoch is not None and epoch < horizon:
                        _drop(value, subkey)
                        stats.windowed += 1
        if not value.data:
            _drop(storage, key)
            stats.keys += 1
            continue
        if len(value.expiration_heap) > 2 * len(value.data) + 16:
            stats.ghosts += _rebuild_heap(value)
    if len(storage.expiration_heap) > 2 * len(storage.data) + 16:
        stats.ghosts += _rebuild_heap(storage)
    stats.seconds = time.perf_counter() - started
    return stats


def _store_without_ghosts(self: TimedStorage, key: Any, value: Any, expiration_time: float) -> bool:
    """``TimedStorage.store`` that leaves the heap alone when it refuses a value (one not newer than the stored one).

    hivemind's version pushes a heap entry and points ``key_to_heap`` at it before it finds out the value is not
    newer: every re-store of an unchanged entry (a reader's node caching what it found on its nearest nodes, a
    republished chunk) left a ghost entry, and one with an *earlier* expiration even made the stored value be
    dropped at that earlier time."""
    current = self.data.get(key)
    if current is not None and current.expiration_time >= expiration_time and not self.frozen:
        return False
    return _hivemind_store(self, key, value, expiration_time)


_hivemind_store = TimedStorage.store


def patch_timed_storage() -> bool:
    """Install :func:`_store_without_ghosts` in this process (the DHT process); returns whether it was needed."""
    if TimedStorage.store is _store_without_ghosts:
        return False
    TimedStorage.store = _store_without_ghosts
    return True


def _own_marker(node) -> bytes | None:
    """This node's ``[owner:...]`` marker, from its RSA signature validator (None if it has none)."""
    validator = getattr(node.protocol, "record_validator", None)
    stack = [validator]
    while stack:
        current = stack.pop()
        if isinstance(current, RSASignatureValidator):
            return current.local_public_key
        stack.extend(getattr(current, "_validators", []) or [])
    return None


def sweep_node(node, windows: dict[bytes, int] | None = None) -> SweepStats:
    """Sweep a ``DHTNode``'s storage and cache (call inside the DHT process)."""
    marker = _own_marker(node)
    total = SweepStats()
    for storage in (node.protocol.storage, node.protocol.cache):
        stats = sweep_storage(storage, windows, marker)
        for name in ("keys", "subkeys", "windowed", "ghosts", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    return total


def _window_ids(windows: list[EpochWindow]) -> dict[bytes, int]:
    return {DHTID.generate(source=window.key).to_bytes(): window.epochs for window in windows}


async def _sweep_once(_dht, node, windows: dict[bytes, int]) -> SweepStats:
    return sweep_node(node, windows)


async def _install(_dht, node, windows: dict[bytes, int], interval: float) -> bool:
    patch_timed_storage()
    task = getattr(node, "_swarm_sweeper", None)
    if task is not None and not task.done():
        node._swarm_sweep_windows.update(windows)
        return False
    node._swarm_sweep_windows = dict(windows)

    async def loop() -> None:
        while node.is_alive:
            await asyncio.sleep(interval)
            try:
                stats = sweep_node(node, node._swarm_sweep_windows)
                if stats.keys or stats.subkeys or stats.windowed or stats.ghosts:
                    logger.debug(f"DHT sweep: {stats}")
            except Exception as error:  # a sweep must never end the DHT process
                logger.warning(f"DHT storage sweep failed: {type(error).__name__}: {error}")

    node._swarm_sweeper = asyncio.create_task(loop())
    return True


def install_sweeper(
    dht: hivemind.DHT, windows: list[EpochWindow] = (), interval: float = SWEEP_INTERVAL
) -> bool:
    """Sweep ``dht``'s storage every ``interval`` seconds, in its own process, for as long as it runs. Called again
    on the same node it only adds ``windows``. Returns whether a sweeper was started; never raises (a node that
    cannot be swept still works, it only forgets lazily)."""
    try:
        return bool(dht.run_coroutine(_call(_install, _window_ids(list(windows)), interval)))
    except Exception as error:
        logger.warning(f"DHT storage sweep not installed: {type(error).__name__}: {error}")
        return False


def sweep(dht: hivemind.DHT, windows: list[EpochWindow] = ()) -> SweepStats:
    """Sweep ``dht``'s storage once, now (tests, benchmarks)."""
    return dht.run_coroutine(_call(_sweep_once, _window_ids(list(windows))))


def run_windows(run_id: str, audit_window: int, rollout_epochs: int | None = None) -> list[EpochWindow]:
    """The epoch windows of a run's per-epoch keys: commitments and verdicts are read for ``audit_window`` epochs
    (plus the two-epoch takeover delay and one of slack); shared rollouts (with ``rollout_epochs``, the sharing's
    ``max_age_epochs``) for that many epochs plus two."""
    from swarm.network.records import commitments_key, verdicts_key
    from swarm.network.rollout_records import rollouts_key

    keep = audit_window + 3
    windows = [EpochWindow(commitments_key(run_id), keep), EpochWindow(verdicts_key(run_id), keep)]
    if rollout_epochs is not None:
        windows.append(EpochWindow(rollouts_key(run_id), rollout_epochs + 2))
    return windows


@dataclass
class KeyFigures:
    subkeys: int = 0
    bytes: int = 0
    heap: int = 0  # heap entries of the dictionary (ghosts included)


@dataclass
class StorageReport:
    """What a node holds: per storage ("storage", "cache"), top-level keys, heap entries and, for the keys asked
    about, subkeys and bytes."""

    keys: dict[str, int] = field(default_factory=dict)
    heap: dict[str, int] = field(default_factory=dict)
    subkeys: dict[str, int] = field(default_factory=dict)  # all dictionaries together
    bytes: dict[str, int] = field(default_factory=dict)
    named: dict[str, KeyFigures] = field(default_factory=dict)  # "storage:<key>" -> figures


class _call:
    """A picklable ``(dht, node) -> awaitable`` for ``DHT.run_coroutine`` with extra arguments."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __call__(self, dht, node):
        return self.function(dht, node, *self.args)


async def _report(_dht, node, names: list[str]) -> StorageReport:
    report = StorageReport()
    ids = {DHTID.generate(source=name): name for name in names}
    for label, storage in (("storage", node.protocol.storage), ("cache", node.protocol.cache)):
        report.keys[label] = len(storage.data)
        report.heap[label] = len(storage.expiration_heap)
        subkeys = size = 0
        for key, item in storage.data.items():
            value = item.value
            if isinstance(value, DictionaryDHTValue):
                figures = KeyFigures(
                    len(value.data),
                    sum(len(s) + len(v.value) for s, v in value.data.items()),
                    len(value.expiration_heap),
                )
                report.heap[label] += figures.heap
            else:
                figures = KeyFigures(0, len(value) if isinstance(value, bytes) else 0, 0)
            subkeys += figures.subkeys
            size += figures.bytes
            if key in ids:
                report.named[f"{label}:{ids[key]}"] = figures
        report.subkeys[label], report.bytes[label] = subkeys, size
    return report


def storage_report(dht: hivemind.DHT, names: list[str] = ()) -> StorageReport:
    """What ``dht``'s node holds now (see :class:`StorageReport`); ``names``: keys to report one by one."""
    return dht.run_coroutine(_call(_report, list(names)))
