"""Verification: contributions are recorded, committed and audited by replay (see ``../shared/DESIGN.md`` §3)."""

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
