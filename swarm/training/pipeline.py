"""The contribution pipeline of a GRPO epoch: **compute → commit → send**, plus what the peer **announces** and, for
a strategy of inner steps (DiLoCo), the pseudo-gradient it commits and sends (**outer**).

:meth:`SwarmTrainer.run_epoch <swarm.training.trainer.SwarmTrainer.run_epoch>` calls these four stages of one
pipeline object and never asks whether the peer is honest. The honest pipeline (:class:`HonestPipeline`) computes
with TRL, commits and sends what it computed, and announces the truth. A cheater of the attack suite
(``verify.attack``, :mod:`swarm.verify.attacks`) is a :class:`CheatingPipeline` *wrapped around* the honest one,
installed from the config by :func:`install`: it changes the request before the honest computation runs (other
rows, other reward functions, a lower precision) and what leaves each later stage (the committed contribution,
the sent gradient, the announced status), through the seams of its :class:`~swarm.verify.attacks.Attack`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from swarm.recipe import Recipe
from swarm.sampling import Sampler, generate_request
from swarm.sharing import ExternalGroup
from swarm.verify.attacks import Attack, AttackContext
from swarm.verify.contribution import Contribution


@dataclass(frozen=True)
class ComputeRequest:
    """What one epoch's contribution is asked to be."""

    epoch: int
    rows: list[
        dict[str, Any]
    ]  # what the contribution claims: the assigned rows, then the shared groups' rows
    seed: int  # the round seed (sampling, and a cheater's randomness)
    # other peers' shared groups (their rows end ``rows``); trained on with their completions taken as given
    shared: tuple[ExternalGroup, ...] = ()
    use_shared: bool = True  # False: computed without the shared groups (``compute_rows`` then says on what)
    compute_rows: list[dict[str, Any]] | None = None  # what TRL really computes on (None: ``rows``)
    reward_funcs: list[Any] = field(default_factory=list)  # the recipe's checked reward functions (honest)
    autocast_dtype: torch.dtype | None = None  # None: the declared precision
    sampler: Sampler | None = None  # what samples the completions (None: the seeded sampler)
    inner_step: int = 0  # which inner step of its epoch this is (a strategy of several per epoch: DiLoCo)


@dataclass
class ComputedRound:
    """What this peer computed for an epoch, before the round."""

    # the TRL trainer that ran the step (its log history and rollouts feed the epoch's record)
    trl_trainer: Any
    sent: list[torch.Tensor]  # the gradient sent into the round, one tensor per trainable parameter
    samples: int  # the sample count claimed (the averaging weight)
    contribution: Contribution | None = None  # GRPO: what is committed and served to auditors


class Pipeline(Protocol):
    """The four stages; each returns what the next one (or the swarm) gets."""

    def compute(self, request: ComputeRequest) -> ComputedRound: ...

    def commit(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        """``computed`` with the contribution that is committed and served to auditors."""
        ...

    def send(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        """``computed`` with the gradient that goes into the all-reduce."""
        ...

    def announce(self, peer: Any) -> None:
        """Install what the peer (a :class:`~swarm.node.peer.SwarmPeer`, before it starts) announces and serves."""
        ...

    def outer(self, pseudo_gradient: list[torch.Tensor]) -> list[torch.Tensor]:
        """A strategy of inner steps (DiLoCo): the pseudo-gradient that is committed and sent, given the one the
        epoch's inner steps give."""
        ...


class HonestPipeline:
    """Computes with ``compute`` (the trainer's recorded TRL step), commits and sends exactly that, announces the
    truth."""

    def __init__(self, compute: Callable[[ComputeRequest], ComputedRound]):
        self._compute = compute

    def compute(self, request: ComputeRequest) -> ComputedRound:
        return self._compute(request)

    def commit(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        return computed

    def send(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        return computed

    def announce(self, peer: Any) -> None:
        pass

    def outer(self, pseudo_gradient: list[torch.Tensor]) -> list[torch.Tensor]:
        return pseudo_gradient


class CheatingPipeline:
    """``inner`` with an :class:`~swarm.verify.attacks.Attack` around it: the attack sees one
    :class:`~swarm.verify.attacks.AttackContext` per epoch (the same random generator across the stages of that
    epoch, its own previous committed contribution, another peer's through ``other``)."""

    def __init__(
        self,
        inner: Pipeline,
        attack: Attack,
        unassigned_rows: Callable[[ComputeRequest], list[dict[str, Any]]],
        other: Callable[[int], Contribution | None],
        tokenizer: Any = None,
        recipe: Recipe | None = None,
        only_step: int | None = None,
    ):
        self.inner, self.attack, self.only_step = inner, attack, only_step
        self._unassigned_rows, self._other = unassigned_rows, other
        self._tokenizer, self._recipe = tokenizer, recipe
        self._previous: Contribution | None = None
        self._context: tuple[int, AttackContext] | None = None

    def cheats(self, request: ComputeRequest) -> bool:
        """Whether the attack applies to ``request`` (every step, or only ``only_step`` of each epoch)."""
        return self.only_step is None or request.inner_step == self.only_step

    def context(self, request: ComputeRequest) -> AttackContext:
        if self._context is None or self._context[0] != request.epoch:
            context = AttackContext(
                rows=request.rows,
                unassigned_rows=lambda: self._unassigned_rows(request),
                previous=self._previous,
                other=lambda: self._other(request.epoch),
                generator=torch.Generator().manual_seed(request.seed),
                tokenizer=self._tokenizer,
                recipe=self._recipe,
            )
            self._context = (request.epoch, context)
        return self._context[1]

    def compute(self, request: ComputeRequest) -> ComputedRound:
        if not self.cheats(request):
            return self.inner.compute(request)
        context = self.context(request)
        return self.inner.compute(
            replace(
                request,
                compute_rows=self.attack.compute_rows(context),
                use_shared=False,  # a cheater trains on no shared groups (what it claims is still ``rows``)
                reward_funcs=self.attack.reward_funcs(request.reward_funcs),
                autocast_dtype=self.attack.autocast_dtype(),
                sampler=self.attack.sampler(generate_request, context),
            )
        )

    def commit(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        computed = self.inner.commit(request, computed)
        if not self.cheats(request):
            return computed
        contribution = self.attack.tamper(computed.contribution, self.context(request))
        self._previous = contribution
        return replace(computed, contribution=contribution)

    def send(self, request: ComputeRequest, computed: ComputedRound) -> ComputedRound:
        computed = self.inner.send(request, computed)
        if not self.cheats(request):
            return computed
        sent = self.attack.sent(computed.contribution.gradient, self.context(request))
        return replace(computed, sent=[grad.detach().clone() for grad in sent])

    def announce(self, peer: Any) -> None:
        self.inner.announce(peer)
        self.attack.deceive(peer)

    def outer(self, pseudo_gradient: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.attack.pseudo_gradient(self.inner.outer(pseudo_gradient))


def install(
    honest: Pipeline,
    attack: Attack | None,
    unassigned_rows: Callable[[ComputeRequest], list[dict[str, Any]]],
    other: Callable[[int], Contribution | None],
    tokenizer: Any = None,
    recipe: Recipe | None = None,
    only_step: int | None = None,
) -> Pipeline:
    """The pipeline of a peer: ``honest``, or ``attack`` (``verify.attack``) wrapped around it (``tokenizer`` and
    ``recipe``: what a sampling attack encodes its chosen completions with; ``only_step``: ``verify.attack_step``,
    the one inner step of each epoch it cheats in)."""
    if attack is None:
        return honest
    return CheatingPipeline(honest, attack, unassigned_rows, other, tokenizer, recipe, only_step)
