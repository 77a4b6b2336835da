"""Automatic client mode: a peer behind a NAT joins in client mode with relays; otherwise it accepts connections."""

from __future__ import annotations

import pytest

from swarm.config import NetworkConfig
from swarm.network import reachability
from swarm.network.reachability import behind_nat, resolve_client_mode

pytestmark = pytest.mark.unit

PEER_ID = "QmYSruBBE8rLVQmjLrzwaEKxzrnKDv5bA8hC7oY3J84VW8"
PUBLIC_PEER = f"/ip4/8.8.8.8/tcp/31337/p2p/{PEER_ID}"  # only parsed: no packet is ever sent to it


@pytest.fixture
def route_from(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine reaches remote peers from a given local address (no socket is opened)."""
    return lambda local_ip: monkeypatch.setattr(reachability, "local_ip_towards", lambda remote: local_ip)


def test_private_address_towards_a_public_peer_means_client_mode(route_from) -> None:
    route_from("192.168.1.20")
    network = NetworkConfig(initial_peers=[PUBLIC_PEER])
    reason = resolve_client_mode(network)
    assert network.client_mode is True and network.use_auto_relay is True
    assert "192.168.1.20" in reason and "NAT" in reason


def test_public_address_or_announced_address_keeps_accepting_connections(route_from) -> None:
    route_from("8.8.4.4")
    network = NetworkConfig(initial_peers=[PUBLIC_PEER])
    resolve_client_mode(network)
    assert network.client_mode is False and network.use_auto_relay is False
    route_from("10.0.0.5")
    announced = NetworkConfig(initial_peers=[PUBLIC_PEER], announce_maddrs=["/ip4/8.8.4.4/tcp/31337"])
    assert behind_nat(announced)[0] is False


def test_local_swarms_and_explicit_settings_are_left_alone(route_from) -> None:
    route_from("192.168.1.20")
    loopback = NetworkConfig(initial_peers=[f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER_ID}"])
    resolve_client_mode(loopback)
    assert loopback.client_mode is False
    starting = NetworkConfig()
    resolve_client_mode(starting)
    assert starting.client_mode is False
    explicit = NetworkConfig(client_mode=False, initial_peers=[PUBLIC_PEER])
    assert resolve_client_mode(explicit) == "set in the config" and explicit.client_mode is False
