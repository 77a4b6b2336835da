"""``swarm doctor``: a healthy machine passes, an unreachable initial peer or a busy listening port is named in a
FAIL line, a malformed multiaddress is one clear error (exit 2). Only 127.0.0.1 is ever touched."""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm import doctor
from swarm.doctor import add_doctor_parser, run_doctor

PEER_ID = "QmXfRtNFRcuQpyMqwFhHJtxCYBmjhVx5N8VBGMfkNpHGzx"
SUMMARY = re.compile(r"^(\d+) checks passed, (\d+) warnings, (\d+) failed$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_swarm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SWARM_"):
            monkeypatch.delenv(name)


def doctor_main(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="swarm")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    return run_doctor(parser.parse_args(["doctor", *argv]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield server
    finally:
        server.close()


@pytest.mark.unit
@pytest.mark.parametrize("style", ["table", "plain"])
def test_healthy_machine_without_initial_peers_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, style: str
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps a table to 80 columns when stdout is not a terminal
    code = doctor_main("--workdir", str(tmp_path), *(["--plain"] if style == "plain" else []))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no initial peers: this peer will start a new swarm" in out
    summary = SUMMARY.search(out)
    assert summary is not None, out
    assert int(summary.group(1)) >= 10 and summary.group(3) == "0"
    assert "Traceback" not in out


@pytest.mark.unit
def test_unreachable_initial_peer_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}"
    code = doctor_main("--plain", "--workdir", str(tmp_path), "--timeout", "2", "--join", address)
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(line for line in out.splitlines() if address in line)
    assert line.startswith("FAIL") and f"127.0.0.1:{port}" in line and "refused" in line
    assert "firewall" in out  # what to do about it
    assert SUMMARY.search(out).group(3) == "1"


@pytest.mark.unit
def test_reachable_initial_peer_is_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    addresses = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}", f"/dns4/localhost/tcp/{port}/p2p/{PEER_ID}"]
    argv = ["--plain", "--workdir", str(tmp_path), "--timeout", "2"]
    for address in addresses:
        argv += ["--join", address]
    code = doctor_main(*argv)
    out = capsys.readouterr().out
    assert code == 0, out
    for address in addresses:
        line = next(line for line in out.splitlines() if address in line)
        assert line.startswith("OK") and "answers" in line


@pytest.mark.unit
def test_occupied_listening_port_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    host = f"/ip4/127.0.0.1/tcp/{port}"
    code = doctor_main("--plain", "--workdir", str(tmp_path), "--set", f'network.host_maddrs=["{host}"]')
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(line for line in out.splitlines() if host in line)
    assert line.startswith("FAIL") and f"port {port}" in line and "in use" in line


@pytest.mark.unit
def test_free_listening_port_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    host = f"/ip4/127.0.0.1/tcp/{port}"
    code = doctor_main("--plain", "--workdir", str(tmp_path), "--set", f'network.host_maddrs=["{host}"]')
    out = capsys.readouterr().out
    assert code == 0, out
    assert next(line for line in out.splitlines() if host in line).startswith("OK")


@pytest.mark.unit
@pytest.mark.parametrize(
    "address, problem",
    [("/ip4/not-an-ip/tcp/1", "not a valid multiaddress"), ("/ip4/127.0.0.1/tcp/4000", "lacks the peer id")],
)
def test_invalid_join_address_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, address: str, problem: str
) -> None:
    code = doctor_main("--workdir", str(tmp_path), "--join", address)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("swarm: error:")
        and address in lines[0]
        and problem in lines[0]
    )


@pytest.mark.unit
def test_bad_config_override_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = doctor_main("--workdir", str(tmp_path), "--set", "network.no_such_key=1")
    err = capsys.readouterr().err
    assert code == 2 and "network.no_such_key" in err and len(err.strip().splitlines()) == 1


@pytest.mark.unit
def test_a_check_that_raises_is_a_fail_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "check_python", broken)
    code = doctor_main("--plain", "--workdir", str(tmp_path))
    out = capsys.readouterr().out
    assert code == 1
    assert any(
        line.startswith("FAIL python:") and "RuntimeError: boom" in line for line in out.splitlines()
    ), out


@pytest.mark.unit
def test_corrupt_identity_key_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "identity.key").write_bytes(b"not a key")
    code = doctor_main("--plain", "--workdir", str(tmp_path))
    out = capsys.readouterr().out
    assert code == 1
    assert any(line.startswith("FAIL identity:") and "identity.key" in line for line in out.splitlines()), out
    assert (tmp_path / "identity.key").read_bytes() == b"not a key"  # left alone


@pytest.mark.unit
def test_missing_identity_is_not_created(tmp_path: Path) -> None:
    result = doctor.check_identity(tmp_path / "identity.key")
    assert result.status == doctor.OK and not (tmp_path / "identity.key").exists()


@pytest.mark.unit
def test_unknown_memory_and_clock_skew_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.read_meminfo(tmp_path / "no-meminfo") is None
    monkeypatch.setattr(doctor, "read_meminfo", lambda: None)
    memory = doctor.check_memory()
    assert memory.status == doctor.WARN and "unknown" in memory.detail

    real_time = doctor.time.time
    monkeypatch.setattr(doctor.time, "time", lambda: real_time() + 3600)
    clock = doctor.check_clock(tmp_path)
    monkeypatch.undo()
    assert clock.status == doctor.WARN and "not measured" in clock.detail and clock.fix
    assert doctor.check_clock(tmp_path).status == doctor.OK


@pytest.mark.e2e
def test_swarm_doctor_command_names_an_unreachable_peer(tmp_path: Path) -> None:
    """The issue's acceptance through the real command: exit 1 and the address named."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT, clean_env

    address = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/QmYSruBBE8rLVQmjLrzwaEKxzrnKDv5bA8hC7oY3J84VW8"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli",
            "doctor",
            "--plain",
            "--workdir",
            str(tmp_path),
            "--join",
            address,
            "--timeout",
            "2",
        ],
        cwd=PROJECT_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert address in result.stdout and "Traceback" not in result.stdout + result.stderr
