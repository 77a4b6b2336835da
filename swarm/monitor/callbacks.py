"""Hooks through which monitors (the terminal dashboard, W&B, ...) follow a peer without the trainer knowing them.

Same convention as ``transformers.TrainerCallback``: subclass, override what you need; every hook is called from
the training thread, and an exception in a hook is logged and does not stop training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.monitor.record import EpochMetrics
    from swarm.training.trainer import SwarmTrainer


class SwarmCallback:
    def on_start(self, trainer: SwarmTrainer) -> None:
        """The peer has joined the swarm (its DHT node and averager run)."""

    def on_phase(self, trainer: SwarmTrainer, phase: str) -> None:
        """The peer moved to another phase: 'computing epoch 3', 'averaging epoch 3', 'catching up', ..."""

    def on_epoch_end(self, trainer: SwarmTrainer, metrics: EpochMetrics) -> None:
        """An epoch finished; ``metrics`` is its one record (swarm/monitor/record.py: ``metrics.swarm["outcome"]``,
        ``metrics.train["reward"]``, ``metrics.flat()`` for a tracker), what status.json and metrics.jsonl hold."""

    def on_completions(self, trainer: SwarmTrainer, samples: list[dict]) -> None:
        """A few of this epoch's rollouts, each ``{epoch, prompt, completion, reward, rewards: {function: value}}``
        (every ``monitor.completions_every`` epochs)."""

    def on_eval(self, trainer: SwarmTrainer, evaluation: dict) -> None:
        """A held-out evaluation finished: ``{epoch, figures: {eval/...: value}, examples: [{prompt, completion}]}``."""

    def on_end(self, trainer: SwarmTrainer) -> None:
        """Training stopped (done, interrupted or failed); the checkpoint is saved."""
