"""Averaging strategies by name (``averaging.strategy``), as Flower's strategies and hivemind's
``grad_averager_factory`` are chosen: see :mod:`swarm.training.strategies.base` for the protocol.

A strategy is found as

* a name registered with :func:`register_strategy` (``sync``, the default, and ``diloco`` are built in);
* a name published by an installed package under the entry-point group ``swarm.strategies``;
* ``path/to/file.py:ClassName`` — a class in a file (every peer of the run needs the same file).

It is built as ``cls(peer, optimizer, max_grad_norm, **averaging.options)``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from swarm.errors import UserError
from swarm.node.peer import SwarmPeer
from swarm.training.strategies.base import GradientStep, RoundInput, Strategy
from swarm.training.strategies.diloco import DiLoCo
from swarm.training.strategies.sync import SyncGradientAveraging

__all__ = [
    "DiLoCo",
    "GradientStep",
    "RoundInput",
    "Strategy",
    "available_strategies",
    "make_strategy",
    "register_strategy",
    "strategy_class",
]

ENTRY_POINT_GROUP = "swarm.strategies"
_REGISTRY: dict[str, type] = {"sync": SyncGradientAveraging, "diloco": DiLoCo}

T = TypeVar("T", bound=type)


def register_strategy(name: str) -> Callable[[T], T]:
    """Class decorator: make the class selectable as ``averaging.strategy: <name>`` in this process."""

    def register(cls: T) -> T:
        if not (callable(getattr(cls, "round", None)) and callable(getattr(cls, "step", None))):
            raise TypeError(f"strategy {name!r}: {cls.__name__} must define round() and step()")
        _REGISTRY[name] = cls
        return cls

    return register


def available_strategies() -> list[str]:
    """Registered and installed strategy names."""
    installed = [entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return sorted({*_REGISTRY, *installed})


def strategy_class(name: str) -> type:
    """The class ``averaging.strategy`` names. :raises UserError: naming the strategy when it cannot be found"""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name and name.split(":", 1)[0].endswith(".py"):
        file, class_name = name.rsplit(":", 1)
        path = Path(file).expanduser()
        if not path.is_file():
            raise UserError(f"averaging.strategy: file {path} does not exist", exit_code=2)
        spec = importlib.util.spec_from_file_location(f"swarm_strategy_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise UserError(
                f"averaging.strategy: {path} failed to import: {type(error).__name__}: {error}", exit_code=2
            ) from None
        cls = getattr(module, class_name, None)
    else:
        entry = next(
            (ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None
        )
        if entry is None:
            raise UserError(
                f"averaging.strategy: {name!r} is not a strategy (available: "
                f"{', '.join(available_strategies())}; or path/to/file.py:ClassName)",
                exit_code=2,
            )
        try:
            cls = entry.load()
        except Exception as error:
            raise UserError(
                f"averaging.strategy: {name} failed to import: {type(error).__name__}: {error}", exit_code=2
            ) from None
    if not (
        isinstance(cls, type)
        and callable(getattr(cls, "round", None))
        and callable(getattr(cls, "step", None))
    ):
        raise UserError(f"averaging.strategy: {name} is not a class with round() and step()", exit_code=2)
    return cls


def make_strategy(
    name: str,
    peer: SwarmPeer,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    options: dict[str, Any] | None = None,
    cls: type | None = None,
) -> Strategy:
    """Build the strategy ``name`` for ``peer`` (``cls``: its class, already found by :func:`strategy_class`, so
    that a strategy file is imported once). :raises UserError: on an unknown strategy or option"""
    cls = strategy_class(name) if cls is None else cls
    try:
        return cls(peer, optimizer, max_grad_norm, **(options or {}))
    except TypeError as error:
        raise UserError(f"averaging.options: strategy {name}: {error}", exit_code=2) from None
