"""The real ``swarm`` command, run as a subprocess: every mistake a user can make ends in one ``swarm: error:``
line that names what is wrong, a non-zero exit code and no traceback; the p2p daemon is not left behind.

The slow cases (``swarm run`` imports the whole training stack before it can fail) are forked together by one
module fixture from the test session's fork server (tests/forkserver.py: the stack imported once, ``swarm.cli``'s
``main`` run as ``python -m swarm.cli`` runs it); each test then checks its own result. The fast cases and the
console script run as fresh interpreters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import fork_server

pytestmark = pytest.mark.e2e

TIMEOUT_S = 120
MARKER_VAR = "PYTEST_SWARM_CLI_MARKER"
FAKE_PEER_ID = "QmYSruBBE8rLVQmjLrzwaEKxzrnKDv5bA8hC7oY3J84VW8"


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return f"swarm {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _env(marker: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env[MARKER_VAR] = marker  # inherited by the p2p daemon, so we can tell our daemons from anybody else's
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _start(args: list[str], cwd: Path, marker: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "swarm.cli", *args],
        cwd=cwd,
        env=_env(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, args: list[str]) -> CliResult:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        pytest.fail(f"swarm {' '.join(args)} did not finish in {TIMEOUT_S}s\n{stderr[-3000:]}")
    return CliResult(args, process.returncode, stdout, stderr)


def _swarm(args: list[str], cwd: Path, marker: str = "") -> CliResult:
    return _finish(_start(args, cwd, marker or uuid.uuid4().hex), args)


def _assert_user_error(result: CliResult, exit_code: int, *named: str) -> None:
    assert result.returncode == exit_code, result.describe()
    assert result.last_line.startswith("swarm: error:"), result.describe()
    for text in named:
        assert text in result.last_line, f"{text!r} not named in: {result.last_line}"
    assert "Traceback" not in result.stdout + result.stderr, result.describe()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _p2pd_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone already, or not ours to read
        return False
    return f"{MARKER_VAR}={marker}".encode() in environ.split(b"\0")


# ---- slow failures (`swarm run` / `swarm local`), started together ----------------------------------------
TYPO_CONFIG = Path("typo.yaml")  # relative to the command's working directory
TYPO_CONFIG_TEXT = "training:\n  lerning_rate: 0.1\n"


def _run_cases(unreachable: str) -> dict[str, list[str]]:
    return {
        "missing_model": ["run", "--set", "model.name_or_path=/nonexistent/dir"],
        "invalid_multiaddr": ["run", "--join", "/ip4/not-an-ip/tcp/1234"],
        "unreachable_join": [
            "run",
            "--join",
            unreachable,
            "--set",
            "network.bootstrap_attempts=2",
            "--set",
            "network.bootstrap_backoff=0.2",
        ],
        "unknown_recipe": ["run", "--recipe", "no_such_recipe"],
        "wrong_type": ["run", "--set", "training.learning_rate=fast"],
        "local_unknown_key": ["local", "--config", str(TYPO_CONFIG)],
    }


@dataclass
class RunResults:
    results: dict[str, CliResult]
    marker: str
    p2pd_before: set[int]
    unreachable: str


@pytest.fixture(scope="module")
def run_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunResults]:
    marker = uuid.uuid4().hex
    before = _p2pd_pids()
    root = tmp_path_factory.mktemp("cli_run")
    unreachable = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{FAKE_PEER_ID}"  # nobody listens there
    cases = _run_cases(unreachable)
    for name in cases:
        (root / name).mkdir()
    (root / "local_unknown_key" / TYPO_CONFIG).write_text(TYPO_CONFIG_TEXT)
    server = fork_server()
    processes = {
        name: server.start(args, root / name, _env(marker), root / name / "stdout", root / name / "stderr")
        for name, args in cases.items()
    }
    try:
        results = {}
        for name, process in processes.items():
            try:
                code = process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"swarm {' '.join(cases[name])} did not finish in {TIMEOUT_S}s")
            output = [(root / name / stream).read_text(errors="replace") for stream in ("stdout", "stderr")]
            results[name] = CliResult(cases[name], code, *output)
        yield RunResults(results, marker, before, unreachable)
    finally:
        server.kill_all()


def test_model_path_that_does_not_exist(run_results: RunResults) -> None:
    _assert_user_error(run_results.results["missing_model"], 2, "model.name_or_path", "/nonexistent/dir")


def test_invalid_join_multiaddr(run_results: RunResults) -> None:
    _assert_user_error(run_results.results["invalid_multiaddr"], 2, "/ip4/not-an-ip/tcp/1234")


def test_unreachable_join_address(run_results: RunResults) -> None:
    result = run_results.results["unreachable_join"]
    _assert_user_error(result, 1, run_results.unreachable)
    assert "2 attempts" in result.last_line


def test_unreachable_join_leaves_no_p2p_daemon(run_results: RunResults) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        ours = [pid for pid in _p2pd_pids() - run_results.p2pd_before if _has_marker(pid, run_results.marker)]
        if not ours or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in ours:  # clean up before failing, so one bug does not leak into the next run
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not ours, f"p2pd processes left behind by the failed join: {ours}"


def test_unknown_recipe_lists_available_ones(run_results: RunResults) -> None:
    _assert_user_error(
        run_results.results["unknown_recipe"], 2, "no_such_recipe", "arithmetic", "arithmetic_sft"
    )


def test_unknown_key_in_file_on_local(run_results: RunResults) -> None:
    result = run_results.results["local_unknown_key"]
    _assert_user_error(result, 2, str(TYPO_CONFIG), "training.lerning_rate", "learning_rate,")


def test_wrong_type_via_set_on_run(run_results: RunResults) -> None:
    _assert_user_error(
        run_results.results["wrong_type"], 2, "--set training.learning_rate", "training.learning_rate:"
    )


# ---- fast cases: config errors, help, config printing -----------------------------------------------------------
def test_malformed_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run_id: x\nmodel:\n  hidden_size: 64: 32\n")
    result = _swarm(["config", "--config", str(path)], tmp_path)
    _assert_user_error(result, 2, f"{path}:3")


def test_unknown_key_via_set(tmp_path: Path) -> None:
    result = _swarm(["config", "--set", "nework.client_mode=true"], tmp_path)
    _assert_user_error(result, 2, "--set nework.client_mode", "network")


def test_help_exits_zero(tmp_path: Path) -> None:
    for args in (["--help"], ["run", "--help"], ["local", "--help"]):
        result = _swarm(args, tmp_path)
        assert result.returncode == 0, result.describe()
        assert "usage: swarm" in result.stdout
    assert "--join" in _swarm(["run", "--help"], tmp_path).stdout
    assert "--peers" in _swarm(["local", "--help"], tmp_path).stdout


def test_console_script_help(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("swarm")
    if not script.exists():
        pytest.fail(f"the swarm console script is not installed next to {sys.executable}")
    result = subprocess.run(
        [str(script), "--help"],
        cwd=tmp_path,
        env=_env("help"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "local" in result.stdout


def test_config_prints_effective_yaml(tmp_path: Path) -> None:
    result = _swarm(["config", "--set", "training.learning_rate=0.5", "--recipe", "arithmetic_sft"], tmp_path)
    assert result.returncode == 0, result.describe()
    assert "learning_rate: 0.5" in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["training"]["learning_rate"] == 0.5
    assert printed["recipe"]["name"] == "arithmetic_sft"


def test_missing_config_file(tmp_path: Path) -> None:
    result = _swarm(["config", "--config", "nope.yaml"], tmp_path)
    _assert_user_error(result, 2, "nope.yaml")
