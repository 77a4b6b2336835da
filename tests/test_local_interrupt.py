"""Ctrl+C on ``swarm local`` stops every peer process and its p2p daemon, with checkpoints saved."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Processes, peer_epoch, processes_mentioning, wait_until


@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_peer_and_daemon(tmp_path: Path, processes: Processes) -> None:
    workdir = tmp_path / "sim"
    local = processes.start(
        [sys.executable, "-m", "swarm.cli", "local", "--peers", "2", "--max-epochs", "100", "--plain",
         "--workdir", str(workdir)],
        log=tmp_path / "local.log",
    )
    wait_until(lambda: all(peer_epoch(workdir / f"peer_{i}") >= 1 for i in range(2)), 200, "both peers at epoch 1")
    assert any("p2pd" in command for _, command in processes_mentioning(str(workdir))), "no p2pd running"
    local.send_signal(signal.SIGINT)  # what Ctrl+C delivers to the foreground process
    code = local.wait(timeout=60)
    assert code == 130
    wait_until(lambda: not processes_mentioning(str(workdir)), 15, "every peer process and p2pd to exit")
    for index in range(2):
        assert (workdir / f"peer_{index}" / "checkpoint.pt").is_file()
        assert (workdir / f"peer_{index}" / "summary.json").is_file()
