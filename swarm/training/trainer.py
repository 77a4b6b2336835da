"""SwarmTrainer: a recipe + TRL + the swarm's averaging strategy. One epoch is :meth:`SwarmTrainer.run_epoch`,
and it reads top to bottom:

    shared = sharing.select(epoch, J)                 # rollout sharing on: other peers' signed groups, re-scored
    rows = recipe.assigned_rows(run, peer, epoch)     # data nobody chooses for themselves (all but the J shared)
    verifier.remember_state(epoch)                    # θ_e, for replaying others' contributions
    computed = TRL step, recorded, not stepped        # generate, score, backpropagate (GradientRecorder)
    sharing.publish(...)                              # this peer's own groups, signed, for the others' next epoch
    verifier.commit(epoch, contribution)              # signed commitment; the file is served to auditors
    result = strategy.round(RoundInput(...))          # barrier, all-reduce or catch-up (averaging.strategy)
    strategy.step(result)                             # θ_e -> θ_{e+1}, identical on every member of the group
    verifier.after_round(result); verifier.process()  # audits chosen by the round's beacon, re-checks, bans
    EpochRecord(...)                                  # the epoch's facts (kept in the checkpoint and summary)

then (train()): checkpoint, one EpochMetrics record (swarm/monitor/record.py) written to status.json and
metrics.jsonl and handed to every monitor.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarm.config import SwarmConfig, dump_config
from swarm.errors import UserError
from swarm.hardware import check_fits, detect_hardware, row_tokens_of
from swarm.identity import Identity
from swarm.ledger.balances import Balance
from swarm.ledger.config import LEDGER_FILE, rules_of
from swarm.ledger.entries import MICRO
from swarm.monitor.callbacks import SwarmCallback
from swarm.monitor.record import EpochMetrics
from swarm.monitor.summary import (
    COMPLETIONS_FILE,
    EVALUATIONS_FILE,
    METRICS_FILE,
    STATUS_FILE,
    write_json_atomic,
)
from swarm.network.dht import PEER_ADDR_FILE, check_multiaddrs
from swarm.network.rollout_records import RolloutBoard
from swarm.network.storage import install_sweeper, run_windows
from swarm.node.peer import SwarmPeer
from swarm.node.state import TrainingState, make_optimizer, param_checksum
from swarm.node.trust import Trust
from swarm.recipe import Recipe, load_recipe
from swarm.sampling import round_seed
from swarm.sharing import ExternalGroup, GroupLimits, RolloutSharing, contribution_sharing, external_count
from swarm.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from swarm.training.evaluation import evaluate
from swarm.training.ledger_recorder import LedgerRecorder
from swarm.training.model import load_model_and_tokenizer
from swarm.training.pipeline import ComputedRound, ComputeRequest, HonestPipeline, install
from swarm.training.rollouts import reward_means, rollout_samples
from swarm.training.strategies import RoundInput, make_strategy, strategy_class
from swarm.trl_adapter import (
    GradientRecorder,
    GRPOSettings,
    keeps_forward,
    make_recording_trainer,
    make_sft_trainer,
    stop_token_ids,
)
from swarm.verify.attacks import Attack, make_attack
from swarm.verify.auditor import Verifier
from swarm.verify.inner import StepLeaf, final_snapshot, step_key
from swarm.verify.replay import contribution_from_record

logger = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    epoch: int
    reward: float | None
    loss: float | None
    outcome: str
    group_size: int
    samples: int = 0  # samples this peer computed for the round
    compute_s: float = 0.0  # generating, scoring, backpropagating
    sync_s: float = 0.0  # waiting for peers, averaging, stepping or downloading state
    audit_s: float = 0.0  # replaying other peers' contributions (verification)
    bytes_sent: int = 0  # all-reduce payload bytes this peer sent, failed attempts included
    # mean of each reward function over this peer's rollouts
    rewards: dict[str, float] = field(default_factory=dict)
    # what the round ran: "grpo", or "sft" (an SFT recipe, or a GRPO recipe's warm start)
    trainer: str = "grpo"

    def as_summary(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, reward=self.reward, loss=self.loss, trainer=self.trainer)


@dataclass
class PeerReport:
    """What the run summary says about one peer."""

    name: str
    peer_id: str
    epochs: int
    samples: int
    param_checksum: str
    history: list[EpochRecord] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # the last held-out evaluation: epoch, figures, examples

    def as_summary(self) -> dict[str, Any]:
        summary = dict(
            name=self.name,
            peer_id=self.peer_id,
            epochs=self.epochs,
            samples=self.samples,
            param_checksum=self.param_checksum,
            history=[record.as_summary() for record in self.history],
        )
        if self.evaluation is not None:
            summary["eval"] = self.evaluation
        return summary


class SwarmTrainer:
    """Trains one peer of a swarm until ``training.max_epochs`` (or until :meth:`stop`).

    Guarantees: every completed epoch's parameters equal those of every other peer that averaged in the same
    group; the state is checkpointed every ``checkpoint.every_epochs`` and on exit, and resumed on restart (or
    replaced by the swarm's state if the swarm has moved on).

    :param config: the peer's config
    :param recipe: the recipe to train (default: ``config.recipe``, looked up by name)
    :param expected_peers: before the first epoch, wait up to ``averaging.round_timeout`` for this many peers
    :param callbacks: monitors to notify (see :class:`swarm.monitor.callbacks.SwarmCallback`)
    """

    def __init__(
        self,
        config: SwarmConfig,
        recipe: Recipe | None = None,
        expected_peers: int = 1,
        callbacks: Sequence[SwarmCallback] = (),
    ):
        self.config = config
        self.callbacks = list(callbacks)
        check_multiaddrs(config.network.initial_peers, "initial peer")  # fail before minutes of model loading
        strategy = strategy_class(config.averaging.strategy)  # likewise an unknown strategy
        if callable(check := getattr(strategy, "check_config", None)):
            check(config)  # settings the strategy does not support, before minutes of model loading
        self.recipe = recipe or load_recipe(config.recipe.name, config.recipe.options)
        self.trainer_kind = config.training.trainer or self.recipe.trainer
        # an SFT warm start only means something for GRPO: an SFT recipe trains on its own completions throughout
        self.warm_start_epochs = config.warm_start.epochs if self.trainer_kind == "grpo" else 0
        if (
            self.warm_start_epochs and self.recipe.warm_start_completion is None
        ):  # the same on every peer of the run
            logger.warning(
                f"recipe {self.recipe.name} has no warm_start_completion (a reference answer to train on): "
                f"no SFT warm start, warm_start.epochs={self.warm_start_epochs} is ignored"
            )
            self.warm_start_epochs = 0
        self.expected_peers = expected_peers
        self.workdir = Path(config.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(config.key_path)
        # before anything is downloaded or allocated; rows sized by the recipe's own prompts (characters: at least
        # as many as tokens for the tokenizers in use) and completion length, not a 512-token guess
        first_rows = self.recipe.assigned_rows(
            config.run_id, str(self.identity.peer_id), 0, config.training.prompts_per_round
        )
        row_tokens = row_tokens_of(
            first_rows, config.training.max_completion_length or self.recipe.max_completion_length
        )
        verifies = config.verify.enabled and self.trainer_kind == "grpo"
        check_fits(
            config.model,
            detect_hardware(),
            config.training,
            row_tokens=row_tokens,
            audit_window=config.verify.audit_window if verifies else 0,
        )
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model, self.recipe.tokenizer_alphabet(), self.workdir / "models"
        )
        # a prompt character the tokenizer cannot encode would silently train as padding: refuse it at start
        self.recipe.check_encodable(self.tokenizer, first_rows)
        if (
            self.warm_start_epochs
        ):  # a recipe without a reference answer fails now, not after the model loaded
            self.recipe.check_encodable(
                self.tokenizer,
                self.recipe.warm_start_rows(
                    config.run_id, str(self.identity.peer_id), 0, config.training.prompts_per_round
                ),
            )
        self.optimizer = make_optimizer(
            (p for p in self.model.parameters() if p.requires_grad),
            config.training.learning_rate,
            config.training.weight_decay,
        )
        # what the peer announces, serves and checkpoints: the model and its optimizer, unless the strategy keeps a
        # shared state of its own (DiLoCo: the outer parameters and their momentum)
        shared_state = getattr(strategy, "shared_state", None)
        self.state = (
            shared_state(self.model, self.optimizer, config)
            if callable(shared_state)
            else TrainingState(self.model, self.optimizer)
        )
        self.history: dict[int, EpochRecord] = {}
        self.evaluation: dict[str, Any] | None = None  # the last held-out evaluation (evaluate())
        self._stopping = threading.Event()
        # what is loaded so far lives as long as the peer: keep the collector (run after every TRL train() by
        # accelerate) from walking it each epoch, which cost more than a tiny model's whole step
        gc.collect()
        gc.freeze()
        epoch, samples, lineage = self._resume()
        self.trust = self._make_trust()
        self.peer = SwarmPeer(
            config, self.identity, self.state, epoch, trust=self.trust, samples=samples, lineage=lineage
        )
        self.strategy = make_strategy(
            config.averaging.strategy,
            self.peer,
            self.optimizer,
            config.training.max_grad_norm,
            config.averaging.options,
            cls=strategy,
        )
        # honest, or the configured cheater of the attack suite wrapped around the honest pipeline (tests, demos)
        if getattr(self.strategy, "inner_steps", 1) > 1 and not callable(
            getattr(self.strategy, "pseudo_gradient", None)
        ):
            raise UserError(
                f"averaging.strategy: {config.averaging.strategy} takes several inner steps per epoch but has no "
                "pseudo_gradient() to send (swarm/training/strategies/base.py)",
                exit_code=2,
            )
        self.attack = self._make_attack()
        self.pipeline = install(
            HonestPipeline(self._run_grpo_step),
            self.attack,
            only_step=config.verify.attack_step,
            unassigned_rows=lambda request: self.recipe.assigned_rows(
                config.run_id, f"{self.peer.peer_id}/unassigned", request.epoch, len(request.rows)
            ),
            other=lambda epoch: (
                self.verifier.other_contribution(epoch) if self.verifier is not None else None
            ),
            tokenizer=self.tokenizer,
            recipe=self.recipe,
        )
        self.pipeline.announce(self.peer)
        self.verifier: Verifier | None = None
        self.ledger: LedgerRecorder | None = None
        self.sharing: RolloutSharing | None = None
        if config.verify.enabled and self.trainer_kind == "grpo":
            self.verifier = Verifier(
                config,
                self.peer,
                self.recipe,
                self.model,
                self.tokenizer,
                self._grpo_settings(0),
                attack=self.attack,
                inner_steps=(
                    self.strategy.inner_steps
                    if callable(getattr(self.strategy, "pseudo_gradient", None))
                    else None
                ),
            )
        elif config.verify.enabled:
            logger.warning(
                f"recipe {self.recipe.name}: SFT rounds are not audited (verification replays GRPO only)"
            )
        if config.sharing.enabled and self.trainer_kind != "grpo":
            logger.warning(
                f"recipe {self.recipe.name}: rollout sharing is for GRPO recipes; this SFT run shares none"
            )

    def _make_trust(self) -> Trust:
        """Weights from this peer's ledger copy when there is one (verification and ledger on, GRPO), else identity
        counting (see :mod:`swarm.node.trust`)."""
        config = self.config
        if config.verify.enabled and config.ledger.enabled and self.trainer_kind == "grpo":
            return Trust(str(self.identity.peer_id), config, self.workdir / LEDGER_FILE, rules_of(config))
        return Trust(str(self.identity.peer_id), config, None, None)

    def _make_attack(self) -> Attack | None:
        name = self.config.verify.attack
        if name is None:
            return None
        if self.trainer_kind != "grpo":
            raise UserError(
                f"verify.attack: the attack suite cheats at GRPO; recipe {self.recipe.name} uses SFT", 2
            )
        try:
            attack = make_attack(name)
        except ValueError as error:
            raise UserError(f"verify.attack: {error}", 2) from None
        logger.warning(
            f"{self.identity.name} is a CHEATING peer (verify.attack={name}), for tests and demos only"
        )
        return attack

    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / CHECKPOINT_FILE

    def _resume(self) -> tuple[int, int, dict[int, str]]:
        """(epoch, samples, lineage) of the checkpoint, or a fresh start's."""
        payload = load_checkpoint(self.checkpoint_path)
        if payload is None:
            return 0, 0, {}
        try:
            epoch = self.state.load(payload["metadata"], payload["tensors"])
        except (KeyError, ValueError) as error:
            logger.warning(
                f"{self.checkpoint_path}: checkpoint does not fit this model ({error}); starting over"
            )
            return 0, 0, {}
        for item in payload.get("history", []):
            self.history[item["epoch"]] = EpochRecord(**item)
        logger.info(f"Resumed from {self.checkpoint_path} at epoch {epoch}")
        lineage = payload.get("lineage", {})
        lineage = {
            past: digest
            for past, digest in (lineage.items() if isinstance(lineage, dict) else [])
            if isinstance(past, int) and isinstance(digest, str)
        }
        return epoch, int(payload.get("samples", 0)), lineage

    def save_checkpoint(self) -> None:
        metadata, tensors = self.peer.snapshot()
        history = [vars(record) for record in self.history.values()]
        save_checkpoint(
            self.checkpoint_path,
            dict(
                metadata=metadata,
                tensors=tensors,
                history=history,
                samples=self.peer.samples,
                lineage=dict(self.peer.lineage),
            ),
        )

    def stop(self) -> None:
        """Ask the training loop to finish after the current epoch."""
        self._stopping.set()

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> PeerReport:
        """Join the swarm, train, checkpoint, leave. Returns this peer's report (also written to ``summary.json``)."""
        config = self.config
        (self.workdir / "config.yaml").write_text(dump_config(config))
        self.peer.start()
        # bounded DHT memory: expired records and per-epoch records outside their window are dropped (hook for start_dht)
        install_sweeper(
            self.peer.dht,
            run_windows(
                config.run_id,
                config.verify.audit_window,
                config.sharing.max_age_epochs if config.sharing.enabled else None,
            ),
        )
        try:
            addresses = [str(addr) for addr in self.peer.dht.get_visible_maddrs()]
            logger.info(f"{self.identity.name} ({self.identity.peer_id}) is in run {config.run_id!r}")
            logger.info(
                f"Others join with: ./launch.sh --join {addresses[0] if addresses else '?'} (also in "
                f"{self.workdir / PEER_ADDR_FILE}; the port stays the same across restarts)"
            )
            self._emit("on_start")
            if self.expected_peers > 1:
                self._emit("on_phase", f"waiting for {self.expected_peers} peers")
                self.peer.wait_for_peers(self.expected_peers, config.averaging.round_timeout)
            self._emit("on_phase", "catching up with the swarm")
            if self.verifier is not None:
                self.verifier.start()
                if config.ledger.enabled:
                    self.ledger = LedgerRecorder(config, self.identity, self.peer.dht)
                    self.ledger.start()
                    self.verifier.observers.append(self.ledger)
            if config.sharing.enabled and self.trainer_kind == "grpo":
                self.sharing = self._make_sharing()
            self.trust.refresh(self.peer.epoch, force=True)  # the ledger copy has just caught up
            self.peer.sync_with_swarm()
            max_epochs = config.training.max_epochs
            while not self._stopping.is_set() and (max_epochs is None or self.peer.epoch < max_epochs):
                record = self.run_epoch()
                self.history[record.epoch] = record
                # a heavier branch adopted at an earlier epoch (a healed partition): this peer's epochs since are
                # not the swarm's; the record of the round that found it stays
                if self.peer.epoch < record.epoch:
                    for discarded in [
                        past for past in self.history if self.peer.epoch <= past < record.epoch
                    ]:
                        del self.history[discarded]
                logger.info(
                    f"{self.identity.name} epoch {record.epoch} {record.outcome} (group of {record.group_size})"
                    f" reward={_fmt(record.reward)} loss={_fmt(record.loss)}"
                )
                if self.peer.epoch % config.checkpoint.every_epochs == 0:
                    with _signals_held():  # Ctrl+C stops the peer once the checkpoint is written
                        self.save_checkpoint()
                metrics = self.epoch_metrics(record)
                self._write_status(metrics)
                self._emit("on_epoch_end", metrics)
                if self._evaluation_due(config.monitor.eval_every):
                    self.evaluate()
            if not self._stopping.is_set():
                if config.monitor.eval_every and (self.evaluation or {}).get("epoch") != self.peer.epoch:
                    self.evaluate()  # the run summary ends with the final model's figures
                if self.verifier is not None:
                    self._emit("on_phase", "finished: waiting for the last audits")
                    self.verifier.finish(self.peer.epoch, config.averaging.round_timeout)
                if self.ledger is not None:
                    self._emit("on_phase", "finished: settling the ledger")
                    # only authors with weight are waited for: anyone can announce a ledger head and never back it
                    self.ledger.settle(
                        config.averaging.round_timeout,
                        live=lambda: self.peer.other_peers(),
                        waits_for=self.trust.known,
                    )
                    # the status a run ends with reflects the settled ledger, not the copy of the last epoch
                    self.trust.refresh(self.peer.epoch, force=True)
                    if self.history:
                        last = self.history[max(self.history)]
                        self._write_status(self.epoch_metrics(last), append_metrics=False)
                self._emit("on_phase", "finished: serving peers that catch up")
                self.peer.linger(config.averaging.round_timeout)
        finally:
            stopping = time.perf_counter()
            try:
                with _signals_held(deliver=False):  # a second Ctrl+C must not cut the final checkpoint short
                    self.save_checkpoint()
            finally:
                saved = time.perf_counter()
                self._emit("on_end")
                if self.ledger is not None:
                    self.ledger.close()
                closed = time.perf_counter()
                self.peer.shutdown()
                logger.info(
                    f"{self.identity.name} left the swarm in {time.perf_counter() - stopping:.1f}s (checkpoint"
                    f" {saved - stopping:.1f}s, monitors and ledger {closed - saved:.1f}s,"
                    f" network {time.perf_counter() - closed:.1f}s)"
                )
        return self.report()

    def _make_sharing(self) -> RolloutSharing:
        config = self.config
        settings = self._grpo_settings(0)
        ttl = (config.sharing.max_age_epochs + 1) * config.averaging.round_timeout * 2
        board = RolloutBoard(
            self.peer.dht, config.run_id, self.identity, ttl, int(config.sharing.max_record_kb * 1024)
        )
        eos = self.tokenizer.eos_token_id
        limits = GroupLimits(
            num_generations=settings.num_generations,
            max_completion_length=settings.max_completion_length,
            vocab_size=self.model.get_input_embeddings().num_embeddings,
            eos_token_ids=frozenset() if eos is None else frozenset([eos]),
            rows_per_round=config.training.prompts_per_round,
        )
        return RolloutSharing(
            config,
            self.identity,
            self.recipe,
            board,
            limits,
            decode=lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True),
            banned=lambda: self.verifier.stats.banned if self.verifier is not None else (),
            sampled=self.verifier.shared_group_problem if self.verifier is not None else None,
        )

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            try:
                getattr(callback, hook)(self, *args)
            except Exception as error:  # a broken monitor must never stop training
                logger.warning(f"{type(callback).__name__}.{hook} failed: {type(error).__name__}: {error}")

    def epoch_metrics(self, record: EpochRecord) -> EpochMetrics:
        """The one metrics record of ``record``'s epoch (swarm/monitor/record.py names every figure), with this
        peer's swarm view, verification, ledger and sharing figures as they are now."""
        peers_online, swarm_samples = self.peer.swarm_view()
        verify: dict[str, Any] = {}
        if self.verifier is not None:
            verify = dict(
                audit_s=record.audit_s, **self.verifier.figures(), banned=list(self.verifier.stats.banned)
            )
        ledger: dict[str, Any] = {}
        if self.ledger is not None:
            balances = self.credits()
            mine = balances.get(self.peer.peer_id)
            ledger = dict(
                my_credit=(mine.total if mine else 0) / MICRO,
                my_credit_provisional=(mine.provisional if mine else 0) / MICRO,
                swarm_credit=sum(balance.total for balance in balances.values()) / MICRO,
                banned=bool(mine and mine.banned),
            )
        return EpochMetrics(
            epoch=record.epoch,
            time=time.time(),
            train=dict(
                trainer=record.trainer,
                reward=record.reward,
                loss=record.loss,
                samples=record.samples,
                total_samples=self.peer.samples,
                compute_s=record.compute_s,
                rewards=dict(record.rewards),
            ),
            swarm=dict(
                outcome=record.outcome,
                group_size=record.group_size,
                sync_s=record.sync_s,
                bytes_sent=record.bytes_sent,
                epoch=self.peer.epoch,
                peers_online=peers_online,
                swarm_samples=swarm_samples,
                **self.trust.figures(),
            ),
            verify=verify,
            ledger=ledger,
            sharing=self.sharing.figures() if self.sharing is not None else {},
        )

    def _write_status(self, metrics: EpochMetrics, append_metrics: bool = True) -> None:
        """``status.json``: who this peer is, the epoch it is at, and the last epoch's metrics record (plus the last
        held-out evaluation); ``metrics.jsonl``: one record per epoch (``append_metrics``: False when the status of
        an epoch already recorded is only brought up to date)."""
        status = dict(
            name=self.identity.name,
            peer_id=self.peer.peer_id,
            epoch=self.peer.epoch,
            round_epoch=metrics.epoch,
            **{key: value for key, value in metrics.as_json().items() if key != "epoch"},
        )
        if self.evaluation is not None:
            status["eval"] = self.evaluation
        write_json_atomic(self.workdir / STATUS_FILE, status)
        if append_metrics:
            with open(self.workdir / METRICS_FILE, "a") as out:
                out.write(json.dumps(metrics.as_json()) + "\n")

    def run_epoch(self) -> EpochRecord:
        """One epoch of this peer, top to bottom (the module docstring): an SFT round during the warm start (epochs
        below ``warm_start.epochs``) and for SFT recipes, GRPO otherwise. Nothing returns through TRL: TRL computes
        the contribution and stops short of the step, the strategy meets the swarm and steps."""
        epoch = self.peer.epoch
        self.trust.refresh(epoch)
        warm = epoch < self.warm_start_epochs
        kind = "sft" if warm else self.trainer_kind
        self._set_learning_rate(self._learning_rate(warm))
        bytes_before = self.peer.averager.bytes_sent.value
        steps = getattr(self.strategy, "inner_steps", 1)
        if callable(begin := getattr(self.strategy, "begin_epoch", None)):
            begin(epoch)
        if self.verifier is not None:
            # θ_e, for replaying the others' contributions after the round
            self.verifier.remember_state(epoch)
        # 1. the data: other peers' shared groups (rollout sharing on) and the rows assigned to this peer;
        # 2. the contribution: TRL generates, scores and backpropagates, without stepping; 3. the commitment.
        # A strategy of several local steps per epoch (DiLoCo) gets rows and a seed per (epoch, inner step), and
        # applies each inner step's gradient itself; the last one goes to the round
        self._emit("on_phase", f"computing epoch {epoch}" + (" (SFT warm start)" if warm else ""))
        started = time.perf_counter()
        budget = getattr(self.strategy, "inner_seconds", None)
        # a strategy of inner steps (DiLoCo) sends its pseudo-gradient; with verification each step is committed
        inner_steps = callable(getattr(self.strategy, "pseudo_gradient", None))
        steps_computed: list[ComputedRound] = []
        leaves: list[StepLeaf] = []
        for inner in range(steps):
            if inner and budget is not None and time.perf_counter() - started >= budget:
                break  # the epoch's compute budget is spent: the last computation goes to the round
            key = step_key(epoch, inner, steps) if inner_steps else epoch
            computing = time.perf_counter()
            shared = self._shared_groups(epoch) if kind == "grpo" and not inner_steps else []
            rows = self._assigned_rows(key, warm, len(shared))
            start = (
                TrainingState(self.model, self.optimizer).snapshot(inner)
                if inner_steps and self.verifier is not None
                else None
            )
            computed = (
                self._compute_grpo(key, rows, shared, inner)
                if kind == "grpo"
                else self._compute_sft(key, rows, warm)
            )
            steps_computed.append(computed)
            if self.verifier is not None and inner_steps and computed.contribution is not None:
                leaves.append(self.verifier.keep_inner_step(epoch, inner, computed.contribution, start))
            if inner_steps:
                self.strategy.inner_step(computed.sent)
            self._idle_for_duty_cycle(time.perf_counter() - computing)
        computed = steps_computed[-1]
        samples = sum(step.samples for step in steps_computed)
        sent = self.pipeline.outer(self.strategy.pseudo_gradient()) if inner_steps else computed.sent
        commitment = None
        if self.verifier is not None and inner_steps and len(leaves) == len(steps_computed):
            params = [param for param in self.model.parameters() if param.requires_grad]
            final = final_snapshot(params, len(leaves))
            commitment = self.verifier.commit_inner(epoch, leaves, final, sent).digest()
        elif self.verifier is not None and computed.contribution is not None:
            commitment = self.verifier.commit(epoch, computed.contribution).digest()
        compute_seconds = time.perf_counter() - started
        # 4. the round: barrier, all-reduce or catch-up; 5. the step, identical on every member of the group
        self._emit("on_phase", f"averaging epoch {epoch} with the swarm")
        started = time.perf_counter()
        result = self.strategy.round(RoundInput(epoch, sent, samples, commitment))
        if result.update is not None:
            self.strategy.step(result)
        sync_seconds = time.perf_counter() - started
        # 6. audits chosen by the round's beacon, re-checks, bans; the ledger credits through the verifier's hooks
        audit_seconds = 0.0
        if self.verifier is not None:
            self._emit("on_phase", f"auditing epoch {epoch}")
            started = time.perf_counter()
            self.verifier.after_round(result)
            self.verifier.process(self.peer.epoch)
            audit_seconds = time.perf_counter() - started
        # 7. the epoch's record
        reward, loss = (
            _mean([_last_logged(step, name) for step in steps_computed]) for name in ("reward", "loss")
        )
        self.peer.note_reward(reward)
        rollouts = (
            [
                sample
                for step in steps_computed
                for sample in rollout_samples(step.trl_trainer, self.tokenizer)
            ]
            if kind == "grpo"
            else []
        )
        self._log_completions(epoch, rollouts)
        return EpochRecord(
            epoch=epoch,
            reward=reward,
            loss=loss,
            outcome=result.outcome.value,
            group_size=result.group_size,
            samples=samples,
            compute_s=round(compute_seconds, 4),
            sync_s=round(sync_seconds, 4),
            audit_s=round(audit_seconds, 4),
            bytes_sent=self.peer.averager.bytes_sent.value - bytes_before,
            rewards=reward_means(rollouts),
            trainer=kind,
        )

    def _idle_for_duty_cycle(self, computed_seconds: float) -> None:
        """Idle so that computing takes ``training.duty_cycle`` of this peer's time (1.0: never idle). Counted as
        compute time: it is this peer's pace, not the swarm's."""
        duty = self.config.training.duty_cycle
        if duty < 1.0 and not self._stopping.is_set():
            self._stopping.wait(computed_seconds * (1 / duty - 1))

    def _shared_groups(self, epoch: int) -> list[ExternalGroup]:
        """Rollout sharing on: the other peers' signed groups this epoch trains on (re-scored here)."""
        if self.sharing is None:
            return []
        self._emit("on_phase", f"picking shared rollouts for epoch {epoch}")
        return self.sharing.select(epoch, external_count(self.config))

    def _assigned_rows(self, epoch: int, warm: bool, shared: int) -> list[dict[str, Any]]:
        """The rows nobody chooses for themselves: the warm start's reference rows, or the recipe's rows (all but
        the ``shared`` groups' share of ``prompts_per_round``)."""
        if warm:
            return self.recipe.warm_start_rows(
                self.config.run_id, self.peer.peer_id, epoch, self._warm_start_rows()
            )
        return self.recipe.assigned_rows(
            self.config.run_id, self.peer.peer_id, epoch, self.config.training.prompts_per_round - shared
        )

    @staticmethod
    def _autocast(dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _learning_rate(self, warm: bool) -> float:
        training = self.config.training
        return (
            (self.config.warm_start.learning_rate or training.learning_rate)
            if warm
            else training.learning_rate
        )

    def _warm_start_rows(self) -> int:
        training = self.config.training
        return self.config.warm_start.rows or training.prompts_per_round * training.num_generations

    def _set_learning_rate(self, learning_rate: float) -> None:
        """The rate the swarm's next step applies, on every peer alike (a constant scheduler over this optimizer
        multiplies the ``initial_lr`` it recorded the first time, so that is set too)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = learning_rate

    def _log_completions(self, epoch: int, rollouts: list[dict[str, Any]]) -> None:
        """Every ``monitor.completions_every`` epochs: a few of this epoch's rollouts with their rewards, appended
        to ``WORKDIR/completions.jsonl`` and handed to the monitors (W&B logs them as a table, as TRL's
        ``log_completions`` does)."""
        monitor = self.config.monitor
        if not rollouts or not monitor.completions_samples or epoch % monitor.completions_every:
            return
        # one completion of each prompt first, then the next ones
        group = self.config.training.num_generations
        spread = sorted(range(len(rollouts)), key=lambda index: (index % group, index // group))
        picked = [dict(epoch=epoch, **rollouts[index]) for index in spread[: monitor.completions_samples]]
        with open(self.workdir / COMPLETIONS_FILE, "a") as out:
            for sample in picked:
                out.write(json.dumps(sample) + "\n")
        self._emit("on_completions", picked)

    def _compute_grpo(
        self,
        epoch: int,
        local_rows: list[dict[str, Any]],
        shared: Sequence[ExternalGroup] = (),
        inner_step: int = 0,
    ) -> ComputedRound:
        """The contribution pipeline (swarm/training/pipeline.py) on the assigned rows and ``shared`` groups:
        compute (TRL's GRPO step, recorded, not stepped), publish this peer's own groups for the others' next epoch
        (rollout sharing on), commit, send."""
        request = ComputeRequest(
            epoch=epoch,
            rows=[*local_rows, *(group.row for group in shared)],
            seed=round_seed(self.config.run_id, self.peer.peer_id, epoch),
            shared=tuple(shared),
            reward_funcs=self.recipe.checked_reward_funcs(),
            inner_step=inner_step,
        )
        computed = self.pipeline.compute(request)
        if self.sharing is not None:
            self.sharing.publish(epoch, computed.contribution.completion_token_ids, len(local_rows))
        computed = self.pipeline.send(request, self.pipeline.commit(request, computed))
        computed.samples = len(computed.contribution.rows) * self.config.training.num_generations
        return computed

    def _run_grpo_step(self, request: ComputeRequest) -> ComputedRound:
        """The honest compute stage: TRL generates, scores and backpropagates on ``request.compute_rows`` (the
        shared groups' completions taken as given), recorded and not stepped."""
        settings = self._grpo_settings(request.seed)
        rows = request.rows if request.compute_rows is None else request.compute_rows
        shared = request.shared if request.use_shared else ()
        first_shared = len(request.rows) - len(request.shared)
        forced = {first_shared + index: group.completions for index, group in enumerate(shared)}
        named = [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]
        state_hash = param_checksum(self.model)
        recorder = GradientRecorder(named, None)
        with keeps_forward(self.model):
            trl_trainer = make_recording_trainer(
                self.model,
                self.tokenizer,
                self.recipe,
                rows,
                settings,
                recorder,
                self.workdir / "trl",
                reward_funcs=request.reward_funcs,
                sampler=request.sampler,
                forced_rows=forced,
            )
            with self._autocast(request.autocast_dtype):
                trl_trainer.train()
        contribution = contribution_from_record(trl_trainer, recorder, state_hash, rows, settings)
        if forced:
            bundles, groups = contribution_sharing(shared)
            contribution = contribution.with_changes(shared_bundles=bundles, shared_groups=groups)
        return ComputedRound(
            trl_trainer, contribution.gradient, len(rows) * settings.num_generations, contribution
        )

    def _compute_sft(self, epoch: int, rows: list[dict[str, Any]], warm: bool) -> ComputedRound:
        """TRL's SFT step on ``rows``, recorded and not stepped (SFT rounds are not committed or audited)."""
        named = [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]
        recorder = GradientRecorder(named, None)
        with keeps_forward(self.model):
            trl_trainer = make_sft_trainer(
                self.model,
                self.tokenizer,
                rows,
                recorder,
                self.workdir / "trl",
                seed=round_seed(self.config.run_id, self.peer.peer_id, epoch),
                micro_batch_size=self.config.training.micro_batch_size,
                bf16=self.config.model.dtype == "bfloat16" and torch.cuda.is_available(),
                max_length=self.config.model.max_positions,
            )
            with self._autocast():
                trl_trainer.train()
        if recorder.gradient is None:
            raise RuntimeError(f"epoch {epoch}: the SFT step finished without reaching the optimizer step")
        return ComputedRound(trl_trainer, recorder.gradient, len(rows))

    def _grpo_settings(self, seed: int) -> GRPOSettings:
        training = self.config.training
        return GRPOSettings(
            num_generations=training.num_generations,
            max_completion_length=training.max_completion_length or self.recipe.max_completion_length,
            temperature=training.temperature,
            top_k=training.top_k,
            top_p=training.top_p,
            min_p=training.min_p,
            stop_token_ids=stop_token_ids(self.model, self.tokenizer),
            seed=seed,
            micro_batch_size=training.micro_batch_size,
            learning_rate=training.learning_rate,
            precision=self.config.precision,
        )

    def credits(self) -> dict[str, Balance]:
        """Every peer's balance in this peer's ledger copy (empty when the ledger is off)."""
        if self.ledger is None:
            return {}
        try:
            return self.ledger.balances()
        except Exception as error:  # a monitor asking must never stop training
            logger.warning(f"Could not compute ledger balances: {type(error).__name__}: {error}")
            return {}

    def _evaluation_due(self, every: int) -> bool:
        """Every ``every`` epochs of progress, once per epoch: a round that failed or was skipped leaves the epoch
        where it was, and the model with it."""
        epoch = self.peer.epoch
        return (
            bool(every) and epoch > 0 and epoch % every == 0 and (self.evaluation or {}).get("epoch") != epoch
        )

    def evaluate(self) -> dict[str, Any] | None:
        """Score the current model on the recipe's held-out rows, greedy and sampled (swarm/training/evaluation.py),
        keep the result for the status file and the summary, and hand it to the monitors. None for a recipe without
        reward functions (nothing to score with)."""
        if not self.recipe.reward_funcs:
            return None
        self._emit("on_phase", f"evaluating epoch {self.peer.epoch} on held-out rows")
        training = self.config.training
        figures, examples = evaluate(
            self.model,
            self.tokenizer,
            self.recipe,
            self.recipe.eval_rows(self.config.monitor.eval_rows),
            training.max_completion_length or self.recipe.max_completion_length,
            training.temperature,
        )
        self.evaluation = dict(epoch=self.peer.epoch, figures=figures, examples=examples)
        with open(
            self.workdir / EVALUATIONS_FILE, "a"
        ) as out:  # the learning curve, for plots and bench/learning.py
            out.write(
                json.dumps(
                    dict(epoch=self.peer.epoch, samples=self.peer.samples, time=time.time(), figures=figures)
                )
                + "\n"
            )
        logger.info(
            f"{self.identity.name} held-out at epoch {self.peer.epoch}: "
            + ", ".join(
                f"{key.removeprefix('eval/')}={value:.3f}"
                for key, value in figures.items()
                if key != "eval/rows"
            )
        )
        self._emit("on_eval", self.evaluation)
        return self.evaluation

    def report(self) -> PeerReport:
        return PeerReport(
            name=self.identity.name,
            peer_id=str(self.identity.peer_id),
            epochs=self.peer.epoch,
            samples=self.peer.samples,
            param_checksum=param_checksum(self.model),
            history=[self.history[epoch] for epoch in sorted(self.history)],
            evaluation=self.evaluation,
        )


@contextlib.contextmanager
def _signals_held(deliver: bool = True):
    """Hold Ctrl+C and SIGTERM (main thread only) while the body runs — writing a checkpoint, which an exception
    raised in the middle of torch.save would leave unfinished and turn into a traceback — and then deliver the
    first one that came to the handler that was in place (``deliver``), or drop it (the peer is already stopping,
    which is what it asked for)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: held.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held and deliver:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL and held[0] == signal.SIGINT:
            raise KeyboardInterrupt


def _last_logged(computed: ComputedRound, name: str) -> float | None:
    """``name`` (reward, loss) of the last TRL log entry of one computation, None if it logged none."""
    logs = [entry for entry in computed.trl_trainer.state.log_history if "loss" in entry]
    value = logs[-1].get(name) if logs else None
    return None if value is None else float(value)


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that exist (an epoch of several inner steps records their mean), None if none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
