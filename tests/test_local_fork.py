"""``swarm local`` forks its peers from itself (swarm/local.py ``ForkedPeer``): each forked peer must behave as the
``swarm run`` subprocess it replaces — its own session, output in its log, its exit code, its atexit hooks, a
traceback in its log for an unhandled error — and never run the parent's code after the fork."""

from __future__ import annotations

import atexit
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from swarm.local import ForkedPeer

pytestmark = pytest.mark.unit


def start(main, tmp_path: Path, argv: list[str] | None = None) -> tuple[ForkedPeer, Path]:
    log = tmp_path / "stdout.log"
    with open(log, "ab") as out:
        peer = ForkedPeer(main, argv or [], out.fileno(), {"SWARM_FORK_TEST": "yes", "OMP_NUM_THREADS": "1"})
    return peer, log


def test_a_forked_peer_writes_its_log_exits_with_its_code_and_runs_its_atexit_hooks(tmp_path: Path) -> None:
    def main(argv: list[str]) -> int:
        atexit.register(lambda: print("atexit ran", flush=True))
        print(
            f"argv={argv} sys.argv={sys.argv[1:]} env={os.environ['SWARM_FORK_TEST']} session={os.getsid(0) == os.getpid()}"
        )
        return 3

    peer, log = start(main, tmp_path, ["run", "--plain"])
    assert peer.wait(timeout=30) == 3
    assert peer.poll() == 3
    text = log.read_text()
    assert "argv=['run', '--plain'] sys.argv=['run', '--plain'] env=yes session=True" in text
    assert text.rstrip().endswith("atexit ran")
    assert "SWARM_FORK_TEST" not in os.environ  # the parent's environment is untouched


def test_an_error_escaping_a_forked_peer_is_a_traceback_in_its_log_and_exit_1(tmp_path: Path) -> None:
    def main(argv: list[str]) -> int:
        raise RuntimeError("the peer broke")

    peer, log = start(main, tmp_path)
    assert peer.wait(timeout=30) == 1
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: the peer broke" in text
    # nothing of the parent's stack ran in the child: pytest would have printed its own report into the log
    assert "passed" not in text and "FAILED" not in text


def test_a_running_forked_peer_times_out_a_wait_and_stops_on_a_signal(tmp_path: Path) -> None:
    def main(argv: list[str]) -> int:
        time.sleep(60)
        return 0

    peer, _ = start(main, tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        peer.wait(timeout=0.3)
    assert peer.poll() is None
    peer.send_signal(signal.SIGTERM)
    assert peer.wait(timeout=30) == -signal.SIGTERM
    peer.send_signal(signal.SIGTERM)  # an exited peer: nothing to signal, no error


def test_a_forked_peer_runs_only_its_own_exit_hooks_and_leaves_the_parents_resources_alone(
    tmp_path: Path,
) -> None:
    """The parent's exit hooks release the parent's resources, which its other peers still use (W&B's media
    directory, made when TRL imports wandb, was removed by the first peer to exit under the others)."""
    shared = tempfile.TemporaryDirectory("parent-resource")  # its finalizer is an exit hook of the parent
    marker = tmp_path / "parent-hook-ran"
    parent_hook = functools.partial(marker.write_text, "yes")
    atexit.register(parent_hook)
    try:

        def main(argv: list[str]) -> int:
            own = tempfile.TemporaryDirectory("child-resource")  # the child's own: cleaned at its exit
            print(f"own={own.name}", flush=True)
            return 0

        peer, log = start(main, tmp_path)
        assert peer.wait(timeout=30) == 0
        assert Path(shared.name).is_dir(), "a peer's exit removed its parent's temporary directory"
        assert not marker.exists(), "a peer ran its parent's exit hook"
        own = log.read_text().split("own=", 1)[1].split()[0]
        assert not Path(own).exists(), "the peer's own temporary directory outlived it"
    finally:
        atexit.unregister(parent_hook)
        shared.cleanup()


def _sleep_forever() -> None:
    time.sleep(600)


def test_a_forked_peer_stops_its_daemonic_children_and_removes_its_multiprocessing_directory(
    tmp_path: Path,
) -> None:
    """What ``multiprocessing`` does at a Python program's exit, a forked peer does too: its daemonic children
    (hivemind's DHT and averager processes) do not outlive it, and its ``pymp-*`` directory (where the sockets
    that pass file descriptors to those children live) is removed. Its parent's daemonic children are not its
    own: they live on (a peer forked after its parent had started one terminated it, then failed at exit)."""
    import multiprocessing
    import multiprocessing.util

    multiprocessing.util.get_temp_dir()  # the test session's own, inherited by the fork (swarm local has none)
    parents_child = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
    parents_child.start()

    def main(argv: list[str]) -> int:
        multiprocessing.process.current_process()._config.pop("tempdir", None)  # the peer's own directory
        child = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
        child.start()
        print(f"child={child.pid} tempdir={multiprocessing.util.get_temp_dir()}", flush=True)
        return 0

    peer, log = start(main, tmp_path)
    assert peer.wait(timeout=30) == 0
    fields = dict(item.split("=") for item in log.read_text().split())
    assert not Path(fields["tempdir"]).exists()
    child = int(fields["child"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the peer's daemonic child outlived it"
    try:
        assert parents_child.is_alive(), "the peer terminated its parent's daemonic child"
        assert "Traceback" not in log.read_text()
    finally:
        parents_child.kill()
        parents_child.join()


def test_a_peer_killed_while_holding_a_hivemind_lock_does_not_hang_the_peers_forked_after_it(
    tmp_path: Path,
) -> None:
    """hivemind's MPFuture locks are multiprocessing locks made at import time, shared by every process forked from
    the importer: a peer killed (-9) while holding one hung the DHT of every peer forked later by the same
    ``swarm local`` (or the test suite's fork server) in ``MPFuture.set_result``."""
    from hivemind.utils.mpfuture import MPFuture

    def hold_and_die(argv: list[str]) -> int:
        MPFuture._update_lock.acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    killed, _ = start(hold_and_die, tmp_path)
    assert killed.wait(timeout=30) == -signal.SIGKILL

    def update(argv: list[str]) -> int:
        return 0 if MPFuture._update_lock.acquire(timeout=5) else 3

    later, log = start(update, tmp_path)
    assert later.wait(timeout=30) == 0, log.read_text()
    # the parent's own lock is untouched by its peers' resets
    assert MPFuture._update_lock.acquire(timeout=1)
    MPFuture._update_lock.release()
