"""The strategy slot: how a peer turns the gradient it computed for an epoch into the swarm's next state.

:class:`swarm.training.trainer.SwarmTrainer.run_epoch` computes and commits a contribution, then calls, in this
order and nothing else:

1. ``result = strategy.round(RoundInput(epoch, gradient, samples, commitment))`` — meet the swarm (barrier,
   all-reduce, catch-up) and say what happened (:class:`RoundResult`). A round that steps carries the ``update``
   to apply; one that downloaded the swarm's state (``RESYNCED``) or failed (``SKIPPED``) carries none.
2. ``strategy.step(result)`` when ``result.update`` is not None — apply it: θ_e → θ_{e+1}, identically on every
   member of the group.

A strategy that takes several local steps per epoch (DiLoCo) also has, and the trainer then calls:

* ``inner_steps`` — computations per epoch (1 when absent), and ``inner_seconds`` — a compute budget after which
  the epoch takes no further computation (None: none);
* ``begin_epoch(epoch)`` — before the epoch's first computation;
* ``inner_step(gradient)`` — after each computation;
* ``pseudo_gradient()`` — after the last inner step: what the round sends (``RoundInput.gradient``) and what
  verification commits to, instead of the last computation's gradient;
* the class methods ``check_config(config)`` (refuse settings it does not support, before anything is loaded) and
  ``shared_state(model, optimizer, config)`` (the :class:`~swarm.node.state.TrainingState` the peer announces,
  serves and checkpoints, when that is not the model and its optimizer).

A strategy only touches the peer through :class:`~swarm.node.peer.SwarmPeer`'s methods. Strategies register
by name (:func:`swarm.training.strategies.register_strategy`) and are chosen with ``averaging.strategy``; the
settings of the chosen one come from ``averaging.options`` as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from swarm.node.peer import SwarmPeer
from swarm.node.rounds import Outcome, RoundResult

__all__ = ["GradientStep", "Outcome", "RoundInput", "RoundResult", "Strategy"]


@dataclass(frozen=True)
class RoundInput:
    """What the epoch hands the strategy: this peer's contribution to the round, already committed."""

    epoch: int  # the epoch the gradient was computed at (the peer's current one)
    # one tensor per trainable parameter, TrainingState.params order; what is sent
    gradient: list[torch.Tensor]
    samples: int  # the sample count this peer claims (its averaging weight, capped at averaging.max_weight)
    # digest of the published commitment (verification on), exchanged with the group
    commitment: str | None = None


@runtime_checkable
class Strategy(Protocol):
    """A swarm averaging strategy (see the module docstring for when each method is called).

    Guarantee expected of an implementation: every peer that ``step`` s on a round's result in the same group
    ends with bit-identical parameters and optimizer statistics.
    """

    def round(self, work: RoundInput) -> RoundResult: ...

    def step(self, result: RoundResult) -> None: ...


class GradientStep:
    """The step that gradient-averaging strategies share: clip the update (after averaging, so the clip is the
    same on every peer), apply it with the local optimizer, advance the epoch.

    :param peer: the peer whose state is stepped
    :param optimizer: the local optimizer (identical hyperparameters on every peer)
    :param max_grad_norm: clip the update to this norm (0: no clipping)
    """

    def __init__(
        self, peer: SwarmPeer, optimizer: torch.optim.Optimizer, max_grad_norm: float, **options: Any
    ):
        if options:
            raise TypeError(f"unknown option(s) {', '.join(sorted(options))}")
        self.peer, self.optimizer, self.max_grad_norm = peer, optimizer, max_grad_norm

    inner_steps = 1  # one computation per epoch: its gradient is the round's
    inner_seconds: float | None = None

    def begin_epoch(self, epoch: int) -> None:
        """Nothing to prepare: the model is the shared state."""

    def step(self, result: RoundResult) -> None:
        if result.update is None:
            raise ValueError(f"epoch {result.epoch}: a {result.outcome.value} round has no update to step on")
        params = self.peer.state.params
        with self.peer.lock:
            for param, grad in zip(params, result.update):
                param.grad = grad.to(param.device, param.dtype)
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.peer.advance(result.epoch + 1, result.samples)
