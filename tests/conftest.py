"""Shared fixtures: real peer processes on 127.0.0.1 that are always killed, p2p daemons included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swarm.local import local_argv
from tests.forkserver import ForkedProcess, ForkServer

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# The protocol tests (averaging, audits, ledger, attacks) need GRPO rounds from epoch 0, and a from-scratch GRPO
# rate whose reward moves within a few epochs; the shipped default starts with a 150-epoch SFT warm start instead
# (configs/default.yaml). test_warm_start.py runs that schedule.
PROTOCOL_SCHEDULE = {"SWARM_WARM_START__EPOCHS": "0", "SWARM_TRAINING__LEARNING_RATE": "0.01"}


TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test is in exactly one tier (pyproject.toml's markers), so that ``-m unit`` means what it says."""
    wrong = [
        item.nodeid for item in items if len({mark.name for mark in item.iter_markers()} & set(TIERS)) != 1
    ]
    if wrong:
        raise pytest.UsageError(
            f"tests without exactly one of the markers {', '.join(TIERS)}: {', '.join(wrong)}"
        )
    if hasattr(config, "workerinput"):
        # under pytest-xdist (the README's test command runs -n 2): the longest tier first, so that the workers
        # finish together — the short unit tests fill the gaps at the end instead of one worker's last e2e test
        # running alone. Every worker sorts the same way (xdist requires one collection order).
        rank = {tier: index for index, tier in enumerate(reversed(TIERS))}
        items.sort(key=lambda item: rank[next(m.name for m in item.iter_markers() if m.name in rank)])


def clean_env(schedule: dict[str, str] | None = None, wandb: str = "disabled") -> dict[str, str]:
    """The environment for peer processes: no SWARM_* settings leaking in from the developer's shell, and the
    protocol tests' training schedule (``schedule``: others, ``{}`` for the shipped one). W&B is off (``wandb``:
    the ``WANDB_MODE``) except in the tests of the W&B runs: its service takes ~5 s to start in every peer."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE=wandb)
    env.update(PROTOCOL_SCHEDULE if schedule is None else schedule)
    return env


def run_local(
    workdir: Path,
    peers: int,
    max_epochs: int,
    settings: list[str],
    timeout: float,
    schedule: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run ``swarm local`` to its end in ``workdir / "w"`` (``--set`` each of ``settings``); returns the process
    and the run summary."""
    summary = workdir / "S.json"
    argv = local_argv(workdir / "w", peers, max_epochs, settings, "--summary", str(summary))
    result = run_swarm(argv, workdir, timeout, env=clean_env(schedule))
    return result, read_json(summary)


_FORK_SERVER: ForkServer | None = None


def fork_server() -> ForkServer:
    """The session's fork server (tests/forkserver.py), started on first use."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        _FORK_SERVER = ForkServer(PROJECT_ROOT, clean_env())
    return _FORK_SERVER


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _FORK_SERVER is not None:
        _FORK_SERVER.close()


def run_swarm(
    argv: list[str], outdir: Path, timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``swarm ARGV`` forked by the fork server, to its end: the :func:`subprocess.run` result it would give,
    stdout and stderr also kept in ``outdir``. A command still running at ``timeout`` is killed with everything
    it started, and the test fails naming it."""
    outdir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = outdir / "swarm.stdout", outdir / "swarm.stderr"
    for path in (stdout, stderr):  # the files hold this command's output only
        path.unlink(missing_ok=True)
    process = fork_server().start(argv, PROJECT_ROOT, env, stdout, stderr)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        fork_server().kill_all()
        pytest.fail(f"swarm {' '.join(argv)} did not finish in {timeout:.0f}s:\n{_tail(stderr)}")
    return subprocess.CompletedProcess(
        ["swarm", *argv], code, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
    )


class Processes:
    """Starts commands in their own process groups and kills every group at teardown (p2pd is in the group)."""

    def __init__(self, scope: Path) -> None:
        self.started: list[subprocess.Popen | ForkedProcess] = []
        self.scope = scope  # every process whose command line mentions this directory is killed at the end

    def start(
        self, args: list[str], log: Path, cwd: Path | None = None, schedule: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd or PROJECT_ROOT,
                env=clean_env(schedule),
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def swarm(
        self,
        *args: str,
        log: Path,
        cwd: Path | None = None,
        schedule: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> subprocess.Popen | ForkedProcess:
        """``swarm ARGS`` forked by the session's fork server (tests/forkserver.py), stdout and stderr appended to
        ``log``; in network namespace ``netns`` (tests/netns.py) where given."""
        log.parent.mkdir(parents=True, exist_ok=True)
        process = fork_server().start(
            list(args), cwd or PROJECT_ROOT, clean_env(schedule), log, log, netns=netns
        )
        self.started.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen | ForkedProcess, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        for process in self.started:
            self.kill(process)
        if any(isinstance(process, ForkedProcess) for process in self.started):
            fork_server().kill_all()  # what the forked commands started in sessions of their own too
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # peers that `swarm local` started live in process groups of their own, and their p2pd carries the
        # identity path: catch them all by the test's directory
        for pid, _ in processes_mentioning(str(self.scope)):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append((int(entry.name), command))
    return found


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.close()


def bare_dht(**kwargs):
    """A plain ``hivemind.DHT`` node (none of a peer's record validators), started with a peer's bound on the wait:
    a start that stalls or dies is killed and made once more (hivemind alone would wait forever)."""
    import hivemind

    from swarm.network.startup import start_retrying

    return start_retrying(lambda: hivemind.DHT(start=False, **kwargs), 60, what="DHT")


@pytest.fixture(scope="module")
def dhts() -> Iterator[list]:
    """Three hivemind DHT nodes on 127.0.0.1 joined into one network, shut down after the module."""
    first = bare_dht()
    others = [bare_dht(initial_peers=first.get_visible_maddrs()) for _ in range(2)]
    everyone = [first, *others]
    try:
        yield everyone
    finally:
        for dht in everyone:
            dht.shutdown()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peer_epoch(workdir: Path) -> int:
    status = read_json(workdir / "status.json") or {}
    return int(status.get("epoch", 0))


def finish(process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait for a peer to exit and assert it exited 0, showing its log's tail otherwise."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"peer did not finish in {timeout:.0f}s; log tail:\n{_tail(log)}") from None
    assert code == 0, f"peer exited with {code}; log tail:\n{_tail(log)}"


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_wandb_offline_run(run_dir: Path) -> tuple[set[str], list[dict[str, object]]]:
    """(groups, history rows) of an offline W&B run, read from its ``.wandb`` file (a LevelDB-style log of
    protobuf records, format of wandb >= 0.13) — so the test sees what ``wandb sync`` would upload."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_dir.glob("*.wandb")).read_bytes()
    block, position, pending = 32768, 7, b""  # 7 = the ':W&B' file header with magic and version
    groups: set[str] = set()
    history: list[dict[str, object]] = []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # too little room left for a header: the block is padded
            position += block - position % block
            continue
        length, kind = int.from_bytes(raw[position + 4 : position + 6], "little"), raw[position + 6]
        chunk, position = raw[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            position += block - position % block if position % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "run":
            groups.add(record.run.run_group)
        elif record.WhichOneof("record_type") == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return groups, history
