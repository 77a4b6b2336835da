"""Run summary JSON (read by teams and tests) and the small per-peer status file ``swarm local`` displays.

Summary format::

    {"run_id": str, "peers": [{"name", "peer_id", "epochs", "samples", "param_checksum",
                               "history": [{"epoch", "reward", "loss"}, ...]}, ...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
# a few rollouts with their rewards every monitor.completions_every epochs
COMPLETIONS_FILE = "completions.jsonl"
METRICS_FILE = "metrics.jsonl"  # one JSON object per epoch: reward, loss, outcome, timings, bytes sent
PEER_SUMMARY_FILE = "summary.json"
# one JSON object per held-out evaluation: epoch, samples, time, figures
EVALUATIONS_FILE = "evaluations.jsonl"


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(staging, path)


def write_summary(path: Path, run_id: str, peers: list[dict[str, Any]]) -> None:
    write_json_atomic(path, {"run_id": run_id, "peers": peers})


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
