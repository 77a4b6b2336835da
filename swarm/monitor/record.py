"""One metrics record per epoch, grouped by concern: ``train/…``, ``swarm/…``, ``verify/…``, ``ledger/…``,
``sharing/…``. The trainer builds it once at the end of an epoch; ``status.json``, ``metrics.jsonl``, the terminal
dashboard and W&B all read this record and nothing else (as TRL's callbacks all read the one ``logs`` dict of
``on_log``), so the four show the same figures under the same names.

Groups (a group is absent when its part is off: ``verify`` without verification, ``ledger`` without the ledger,
``sharing`` without rollout sharing):

* ``train``: ``trainer`` ("grpo", or "sft" for an SFT recipe or a warm start), ``reward``, ``loss``, ``samples``
  (computed this epoch), ``total_samples`` (this peer's, all epochs), ``compute_s``, ``rewards`` (each reward
  function's mean over this peer's rollouts);
* ``swarm``: ``outcome`` (:class:`~swarm.node.rounds.Outcome`), ``group_size``, ``sync_s``, ``bytes_sent``,
  ``epoch`` (where this peer is after the round: a catch-up jumps), ``peers_online``, ``swarm_samples``,
  ``trusted_peers``, ``my_weight``;
* ``verify``: ``audit_s``, ``audits_done``, ``cheats_found``, ``my_audits_passed``, ``my_audits_failed``,
  ``banned_peers``, ``banned`` (their ids);
* ``ledger``: ``my_credit``, ``my_credit_provisional``, ``swarm_credit`` (in credits), ``banned`` (this peer);
* ``sharing``: ``published_groups``, ``received_groups``, ``used_groups``, ``dropped``, ``dropped_unsampled``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swarm.node.rounds import Outcome

GROUPS = ("train", "swarm", "verify", "ledger", "sharing")
# text figures that trackers get as one 0/1 flag per possible value (a chart per kind, zeros included)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "swarm/outcome": tuple(kind.value for kind in Outcome),
    "train/trainer": ("grpo", "sft"),
}


@dataclass(frozen=True)
class EpochMetrics:
    """The figures of one epoch of one peer. ``epoch`` is the epoch the round was for."""

    epoch: int
    time: float  # wall-clock seconds since the epoch (Unix time) when the record was made
    train: dict[str, Any]
    swarm: dict[str, Any]
    verify: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    sharing: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> EpochMetrics:
        """A record read back from a line of ``metrics.jsonl`` (:meth:`as_json`)."""
        return cls(
            epoch=int(item["epoch"]),
            time=float(item["time"]),
            **{name: dict(item.get(name) or {}) for name in GROUPS},
        )

    def groups(self) -> dict[str, dict[str, Any]]:
        """The groups that hold figures, by name, in :data:`GROUPS` order."""
        return {name: getattr(self, name) for name in GROUPS if getattr(self, name)}

    def as_json(self) -> dict[str, Any]:
        """The record as one JSON object (a line of ``metrics.jsonl``): ``{epoch, time, train: {…}, swarm: {…},
        …}``."""
        return dict(epoch=self.epoch, time=self.time, **self.groups())

    def flat(self) -> dict[str, float | int]:
        """Numeric figures under ``group/name`` keys, for trackers: nested figures join their keys with ``/``
        (``train/rewards/correct``), a text figure of :data:`CATEGORIES` becomes one 0/1 flag per possible value
        (``swarm/outcome/averaged``), lists and missing values are left out; ``epoch`` is the record's epoch."""
        figures: dict[str, float | int] = {"epoch": self.epoch}

        def add(key: str, value: Any) -> None:
            if isinstance(value, bool):
                figures[key] = int(value)
            elif isinstance(value, int | float):
                figures[key] = value
            elif isinstance(value, dict):
                for name, inner in value.items():
                    add(f"{key}/{name}", inner)
            elif isinstance(value, str) and key in CATEGORIES:
                figures.update({f"{key}/{kind}": int(value == kind) for kind in CATEGORIES[key]})

        for name, group in self.groups().items():
            add(name, group)
        return figures
