"""``averaging.strategy: diloco``: DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training
of Language Models"), one all-reduce per ``diloco.inner_steps`` optimizer steps.

One epoch of a DiLoCo peer, as :class:`~swarm.training.trainer.SwarmTrainer` drives it:

1. :meth:`DiLoCo.begin_epoch` — the model is set to the swarm's shared state θ_e and the inner optimizer
   (the training section's AdamW) starts afresh;
2. H = ``diloco.inner_steps`` computations, each on rows assigned for (epoch, inner step) — fewer when the
   ``diloco.inner_seconds`` budget runs out first, so a slow peer takes fewer steps instead of holding the round —
   and after every one, :meth:`DiLoCo.inner_step` applies the local gradient (clipped to ``training.max_grad_norm``);
   with verification on, each step is committed as it is taken (swarm/verify/inner.py);
3. :meth:`DiLoCo.round` meets the swarm with the pseudo-gradient θ_e − θ_local (:meth:`DiLoCo.pseudo_gradient`,
   committed before it is sent): the barrier, all-reduce (weighted by the samples of all H steps, through
   ``averaging.compression``) and consensus of :class:`~swarm.training.strategies.sync.SyncGradientAveraging`;
4. :meth:`DiLoCo.step` — the outer step: SGD with Nesterov momentum (``diloco.outer_lr``, ``outer_momentum``) on
   θ_e with the averaged pseudo-gradient. Every member holds the same θ_e, outer momentum and average, so every
   member ends with bit-identical parameters.

The state a DiLoCo peer announces, serves to peers that catch up and checkpoints is the shared one — θ_e and the
outer momentum (:meth:`DiLoCo.shared_state`) — not the model it trains between two rounds: at one epoch every
member announces the same hash, and a peer that downloads the swarm's state starts its inner steps from it.

Why the inner optimizer restarts every epoch (the paper keeps its state): its statistics would be the one part of a
peer's step that no other peer can know, so the inner trajectory would stop being a pure function of θ_e and the
peer's own rows — which is what a replay needs to audit an inner step: an auditor checks step k from the inner
state the peer committed to before it, and that state's chain back to θ_e is checked at every audited step.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm.config import SwarmConfig
from swarm.errors import UserError
from swarm.node.peer import SwarmPeer
from swarm.node.rounds import RoundResult
from swarm.node.state import TrainingState
from swarm.training.strategies.base import RoundInput
from swarm.training.strategies.sync import SyncGradientAveraging
from swarm.verify.inner import optimizer_step, pseudo_gradient


class DiLoCo(SyncGradientAveraging):
    """H local steps per epoch, then one outer step on the swarm-averaged pseudo-gradient (module docstring).

    :param peer: the peer whose shared state (:meth:`shared_state`), averager and status board are used
    :param optimizer: the inner optimizer over the model's trainable parameters
    :param max_grad_norm: clip each inner step's gradient to this norm (0: no clipping)
    """

    @classmethod
    def check_config(cls, config: SwarmConfig) -> None:
        """Refuse what DiLoCo does not support yet, before anything is loaded. :raises UserError: naming the key"""
        if config.sharing.enabled:
            raise UserError(
                "averaging.strategy: diloco does not share rollouts yet; set sharing.enabled=false",
                exit_code=2,
            )

    @classmethod
    def shared_state(
        cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: SwarmConfig
    ) -> TrainingState:
        """The state the swarm agrees on: an fp32 CPU copy of the model's trainable parameters (θ_e) and the outer
        optimizer over it (SGD, Nesterov momentum), as one :class:`TrainingState`."""
        settings = config.diloco
        outer = torch.nn.ParameterList(
            torch.nn.Parameter(param.detach().to("cpu", torch.float32, copy=True))
            for param in model.parameters()
            if param.requires_grad
        )
        outer_optimizer = torch.optim.SGD(
            outer.parameters(),
            lr=settings.outer_lr,
            momentum=settings.outer_momentum,
            nesterov=settings.nesterov and settings.outer_momentum > 0,
        )
        return TrainingState(outer, outer_optimizer)

    def __init__(
        self, peer: SwarmPeer, optimizer: torch.optim.Optimizer, max_grad_norm: float, **options: Any
    ):
        super().__init__(peer, optimizer, max_grad_norm, **options)
        if not isinstance(peer.state.optimizer, torch.optim.SGD):
            raise TypeError(
                "the peer's state must be DiLoCo.shared_state (the outer parameters and their SGD)"
            )
        self.inner_steps = peer.config.diloco.inner_steps
        self.inner_seconds = peer.config.diloco.inner_seconds
        self.outer = peer.state
        self.inner_params = [param for group in optimizer.param_groups for param in group["params"]]
        if [tuple(p.shape) for p in self.inner_params] != [tuple(p.shape) for p in self.outer.params]:
            raise TypeError("the inner optimizer's parameters do not match the shared state's")
        self.begin_epoch(peer.epoch)

    def begin_epoch(self, epoch: int) -> None:
        """Start the epoch's inner steps from the shared state θ_e, with a fresh inner optimizer."""
        with torch.no_grad():
            for inner, outer in zip(self.inner_params, self.outer.params):
                inner.copy_(outer.to(inner.device, inner.dtype))
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    def inner_step(self, gradient: list[torch.Tensor]) -> None:
        """One local optimizer step on this peer's own gradient (clipped to ``max_grad_norm``): the step an auditor
        of it takes too (:func:`swarm.verify.inner.optimizer_step`)."""
        optimizer_step(self.inner_params, self.optimizer, gradient, self.max_grad_norm)

    def pseudo_gradient(self) -> list[torch.Tensor]:
        """θ_e − θ_local, in fp32 on the CPU (what the all-reduce averages): call after the epoch's last inner step."""
        return pseudo_gradient(self.outer.params, self.inner_params)

    def round(self, work: RoundInput) -> RoundResult:
        """The sync round with ``work.gradient``, the pseudo-gradient (:meth:`pseudo_gradient`); a round without an
        update (the state was downloaded, or averaging failed) restarts the model from the shared state, so the next
        epoch never continues from inner steps the swarm did not take."""
        result = super().round(work)
        if result.update is None:
            self.begin_epoch(self.peer.epoch)
        return result

    def step(self, result: RoundResult) -> None:
        """The outer step θ_e → θ_{e+1} with the round's (averaged) pseudo-gradient, identical on every member."""
        if result.update is None:
            raise ValueError(f"epoch {result.epoch}: a {result.outcome.value} round has no update to step on")
        with self.peer.lock:
            for param, update in zip(self.outer.params, result.update):
                param.grad = update.to(param.dtype)
            self.outer.optimizer.step()
            self.outer.optimizer.zero_grad(set_to_none=True)
            self.begin_epoch(result.epoch + 1)
            self.peer.advance(result.epoch + 1, result.samples)
