"""The background processes a peer starts. Its DHT node survives large values: hivemind 1.1.12's DHT process reads
its command pipe non-blocking and dies on the first command that does not arrive in one read ("Resource temporarily
unavailable", then "EOFError: Ran out of input" — the crash RL-Swarm users report), after which every call on it
hangs. And a DHT node or averager whose start stalls or dies is killed and started again, where hivemind would wait
for it forever."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import psutil
import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.config import NetworkConfig, SwarmConfig
from swarm.errors import UserError
from swarm.identity import Identity
from swarm.network.averager import SwarmAverager
from swarm.network.dht import _WholeMessageReads, start_dht
from swarm.node.peer import SwarmPeer
from swarm.node.state import TrainingState


@pytest.mark.integration
@pytest.mark.timeout(120)  # with the upstream DHT the parent's send blocks forever on the dead process
def test_a_peer_dht_node_stores_megabyte_values_and_stays_alive(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "identity.key")
    dht = start_dht(NetworkConfig(client_mode=False), identity, tmp_path)
    try:
        for index in range(5):
            value = os.urandom(1 << 20)  # one command of about 1 MiB: it reaches the DHT process in pieces
            stored = dht.store(f"big-{index}", value, get_dht_time() + 60, return_future=True)
            assert stored.result(timeout=30), f"store {index} refused"
            assert dht.is_alive(), f"the DHT process died on store {index}"
        assert dht.get("big-4", latest=True).value == value
    finally:
        dht.shutdown()


def p2p_daemons_of(identity: Identity) -> list[psutil.Process]:
    """Live p2pd processes serving this identity (its key file's path is on their command line)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "p2pd" and any(
            str(identity.path) in arg for arg in process.info["cmdline"] or []
        ):
            found.append(process)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("failure", ["stalls", "dies"])
