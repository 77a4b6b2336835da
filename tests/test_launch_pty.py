"""The hobbyist's path: ``./launch.sh`` in a real terminal shows a live dashboard, and Ctrl+C stops everything."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, clean_env, processes_mentioning, wait_until

pytestmark = pytest.mark.e2e

ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]")


def read_until(fd: int, pattern: re.Pattern[str], timeout: float, seen: bytearray) -> re.Match[str]:
    """Read the terminal until ``pattern`` matches the screen text so far (ANSI codes stripped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                break
            seen.extend(chunk)
        match = pattern.search(ANSI.sub(b"", bytes(seen)).decode(errors="replace"))
        if match:
            return match
    tail = ANSI.sub(b"", bytes(seen)).decode(errors="replace")[-2000:]
    raise AssertionError(f"never saw {pattern.pattern!r} on the terminal; it shows:\n{tail}")


@pytest.mark.timeout(300)
def test_launch_sh_dashboard_updates_and_ctrl_c_exits_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "peer"
    env = clean_env()
    env.update(COLUMNS="100", LINES="40", TERM="xterm-256color")
    env.pop("WANDB_MODE", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the session leader of the new terminal, like a shell would run it
        os.chdir(PROJECT_ROOT)
        os.execve(
            str(PROJECT_ROOT / "launch.sh"),
            ["launch.sh", "--tier", "auto", "--workdir", str(workdir), "--set", "monitor.wandb=disabled"],
            env,
        )
    seen = bytearray()
    try:
        # the dashboard's epoch row goes past 0, 1, 2: it is live, not a one-off print
        read_until(fd, re.compile(r"│\s*epoch\s*│\s*[3-9]\d*\s*│"), 200, seen)
        screen = ANSI.sub(b"", bytes(seen)).decode(errors="replace")
        assert "peers online" in screen
        assert re.search(r"no CUDA GPU, \d+ CPU cores?.*: cpu, ", screen), "the tier choice was not explained"
        os.write(fd, b"\x03")  # Ctrl+C: the terminal sends SIGINT to the whole foreground process group
        before_stop = len(seen)
        read_until(fd, re.compile(r"checkpoint saved"), 60, seen)
        after = ANSI.sub(b"", bytes(seen[before_stop:])).decode(errors="replace")
        assert "stopping…" in after, "Ctrl+C showed no 'stopping…'"
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130
        wait_until(
            lambda: not processes_mentioning(str(workdir)), 15, "every process (p2pd included) to exit"
        )
        assert (workdir / "checkpoint.pt").is_file()
        assert "Traceback" not in ANSI.sub(b"", bytes(seen)).decode(errors="replace")
    finally:
        for leftover, _ in processes_mentioning(str(workdir)):
            os.kill(leftover, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
