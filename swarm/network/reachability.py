"""Is this peer reachable by the swarm? Decides client mode automatically (``network.client_mode: auto``).

A peer behind a NAT (home router, most laptops) cannot accept connections from peers on the internet. hivemind
then needs it in *client mode*: it dials out to everyone, never waits for incoming connections, does not reduce a
share of the all-reduce (it still contributes its gradient), and reaches others through relays. The heuristic:
when an initial peer has a public address while the interface this machine uses to reach it has a private one,
and the user announced no public address, the peer is behind a NAT.
"""

from __future__ import annotations

import ipaddress
import socket

from hivemind.utils.multiaddr import Multiaddr

from swarm.config import NetworkConfig


def _peer_ips(addresses: list[str]) -> list[str]:
    ips = []
    for address in addresses:
        try:
            parts = Multiaddr(address).items()
        except Exception:
            continue
        ips.extend(value for protocol, value in parts if protocol.name in ("ip4", "ip6"))
    return ips


def local_ip_towards(remote_ip: str) -> str | None:
    """The address of the interface this machine would use to reach ``remote_ip`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_ip, 9))  # UDP connect only selects a route
            return probe.getsockname()[0]
    except OSError:
        return None


def behind_nat(network: NetworkConfig) -> tuple[bool, str]:
    """(client mode needed?, one sentence saying why) for this peer and its initial peers."""
    if network.announce_maddrs:
        return False, "a public address is announced (network.announce_maddrs)"
    for remote in _peer_ips(network.initial_peers):
        if not ipaddress.ip_address(remote).is_global:
            continue
        local = local_ip_towards(remote)
        if local is not None and not ipaddress.ip_address(local).is_global:
            return True, (
                f"this machine reaches {remote} from the private address {local}: it is behind a NAT, so it joins"
                " in client mode through relays (set network.client_mode=false and announce_maddrs if the port"
                " is forwarded)"
            )
    return False, "no initial peer on the internet needs to reach this machine through a NAT"


def resolve_client_mode(network: NetworkConfig) -> str:
    """Replace ``client_mode: auto`` by a decision (and enable auto-relay with client mode); returns the reason."""
    if network.client_mode != "auto":
        return "set in the config"
    needed, reason = behind_nat(network)
    network.client_mode = needed
    if needed:
        network.use_auto_relay = True
    return reason
