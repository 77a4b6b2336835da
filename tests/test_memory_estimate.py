"""The memory check before start (swarm/hardware.py) against what a peer really uses: real `swarm run` peers of
several model sizes, their peak resident memory measured by the kernel, compared with the estimate the peer
checked. The estimate must neither refuse what fits (over 1.5x the peak) nor wave through what does not (under the
peak divided by 1.5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.config import ModelConfig, TrainingConfig, VerifyConfig
from swarm.hardware import Hardware, batch_tokens_for, estimate_for, row_tokens_of
from swarm.recipe import load_recipe
from tests.conftest import PROJECT_ROOT, clean_env

pytestmark = pytest.mark.e2e

SIZES = {  # parameters: about 0.1M (the offline default), 3.7M, 34M
    "default": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=2048),
}

# runs the peer as its only child, so the children's peak RSS is the peer's (and its DHT process's) alone
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print({"code": code, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss})
"""


def _estimate(sizes: dict[str, int]) -> int:
    """The estimate the trainer checks at start for the arithmetic recipe (swarm/training/trainer.py)."""
    recipe, training, verify = load_recipe("arithmetic"), TrainingConfig(), VerifyConfig()
    rows = recipe.assigned_rows("mem", "peer", 0, training.prompts_per_round)
    tokens, generated = batch_tokens_for(training, row_tokens_of(rows, recipe.max_completion_length))
    # the peers verify (the default)
    sized = estimate_for(
        ModelConfig(**sizes),
        Hardware(cpu_count=2, total_ram=None),
        tokens,
        generated,
        audit_window=verify.audit_window,
    )
    assert sized is not None
    return sized[1]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("size", sorted(SIZES))
def test_the_memory_estimate_is_within_one_and_a_half_times_the_measured_peak(
    size: str, tmp_path: Path
) -> None:
    sets = [item for key, value in SIZES[size].items() for item in ("--set", f"model.{key}={value}")]
    command = [
        sys.executable,
        "-c",
        MEASURE,
        sys.executable,
        "-m",
        "swarm.cli",
        "run",
        "--plain",
        "--max-epochs",
        "2",
        "--workdir",
        str(tmp_path / "w"),
        *sets,
    ]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=clean_env(), capture_output=True, text=True, timeout=380
    )
    measured = json.loads(result.stdout.strip().replace("'", '"'))
    assert measured["code"] == 0, (tmp_path / "w" / "peer.log").read_text()[-2000:]
    peak = measured["peak_kib"] * 1024
    estimate = _estimate(SIZES[size])
    assert peak / 1.5 <= estimate <= peak * 1.5, (
        f"estimate {estimate / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
    )
