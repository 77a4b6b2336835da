"""A fork server for the tests: one process imports the training stack once, then forks every ``swarm`` command a
test starts, so that a test's peers do not each pay the ~10 s of CPU that importing torch, transformers and TRL
costs (on 2 cores that was most of the e2e tier's time).

Each command runs as ``swarm local`` runs its peers on Linux (:class:`swarm.local.ForkedPeer`): a real process in
a session of its own (``killpg`` of its pid takes its p2p daemon with it), stdin from ``/dev/null``, stdout and
stderr to files, the environment and working directory the test gave, and ``swarm.cli``'s ``main`` run as
``python -m swarm.cli`` would run it. What a fresh interpreter must prove (``launch.sh``, the console script,
tracebacks at import, peak memory) is still tested with real ``exec`` elsewhere.

The server is single-threaded (a fork copies only the forking thread: no other thread may hold a lock then) and
a child subreaper, so that every process a command leaves behind, orphans included, stays its descendant and is
killed with :meth:`ForkServer.kill_all`. Protocol: JSON lines on stdin (``start``, ``kill_all``), JSON lines on
stdout (``started`` with the command's number and pid, ``exit`` with the number and exit code, ``killed``): the
system reuses pids (32768 of them on this machine), a command's number is never reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.netns import entered

PR_SET_CHILD_SUBREAPER = 36


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def serve() -> None:
    """The server's loop (``python -m tests.forkserver``)."""
    from swarm import cli, local

    local.preload()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # nothing a request runs in this process may write into the protocol
    pending = b""
    started: dict[int, int] = {}  # pid -> the command's number (pids are reused: numbers are not)
    numbers = itertools.count()
    while True:
        while True:  # reap: the commands started, and orphans handed to this subreaper
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in started:
                out.write(
                    json.dumps(dict(exit=started.pop(pid), code=os.waitstatus_to_exitcode(status))) + "\n"
                )
        if not select.select([0], [], [], 0.05)[0]:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the test session ended: nothing it started may outlive it
            for pid in _descendants(os.getpid()):
                _kill(pid)
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "kill_all":
                for pid in _descendants(os.getpid()):
                    _kill(pid)
                out.write(json.dumps(dict(killed=True)) + "\n")
                continue
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                # a partition test's peer runs in a network namespace of its own (tests/netns.py)
                with entered(request["netns"]) if request.get("netns") else contextlib.nullcontext():
                    peer = local.ForkedPeer(
                        cli.run_forked_peer, request["argv"], stdout, request["env"], stderr_fd=stderr
                    )
            finally:
                os.close(stdout)
                os.close(stderr)
            started[peer.pid] = number = next(numbers)
            out.write(json.dumps(dict(started=number, pid=peer.pid)) + "\n")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ForkedProcess:
    """The part of :class:`subprocess.Popen` the tests use, for a command the fork server started."""

    def __init__(self, server: ForkServer, number: int, pid: int, args: list[str]):
        self.server, self.number, self.pid, self.args = server, number, pid, args

    @property
    def returncode(self) -> int | None:
        return self.server.exits.get(self.number)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.changed:
            if not self.server.changed.wait_for(lambda: self.number in self.server.exits, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.server.exits[self.number]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The test session's fork server (started on first use, ended with the session)."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.exits: dict[int, int] = {}  # command number -> exit code
        self.changed = threading.Condition()
        self._replies: list[dict] = []
        self._requests = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="forkserver-reader").start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self.changed:
                if "exit" in message:
                    self.exits[message["exit"]] = message["code"]
                else:
                    self._replies.append(message)
                self.changed.notify_all()
        with self.changed:
            self._replies.append(dict(dead=self.process.wait()))
            self.changed.notify_all()

    def _ask(self, request: dict, timeout: float = 120.0) -> dict:
        with self._requests:
            with self.changed:
                self._replies.clear()
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            with self.changed:
                if not self.changed.wait_for(lambda: self._replies, timeout):
                    raise RuntimeError(f"the fork server did not answer {request['op']} in {timeout:.0f}s")
                reply = self._replies.pop(0)
        if "dead" in reply:
            raise RuntimeError(f"the fork server exited with {reply['dead']}")
        return reply

    def start(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        stdout: Path,
        stderr: Path,
        netns: str | None = None,
    ) -> ForkedProcess:
        """Run ``swarm ARGV`` (in network namespace ``netns``, where given); the first call waits for the server's
        imports."""
        reply = self._ask(
            dict(
                op="start",
                argv=argv,
                cwd=str(cwd),
                env=env,
                stdout=str(stdout),
                stderr=str(stderr),
                netns=netns,
            )
        )
        return ForkedProcess(self, reply["started"], reply["pid"], ["swarm", *argv])

    def kill_all(self) -> None:
        """SIGKILL every process the server's commands started, whatever became of their parents."""
        self._ask(dict(op="kill_all"))
        deadline = time.monotonic() + 10
        while _descendants(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)


if __name__ == "__main__":
    serve()
