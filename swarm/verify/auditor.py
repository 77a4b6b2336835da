"""The verification layer as one peer runs it (docs/design.md §2, steps 4 and 7): commit, audit, re-check, ban.

Per epoch, around the strategy's round (:meth:`swarm.training.trainer.SwarmTrainer.run_epoch`):

1. :meth:`Verifier.remember_state` keeps the trainable parameters θ_e (auditors replay from them);
2. :meth:`Verifier.commit` writes the contribution to ``WORKDIR/contributions/epoch-E.pt`` (served to auditors
   over hivemind P2P for ``verify.audit_window`` epochs) and publishes its signed commitment; its digest travels
   with the all-reduce, so every group member knows what every other one committed to;
3. after an averaged round, :meth:`Verifier.after_round` derives the audits from the round's beacon
   (:mod:`swarm.verify.selection`): the same on every member;
4. :meth:`Verifier.process` runs this peer's audits — each one fetches the commitment and the served contribution
   and runs the list of checks :data:`swarm.verify.checks.AUDIT_CHECKS` (this module is the protocol around
   them, not the checks): the primary ones at once; a re-check when the primary auditor
   of a contribution this peer is assigned to re-check has failed it; a *takeover* by the first re-checker when
   the primary stays silent (its own all-reduce may have failed one-sidedly, so it never learnt the round's
   beacon): no verdict from it a whole round later, or, at the end of the run, once it left or after
   ``verify.fetch_timeout`` seconds. The takeover's verdict then stands for the primary's. A failure that a
   re-checker passed is *disputed*: every other member of the round replays it too (the escalation). A
   contribution passes when its (acting) primary passed it; otherwise this peer's own replay decides for it, and
   a peer that did not replay goes by weight over the round (:meth:`Verifier._decide`). A failed contribution's
   peer is banned from this peer's averaging for
   ``verify.ban_epochs`` epochs (matchmaking refuses it, its parts are dropped, the barrier ignores it) and the
   failure is appended to ``WORKDIR/audit_events.jsonl`` for the ledger.

A strategy of inner steps (DiLoCo) commits its epoch step by step instead (:meth:`Verifier.keep_inner_step`,
:meth:`Verifier.commit_inner`), and its audits replay the inner steps the beacon picks
(:meth:`Verifier._replay_inner`; swarm/verify/inner.py says what is checked).

Guarantees: an honest peer is never failed by an honest auditor (replays with the peer's own micro-batch split and
order are exact in fp32); a peer never bans itself; a verdict counts only if it comes from an auditor the beacon
assigned, about the commitment the group saw; nothing a remote peer serves or publishes can raise here.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from swarm.config import SwarmConfig
from swarm.network.averager import CONTRIBUTION, INNER_STATE, MANIFEST, STEP
from swarm.network.compression import as_received, make_compression
from swarm.network.records import AuditVerdict, Commitment, CommitmentBoard, VerdictBoard
from swarm.node.peer import CONTRIBUTION_DIR, POLL_INTERVAL, SwarmPeer
from swarm.node.rounds import Outcome, RoundResult
from swarm.node.state import TrainingState, make_optimizer, tensors_hash
from swarm.recipe import Recipe
from swarm.sampling import round_seed
from swarm.sharing import ExternalGroup, SharingError, check_shared
from swarm.trl_adapter import prompt_token_ids
from swarm.verify.checks import (
    AUDIT_CHECKS,
    GRADIENT_TOLERANCE,
    SAMPLING_MARGIN,
    SENT_TOLERANCE,
    TRANSIENT_FAILURES,
    AuditCase,
    CheckResult,
    Verdict,
    run_checks,
    shared_group_problem,
)
from swarm.verify.commitment import (
    MalformedContribution,
    contribution_bytes,
    gradient_hash,
    load_contribution,
    make_commitment,
    save_contribution,
    save_served,
)
from swarm.verify.contribution import Contribution
from swarm.verify.inner import (
    MalformedInnerPart,
    Manifest,
    StepLeaf,
    audited_steps,
    epoch_commitment,
    inner_state_bytes,
    inner_step_error,
    load_inner_state,
    optimizer_step,
    pseudo_gradient,
    start_state_hash,
    step_key,
)
from swarm.verify.replay import GRPOSettings, Replayer
from swarm.verify.selection import AuditAssignment, assign_audits

logger = logging.getLogger(__name__)

FETCH_RETRY_PAUSE = 0.5  # seconds between two requests for a contribution that was not served
# a primary auditor audits right after its round: with no verdict from it by the end of the round after, it is
# taken to be out of that round (one-sided all-reduce failure) and the first re-checker takes over
TAKEOVER_AFTER_EPOCHS = 2
# distinct failing auditors before a peer outside the round bans (and the ledger slashes)
UNSEEN_ROUND_QUORUM = 2

EVENTS_FILE = "audit_events.jsonl"


class VerificationObserver:
    """Hooks through which the ledger (or any other consumer) follows verification on this peer. Every hook is
    called from the training thread; an exception in a hook is logged and does not stop verification."""

    def on_round(self, epoch: int, commitments: dict[str, Commitment]) -> None:
        """An averaged round: the signed commitments of its consensus members (peer id -> commitment)."""

    def on_verdict(self, verdict: AuditVerdict) -> None:
        """This peer published ``verdict`` as an auditor."""

    def on_final(
        self, assignment: AuditAssignment, passed: bool, verdicts: list[AuditVerdict], current_epoch: int
    ) -> None:
        """The audit of ``assignment`` is decided (a majority of its auditors failed it, or it passed)."""

    def on_false_accusation(
        self,
        assignment: AuditAssignment,
        verdict: AuditVerdict,
        accuser_commitment: str | None,
        current_epoch: int,
    ) -> None:
        """The weighted re-check refuted ``verdict``'s failure of ``assignment``: its auditor is a false accuser
        (``accuser_commitment``: the digest of its own commitment in that round, None if it was not a member)."""

    def on_epoch_end(self, current_epoch: int) -> None:
        """Called after each round's verification work (replication, periodic roots, ...)."""


