"""The default strategy (``averaging.strategy: sync``): synchronous gradient averaging, one optimizer step per
swarm epoch.

One round, as :meth:`SyncGradientAveraging.round` runs it with the gradient the epoch computed:

1. announce "ready for epoch e" and wait until every live peer at epoch e is ready too (a barrier through DHT
   records; a peer that has gone silent for ``peer_timeout`` is not waited for, nor anyone past ``round_timeout``);
2. average the gradient with the group (weights = sample counts) — bit-identical on every member;
3. every member whose (epoch, state hash) is the group's consensus gets the average as its update, and
   :meth:`~swarm.training.strategies.base.GradientStep.step` applies the same step: θ_e → θ_{e+1}.

A peer that finds the swarm ahead of it, or outside the group's consensus, discards its gradient and downloads
the swarm's state instead; "the swarm" is what outweighs this peer (:meth:`SwarmPeer.swarm_target`), so
identities without weight claiming a later epoch are not followed. A peer with nobody else at its epoch steps on
its own gradient. If averaging keeps failing until ``round_timeout`` the state is left untouched and the epoch is
recomputed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from swarm.network.averager import RoundKey, round_key_of, weighted_consensus
from swarm.network.records import PeerStatus
from swarm.node.peer import POLL_INTERVAL, SwarmPeer
from swarm.node.rounds import Outcome, RoundResult
from swarm.node.state import tensors_hash
from swarm.training.strategies.base import GradientStep, RoundInput

logger = logging.getLogger(__name__)

RETRY_PAUSE = 1.0


class SyncGradientAveraging(GradientStep):
    """Turns the gradient a peer computed into one swarm-wide optimizer step (see the module docstring).

    :param peer: the peer whose state, averager and status board are used
    :param optimizer: the local optimizer that applies the (averaged) gradient
    :param max_grad_norm: clip the averaged gradient to this norm (0: no clipping) — after averaging, so the clip is
      identical on every peer
    """

    def __init__(
        self, peer: SwarmPeer, optimizer: torch.optim.Optimizer, max_grad_norm: float, **options: Any
    ):
        super().__init__(peer, optimizer, max_grad_norm, **options)
        self.expected_group = 2
        self.catch_up_grace = 3 * peer.config.averaging.matchmaking_time
        self._newcomer_wait: dict[
            str, float
        ] = {}  # peer id without weight -> seconds the barrier waited for it
        self._expected: set[str] = set()  # the other peers the last 'go' expected in the group
        self._expected_in_step: set[str] = (
            set()
        )  # those of them that announced this peer's (epoch, state hash)

    def round(self, work: RoundInput) -> RoundResult:
        """Meet the swarm with ``work.gradient`` (see the module docstring); the result's ``update`` is the
        gradient to step on (AVERAGED, SOLO), or None (RESYNCED, SKIPPED)."""
        peer, averaging = self.peer, self.peer.config.averaging
        peer.check_alive()
        epoch, samples, commitment = work.epoch, work.samples, work.commitment
        if epoch != peer.epoch:
            raise ValueError(f"a gradient of epoch {epoch} handed to a round at epoch {peer.epoch}")
        local = [grad.detach().to("cpu", copy=True) for grad in work.gradient]
        weight = float(min(samples, averaging.max_weight))
        deadline = time.monotonic() + averaging.round_timeout
        try:
            while True:
                verdict = self._barrier(epoch, deadline)
                if verdict == "behind":
                    if not peer.sync_with_swarm():
                        # nobody served the state: do not spin on recomputing the epoch
                        time.sleep(RETRY_PAUSE)
                    return RoundResult(Outcome.RESYNCED, epoch)
                if verdict == "alone":
                    return RoundResult(Outcome.SOLO, epoch, update=local, samples=samples)
                averaging_started = time.monotonic()
                gathered = self._average(local, epoch, weight, commitment)
                if gathered is None:
                    # hivemind's all-reduce can fail on one side only: the others then stepped with this peer's
                    # gradient in their average, and theirs is the state it should have. Counting them as members
                    # (the weight a successful round would have given them) lets the next barrier follow them
                    # instead of stepping alone — which, for the first peer of a swarm, would fork it off
                    peer.trust.note_round(epoch, self._expected_in_step)
                self._charge_no_shows(gathered or {}, time.monotonic() - averaging_started)
                if gathered is not None:
                    consensus = self._consensus(gathered)
                    if consensus != (epoch, peer.state_hash):
                        holders = [
                            str(pid) for pid, item in gathered.items() if round_key_of(item) == consensus
                        ]
                        peer.download_state(holders, consensus) or peer.sync_with_swarm()
                        return RoundResult(Outcome.RESYNCED, epoch, len(gathered))
                    with peer.averager.get_tensors() as averaged:
                        result = [tensor.clone() for tensor in averaged]
                    if all(torch.isfinite(tensor).all() for tensor in result):
                        peer.trust.note_round(
                            epoch,
                            [str(pid) for pid, item in gathered.items() if round_key_of(item) == consensus],
                        )
                        commitments = {
                            str(pid): item["commitment"]
                            for pid, item in gathered.items()
                            if round_key_of(item) == consensus and isinstance(item.get("commitment"), str)
                        }
                        declared = {
                            str(pid): item.get("samples")
                            for pid, item in gathered.items()
                            if str(pid) in commitments and isinstance(item.get("samples"), int | float)
                        }
                        return RoundResult(
                            Outcome.AVERAGED,
                            epoch,
                            len(gathered),
                            commitments,
                            tensors_hash(epoch, result),
                            declared,
                            update=result,
                            samples=samples,
                        )
                    logger.warning(f"epoch {epoch}: the averaged gradient is not finite; retrying")
                if time.monotonic() >= deadline:
                    logger.warning(f"epoch {epoch}: averaging failed until the round timeout; recomputing")
                    return RoundResult(Outcome.SKIPPED, epoch)
                # a failure can be one-sided (the others finished and stepped): let their new status reach the DHT
                # so that the next barrier sees them ahead and downloads their state instead of waiting for a group
                time.sleep(RETRY_PAUSE)
        finally:
            peer.set_ready(None)

    def _barrier(self, epoch: int, deadline: float) -> str:
        """'go', 'alone' (no other live peer can join this epoch) or 'behind' (the swarm's state is at a later epoch:
        :meth:`SwarmPeer.swarm_target`).

        Only peers with weight (:meth:`Trust.known`) are waited for until ``deadline``; those one or more epochs
        behind are catching up (they download this epoch's state), and are waited for ``catch_up_grace`` seconds
        at most. Peers without weight — any fresh identity — are waited for ``trust.newcomer_wait`` seconds at most
        per epoch and ``trust.newcomer_budget`` seconds in all per identity (a round it was expected in but did not
        join costs it the round, at least a quarter of the budget: see :meth:`_charge_no_shows`), so that announcing 'busy', 'lagging' or 'ready' from free identities
        cannot stall the swarm for long, while an honest newcomer still gets its first rounds in which to become a
        member. Once that wait is over, newcomers that are ready still go into the group; only those that are not
        are left behind. A peer that sees nobody with weight at all (the first peer of a new swarm) charges no
        budget for waiting (only no-shows spend it there) and does not step alone while newcomers at its epoch may still get ready (until ``deadline``): it
        costs only its own time, and a first peer that ran ahead of the newcomers would be left outside the group
        they form. On 'go', ``self.expected_group`` is the number of peers expected in the group, this one
        included."""
        peer, trust = self.peer, self.peer.trust
        peer.set_ready(epoch)
        started = last = time.monotonic()
        waiting_on: list[str] = []
        partitioned = False  # waiting without a quorum (SwarmPeer.has_quorum)
        catch_up_deadline = started + self.catch_up_grace
        newcomer_deadline = started + peer.config.trust.newcomer_wait
        while True:
            others = peer.other_peers()
            target = peer.swarm_target(others)
            # a later state, or a heavier branch at an earlier epoch (a healed split)
            if target is not None and target[0] != epoch:
                return "behind"
            # peers ahead that the swarm does not follow (see SwarmPeer.swarm_target) are neither waited for nor
            # averaged with: they are not at this epoch
            now = time.monotonic()
            for peer_id in waiting_on:  # what the last poll waited for
                self._charge(peer_id, now - last)
            last = now
            patient = now < newcomer_deadline
            founding = not any(trust.known(peer_id) for peer_id in others)
            waited = [status for status in others.values() if self._counted(status, epoch, founding, patient)]
            same = [status for status in waited if status.epoch == epoch]
            lagging = [status for status in waited if status.epoch < epoch] if now < catch_up_deadline else []
            can_reduce = any(not status.client_mode for status in same) or not peer.config.network.client_mode
            if not lagging and (not same or not can_reduce):
                # the first peer of a swarm steps alone only when no newcomer at its epoch gets ready in the round:
                # stepping ahead of them would leave it outside the group they then form without it
                if not (
                    founding
                    and now < deadline
                    and any(
                        status.epoch == epoch and self._newcomer_budget(status.peer_id) > POLL_INTERVAL
                        for status in others.values()
                    )
                ):
                    if peer.has_quorum(others):
                        if partitioned:
                            logger.warning(f"epoch {epoch}: the missing peers count as gone; stepping alone")
                        return "alone"
                    # a minority side of a partition: stepping alone would fork it off the swarm, which goes on
                    # without it; once the network heals this peer is behind and downloads the swarm's state
                    if not partitioned:
                        logger.warning(
                            f"epoch {epoch}: this peer sees at most half the weight it saw in the last"
                            f" {peer.config.averaging.partition_grace:.0f}s (a partition, or peers gone): not"
                            " stepping alone; waiting for them"
                        )
                    partitioned, waiting_on = True, []
                    time.sleep(POLL_INTERVAL)
                    continue
            unready = lagging + [status for status in same if status.ready_epoch != epoch]
            if same and (not unready or now >= deadline):
                self.expected_group = 1 + len(same)
                self._expected = {status.peer_id for status in same}
                self._expected_in_step = {
                    status.peer_id for status in same if status.state_hash == peer.state_hash
                }
                return "go"
            # while founding, nobody is charged: there is nobody else to wait for anyway
            waiting_on = [] if founding else [status.peer_id for status in unready]
            time.sleep(POLL_INTERVAL)

    def _counted(self, status: PeerStatus, epoch: int, founding: bool, patient: bool) -> bool:
        """Whether the barrier counts ``status``'s peer: known; or a newcomer with budget left (any newcomer while
        founding) that is ready at ``epoch``, or that is still waited for (``patient``)."""
        if self.peer.trust.known(status.peer_id):
            return True
        if self._newcomer_budget(status.peer_id) <= POLL_INTERVAL:  # founding too: no-shows spend it
            return False
        return patient or (status.epoch == epoch and status.ready_epoch == epoch)

    def _newcomer_budget(self, peer_id: str) -> float:
        """Seconds the barrier may still wait for ``peer_id`` while it has no weight (see :meth:`_barrier`)."""
        return self.peer.config.trust.newcomer_budget - self._newcomer_wait.get(peer_id, 0.0)

    def _charge_no_shows(self, gathered: dict, seconds: float) -> None:
        """Matchmaking waits for the group size the barrier expected: every peer without weight that was expected
        but did not join (it announced 'ready' and never came, or the round failed) is charged the ``seconds`` the
        round took, and at least a quarter of its budget — four no-shows and the barrier stops counting it, also
        while this peer is founding a swarm (a free identity that announces 'ready' and never comes must not hold
        a swarm's first epoch forever). It can still join a group it finds, and then it is a member."""
        joined = {str(peer_id) for peer_id in gathered}
        charge = max(
            seconds, self.peer.config.averaging.matchmaking_time, self.peer.config.trust.newcomer_budget / 4
        )
        for peer_id in self._expected - joined:
            self._charge(peer_id, charge)
        self._expected = set()

    def _charge(self, peer_id: str, seconds: float) -> None:
        if not self.peer.trust.known(peer_id):
            self._newcomer_wait[peer_id] = self._newcomer_wait.get(peer_id, 0.0) + seconds

    def _consensus(self, gathered: dict) -> RoundKey:
        """The (epoch, state hash) of the group: the members' announced keys counted by weight, this peer's own
        included with at least 1 (:func:`~swarm.network.averager.weighted_consensus`), so members without weight
        cannot outvote it. The averager process decides with the same weights whether this peer's part counts."""
        keys = {str(peer_id): round_key_of(item) for peer_id, item in gathered.items()}
        return weighted_consensus(keys, self._member_weight) or self.peer.round_key

    def _member_weight(self, peer_id: str) -> float:
        weight = self.peer.trust.weight(peer_id)
        return max(1.0, weight) if peer_id == self.peer.peer_id else weight

    def _average(
        self, local: list[torch.Tensor], epoch: int, weight: float, commitment: str | None
    ) -> dict | None:
        peer, averaging = self.peer, self.peer.config.averaging
        with peer.averager.get_tensors() as buffers:
            for buffer, grad in zip(buffers, local):
                buffer.copy_(grad)
        peer.averager.set_group_bits(format(epoch % 256, "08b"))
        if not peer.trust.counts_identities:
            peer.averager.set_member_weights(
                {peer_id: self._member_weight(peer_id) for peer_id in [peer.peer_id, *peer.other_peers()]}
            )
        peer.averager.set_target_group_size(self.expected_group)
        # only the peers the barrier expected at this epoch: one announcing another epoch must not take a place
        peer.averager.set_admitted(self._expected)
        try:
            gathered = peer.averager.step(
                gather=dict(epoch=epoch, state_hash=peer.state_hash, samples=weight, commitment=commitment),
                weight=weight,
                timeout=averaging.matchmaking_time * 3,
                allow_retries=False,
            )
        except Exception as error:
            logger.info(f"epoch {epoch}: averaging round failed ({type(error).__name__}: {error}); retrying")
            return None
        return gathered or None
