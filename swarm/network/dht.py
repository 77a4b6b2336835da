"""Starting a DHT node: a new swarm, or joining one through initial peers with retries and a clear failure."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.multiaddr import Multiaddr

from swarm.config import NetworkConfig
from swarm.errors import UserError
from swarm.identity import Identity
from swarm.network.ports import release_ports, stable_host_maddrs
from swarm.network.startup import StartStalled, install_stack_dumps, start_in_background
from swarm.network.validation import RecordBounds, SwarmRecordValidator

logger = logging.getLogger(__name__)

PEER_ADDR_FILE = "peer_addr.txt"


class _WholeMessageReads:
    """The DHT process's end of its command pipe, read in blocking mode.

    hivemind 1.1.12's ``DHT.run`` registers the pipe with the event loop, which makes it non-blocking, and then
    calls ``recv()`` as soon as the first bytes are there. A command larger than one socket read (a value of some
    hundred KiB, e.g. a shared-rollout bundle) then raises ``BlockingIOError`` halfway through the message, which
    hivemind logs and skips — leaving the rest of the message in the pipe, so the next ``recv`` fails with
    ``EOFError`` and the DHT process dies (seen in RL-Swarm as "Resource temporarily unavailable" followed by "Ran
    out of input"). A caller then waits forever on its store. Reading each message whole, once the loop has seen it
    start, avoids that; everything else is the pipe's own. A command that cannot be rebuilt because its sender has
    exited becomes ``_dropped_command`` (one log line) instead of hivemind's traceback and pause."""

    def __init__(self, connection) -> None:
        self._connection = connection

    def recv(self):
        fd = self._connection.fileno()
        os.set_blocking(fd, True)
        try:
            message = self._connection.recv_bytes()
        finally:
            os.set_blocking(fd, False)
        try:
            return ForkingPickler.loads(message)
        except OSError as error:
            # the command's future carries its sender's pipe, which multiprocessing's resource sharer hands over
            # through a socket of the sending process: a sender that exited since (a peer stopping on Ctrl+C)
            # leaves nothing to connect to. hivemind would log a traceback and pause; nobody waits for the answer
            return "_dropped_command", [], dict(reason=f"{type(error).__name__}: {error}")

    def __getattr__(self, name: str):
        return getattr(self._connection, name)


class SwarmDHT(hivemind.DHT):
    """``hivemind.DHT`` whose process reads every command from its pipe whole (see :class:`_WholeMessageReads`)
    and prints its stacks when a start that stalled is given up on (:func:`~swarm.network.startup.await_ready`)."""

    def run(self) -> None:
        install_stack_dumps()
        self._inner_pipe = _WholeMessageReads(self._inner_pipe)
        super().run()

    async def _dropped_command(self, reason: str) -> None:
        """What a command whose sender has exited becomes (:class:`_WholeMessageReads`): one log line."""
        logger.info(f"DHT: dropped a command from a process that has exited ({reason})")


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _start_node(
    network: NetworkConfig, identity: Identity, validators: list[RecordValidatorBase]
) -> SwarmDHT:
    dht = SwarmDHT(
        initial_peers=network.initial_peers,
        host_maddrs=network.host_maddrs,
        announce_maddrs=network.announce_maddrs or None,
        client_mode=network.client_mode,
        use_relay=network.use_relay,
        use_auto_relay=network.use_auto_relay,
        identity_path=str(identity.path),
        record_validators=validators,
        start=False,
    )
    return start_in_background(dht, network.startup_timeout, what="DHT")


def peer_ids_of(addresses: Iterable[str]) -> list[str]:
    """The peer ids named by ``/p2p/<id>`` in multiaddrs, in order, without repeats (malformed ones are skipped:
    the DHT start reports them)."""
    ids: list[str] = []
    for address in addresses:
        try:
            peer_id = Multiaddr(address).value_for_protocol("p2p")
        except Exception:
            continue
        if peer_id and peer_id not in ids:
            ids.append(peer_id)
    return ids


def check_multiaddrs(addresses: list[str], what: str) -> None:
    """:raises UserError: naming the first address that is not a valid multiaddr (with ``/p2p/`` for peers)."""
    for address in addresses:
        try:
            parsed = Multiaddr(address)
        except Exception as error:
            raise UserError(
                f"{what}: {address!r} is not a valid multiaddress ({error})", exit_code=2
            ) from None
        if what == "initial peer" and "/p2p/" not in str(parsed):
            raise UserError(f"initial peer: {address!r} lacks the peer id part (/p2p/Qm...)", exit_code=2)


def start_dht(
    network: NetworkConfig,
    identity: Identity,
    workdir: Path,
    run_id: str | None = None,
    record_bounds: RecordBounds | None = None,
    averager_prefix: str | None = None,
) -> hivemind.DHT:
    """Start this peer's DHT node, signed records enabled with the peer's own key.

    With ``run_id``, the node also refuses to store (or to accept from other nodes) any record the swarm would not
    write (:class:`~swarm.network.validation.SwarmRecordValidator`: under every key of the run and of its averager,
    ``averager_prefix``, default ``<run_id>_grads``, values without an owner subkey, not msgpack, of the wrong
    type or model, oversized, forged, or with an expiration that is NaN, infinite or further ahead than
    ``record_bounds`` allow; default :class:`~swarm.network.validation.RecordBounds`, best
    ``RecordBounds.from_config(config)``), including verification records that are forged, replayed, malformed or
    oversized (what :class:`~swarm.network.records.VerificationRecordValidator` refuses) and shared-rollout entries
    over 4 MiB (what :class:`~swarm.network.rollout_records.RolloutRecordValidator` refuses).

    With no initial peers it starts a new swarm. With initial peers it tries ``network.bootstrap_attempts`` times,
    waiting ``bootstrap_backoff`` seconds (doubling) in between. A node process that dies or is not ready within
    ``network.startup_timeout`` seconds is killed and counts as a failed attempt, with or without initial peers
    (:func:`~swarm.network.startup.await_ready`). A host address with TCP port 0 listens on the port kept in the
    work directory (:func:`~swarm.network.ports.stable_host_maddrs`), so the join address survives restarts. On
    success the multiaddrs others can join with are written to ``WORKDIR/peer_addr.txt``.

    :raises UserError: one line naming the addresses tried, when none of the initial peers answered (or the reason
        the node could not start, without initial peers)
    """
    check_multiaddrs(network.initial_peers, "initial peer")
    check_multiaddrs(network.host_maddrs, "network.host_maddrs")
    check_multiaddrs(network.announce_maddrs, "network.announce_maddrs")
    attempts = network.bootstrap_attempts
    validators: list[RecordValidatorBase] = [RSASignatureValidator(identity.private_key)]
    if run_id is not None:
        # it refuses everything VerificationRecordValidator and RolloutRecordValidator refuse, and logs each kind of
        # refusal once (registering those too would log every refused commitment twice, and without a limit)
        validators.append(
            SwarmRecordValidator(run_id, record_bounds, averager_prefix, local_peer_id=str(identity.peer_id))
        )
    delay = network.bootstrap_backoff
    requested = network
    network = network.model_copy(update=dict(host_maddrs=stable_host_maddrs(network.host_maddrs, workdir)))
    for attempt in range(1, attempts + 1):
        try:
            try:
                dht = _start_node(network, identity, validators)
            finally:
                release_ports()
            break
        except Exception as error:  # p2pd reports an unreachable bootstrap peer as a generic daemon error
            if (
                network.host_maddrs != requested.host_maddrs
                and "address already in use" in str(error).lower()
            ):
                logger.warning(
                    f"the kept port is in use after all: listening on a random port ({_last_line(error)})"
                )
                network = requested
                continue
            # a lone node that failed for a reason of its own (a port in use) would fail the same way again
            retry = bool(network.initial_peers) or isinstance(error, StartStalled)
            reason = _last_line(error)[:200]
            if "already taken by another peer" in reason:  # hivemind's identity check: no retry changes that
                raise UserError(
                    f"the identity {identity.path} is in use by a peer that is running (two peers in one "
                    f"work directory?): give this peer a work directory of its own with --workdir DIR",
                    exit_code=2,
                ) from None
            if retry and attempt < attempts:
                what = "join the swarm" if network.initial_peers else "start the DHT node"
                logger.warning(
                    f"Could not {what} (attempt {attempt}/{attempts}: {reason}), retrying in {delay:.1f}s"
                )
                time.sleep(delay)
                delay *= 2
                continue
            if network.initial_peers:
                raise UserError(
                    f"none of the initial peers answered after {attempts} attempts:"
                    f" {', '.join(network.initial_peers)} ({reason})"
                ) from None
            raise UserError(f"could not start the DHT node after {attempt} attempt(s): {reason}") from None
    addresses = [str(addr) for addr in dht.get_visible_maddrs()]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / PEER_ADDR_FILE).write_text("\n".join(addresses) + "\n")
    return dht
