"""A contribution: everything an auditor needs to recompute a peer's gradient for one epoch (docs/design.md §2,
step 3) — the hash of the model state it was computed at, the assigned rows, the rollouts as token ids (prompts
and completions, with TRL's padded tensors and masks), the rewards it claims per reward function, the advantages it
claims, and the gradient it claims (one tensor per trainable parameter, ``named_parameters`` order)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from swarm.trl_adapter import GRPOSettings

__all__ = ["Contribution"]


@dataclass
class Contribution:
    """What a peer keeps for the audit window, and what an auditor replays."""

    state_hash: str  # param_checksum of the model the gradient was computed at
    rows: list[dict[str, Any]]  # the assigned rows (an auditor can regenerate them from the seed)
    settings: GRPOSettings
    # one per completion, in TRL's order (each prompt repeated num_generations)
    prompt_token_ids: list[list[int]]
    completion_token_ids: list[list[int]]  # as sampled, unpadded
    prompt_ids: torch.Tensor  # TRL's left-padded prompt tensor, (N, P)
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # TRL's right-padded completion tensor, (N, C)
    completion_mask: torch.Tensor
    reward_names: list[str]
    rewards: torch.Tensor  # claimed rewards per reward function, (N, F); NaN where a function returned None
    advantages: torch.Tensor  # claimed advantages, (N,)
    order: list[int]  # the order TRL's shuffle put the completions in before cutting them into micro-batches
    param_names: list[str]  # trainable parameters, named_parameters order
    gradient: list[torch.Tensor]  # claimed gradient, one tensor per name in param_names
    # rollout sharing (swarm/sharing.py): the signed bundles of other peers this contribution trained on, as
    # [canonical bytes, signature], and for each of the last len(shared_groups) rows its [bundle, group] indices
    shared_bundles: list[list[bytes]] = field(default_factory=list)
    shared_groups: list[list[int]] = field(default_factory=list)

    @property
    def num_completions(self) -> int:
        return len(self.completion_token_ids)

    def with_changes(self, **changes: Any) -> Contribution:
        """A copy with some fields replaced (what a cheater would send)."""
        return replace(self, **changes)
