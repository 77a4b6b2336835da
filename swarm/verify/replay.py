"""Verification by replay, first slice: record a contribution during a real TRL GRPO step, replay it offline.

A *contribution* is everything an auditor needs to recompute a peer's gradient for one epoch (docs/design.md §2, step 7):
the hash of the model state it was computed at, the assigned rows, the rollouts as token ids (prompts and
completions, with TRL's padded tensors and masks), the rewards it claims per reward function, the advantages it
claims, and the gradient it claims (one tensor per trainable parameter, ``named_parameters`` order).

Both sides run TRL's own code: :class:`RecordingGRPOTrainer` is a ``GRPOTrainer`` that

* when capturing, samples completions as usual and records what TRL builds from them;
* when replaying, returns the recorded completion token ids instead of sampling (its only change to TRL's
  computation), so that TRL itself re-tokenizes the prompts from the rows, decodes the completions, re-scores them
  with the auditor's reward functions, recomputes the advantages, builds the loss and backpropagates — with the
  same ``GRPOConfig`` (loss type, reward scaling, micro-batching) as the peer.

The gradient is read from ``param.grad`` when TRL calls ``optimizer.step()`` (:class:`GradientRecorder`, which the
peer's own epoch uses too: TRL computes, the swarm steps). Nothing is trusted: a replay that finds other prompts
(``wrong_data``), other rewards (``forged_rewards``), other advantages (``forged_advantages``) or a gradient further
than the tolerance from the claimed one (``gradient_mismatch``) fails, and a replay is only attempted from the
model state the contribution claims (``wrong_state``).

TRL itself is reached only through :mod:`swarm.trl_adapter`; what is checked, in which order, is the list
:data:`swarm.verify.checks.REPLAY_CHECKS`.

Measured on the tiny offline model (fp32, CPU, tests/test_replay.py): replaying with the same micro-batch split and
order is bitwise exact (error 0), whatever the thread count; another order within one micro-batch gives ~1e-7..1e-6;
another micro-batch split gives ~2e-3 (the attention backward is that sensitive to which sequences share a batch),
which is why the order is part of the contribution. Tampered gradients are >= 0.25 away.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from swarm.node.state import param_checksum
from swarm.recipe import Recipe
from swarm.sampling import Sampler
from swarm.verify.checks import (
    ADVANTAGE_TOLERANCE,
    GRADIENT_TOLERANCE,
    OTHER_SPLIT_TOLERANCE,
    REPLAY_CHECKS,
    REWARD_TOLERANCE,
    ReplayCase,
    Verdict,
    relative_error,
    run_checks,
)
from swarm.verify.contribution import Contribution

__all__ = [
    "ADVANTAGE_TOLERANCE",
    "GRADIENT_TOLERANCE",
    "OTHER_SPLIT_TOLERANCE",
    "REWARD_TOLERANCE",
    "Contribution",
    "GRPOSettings",
    "ReplayResult",
    "Replayer",
    "Verdict",
    "capture_contribution",
    "contribution_from_record",
    "relative_error",
    "replay_gradient",
]
from swarm.trl_adapter import (
    GradientRecorder,
    GRPOSettings,
    RecordingGRPOTrainer,
    keeps_forward,
    make_recording_trainer,
)


@dataclass
class ReplayResult:
    verdict: Verdict
    error: float  # relative L2 error of the claimed gradient (inf when the replay did not get that far)
    tolerance: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def capture_contribution(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    rows: list[dict[str, Any]],
    settings: GRPOSettings,
    optimizer: torch.optim.Optimizer | None = None,
    output_dir: str | Path | None = None,
    sampler: Sampler | None = None,
) -> Contribution:
    """Run one real TRL GRPO step on ``rows`` and record the contribution it makes.

    :param optimizer: stepped with the recorded gradient after recording (e.g. the peer's AdamW); None: the model
      is left unchanged
    :param sampler: what generates the completions (None: the seeded sampler; a benchmark passes a timed one)
    """
    state_hash = param_checksum(model)
    named = _trainable(model)
    recorder = GradientRecorder(named, optimizer)
    with tempfile.TemporaryDirectory() as scratch, keeps_forward(model):
        trainer = make_recording_trainer(
            model, tokenizer, recipe, rows, settings, recorder, output_dir or scratch, sampler=sampler
        )
        trainer.train()
    return contribution_from_record(trainer, recorder, state_hash, rows, settings)


def contribution_from_record(
    trainer: RecordingGRPOTrainer,
    recorder: GradientRecorder,
    state_hash: str,
    rows: list[dict[str, Any]],
    settings: GRPOSettings,
) -> Contribution:
    """The contribution a recording trainer has made once TRL reached ``optimizer.step()`` (the recorder has the
    gradient, the record the rollouts). :raises RuntimeError: if it has not got that far"""
    record = trainer.record
    if recorder.gradient is None or record.inputs is None or record.rewards is None:
        raise RuntimeError("the GRPO step finished without an optimizer step or without rollouts")
    inputs = record.inputs
    return Contribution(
        state_hash=state_hash,
        rows=[dict(row) for row in rows],
        settings=settings,
        prompt_token_ids=record.prompt_token_ids,
        completion_token_ids=record.completion_token_ids,
        prompt_ids=inputs["prompt_ids"],
        prompt_mask=inputs["prompt_mask"],
        completion_ids=inputs["completion_ids"],
        completion_mask=inputs["completion_mask"],
        reward_names=list(trainer.reward_func_names),
        rewards=record.rewards,
        advantages=inputs["advantages"],
        order=record.order,
        param_names=list(recorder.names),
        gradient=recorder.gradient,
    )


def replay_gradient(
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    contribution: Contribution,
    *,
    rows: list[dict[str, Any]] | None = None,
    micro_batch_size: int | None = None,
    tolerance: float = GRADIENT_TOLERANCE["fp32"],
) -> ReplayResult:
    """Recompute a contribution's gradient with TRL from ``model`` (which must be at the contribution's state) and
    judge it, with a TRL trainer built for this replay only. The model's parameters and forward are left unchanged.
    An auditor that replays many contributions uses a :class:`Replayer` instead (same verdicts, less overhead).

    :param rows: the rows the peer was assigned (regenerated by the auditor); None: the contribution's own rows
    :param micro_batch_size: the auditor's own micro-batch split (None: the peer's, which replays bitwise); another
      split moves an fp32 gradient by ~2e-3, so pass ``tolerance=OTHER_SPLIT_TOLERANCE`` with it
    :param tolerance: relative L2 error allowed for the declared precision class (:data:`GRADIENT_TOLERANCE`)
    """
    with keeps_forward(model), tempfile.TemporaryDirectory() as scratch:

        def fresh(rows: list[dict[str, Any]], settings: GRPOSettings, **replay: Any):
            recorder = GradientRecorder(_trainable(model), None)
            trainer = make_recording_trainer(
                model, tokenizer, recipe, rows, settings, recorder, scratch, **replay
            )
            return trainer, recorder

        return _judge(model, contribution, rows, micro_batch_size, tolerance, fresh)


class Replayer:
    """Replays contributions on one model (the auditor's), reusing one TRL trainer per (GRPO settings, row count)
    instead of building one per replay — building a ``GRPOTrainer`` costs as much as a tiny model's whole replay.

    Verdicts are those of :func:`replay_gradient` (tests/test_replay.py checks they are identical). The model's
    forward stays wrapped in TRL's fused LM head once per cached trainer (behaviour-preserving unless called with
    ``fused_lm_head=True``); at most ``max_cached`` trainers are kept.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, recipe: Recipe, max_cached: int = 4):
        self.model, self.tokenizer, self.recipe, self.max_cached = model, tokenizer, recipe, max_cached
        self._cache: dict[tuple, tuple[RecordingGRPOTrainer, GradientRecorder]] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="swarm-replay-")

    def replay(
        self,
        contribution: Contribution,
        *,
        rows: list[dict[str, Any]] | None = None,
        micro_batch_size: int | None = None,
        tolerance: float = GRADIENT_TOLERANCE["fp32"],
    ) -> ReplayResult:
        """Same as :func:`replay_gradient` on this replayer's model."""
        return _judge(self.model, contribution, rows, micro_batch_size, tolerance, self.trainer_for)

    def trainer_for(self, rows: list[dict[str, Any]], settings: GRPOSettings, **replay: Any):
        key = (replace(settings, seed=0, learning_rate=0.0), len(rows))  # neither changes a replayed gradient
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            recorder = GradientRecorder(_trainable(self.model), None)
            trainer = make_recording_trainer(
                self.model, self.tokenizer, self.recipe, rows, settings, recorder, self._scratch.name
            )
            self._cache[key] = (trainer, recorder)
        trainer, recorder = self._cache[key]
        trainer.reset_for_replay(
            rows, replay["replay_prompts"], replay["replay_completions"], replay["replay_order"]
        )
        recorder.gradient = None
        return trainer, recorder


def _judge(
    model, contribution: Contribution, rows, micro_batch_size, tolerance: float, trainer_for
) -> ReplayResult:
    """The replay checks (:data:`~swarm.verify.checks.REPLAY_CHECKS`) on ``contribution``, ``trainer_for(rows,
    settings, **replay) -> (trainer, recorder)`` giving the recording trainer that replays it."""
    case = ReplayCase(
        contribution,
        model,
        contribution.rows if rows is None else rows,
        tolerance,
        trainer_for,
        micro_batch_size,
    )
    result = run_checks(case, REPLAY_CHECKS)
    return ReplayResult(
        result.verdict, math.inf if result.error is None else result.error, tolerance, case.details
    )