@dataclass
class AuditStats:
    """What the dashboard and trackers show about verification on this peer."""

    audits_done: int = 0  # replays this peer ran as an auditor
    cheats_found: int = 0  # of those, failed ones
    my_audits_passed: int = 0  # final outcomes of audits of this peer's contributions
    my_audits_failed: int = 0
    banned: list[str] = field(default_factory=list)


class Verifier:
    """One peer's part of the verification layer.

    :param config: the peer's config (``verify`` section, run id, training settings)
    :param peer: the peer (its DHT, averager and identity are used; its ``banned`` set is kept up to date)
    :param recipe: the recipe; auditors regenerate the audited peer's rows and re-score with its reward functions
    :param model: the training model (copied once, lazily, into a separate model that replays audits)
    :param tokenizer: the training tokenizer
    :param settings: the swarm's GRPO settings (a contribution computed with other ones fails)
    """

    def __init__(
        self,
        config: SwarmConfig,
        peer: SwarmPeer,
        recipe: Recipe,
        model: torch.nn.Module,
        tokenizer: Any,
        settings: GRPOSettings,
        observers: list[VerificationObserver] | None = None,
        attack: Any = None,
        inner_steps: int | None = None,
    ):
        self.config, self.peer, self.recipe = config, peer, recipe
        # H of a strategy of several inner steps per epoch (DiLoCo): contributions are then committed and audited
        # step by step (swarm/verify/inner.py); None: one gradient per epoch
        self.inner_steps = inner_steps
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.verify = config.verify
        self.directory = Path(config.workdir) / CONTRIBUTION_DIR
        self.events_path = Path(config.workdir) / EVENTS_FILE
        self.stats = AuditStats()
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # epoch -> trainable parameters θ_e
        # epoch -> the shared state's parameters in fp32 (DiLoCo: what a pseudo-gradient is taken from)
        self.starts: dict[int, list[torch.Tensor]] = {}
        self.assignments: dict[int, list[AuditAssignment]] = {}
        self.declared: dict[
            int, dict[str, float]
        ] = {}  # epoch -> the weight each member declared to the group
        self.performed: set[tuple[int, str]] = set()  # (epoch, audited) this peer has judged
        self._unpublished: list[AuditVerdict] = []  # verdicts no DHT node stored yet
        self.finalized: set[tuple[int, str]] = set()
        self.bans: dict[str, int] = {}  # peer id -> first epoch it may average again
        self._audit_model: torch.nn.Module | None = None
        self._replayer: Replayer | None = None  # replays on the audit model, reusing its TRL trainer
        self.commitments = self.verdicts = None
        self.observers = list(observers or [])
        self._finishing_since: float | None = None  # when finish() started (takeovers then go by time)
        self._live: set[str] = set()  # the other live peers, as finish() last read them
        self.round_digests: dict[
            int, dict[str, str]
        ] = {}  # epoch -> every consensus member's commitment digest
        # a cheating auditor (tests and demos): what it publishes instead of its verdicts
        self.attack = attack

    def _notify(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception as error:  # a broken consumer must never stop verification
                logger.warning(f"{type(observer).__name__}.{hook} failed: {type(error).__name__}: {error}")

    def figures(self) -> dict[str, int]:
        """Counters for the dashboard, status file and trackers."""
        stats = self.stats
        return dict(
            audits_done=stats.audits_done,
            cheats_found=stats.cheats_found,
            my_audits_passed=stats.my_audits_passed,
            my_audits_failed=stats.my_audits_failed,
            banned_peers=len(stats.banned),
        )

    @property
    def me(self) -> str:
        return self.peer.peer_id

    def start(self) -> None:
        """Call once the peer has joined (the boards need its DHT)."""
        ttl = self.verify.audit_window * self.config.averaging.round_timeout * 2
        self.commitments = CommitmentBoard(self.peer.dht, self.config.run_id, self.peer.identity, ttl)
        self.verdicts = VerdictBoard(self.peer.dht, self.config.run_id, self.peer.identity, ttl)

    # ---- before averaging ---------------------------------------------------------------------------------------
    def remember_state(self, epoch: int) -> None:
        """Keep θ_e (trainable parameters only: frozen ones never change) for the audit window."""
        self.snapshots[epoch] = [param.detach().to("cpu", copy=True) for param in self._trainable(self.model)]
        if self.inner_steps is not None:
            self.starts[epoch] = [
                param.detach().to("cpu", torch.float32, copy=True) for param in self.peer.state.params
            ]
        for old in [e for e in self.snapshots if e <= epoch - self.verify.audit_window]:
            del self.snapshots[old]
            self.starts.pop(old, None)

    def commit(self, epoch: int, contribution: Contribution) -> Commitment:
        """Keep the contribution for auditors and publish its commitment (before any gradient is sent)."""
        save_contribution(self.directory, epoch, contribution, keep_epochs=self.verify.audit_window)
        commitment = make_commitment(self.me, epoch, contribution, self.config.precision)
        if not self.commitments.publish(commitment):
            logger.warning(
                f"epoch {epoch}: the commitment could not be stored in the DHT; auditors will fail it"
            )
        return commitment

    def keep_inner_step(
        self,
        epoch: int,
        step: int,
        contribution: Contribution,
        inner: tuple[dict[str, Any], list[torch.Tensor]],
    ) -> StepLeaf:
        """Keep inner step ``step`` of a DiLoCo epoch for its auditors — its contribution and, after the first
        step, the inner state S_k it started from (``inner``: its :meth:`TrainingState.snapshot`) — and return its
        leaf of the epoch's manifest. Written to disk at once, so that a peer of many steps holds none of them."""
        keep = self.verify.audit_window
        save_served(self.directory, epoch, contribution_bytes(contribution), keep, STEP, step)
        metadata, tensors = inner
        if step > 0:  # S_0 is the swarm's state with a fresh optimizer: every auditor has it
            save_served(self.directory, epoch, inner_state_bytes(metadata, tensors), keep, INNER_STATE, step)
        key = step_key(epoch, step, self.inner_steps or 1)
        return StepLeaf.of(
            step, metadata["state_hash"], make_commitment(self.me, key, contribution, self.config.precision)
        )

    def commit_inner(
        self,
        epoch: int,
        leaves: list[StepLeaf],
        final: tuple[dict[str, Any], list[torch.Tensor]],
        pseudo_gradient: list[torch.Tensor],
    ) -> Commitment:
        """Publish the commitment of a DiLoCo epoch (:func:`~swarm.verify.inner.epoch_commitment`) before its
        pseudo-gradient is sent, and serve its manifest and final parameters θ_{e,n} (``final``)."""
        keep = self.verify.audit_window
        metadata, tensors = final
        save_served(
            self.directory, epoch, inner_state_bytes(metadata, tensors), keep, INNER_STATE, len(leaves)
        )
        manifest = Manifest(epoch=epoch, steps=leaves, final_hash=metadata["state_hash"])
        save_served(self.directory, epoch, manifest.to_bytes(), keep, MANIFEST)
        commitment = epoch_commitment(
            self.me, manifest, gradient_hash(epoch, pseudo_gradient), self.config.precision
        )
        if not self.commitments.publish(commitment):
            logger.warning(
                f"epoch {epoch}: the commitment could not be stored in the DHT; auditors will fail it"
            )
        return commitment

    def other_contribution(self, epoch: int, wait: float = 10.0) -> Contribution | None:
        """Another peer's committed contribution of ``epoch`` (what the ``copy`` attack submits as its own)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for peer_id in self.commitments.fetch(epoch):
                if peer_id != self.me and (contribution := self._download(peer_id, epoch)) is not None:
                    return contribution
            time.sleep(POLL_INTERVAL)
        return None

    def shared_group_problem(self, group: ExternalGroup) -> str | None:
        """Why another peer's shared group (rollout sharing) is not what its seeded sampler drew from the state of
        its epoch — which this peer held then and keeps for the audit window — or None when it is. The margin is
        that of the sender's committed precision class (the widest when its commitment cannot be read)."""
        if group.epoch not in self.snapshots:
            return f"this peer no longer holds (or never held) the state of epoch {group.epoch}"
        commitment = self.commitments.fetch(group.epoch).get(group.sender)
        margin = (
            SAMPLING_MARGIN[commitment.precision]
            if commitment is not None and commitment.precision in SAMPLING_MARGIN
            else max(SAMPLING_MARGIN.values())
        )
        settings = replace(self.settings, seed=round_seed(self.config.run_id, group.sender, group.epoch))
        return shared_group_problem(
            self._model_at(group.epoch),
            prompt_token_ids(self.tokenizer, group.row["prompt"]),
            [list(ids) for ids in group.completions],
            group.row_index,
            settings,
            settings.stop_token_ids,
            int(self.tokenizer.pad_token_id),
            margin,
        )

    # ---- after averaging ----------------------------------------------------------------------------------------
    def after_round(self, result: RoundResult) -> list[AuditAssignment]:
        """Derive the audits of an averaged round (the same on every member of its group)."""
        if result.outcome is not Outcome.AVERAGED or not result.commitments or result.averaged_digest is None:
            return []
        assignments = assign_audits(
            result.epoch,
            result.commitments,
            result.averaged_digest,
            self.verify.audit_probability,
            self.verify.recheck_auditors,
        )
        self.assignments[result.epoch] = assignments
        if self.observers:
            try:
                found = self.commitments.fetch(result.epoch)
            except Exception as error:
                logger.warning(f"Could not read commitments: {error!r}")
                found = {}
            members = {
                peer: found[peer]
                for peer, digest in result.commitments.items()
                if peer in found and found[peer].digest() == digest
            }
            self._notify("on_round", result.epoch, members)
        self.declared[result.epoch] = dict(result.declared_samples)
        self.round_digests[result.epoch] = dict(result.commitments)
        for old in [e for e in self.assignments if e <= result.epoch - self.verify.audit_window]:
            del self.assignments[old]
            self.declared.pop(old, None)
            self.round_digests.pop(old, None)
        # what was judged or decided long ago can no longer come up: a peer running for days keeps a window only
        horizon = result.epoch - self.verify.audit_window - TAKEOVER_AFTER_EPOCHS
        self.performed = {key for key in self.performed if key[0] > horizon}
        self.finalized = {key for key in self.finalized if key[0] > horizon}
        return assignments

    def process(self, current_epoch: int) -> None:
        """Run this peer's pending audits and re-checks, then decide final failures and bans."""
        self._unpublished = [verdict for verdict in self._unpublished if not self._publish_verdict(verdict)]
        everything: list[AuditVerdict] | None = None  # read once, only if this peer sits in an escalation
        for epoch, assignments in sorted(self.assignments.items()):
            for assignment in assignments:
                if self.me not in assignment.panel or (epoch, assignment.audited) in self.performed:
                    continue
                if assignment.auditors[0] == self.me:
                    self._audit(assignment, "primary")
                elif self.me in assignment.auditors:
                    role = self._recheck_role(
                        assignment, wait=epoch == current_epoch - 1, current_epoch=current_epoch
                    )
                    if role:
                        self._audit(assignment, role)
                else:
                    everything = self._read_verdicts(None) if everything is None else everything
                    verdicts = {
                        verdict.auditor: verdict
                        for verdict in self._verdicts_for(assignment, everything)
                        if verdict.epoch == epoch
                    }
                    if self._disputed(assignment, verdicts, current_epoch):
                        self._audit(assignment, "recheck")
        self._finalize(current_epoch)

    def finish(self, current_epoch: int, timeout: float) -> None:
        """At the end of training: keep auditing, and serving this peer's contributions, until every audit this peer
        takes part in (as auditor or audited) is decided, or ``timeout`` seconds pass. Leaving earlier would make
        this peer's last contributions unavailable to its auditors, which counts as a failed audit."""
        deadline = time.monotonic() + timeout
        self._finishing_since = time.monotonic()
        while True:
            self._live = set(self.peer.other_peers())  # nobody waits for a peer that has crashed or left
            self.process(current_epoch)
            pending = [
                assignment
                for assignments in self.assignments.values()
                for assignment in assignments
                if (assignment.epoch, assignment.audited) not in self.finalized
                and (assignment.audited == self.me or self.me in assignment.panel)
                and ({assignment.audited, *assignment.panel} - {self.me}) & self._live
            ]
            if not pending:
                return
            if time.monotonic() >= deadline:
                waiting = ", ".join(f"epoch {a.epoch} of {a.audited} by {a.auditors[0]}" for a in pending)
                logger.warning(f"audits still undecided after {timeout:.0f}s, leaving anyway: {waiting}")
                return
            time.sleep(POLL_INTERVAL)

    def _primary_silent(self, assignment: AuditAssignment, heard: set[str], current_epoch: int) -> bool:
        """Whether the primary auditor is taken to be out of this audit: it published no verdict (``heard``: the
        auditors with a verdict) and either ``TAKEOVER_AFTER_EPOCHS`` rounds have passed
        since, or this peer is finishing and the primary has left or stayed silent for ``verify.fetch_timeout``.

        An honest primary that took part in the round audits right after it, so its verdict is out long before the
        deadline: a re-checker that colludes with a cheater cannot pass it by "taking over" early."""
        if len(assignment.auditors) < 2:
            return False
        overdue = current_epoch >= assignment.epoch + TAKEOVER_AFTER_EPOCHS or (
            self._finishing_since is not None
            and (
                assignment.auditors[0] not in self._live
                or time.monotonic() - self._finishing_since >= self.verify.fetch_timeout
            )
        )
        return overdue and assignment.auditors[0] not in heard

    def _acting_primary(self, assignment: AuditAssignment, heard: set[str], current_epoch: int) -> str:
        """The auditor whose pass decides and whose failure calls for re-checks: the primary, or the first
        re-checker once the primary is silent (:meth:`_primary_silent`)."""
        return (
            assignment.auditors[1]
            if self._primary_silent(assignment, heard, current_epoch)
            else assignment.auditors[0]
        )

    def _recheck_role(self, assignment: AuditAssignment, wait: bool, current_epoch: int) -> str | None:
        """For a re-checker of ``assignment``: ``"takeover"`` when it is the acting primary, ``"recheck"`` when the
        acting primary has published a failure, else None. Waits briefly for the verdict on the last round."""
        deadline = time.monotonic() + (self.verify.fetch_timeout if wait else 0.0)
        while True:
            verdicts = {verdict.auditor: verdict for verdict in self._verdicts_for(assignment)}
            acting = self._acting_primary(assignment, set(verdicts), current_epoch)
            if acting == self.me:
                return "takeover"
            if acting in verdicts or time.monotonic() >= deadline:
                return "recheck" if acting in verdicts and not verdicts[acting].passed else None
            time.sleep(POLL_INTERVAL)

    def _read_verdicts(self, epoch: int | None) -> list[AuditVerdict]:
        try:
            return self.verdicts.fetch(epoch)
        except Exception as error:
            logger.warning(f"Could not read verdicts: {error!r}")
            return []

    def _verdicts_for(
        self, assignment: AuditAssignment, found: list[AuditVerdict] | None = None
    ) -> list[AuditVerdict]:
        """The verdicts that count for ``assignment`` among ``found`` (default: read from the DHT now)."""
        found = self._read_verdicts(assignment.epoch) if found is None else found
        return [
            verdict
            for verdict in found
            if verdict.audited == assignment.audited
            and verdict.commitment == assignment.commitment
            and verdict.auditor in assignment.panel
        ]

    def _finalize(self, current_epoch: int) -> None:
        everything = self._read_verdicts(None)  # one DHT read for every decision of this call
        for epoch, assignments in self.assignments.items():
            for assignment in assignments:
                key = (epoch, assignment.audited)
                if key in self.finalized:
                    continue
                verdicts = {
                    verdict.auditor: verdict
                    for verdict in self._verdicts_for(assignment, everything)
                    if verdict.epoch == epoch
                }
                decision = self._decide(assignment, verdicts, current_epoch)
                if decision is None:
                    continue
                passed, counted = decision
                self.finalized.add(key)
                if passed:
                    if assignment.audited == self.me:
                        self.stats.my_audits_passed += 1
                    accusers = [
                        verdict
                        for verdict in counted
                        if not verdict.passed and verdict.verdict not in TRANSIENT_FAILURES
                    ]
                    if accusers:
                        self._false_accusation(assignment, accusers, current_epoch)
                else:
                    self._final_failure(
                        assignment, [verdict for verdict in counted if not verdict.passed], current_epoch
                    )
                self._notify("on_final", assignment, passed, counted, current_epoch)
        self._finalize_unseen_rounds(current_epoch, everything)
        self.stats.banned = sorted(peer for peer, until in self.bans.items() if until > current_epoch)
        self.peer.set_banned(self.stats.banned)
        self._notify("on_epoch_end", current_epoch)

    @staticmethod
    def _counts(verdict: AuditVerdict) -> bool:
        """A pass always counts; a gradient failure only with its evidence (the replayed gradient's hash and where
        it differs most), which any other auditor's replay confirms or refutes."""
        return (
            verdict.passed
            or verdict.verdict != Verdict.GRADIENT_MISMATCH.value
            or (verdict.replayed_hash is not None and verdict.worst_index is not None)
        )

    def _disputed(
        self, assignment: AuditAssignment, verdicts: dict[str, AuditVerdict], current_epoch: int
    ) -> bool:
        """Whether the acting primary failed ``assignment`` and an auditor called to re-check it passed it: the
        failure then goes to the round's other members too (``assignment.escalation``)."""
        acting = self._acting_primary(assignment, set(verdicts), current_epoch)
        primary = verdicts.get(acting)
        if primary is None or primary.passed or not self._counts(primary):
            return False
        called = assignment.auditors[assignment.auditors.index(acting) :]
        return any(verdicts[auditor].passed for auditor in called if auditor in verdicts)

    def _decide(
        self, assignment: AuditAssignment, verdicts: dict[str, AuditVerdict], current_epoch: int
    ) -> tuple[bool, list[AuditVerdict]] | None:
        """(passed, the verdicts that decided) once ``assignment`` is decided, else None.

        Only verdicts the protocol calls for count: the acting primary's; once it failed the contribution, the
        re-checkers'; once a re-checker passed what the primary failed (a dispute), the escalation's. A pass by the
        acting primary decides at once (no other auditor's failure can overturn it). A failure by it is decided:

        * by this peer's own replay, once it made one (replays are exact, so an honest auditor knows): its pass
          refutes the failure, its failure confirms it — an honest peer never bans a contribution it passed;
        * otherwise by weight (:meth:`Trust.weight`) over the whole electorate, the round's members other than
          the audited peer (a silent primary excepted): the contribution fails when auditors holding more than
          half of that weight failed it, and passes once auditors holding at least half passed it.

        So colluders holding less than half of a round's weight can neither ban an honest peer nor block a ban,
        even when they fill the assigned panel; auditors without weight count for nothing."""
        acting = self._acting_primary(assignment, set(verdicts), current_epoch)
        primary = verdicts.get(acting)
        if primary is None or not self._counts(primary):
            return None
        if primary.passed:
            return True, [primary]
        # a silent primary is not in it
        called = list(assignment.auditors[assignment.auditors.index(acting) :])
        electorate = called + list(assignment.escalation)
        if self._disputed(assignment, verdicts, current_epoch):
            called = electorate
        counted = [
            verdicts[auditor] for auditor in called if auditor in verdicts and self._counts(verdicts[auditor])
        ]
        own = verdicts.get(self.me)
        if (
            self.me in called
            and own is not None
            and self._counts(own)
            and own.verdict not in TRANSIENT_FAILURES
        ):
            return own.passed, counted
        if self._finishing_since is not None:  # nobody waits for an auditor that has left
            electorate = [
                auditor
                for auditor in electorate
                if auditor in verdicts or auditor in self._live or auditor == self.me
            ]
        weight = self.peer.trust.weight
        total = sum(weight(auditor) for auditor in electorate)
        failed = sum(weight(verdict.auditor) for verdict in counted if not verdict.passed)
        passed = sum(weight(verdict.auditor) for verdict in counted if verdict.passed)
        if failed > total / 2:
            return False, counted
        if passed >= total / 2 and passed > 0:
            return True, counted
        return None

    def _false_accusation(
        self, assignment: AuditAssignment, accusers: list[AuditVerdict], current_epoch: int
    ) -> None:
        """The weighted panel refuted a failure: each auditor that failed the contribution is banned here like a
        cheater, and the ledger slashes it (through :meth:`VerificationObserver.on_false_accusation`)."""
        digests = self.round_digests.get(assignment.epoch, {})
        for verdict in accusers:
            accuser = verdict.auditor
            event = dict(
                time=time.time(),
                event="false_accusation",
                epoch=assignment.epoch,
                accuser=accuser,
                accused=assignment.audited,
                verdict=verdict.verdict,
                commitment=digests.get(accuser),
                banned_until_epoch=current_epoch + self.verify.ban_epochs,
            )
            with open(self.events_path, "a") as events:
                events.write(json.dumps(event) + "\n")
            if accuser == self.me:
                logger.error(
                    f"epoch {assignment.epoch}: this peer's failing verdict on {assignment.audited} was "
                    f"refuted by the re-check"
                )
                continue
            self.bans[accuser] = current_epoch + self.verify.ban_epochs
            logger.warning(
                f"epoch {assignment.epoch}: {accuser} failed {assignment.audited}'s contribution "
                f"({verdict.verdict}) and the re-check refuted it: false accuser, banned for "
                f"{self.verify.ban_epochs} epochs"
            )
            self._notify("on_false_accusation", assignment, verdict, digests.get(accuser), current_epoch)

    def _finalize_unseen_rounds(self, current_epoch: int, verdicts: list[AuditVerdict]) -> None:
        """Failures in rounds this peer was not part of (it joined late, or its all-reduce failed one-sidedly), so it
        does not know their beacon: a contribution counts as failed when at least ``UNSEEN_ROUND_QUORUM`` distinct
        auditors other than its peer failed the commitment that peer really published, once the round's re-checks
        have had their time (:meth:`_settled`), and the failing auditors outweigh those that passed it together
        with the audited peer itself (whose commitment stands for its own pass). Colluders that accuse an honest
        peer whom the re-check passed therefore get it banned nowhere; colluders outweighing the rest of an unseen
        round still could (a known limit: no rule tells them from an honest majority there)."""
        quorum = UNSEEN_ROUND_QUORUM
        failing: dict[tuple[int, str, str], dict[str, AuditVerdict]] = {}
        passing: dict[tuple[int, str, str], set[str]] = {}
        for verdict in verdicts:
            if (
                verdict.epoch in self.assignments
                or verdict.audited == verdict.auditor
                or verdict.epoch <= current_epoch - self.verify.audit_window
                or (verdict.epoch, verdict.audited) in self.finalized
                or not self._counts(verdict)
            ):
                continue
            key = (verdict.epoch, verdict.audited, verdict.commitment)
            if verdict.passed:
                passing.setdefault(key, set()).add(verdict.auditor)
            else:
                failing.setdefault(key, {})[verdict.auditor] = verdict
        weight = self.peer.trust.weight
        for (epoch, audited, digest), by_auditor in failing.items():
            if len(by_auditor) < quorum or (epoch, audited) in self.finalized:
                continue
            if not self._settled(epoch, current_epoch):
                continue  # its re-checks and escalation may still be under way
            passers = passing.get((epoch, audited, digest), set()) - set(by_auditor)
            if sum(map(weight, by_auditor)) <= sum(map(weight, passers)) + weight(audited):
                continue  # the audited peer and those who passed it weigh as much: an accusation, not a verdict
            published = self.commitments.fetch(epoch).get(audited)
            if published is None or published.digest() != digest:
                continue
            assignment = AuditAssignment(epoch, audited, digest, tuple(sorted(by_auditor)))
            self.finalized.add((epoch, audited))
            self._final_failure(assignment, list(by_auditor.values()), current_epoch)
            self._notify("on_final", assignment, False, list(by_auditor.values()), current_epoch)

    def _settled(self, epoch: int, current_epoch: int) -> bool:
        """Whether the audits of ``epoch`` have had their time: ``TAKEOVER_AFTER_EPOCHS`` rounds (fewer when the
        audit window is shorter: they must be decided inside it), or ``verify.fetch_timeout`` seconds of this
        peer's finishing."""
        wait = min(TAKEOVER_AFTER_EPOCHS, self.verify.audit_window - 1)
        return current_epoch >= epoch + wait or (
            self._finishing_since is not None
            and time.monotonic() - self._finishing_since >= self.verify.fetch_timeout
        )

    def _final_failure(
        self, assignment: AuditAssignment, failed: list[AuditVerdict], current_epoch: int
    ) -> None:
        kinds = sorted({verdict.verdict for verdict in failed})
        event = dict(
            time=time.time(),
            event="audit_failed",
            epoch=assignment.epoch,
            audited=assignment.audited,
            commitment=assignment.commitment,
            verdicts=kinds,
            auditors=[verdict.auditor for verdict in failed],
            banned_until_epoch=current_epoch + self.verify.ban_epochs,
        )
        with open(self.events_path, "a") as events:
            events.write(json.dumps(event) + "\n")
        if assignment.audited == self.me:
            self.stats.my_audits_failed += 1
            logger.error(
                f"epoch {assignment.epoch}: this peer's contribution failed its audit ({', '.join(kinds)})"
            )
            return
        self.bans[assignment.audited] = current_epoch + self.verify.ban_epochs
        logger.warning(
            f"epoch {assignment.epoch}: {assignment.audited} failed its audit ({', '.join(kinds)}, "
            f"{len(failed)} of {len(assignment.auditors)} auditors): banned for {self.verify.ban_epochs} epochs"
        )

    # ---- one audit ----------------------------------------------------------------------------------------------
    def _audit(self, assignment: AuditAssignment, role: str) -> None:
        epoch, audited = assignment.epoch, assignment.audited
        self.performed.add((epoch, audited))
        if epoch not in self.snapshots:
            logger.info(f"epoch {epoch}: cannot audit {audited}, this peer no longer holds that state")
            return
        started = time.perf_counter()
        try:
            kind, error, evidence = self._judge(assignment)
            if self.attack is not None:
                kind, error, evidence = self.attack.audit_verdict(kind, error, evidence)
        except (
            Exception
        ) as failure:  # our own side failed (DHT, averager process): no verdict rather than a wrong one
            logger.warning(f"epoch {epoch}: could not audit {audited}: {type(failure).__name__}: {failure}")
            return
        verdict = AuditVerdict(
            auditor=self.me,
            audited=audited,
            epoch=epoch,
            commitment=assignment.commitment,
            verdict=kind,
            error=error if error is not None and math.isfinite(error) else None,
            role=role,
            **evidence,
        )
        self.stats.audits_done += 1
        self.stats.cheats_found += int(not verdict.passed)
        log = logger.info if verdict.passed else logger.warning
        log(
            f"epoch {epoch}: {role} audit of {audited}: {kind} (error {error if error is not None else 'n/a'}, "
            f"{time.perf_counter() - started:.2f}s)"
        )
        self._publish_verdict(verdict)
        self._notify("on_verdict", verdict)

    def _publish_verdict(self, verdict: AuditVerdict) -> bool:
        """Store ``verdict`` in the DHT; one that no node stored is kept and published again by :meth:`process`,
        since the audited peer and the other auditors wait for it."""
        try:
            stored = self.verdicts.publish(verdict)
        except Exception as error:
            logger.warning(f"Could not publish a verdict: {error!r}")
            stored = False
        if not stored and verdict not in self._unpublished:
            logger.warning(
                f"epoch {verdict.epoch}: the verdict on {verdict.audited} was not stored; retrying"
            )
            self._unpublished.append(verdict)
        return stored

    def _judge(self, assignment: AuditAssignment) -> tuple[str, float | None, dict[str, Any]]:
        """(verdict kind, relative error or None, evidence: the replayed gradient's hash and where it differs most
        from the committed one, when the replay got that far)."""
        return self._replay(assignment)

    def _replay(self, assignment: AuditAssignment) -> tuple[str, float | None, dict[str, Any]]:
        """Fetch what ``assignment`` committed and served, and run :data:`~swarm.verify.checks.AUDIT_CHECKS` on it."""
        epoch, audited = assignment.epoch, assignment.audited
        commitment = self.commitments.fetch(epoch).get(audited)
        if commitment is None or commitment.digest() != assignment.commitment:
            return Verdict.MISSING_COMMITMENT.value, None, {}
        if (commitment.steps_root is None) != (self.inner_steps is None):
            logger.info(f"epoch {epoch}: {audited} committed {'no' if self.inner_steps else ''} inner steps")
            return Verdict.COMMITMENT_MISMATCH.value, None, {}
        if self.inner_steps is not None:
            return self._replay_inner(assignment, commitment)
        data = self._download_bytes(audited, epoch)
        if data is None:
            return Verdict.UNAVAILABLE.value, None, {}
        try:
            contribution = load_contribution(data)
        except MalformedContribution as error:
            logger.info(f"epoch {epoch}: {audited} served a malformed contribution: {error}")
            return Verdict.MALFORMED.value, None, {}
        shared_rows, shared_error = [], None
        try:  # rollout sharing: the last rows may be other peers' signed groups
            shared_rows = check_shared(
                self.config,
                self.recipe,
                audited,
                epoch,
                contribution.shared_bundles,
                contribution.shared_groups,
                contribution.completion_token_ids,
                len(contribution.rows),
            )
        except SharingError as error:
            shared_error = f"shared rollouts are not acceptable: {error}"
        rows = [
            *self.recipe.assigned_rows(
                self.config.run_id, audited, epoch, max(0, len(contribution.rows) - len(shared_rows))
            ),
            *shared_rows,
        ]
        model = self._model_at(epoch)
        if self._replayer is None:
            self._replayer = Replayer(model, self.tokenizer, self.recipe)
        case = AuditCase(
            contribution=contribution,
            model=model,
            rows=rows,
            tolerance=self.verify.tolerance or GRADIENT_TOLERANCE.get(commitment.precision, 0.0),
            trainer_for=self._replayer.trainer_for,
            epoch=epoch,
            audited=audited,
            commitment=commitment,
            declared_samples=self.declared.get(epoch, {}).get(audited, 0.0),
            sent_error=lambda: self._sent_error(epoch, audited, contribution.gradient),
            swarm_settings=self.settings,
            expected_seed=round_seed(self.config.run_id, audited, epoch),
            shared_error=shared_error,
        )
        result = self._run_audit_checks(case, f"epoch {epoch}: replaying {audited}'s contribution")
        if result.verdict is not Verdict.PASS:
            logger.info(
                f"epoch {epoch}: {audited}: {result.verdict.value}"
                + (f" ({case.details['reason']})" if "reason" in case.details else "")
            )
        return result.verdict.value, result.error, dict(result.evidence)

    @staticmethod
    def _run_audit_checks(case: AuditCase, what: str) -> CheckResult:
        """:data:`AUDIT_CHECKS` on ``case``; an exception inside TRL (malformed token ids, shapes, ...) is the
        contribution's fault: ``malformed``."""
        try:
            return run_checks(case, AUDIT_CHECKS)
        except Exception as error:
            logger.info(f"{what} failed: {type(error).__name__}: {error}")
            return CheckResult(Verdict.MALFORMED)

    def _replay_inner(
        self, assignment: AuditAssignment, commitment: Commitment
    ) -> tuple[str, float | None, dict[str, Any]]:
        """Audit a DiLoCo epoch (swarm/verify/inner.py): its manifest against the commitment, its start state, the
        inner steps the beacon picks (each replayed, and its optimizer step checked), then its pseudo-gradient."""
        epoch, audited = assignment.epoch, assignment.audited
        if commitment.inner_steps > self.inner_steps:
            logger.info(
                f"epoch {epoch}: {audited} committed {commitment.inner_steps} > {self.inner_steps} steps"
            )
            return Verdict.COMMITMENT_MISMATCH.value, None, {}
        data = self._download_bytes(audited, epoch, MANIFEST)
        if data is None:
            return Verdict.UNAVAILABLE.value, None, {}
        try:
            manifest = Manifest.from_bytes(data, epoch)
        except MalformedInnerPart as error:
            logger.info(f"epoch {epoch}: {audited} served a malformed manifest: {error}")
            return Verdict.MALFORMED.value, None, {}
        if epoch_commitment(audited, manifest, commitment.gradient_hash, commitment.precision) != commitment:
            logger.info(f"epoch {epoch}: {audited}'s manifest does not match its commitment")
            return Verdict.COMMITMENT_MISMATCH.value, None, {}
        if self.declared.get(epoch, {}).get(audited, 0.0) > commitment.samples:
            return Verdict.WRONG_WEIGHT.value, None, {}
        model = self._model_at(epoch)
        optimizer = make_optimizer(
            self._trainable(model), self.config.training.learning_rate, self.config.training.weight_decay
        )
        if start_state_hash(model, optimizer) != manifest.steps[0].inner_hash:
            logger.info(f"epoch {epoch}: {audited}'s inner steps did not start from the swarm's state")
            return Verdict.WRONG_STATE.value, None, {}
        tolerance = self.verify.tolerance or GRADIENT_TOLERANCE.get(commitment.precision, 0.0)
        error: float | None = None
        evidence: dict[str, Any] = {}
        ends: list[list[torch.Tensor]] = []  # θ_(e,n), when the auditor computed it exactly
        for step in audited_steps(
            assignment.beacon, audited, len(manifest.steps), self.config.diloco.audited_steps
        ):
            kind, error, evidence = self._replay_step(
                assignment, commitment, manifest, step, optimizer, tolerance, ends
            )
            if kind != Verdict.PASS.value:
                logger.info(f"epoch {epoch}: {audited}: inner step {step}: {kind}")
                return kind, error, evidence
        if ends:
            end = ends[0]
        else:
            served = self._served_inner(audited, epoch, len(manifest.steps), manifest.final_hash)
            if isinstance(served, str):
                return served, None, {}
            end = served[1]
        sent = pseudo_gradient(self.starts[epoch], end)
        if gradient_hash(epoch, sent) != commitment.gradient_hash:
            logger.info(f"epoch {epoch}: {audited} committed another pseudo-gradient than θ_e - θ_(e,n)")
            return Verdict.PSEUDO_GRADIENT_MISMATCH.value, None, {}
        sent_error = self._sent_error(epoch, audited, sent)
        if sent_error is not None and sent_error > SENT_TOLERANCE:
            return Verdict.SENT_MISMATCH.value, sent_error, {}
        return Verdict.PASS.value, error, evidence

    def _replay_step(
        self,
        assignment: AuditAssignment,
        commitment: Commitment,
        manifest: Manifest,
        step: int,
        optimizer: torch.optim.Optimizer,
        tolerance: float,
        ends: list[list[torch.Tensor]],
    ) -> tuple[str, float | None, dict[str, Any]]:
        """One inner step of a DiLoCo epoch: S_k (the swarm's state for step 0, else served), the replay of its
        contribution from it, and S_{k+1} (or θ_{e,n}) against the optimizer step the auditor takes itself —
        by hash when the auditor's step is bit-identical, else within ``tolerance`` of the served state (after a
        last step, the committed θ_{e,n} goes to ``ends``)."""
        epoch, audited = assignment.epoch, assignment.audited
        key = step_key(epoch, step, self.inner_steps)
        model = self._model_at(epoch)
        state = TrainingState(model, optimizer)
        optimizer.state.clear()
        if step > 0:
            served = self._served_inner(audited, epoch, step, manifest.steps[step].inner_hash)
            if isinstance(served, str):
                return served, None, {}
            try:
                state.load(*served)
            except ValueError as error:
                logger.info(f"epoch {epoch}: {audited}'s inner state {step} does not fit the model: {error}")
                return Verdict.MALFORMED.value, None, {}
        before = [tensor.detach().clone() for tensor in state.params]
        data = self._download_bytes(audited, epoch, STEP, step)
        if data is None:
            return Verdict.UNAVAILABLE.value, None, {}
        try:
            contribution = load_contribution(data)
        except MalformedContribution as error:
            logger.info(f"epoch {epoch}: {audited} served a malformed step {step}: {error}")
            return Verdict.MALFORMED.value, None, {}
        if self._replayer is None:
            self._replayer = Replayer(model, self.tokenizer, self.recipe)
        case = AuditCase(
            contribution=contribution,
            model=model,
            rows=self.recipe.assigned_rows(self.config.run_id, audited, key, len(contribution.rows)),
            tolerance=tolerance,
            trainer_for=self._replayer.trainer_for,
            epoch=key,
            audited=audited,
            commitment=manifest.steps[step].commitment(audited, key, commitment.precision),
            swarm_settings=self.settings,
            expected_seed=round_seed(self.config.run_id, audited, key),
        )
        result = self._run_audit_checks(case, f"epoch {epoch}: replaying {audited}'s step {step}")
        if result.verdict is not Verdict.PASS:
            return result.verdict.value, result.error, dict(result.evidence)
        optimizer_step(state.params, optimizer, contribution.gradient, self.config.training.max_grad_norm)
        last = step + 1 == len(manifest.steps)
        expected = manifest.final_hash if last else manifest.steps[step + 1].inner_hash
        replayed = [param.detach() for param in state.params] if last else state.tensors()
        if tensors_hash(step + 1, replayed) == expected:  # bit-identical: nothing to download and compare
            if last:
                ends.append([tensor.clone() for tensor in replayed])
            return Verdict.PASS.value, result.error, dict(result.evidence)
        # another machine's kernels may round differently: compare with the served state, within the tolerance
        served = self._served_inner(audited, epoch, step + 1, expected)
        if isinstance(served, str):
            return served, None, {}
        if not last and served[0]["layout"] != state.layout():
            return Verdict.INNER_STEP_MISMATCH.value, math.inf, {}
        error = inner_step_error(before, replayed, served[1], len(before))
        if not error <= tolerance:
            case.details.update(reason=f"S_{step + 1} is {error:.3g} from the optimizer step")
            return Verdict.INNER_STEP_MISMATCH.value, error, {}
        if last:  # the committed θ_(e,n) (its hash matched): what the pseudo-gradient is checked against
            ends.append(served[1])
        return Verdict.PASS.value, result.error, dict(result.evidence)

    def _served_inner(
        self, audited: str, epoch: int, step: int, expected_hash: str
    ) -> tuple[dict[str, Any], list[torch.Tensor]] | str:
        """The inner state ``audited`` serves for ``step`` of ``epoch`` (θ_{e,n} for the last), checked against the
        hash its manifest commits to; or the verdict kind when it cannot be had or is not that state."""
        data = self._download_bytes(audited, epoch, INNER_STATE, step)
        if data is None:
            return Verdict.UNAVAILABLE.value
        try:
            metadata, tensors = load_inner_state(data, step)
        except MalformedInnerPart as error:
            logger.info(f"epoch {epoch}: {audited} served a malformed inner state {step}: {error}")
            return Verdict.MALFORMED.value
        if metadata["state_hash"] != expected_hash or tensors_hash(step, tensors) != expected_hash:
            logger.info(f"epoch {epoch}: {audited}'s inner state {step} is not the one it committed to")
            return Verdict.COMMITMENT_MISMATCH.value
        if not all(tensor.is_floating_point() and bool(torch.isfinite(tensor).all()) for tensor in tensors):
            return Verdict.MALFORMED.value
        return metadata, tensors

    def _sent_error(self, epoch: int, audited: str, gradient: list[torch.Tensor]) -> float | None:
        """Relative L2 error between what ``audited`` sent this peer in the all-reduce (the parts this peer
        reduced) and the same slices of the gradient it committed to, passed through the same compression. None
        when this peer reduced nothing of it. The slice is fixed before the beacon picks this auditor, so a peer
        that sends anything but its committed gradient on a fraction f of the vector is caught with probability
        about f per auditor."""
        received = self.peer.averager.received_span(epoch, audited)
        if received is None:
            return None
        offset, parts = received
        flat = torch.cat([tensor.reshape(-1).float() for tensor in gradient]) if gradient else torch.zeros(0)
        compression = make_compression(self.config.averaging.compression)
        diff = norm = 0.0
        for part in parts:
            committed = flat[offset : offset + part.numel()]
            offset += part.numel()
            if committed.numel() != part.numel():
                return math.inf
            expected = as_received(committed.contiguous(), compression).double()
            diff += float((part.double() - expected).pow(2).sum())
            norm += float(expected.pow(2).sum())
        if norm == 0.0:
            return 0.0 if diff == 0.0 else math.inf
        return math.sqrt(diff / norm)

    def _download_bytes(
        self, peer_id: str, epoch: int, part: str = CONTRIBUTION, step: int | None = None
    ) -> bytes | None:
        """The served contribution, asked again until ``verify.fetch_timeout`` passes: a peer is unavailable only if
        it does not serve it within that time, not because one request failed (seen: a stream that broke at once,
        while a re-checker fetched the same file a second later)."""
        deadline = time.monotonic() + self.verify.fetch_timeout
        while True:
            data = self.peer.averager.download_contribution(
                peer_id,
                epoch,
                timeout=max(1.0, deadline - time.monotonic()),
                max_bytes=int(self.verify.max_contribution_mb * 2**20),
                part=part,
                step=step,
            )
            if data is not None or time.monotonic() + FETCH_RETRY_PAUSE >= deadline:
                return data
            time.sleep(FETCH_RETRY_PAUSE)

    def _download(self, peer_id: str, epoch: int) -> Contribution | None:
        data = self._download_bytes(peer_id, epoch)
        try:
            return None if data is None else load_contribution(data)
        except MalformedContribution:
            return None

    def _model_at(self, epoch: int) -> torch.nn.Module:
        if self._audit_model is None:
            self._audit_model = copy.deepcopy(self.model)
        with torch.no_grad():
            for param, value in zip(self._trainable(self._audit_model), self.snapshots[epoch]):
                param.copy_(value)
        return self._audit_model

    @staticmethod
    def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [param for param in model.parameters() if param.requires_grad]
