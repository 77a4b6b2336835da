"""The optimizer a TRL trainer is given: its ``step()`` is one swarm round (see ``strategies/sync.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swarm.training.strategies.sync import RoundResult


class SwarmOptimizer(torch.optim.Optimizer):
    """Wraps the local optimizer so that TRL's training loop stays untouched: the trainer computes and accumulates
    the gradient as usual, and its call to ``step()`` hands the gradient to the swarm, which applies the averaged
    step (or skips it) through the wrapped optimizer. Parameter groups and state are the wrapped optimizer's.

    :param inner: the local optimizer (e.g. AdamW) — identical hyperparameters on every peer
    :param finish_round: called with no arguments by ``step()``; returns what happened to the round
    """

    def __init__(self, inner: torch.optim.Optimizer, finish_round: Callable[[], RoundResult]):
        # torch.optim.Optimizer.__init__ is not called: every attribute it would set is the inner optimizer's
        self.inner, self.finish_round = inner, finish_round
        self.last_result: RoundResult | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("SwarmOptimizer does not support closures")
        self.last_result = self.finish_round()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"SwarmOptimizer({self.inner!r})"