def test_a_dht_process_that_never_becomes_ready_is_killed_and_started_again(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, caplog
) -> None:
    """hivemind waits forever on a DHT process that hangs or dies while starting (seen once in CI: a peer's node
    start never returned). The first start here hangs after its p2p daemon is up (or exits at once); start_dht
    gives up on it after startup_timeout, kills it with its daemon, prints its stacks, and the second start
    serves."""
    identity = Identity.load_or_create(tmp_path / "identity.key")
    first_attempt = tmp_path / "first-attempt-made"
    real_create = DHTNode.create

    async def create_failing_once(**kwargs):
        if first_attempt.exists():
            return await real_create(**kwargs)
        first_attempt.touch()
        if failure == "dies":
            os._exit(3)
        await real_create(**kwargs)  # its p2p daemon is running from here on
        await asyncio.sleep(3600)

    # inherited by the forked process
    monkeypatch.setattr(DHTNode, "create", staticmethod(create_failing_once))
    network = NetworkConfig(client_mode=False, startup_timeout=5, bootstrap_backoff=0)
    started = time.monotonic()
    dht = start_dht(network, identity, tmp_path)
    try:
        assert first_attempt.exists()
        assert time.monotonic() - started < 30
        assert dht.store("key", "value", get_dht_time() + 60)
        assert dht.get("key", latest=True).value == "value"
        assert len(p2p_daemons_of(identity)) == 1, "the stalled node's p2p daemon is still running"
        if failure == "stalls":
            assert "create_failing_once" in capfd.readouterr().err, (
                "the stalled process's stacks were not printed"
            )
            assert "was not ready after 5s" in caplog.text
        else:
            assert "exited with code 3 before it was ready" in caplog.text
    finally:
        dht.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_lone_node_that_cannot_start_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def exit_at_once(**kwargs):
        os._exit(3)

    monkeypatch.setattr(DHTNode, "create", staticmethod(exit_at_once))
    network = NetworkConfig(client_mode=False, bootstrap_attempts=2, bootstrap_backoff=0)
    with pytest.raises(UserError) as raised:
        start_dht(network, Identity.load_or_create(tmp_path / "identity.key"), tmp_path)
    assert str(raised.value) == (
        "could not start the DHT node after 2 attempt(s): the DHT process exited with code 3 before it was ready"
    )


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_peer_whose_averager_stalls_while_starting_starts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    first_attempt = tmp_path / "first-attempt-made"
    real_run = SwarmAverager.run

    def run_stalling_once(self) -> None:
        if not first_attempt.exists():
            first_attempt.touch()
            time.sleep(3600)
        real_run(self)

    monkeypatch.setattr(SwarmAverager, "run", run_stalling_once)  # inherited by the forked averager process
    model = torch.nn.Linear(4, 2)
    state = TrainingState(model, torch.optim.AdamW(model.parameters()))
    config = SwarmConfig(workdir=tmp_path, network=dict(client_mode=False, startup_timeout=5))
    peer = SwarmPeer(config, Identity.load_or_create(tmp_path / "identity.key"), state)
    try:
        peer.start()
        assert first_attempt.exists()
        assert peer.averager.is_alive()
        assert "the averager process was not ready after 5s" in caplog.text
        assert set(peer.board.fetch()) == {peer.peer_id}, "the started peer does not announce itself"
    finally:
        peer.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_restarted_peer_listens_on_the_same_address_and_moves_only_when_its_port_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The join address a hobbyist gave out survives restarts: port 0 becomes the port kept in the work directory.
    When another program holds that port, the peer moves to a free one and says so."""
    import socket

    identity = Identity.load_or_create(tmp_path / "identity.key")
    addresses = []
    for _ in range(2):
        dht = start_dht(NetworkConfig(client_mode=False), identity, tmp_path)
        try:
            addresses.append((tmp_path / "peer_addr.txt").read_text().split()[0])
        finally:
            dht.shutdown()
    assert addresses[0] == addresses[1] and "/tcp/0/" not in addresses[0]
    kept = int((tmp_path / "listen_port").read_text())
    assert f"/tcp/{kept}/" in addresses[0]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        squatter.bind(("127.0.0.1", kept))
        squatter.listen()
        with caplog.at_level("WARNING", logger="swarm.network.ports"):
            dht = start_dht(NetworkConfig(client_mode=False), identity, tmp_path)
        try:
            moved = (tmp_path / "peer_addr.txt").read_text().split()[0]
        finally:
            dht.shutdown()
    assert f"/tcp/{kept}/" not in moved and int((tmp_path / "listen_port").read_text()) != kept
    assert any(
        f"port {kept}" in record.message and "give out the new address" in record.message
        for record in caplog.records
    )


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_second_peer_in_the_same_work_directory_is_told_to_use_its_own(tmp_path: Path) -> None:
    """Both peers would sign with one identity: the second one stops at once with the cause and the fix."""
    identity = Identity.load_or_create(tmp_path / "identity.key")
    first = start_dht(NetworkConfig(client_mode=False), identity, tmp_path)
    try:
        address = (tmp_path / "peer_addr.txt").read_text().split()[0]
        with pytest.raises(
            UserError,
            match=r"the identity .*identity\.key is in use by a peer that is running .*"
            r"--workdir DIR",
        ):
            start_dht(
                NetworkConfig(client_mode=False, initial_peers=[address]), identity, tmp_path / "second"
            )
    finally:
        first.shutdown()


@pytest.mark.unit
def test_a_command_whose_sender_has_exited_is_dropped_with_one_line_not_a_traceback() -> None:
    """A command's future carries its sender's pipe, handed over through the sending process's resource sharer;
    once that process has exited (a peer stopping on Ctrl+C), the DHT process cannot rebuild the command. hivemind
    logged a traceback there and paused; the DHT process now drops it (and reads the next command as before)."""
    reader, writer = multiprocessing.Pipe(duplex=False)

    def send_and_exit() -> None:
        kept, _ = multiprocessing.Pipe(duplex=False)
        writer.send(("_get", [], dict(reply_to=kept)))  # pickled through this process's resource sharer

    sender = multiprocessing.get_context("fork").Process(target=send_and_exit)
    sender.start()
    sender.join(30)
    assert sender.exitcode == 0 and reader.poll(10)
    pipe = _WholeMessageReads(reader)
    method, args, kwargs = pipe.recv()
    assert (method, args) == ("_dropped_command", []) and "Error" in kwargs["reason"]
    writer.send(("_get", [], dict(key="k")))
    assert pipe.recv() == ("_get", [], dict(key="k"))
