"""One peer's presence in the swarm: its DHT node, its announced status, its averager and its training state.

The peer keeps the invariant the round relies on: whenever live peers that outweigh it agree on a state (later epoch,
or the same epoch with a different hash), a peer that holds another one replaces its own with theirs — downloaded
from one of them, and validated (names, shapes, finite values, the announced hash) before it is used. Weights come
from :class:`~swarm.node.trust.Trust`: announcements of identities without weight change nothing.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import PeerID

from swarm.config import SwarmConfig
from swarm.errors import UserError
from swarm.identity import Identity
from swarm.network.averager import RoundKey, SwarmAverager, _invert
from swarm.network.compression import make_compression
from swarm.network.dht import start_dht
from swarm.network.reachability import resolve_client_mode
from swarm.network.records import PeerStatus, StatusBoard
from swarm.network.run_records import RunAnnouncement, RunBoard
from swarm.network.startup import StartStalled, start_retrying
from swarm.network.validation import RecordBounds
from swarm.node.state import TrainingState
from swarm.node.trust import Trust
from swarm.shared_settings import fingerprint, shared_settings

# WORKDIR/contributions/epoch-E.pt: kept for auditors, served by the averager
CONTRIBUTION_DIR = "contributions"

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
NEWER_STATE_WAIT = 3.0  # how long a peer waits for the swarm to announce a state a holder served
# consecutive failed status updates (two peer timeouts of heartbeats) = lost the swarm
MAX_PUBLISH_FAILURES = 6
LINEAGE_EPOCHS = 1024  # how many of its past (epoch, state hash) pairs a peer remembers (SwarmPeer.lineage)


def _quiet_lost_daemon(args: threading.ExceptHookArgs) -> None:
    """Ctrl+C in a terminal also stops p2pd; hivemind's averager thread then dies on the missing socket while
    shutting down. That is expected and not actionable, so it is logged at debug level instead of a traceback."""
    if (
        args.thread is not None
        and "_run_internal" in args.thread.name
        and isinstance(args.exc_value, OSError)
    ):
        logger.debug(f"hivemind averager thread stopped: {args.exc_value!r}")
        return
    _default_excepthook(args)


_default_excepthook = threading.excepthook


Snapshot = tuple[dict[str, Any], list[torch.Tensor]]
Announced = Callable[[PeerStatus], PeerStatus]
Served = Callable[[dict[str, Any], list[torch.Tensor]], Snapshot]


def _unchanged_status(status: PeerStatus) -> PeerStatus:
    return status


def _unchanged_state(metadata: dict[str, Any], tensors: list[torch.Tensor]) -> Snapshot:
    return metadata, tensors


class SwarmPeer:
    """A training state that is kept in lock-step with the swarm.

    :param config: the peer's config (network, averaging and run id are used here)
    :param identity: the peer's key; its DHT node and records use it
    :param state: views over the model and the local optimizer
    :param epoch: the epoch ``state`` is at (0, or the epoch of a resumed checkpoint)
    """

    def __init__(
        self,
        config: SwarmConfig,
        identity: Identity,
        state: TrainingState,
        epoch: int = 0,
        trust: Trust | None = None,
        samples: int = 0,
        lineage: dict[int, str] | None = None,
    ):
        self.config, self.identity, self.state = config, identity, state
        # without a ledger given, peers count as identities (tests of the decisions; the trainer passes its own)
        self.trust = trust if trust is not None else Trust(str(identity.peer_id), config, None, None)
        # held while the state changes, so snapshots served to peers are consistent
        self.lock = threading.RLock()
        self.epoch = epoch
        self.state_hash = state.state_hash(epoch)
        # epoch -> the state hash this peer held at it, on the branch of its current state (a downloaded state
        # starts a new one): how it tells a peer behind it on its own history from one on another branch
        self.lineage: dict[int, str] = {
            past: digest for past, digest in (lineage or {}).items() if past < epoch
        }
        self.lineage[epoch] = self.state_hash
        # computed by this peer in the rounds it stepped on (a resumed peer's included)
        self.samples = samples
        self.last_reward: float | None = None
        self.ready_epoch = -1
        # peers this peer refuses to wait for, average with or load from
        self.banned: frozenset[str] = frozenset()
        self.settings = shared_settings(config)
        self.fingerprint = fingerprint(self.settings)
        self.foreign: set[str] = set()  # peers of this run id announcing other shared settings: never counted
        self.dht = self.board = self.averager = None
        self._stop = threading.Event()
        self._publish_failures = 0
        self._seen: dict[str, tuple[float, PeerStatus]] = {}  # peer id -> (when last read, status)
        # peer id -> when last read, kept for averaging.partition_grace (SwarmPeer.has_quorum)
        self._last_seen: dict[str, float] = {}
        self._heartbeat: threading.Thread | None = None
        # what this peer announces and serves: itself, unless a cheater of the attack suite filters it
        self._status_filter: Announced = _unchanged_status
        self._state_filter: Served = _unchanged_state

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    @property
    def round_key(self) -> RoundKey:
        return self.epoch, self.state_hash

    def start(self) -> None:
        """Join (or start) the swarm and begin announcing this peer. :raises UserError: if no initial peer answers"""
        averaging = self.config.averaging
        reason = resolve_client_mode(self.config.network)
        logger.info(f"client mode {'on' if self.config.network.client_mode else 'off'}: {reason}")
        self.dht = start_dht(
            self.config.network,
            self.identity,
            self.config.workdir,
            run_id=self.config.run_id,
            record_bounds=RecordBounds.from_config(self.config),
        )
        self.board = StatusBoard(self.dht, self.config.run_id, self.identity, ttl=averaging.peer_timeout)
        self.runs = RunBoard(self.dht, self.identity, ttl=averaging.peer_timeout)
        buffers = [torch.zeros_like(param, device="cpu") for param in self.state.params]
        # hivemind ignores SIGINT in this process before forking the averager and never restores it: keep Ctrl+C
        sigint_handler = signal.getsignal(signal.SIGINT)
        threading.excepthook = _quiet_lost_daemon  # inherited by the averager process forked below
        try:
            self.averager = self._start_averager(buffers)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint_handler)
        self.publish()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="swarm-heartbeat", daemon=True)
        self._heartbeat.start()

    def _start_averager(self, buffers: list[torch.Tensor]) -> SwarmAverager:
        """Start the averager process; one that stalls or dies while starting is killed and started once more.

        :raises UserError: when the second start fails the same way
        """
        averaging = self.config.averaging

        def make() -> SwarmAverager:
            return SwarmAverager(
                buffers,
                self.dht,
                state_provider=self.snapshot,
                prefix=f"{self.config.run_id}_grads",
                start=False,
                min_group_size=2,
                min_matchmaking_time=averaging.matchmaking_time,
                request_timeout=3.0,
                allreduce_timeout=averaging.allreduce_timeout,
                next_chunk_timeout=averaging.allreduce_timeout / 3,
                compression=make_compression(averaging.compression),
                aggregation=averaging.aggregation,
                clip_tau=averaging.clip_tau,
                clip_iterations=averaging.clip_iterations,
                contributions_dir=Path(self.config.workdir) / CONTRIBUTION_DIR,
                max_weight=averaging.max_weight,
                keep_received_epochs=self.config.verify.audit_window if self.config.verify.enabled else 0,
                client_mode=self.config.network.client_mode,
                declare_state_period=averaging.peer_timeout,
                shutdown_timeout=3,
            )

        try:
            return start_retrying(make, self.config.network.startup_timeout, what="averager")
        except StartStalled as error:
            raise UserError(f"could not start the averager: {error}") from None

    def shutdown(self) -> None:
        """Announce that this peer leaves (so the others stop counting it at once instead of after ``peer_timeout``),
        stop announcing, shut the averager and the DHT (and their p2p daemon) down. Safe to call twice."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2.0)  # its last status must not land after the farewell
            self._heartbeat = None
            self._announce_leaving()
        # on Ctrl+C the terminal also stops p2pd, and hivemind then logs tracebacks about the missing daemon
        logging.getLogger("hivemind").setLevel(logging.CRITICAL)
        if self.averager is not None:
            self.averager.shutdown()
            self.averager = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    # ---- status -----------------------------------------------------------------------------------------------
    def filter_announcements(
        self,
        status: Announced | None = None,
        served: Served | None = None,
    ) -> None:
        """Pass what this peer announces (its status record) and what it serves to peers that download its state
        through ``status`` and ``served``. The seam of the attack suite's cheaters that lie about their state
        (:mod:`swarm.verify.attacks`); an honest peer never calls it. Call before :meth:`start`."""
        if status is not None:
            self._status_filter = status
        if served is not None:
            self._state_filter = served

    def status(self) -> PeerStatus:
        return self._status_filter(self._status())

    def _status(self) -> PeerStatus:
        return PeerStatus(
            peer_id=self.peer_id,
            name=self.identity.name,
            epoch=self.epoch,
            state_hash=self.state_hash,
            ready_epoch=self.ready_epoch,
            samples=self.samples,
            reward=self.last_reward,
            client_mode=self.config.network.client_mode,
            fingerprint=self.fingerprint,
        )

    def _announce_leaving(self) -> None:
        try:
            self.board.publish(self.status().model_copy(update={"left": True, "ready_epoch": -1}))
        except Exception as error:  # best effort: without it the others notice after peer_timeout
            logger.debug(f"Could not announce leaving: {error!r}")

    def publish(self) -> None:
        try:
            stored = self.board.publish(self.status())
        except Exception as error:  # a transient DHT failure must not kill training; the heartbeat retries
            logger.warning(f"Could not publish status: {error!r}")
            stored = False
        self._publish_failures = 0 if stored else self._publish_failures + 1
        try:  # what a joiner reads to land in this run (swarm/network/run_records.py)
            self.runs.publish(
                RunAnnouncement(
                    peer_id=self.peer_id,
                    run_id=self.config.run_id,
                    fingerprint=self.fingerprint,
                    settings=self.settings,
                )
            )
        except Exception as error:
            logger.debug(f"Could not announce the run: {error!r}")

    def check_alive(self) -> None:
        """:raises UserError: if this peer has lost its DHT node (e.g. its p2p daemon was killed)."""
        if self.dht is None or not self.dht.is_alive() or self._publish_failures >= MAX_PUBLISH_FAILURES:
            raise UserError(
                f"{self.identity.name}: lost contact with the swarm (DHT node down or {self._publish_failures}"
                " status updates failed in a row); the checkpoint is saved, restart the peer to rejoin"
            )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.averaging.peer_timeout / 3):
            self.publish()

    def other_peers(self) -> dict[str, PeerStatus]:
        """Live peers other than this one. A peer seen within ``peer_timeout`` stays listed (with its last status)
        even if one read of the DHT misses it, so a slow or failed lookup never makes the swarm look empty; a peer
        whose status says it ``left`` is dropped at once."""
        try:
            fresh = self.board.fetch()
        except Exception as error:
            logger.warning(f"Could not read peer statuses: {error!r}")
            fresh = {}
        fresh.pop(self.peer_id, None)
        for peer_id in self.banned:
            fresh.pop(peer_id, None)
            self._seen.pop(peer_id, None)
            self._last_seen.pop(peer_id, None)
        for peer_id, status in list(fresh.items()):
            if status.fingerprint != self.fingerprint:
                fresh.pop(peer_id)
                self._seen.pop(peer_id, None)
                self._last_seen.pop(peer_id, None)
                if peer_id not in self.foreign:
                    self.foreign.add(peer_id)
                    logger.warning(
                        f"{status.name} ({peer_id}) is in run {self.config.run_id!r} with other shared "
                        f"settings (fingerprint {status.fingerprint or 'none'}, this peer's "
                        f"{self.fingerprint}): not averaged with; `swarm doctor --join` with its "
                        f"address names the differences"
                    )
                    self._update_averager_bans()
        now = time.monotonic()
        for peer_id, status in fresh.items():
            if status.left:
                self._seen.pop(peer_id, None)
                self._last_seen.pop(peer_id, None)
            else:
                self._seen[peer_id] = (now, status)
                self._last_seen[peer_id] = now
        horizon = now - self.config.averaging.peer_timeout
        self._seen = {peer_id: seen for peer_id, seen in self._seen.items() if seen[0] >= horizon}
        grace = now - max(self.config.averaging.partition_grace, self.config.averaging.peer_timeout)
        self._last_seen = {peer_id: seen for peer_id, seen in self._last_seen.items() if seen >= grace}
        return {peer_id: status for peer_id, (_, status) in self._seen.items()}

    def has_quorum(self, others: dict[str, PeerStatus]) -> bool:
        """Whether this peer, with the live peers ``others`` it sees, is the swarm — and may step without the rest.

        The reference is the weight (:meth:`Trust.weight`: identities without weight add nothing) of this peer and
        every peer it read a status of in the last ``averaging.partition_grace`` seconds (one whose status said it
        ``left`` is dropped at once). This side holds a quorum when it sees more than half of that weight, or
        exactly half with the smallest peer id of the reference among it — so of two halves that see only
        themselves exactly one goes on, the same one on both sides, and the other waits for the network to heal
        (then it is behind and downloads the swarm's state) instead of stepping alone and forking. A peer that
        has seen nobody within the grace (the first peer of a swarm, or one whose peers all left or died that
        long ago) is the swarm on its own."""
        reference = {self.peer_id, *(peer_id for peer_id in self._last_seen if self.trust.known(peer_id))}
        visible = {self.peer_id, *(peer_id for peer_id in others if peer_id in reference)}
        total = sum(self.trust.weight(peer_id) for peer_id in reference)  # this peer's own is at least 1
        seen = sum(self.trust.weight(peer_id) for peer_id in visible)
        return 2 * seen > total or (2 * seen == total and min(reference) in visible)

    def set_banned(self, peer_ids: list[str]) -> None:
        """Exclude these peers: the barrier ignores them, state is never loaded from them, and the averager refuses
        them in matchmaking and drops their parts (see :meth:`SwarmAverager.set_banned`)."""
        banned = frozenset(peer_ids) - {self.peer_id}
        if banned == self.banned:
            return
        self.banned = banned
        self._update_averager_bans()

    def _update_averager_bans(self) -> None:
        if self.averager is not None:
            self.averager.set_banned(sorted(self.banned | self.foreign))

    def swarm_view(self) -> tuple[int, int]:
        """(peers online, samples contributed swarm-wide) from the statuses last read — no DHT round trip."""
        known = [status for _, status in self._seen.values()]
        return 1 + len(known), self.samples + sum(status.samples for status in known)

    def wait_for_peers(self, count: int, timeout: float) -> int:
        """Wait until ``count`` peers (this one included) are online or ``timeout`` passes; returns how many are.

        Peers announcing an epoch ahead of this one that nobody with weight backs (:meth:`swarm_target`) are not
        counted: a flood of fresh identities claiming a far epoch must not start a new swarm's first peer alone."""
        deadline = time.monotonic() + timeout
        while True:
            others = self.other_peers()
            target = self.swarm_target(others)
            online = 1 + sum(
                status.epoch <= self.epoch or (target is not None and status.epoch == target[0])
                for status in others.values()
            )
            if online >= count or time.monotonic() >= deadline or self._stop.is_set():
                return online
            time.sleep(POLL_INTERVAL)

    def linger(self, timeout: float) -> None:
        """Keep serving (state downloads, the last all-reduce) while live peers with weight are still behind this
        peer's epoch, so that a peer whose last round failed can download the final state instead of ending on
        another one. Identities without weight announcing they lag do not hold it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if not any(
                status.epoch < self.epoch and self.trust.known(peer_id)
                for peer_id, status in self.other_peers().items()
            ):
                return
            time.sleep(POLL_INTERVAL)

    # ---- state --------------------------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(metadata, tensors) of this peer's state, as served to peers that download it."""
        with self.lock:
            return self._state_filter(*self.state.snapshot(self.epoch))

    def set_ready(self, epoch: int | None) -> None:
        """Announce that this peer's contribution to the round of ``epoch`` is ready (published at once), or, with
        None, that it is in no round (published with the next status)."""
        self.ready_epoch = -1 if epoch is None else epoch
        if epoch is not None:
            self.publish()

    def note_reward(self, reward: float | None) -> None:
        """The mean reward of this peer's last epoch, for its status (None: the round had none)."""
        self.last_reward = reward

    def advance(self, epoch: int, samples: int) -> None:
        """After a step: the state is now at ``epoch``, with ``samples`` more computed by this peer."""
        with self.lock:
            self.samples += samples
            self.set_state_changed(epoch)

    def set_state_changed(self, epoch: int, branch: bool = False) -> None:
        """Call after the parameters changed (a step, or a load: ``branch``, whose history this peer does not
        know) to re-hash and re-announce the state."""
        with self.lock:
            self.epoch = epoch
            self.state_hash = self.state.state_hash(epoch)
            kept = {} if branch else self.lineage
            self.lineage = {past: digest for past, digest in kept.items() if past < epoch}
            self.lineage[epoch] = self.state_hash
            while len(self.lineage) > LINEAGE_EPOCHS:
                del self.lineage[min(self.lineage)]
        self.publish()

    def on_another_branch(self, status: PeerStatus) -> bool:
        """Whether ``status`` announces a state at an epoch this peer has passed that is not the one this peer
        held there: it was made without this peer (the other side of a partition, or of a restart), not on the
        way to this peer's state. A peer merely behind on this peer's history announces the hash this peer had."""
        known = self.lineage.get(status.epoch)
        return status.epoch < self.epoch and known is not None and known != status.state_hash

    def _support(self, key: RoundKey, others: dict[str, PeerStatus], excluding: str | None = None) -> float:
        """The total weight of the live peers in ``others`` (but ``excluding``) that announce ``key``."""
        return sum(
            self.trust.weight(peer_id)
            for peer_id, status in others.items()
            if (status.epoch, status.state_hash) == key and peer_id != excluding
        )

    def _announced_by(self, key: RoundKey, support: float, excluding: str | None = None) -> bool:
        """Whether live peers other than ``excluding`` of total weight at least ``support`` announce ``key``,
        waiting up to ``NEWER_STATE_WAIT`` s for it."""
        deadline = time.monotonic() + NEWER_STATE_WAIT
        while True:
            if self._support(key, self.other_peers(), excluding) >= support:
                return True
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(POLL_INTERVAL)

    def swarm_target(self, others: dict[str, PeerStatus]) -> RoundKey | None:
        """The state this peer should adopt, or None to keep its own.

        Candidates are the (epoch, state hash) pairs live peers announce at this peer's epoch or later, each
        supported by the total *weight* of the peers announcing it (:meth:`Trust.weight`: identities without weight
        add nothing). The best is the best supported, ties going to the *earlier* epoch (an honest swarm moves one
        epoch per round; a far-ahead claim is the suspicious one), then to the smaller hash. It is adopted when it
        weighs at least as much as this peer's own state (this peer's own weight, at least 1, included) — or, at
        this peer's own epoch, strictly more or as much with a smaller hash (so two disagreeing peers do not swap).
        On a tie, a later state is adopted only when it is one epoch ahead (the member whose step this peer
        missed) or an initial peer announces it (a newcomer follows the swarm it joined): a member of equal weight
        claiming a far-ahead epoch is not followed.

        A state at an *earlier* epoch is a candidate only when it is on another branch (:meth:`on_another_branch`:
        not the hash this peer held at that epoch), and it is adopted only when it weighs strictly more than this
        peer's state and than any later candidate: the heavier side of a healed partition, or of a restart, is the
        swarm, whatever epoch the lighter side counted up to alone; its epochs are discarded. A peer merely behind
        on this peer's history is never a reason to go back.

        So any number of fresh identities announcing a far epoch is never followed, and a peer behind a swarm that
        outweighs it (a late joiner, or the member whose last all-reduce failed) adopts the swarm's state. Where
        the weighted peers disagree evenly one epoch apart (two peers of equal weight), a liar among them can
        still be followed.
        """
        weights: dict[RoundKey, float] = {}
        branches: dict[RoundKey, float] = {}  # earlier states on another branch
        for peer_id, status in others.items():
            if (weight := self.trust.weight(peer_id)) <= 0:
                continue
            key = (status.epoch, status.state_hash)
            if status.epoch >= self.epoch:
                weights[key] = weights.get(key, 0.0) + weight
            elif self.on_another_branch(status):
                branches[key] = branches.get(key, 0.0) + weight
        mine = self.round_key
        support = weights.pop(mine, 0.0) + max(1.0, self.trust.weight(self.peer_id))
        later = self._later_target(weights, support, others)
        if branches:
            branch = max(branches, key=lambda key: (branches[key], key[0], _invert(key[1])))
            if branches[branch] > max(support, weights.get(later, 0.0) if later else 0.0):
                return branch
        return later

    def _later_target(
        self, weights: dict[RoundKey, float], support: float, others: dict[str, PeerStatus]
    ) -> RoundKey | None:
        """:meth:`swarm_target`'s choice among the states at this peer's epoch or later (``weights``: their
        support, this peer's own state taken out and counted in ``support``)."""
        if not weights:
            return None
        mine = self.round_key
        best = max(weights, key=lambda key: (weights[key], -key[0], _invert(key[1])))
        if weights[best] > support:
            return best
        if weights[best] < support:
            return None
        # a tie: a state one epoch ahead (the member whose step this peer missed), one an initial peer announces
        # (a newcomer follows the swarm it joined), or, at this epoch, the smaller hash; never a far-ahead claim
        if best[0] == self.epoch + 1 or best[0] == self.epoch and best[1] < mine[1]:
            return best
        backed = any(
            peer_id in self.trust.roots and (status.epoch, status.state_hash) == best
            for peer_id, status in others.items()
        )
        return best if best[0] > self.epoch and backed else None

    def sync_with_swarm(self, others: dict[str, PeerStatus] | None = None) -> bool:
        """Adopt the swarm's state if it differs from this peer's. Returns True if the state was replaced."""
        others = self.other_peers() if others is None else others
        target = self.swarm_target(others)
        if target is None:
            return False
        holders = [
            peer_id
            for peer_id, status in others.items()
            if (status.epoch, status.state_hash) == target and self.trust.known(peer_id)
        ]
        if target[0] < self.epoch:
            logger.warning(
                f"{self.identity.name}: the swarm's state is on another branch at epoch {target[0]} and outweighs"
                f" this peer's (epoch {self.epoch}, made without it): downloading it; this peer's epochs since"
                " are discarded"
            )
        else:
            logger.info(
                f"{self.identity.name}: swarm is at epoch {target[0]}, this peer at {self.epoch}: downloading"
            )
        if self.download_state(holders, target):
            return True
        logger.warning(
            f"{self.identity.name}: no holder served an acceptable state of epoch {target[0]}; keeping"
            f" this peer's own (epoch {self.epoch})"
        )
        return False

    def download_state(self, holders: list[str], target: RoundKey) -> bool:
        """Load the state ``target`` (epoch, state hash) that ``holders`` announced, from the first that serves it.

        A holder may serve a later state only if it moved on while asked: that state is taken once live peers
        other than that holder, of at least the weight that announced ``target``, announce it (waiting up to ``NEWER_STATE_WAIT`` seconds for
        their statuses). Any other state — one a holder alone vouches for — is refused, so a holder cannot make
        this peer load something the swarm did not announce. A served state that fails validation (names,
        shapes, non-finite values, its hash) is refused and its holder loses all weight (:meth:`Trust.refuse`)."""
        holders = [
            peer_id for peer_id in holders if peer_id not in self.banned and peer_id not in self.trust.refused
        ]
        support = max(1.0, sum(self.trust.weight(peer_id) for peer_id in holders))
        for peer_id in random.sample(holders, len(holders)):
            result = self.averager.download_state(
                PeerID.from_base58(peer_id), timeout=self.config.averaging.allreduce_timeout
            )
            if result is None:
                continue
            metadata, tensors = result
            served = (metadata.get("epoch"), metadata.get("state_hash"))
            if not (isinstance(served[0], int) and isinstance(served[1], str)):
                continue
            # a later state must be vouched for by others than the holder that serves it (a liar vouches for itself)
            vouch = max(1.0, support - self.trust.weight(peer_id))
            if served != tuple(target) and not (
                served[0] > target[0] and self._announced_by(served, vouch, excluding=peer_id)
            ):
                logger.warning(
                    f"Refused the state served by {peer_id}: epoch {served[0]} hash {served[1][:12]} is"
                    f" not the announced epoch {target[0]} hash {target[1][:12]}"
                )
                continue
            try:
                with self.lock:
                    epoch = self.state.load(metadata, tensors)
            except ValueError as error:
                logger.warning(f"Rejected the state served by {peer_id}: {error}; it no longer counts")
                self.trust.refuse(peer_id)
                continue
            self.set_state_changed(epoch, branch=True)
            logger.info(f"{self.identity.name}: loaded epoch {epoch} from {peer_id}")
            return True
        return False
