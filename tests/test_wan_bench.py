"""A smoke run of bench/wan.py: three real peers, each behind its own shaped link (50 ms ± 10, 50 Mbit/s, 0.5 %
loss), train with DiLoCo and end on one checksum; the JSON keeps issue 14's shape. (The slow-peer case runs in
the benchmark; its mechanism, the inner time budget, is tested in tests/test_diloco.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, clean_env

pytestmark = pytest.mark.e2e

RUN_KEYS = {"profile", "strategy", "H", "case", "compute_fraction", "bytes_per_sample", "reward"}
RUN_KEYS |= {"checksums_identical", "forks", "stall_s"}


@pytest.mark.timeout(300)
def test_three_diloco_peers_behind_shaped_links_end_on_one_checksum() -> None:
    command = [sys.executable, str(PROJECT_ROOT / "bench" / "wan.py"), "--json", "--profiles", "wan50"]
    command += ["--strategies", "diloco:2", "--steps", "2", "--slow-profiles", "", "--timeout", "240"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=280, env=clean_env({}), check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout)["runs"]
    assert [(run["profile"], run["strategy"], run["H"], run["case"]) for run in runs] == [
        ("wan50", "diloco", 2, "equal")
    ]
    run = runs[0]
    assert RUN_KEYS <= set(run)
    assert run["checksums_identical"] and run["forks"] == 0
    assert run["epochs"] == 1 and run["samples"] == 3 * 2 * 16 * 8
    assert 0 < run["compute_fraction"] <= 1 and run["bytes_per_sample"] > 0
    assert run["reward"] is not None
