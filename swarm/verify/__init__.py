"""Verification: contributions are recorded, committed and audited by replay (see ``docs/design.md`` §2.2)."""

from swarm.verify.replay import (
    Contribution,
    ReplayResult,
    Verdict,
    capture_contribution,
    relative_error,
    replay_gradient,
)

__all__ = [
    "Contribution",
    "ReplayResult",
    "Verdict",
    "capture_contribution",
    "relative_error",
    "replay_gradient",
]
