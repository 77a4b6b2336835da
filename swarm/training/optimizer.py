"""Optimizers handed to TRL trainers: wrappers whose ``step()`` does swarm work around a local optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swarm.training.strategies.sync import RoundResult


class WrappedOptimizer(torch.optim.Optimizer):
    """Base for optimizers that hand TRL the parameter groups and state of an ``inner`` optimizer and decide in
    ``step()`` what happens with the accumulated gradient. Subclasses implement ``step``."""

    def __init__(self, inner: torch.optim.Optimizer):
        # torch.optim.Optimizer.__init__ is not called: every attribute it would set is the inner optimizer's
        self.inner = inner

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
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class SwarmOptimizer(WrappedOptimizer):
    """Its ``step()`` is one swarm round, so TRL's training loop stays untouched: the trainer computes and
    accumulates the gradient as usual, and the swarm applies the averaged step (or skips it) through ``inner``.

    :param inner: the local optimizer (e.g. AdamW) — identical hyperparameters on every peer
    :param finish_round: called with no arguments by ``step()``; returns what happened to the round
    """

    def __init__(self, inner: torch.optim.Optimizer, finish_round: Callable[[], RoundResult]):
        super().__init__(inner)
        self.finish_round = finish_round
        self.last_result: RoundResult | None = None

    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("SwarmOptimizer does not support closures")
        self.last_result = self.finish_round()
