"""What one swarm round produced (:class:`RoundResult`), whichever strategy ran it: the type that the epoch, the
verifier and the monitors read."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Outcome(enum.Enum):
    AVERAGED = "averaged"  # stepped on the group's average
    SOLO = "solo"  # nobody else at this epoch: stepped on the local gradient
    RESYNCED = "resynced"  # the swarm was elsewhere: gradient discarded, state downloaded
    SKIPPED = "skipped"  # averaging failed until the round timeout: state untouched


@dataclass
class RoundResult:
    outcome: Outcome
    epoch: int  # the epoch the gradient was computed at
    group_size: int = 1
    # averaged rounds only: the commitment digest of every member in the group's consensus (peer id -> digest) and
    # the hash of the averaged gradient, identical on every member (the audit beacon is made of both)
    commitments: dict[str, str] = field(default_factory=dict)
    averaged_digest: str | None = None
    # the weight each member declared to the group
    declared_samples: dict[str, float] = field(default_factory=dict)
    # what Strategy.step applies (AVERAGED: the group's average; SOLO: the local gradient); None: nothing to step
    update: list[torch.Tensor] | None = field(default=None, repr=False)
    samples: int = 0  # the samples this peer computed for the round, counted once it steps
