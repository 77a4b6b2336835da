"""A Sybil client written against plain hivemind (no swarm code): one DHT node that joins a swarm and announces
signed peer statuses for many fresh identities, each signed by its own RSA key — what anybody can do for free.

    python -m tests.sybil_client INITIAL_PEER RUN_ID --identities 30 --mode ahead|busy|lagging|mixed

Modes (every status is re-announced every 2 seconds, until the process is killed):

* ``ahead``: every identity copies the furthest-ahead status it reads (another liar's, e.g. a peer serving a
  poisoned state), or announces a far epoch of its own;
* ``busy``: at the epoch the honest peers are at, never ready;
* ``lagging``: at epoch 0, behind everyone;
* ``mixed``: a third of each.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.hostile_client import join_with_retries

FAR_EPOCH = 1_000_000


def peer_id_of_key(key: RSAPrivateKey) -> PeerID:
    """The libp2p peer id of a key, as hivemind derives it for its own identity files."""
    return PeerID.from_identity(
        crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString()
    )


class ManyKeysSigner(RSASignatureValidator):
    """hivemind's signature validator, signing each record with whichever of its keys the record names."""

    def __init__(self, keys: list[RSAPrivateKey]):
        super().__init__(keys[0])
        self._signers = [RSASignatureValidator(key) for key in keys]

    def sign_value(self, record: DHTRecord) -> bytes:
        for signer in self._signers:
            if signer.local_public_key in record.key or signer.local_public_key in record.subkey:
                return signer.sign_value(record)
        return record.value

    def merge_with(self, other) -> bool:
        return isinstance(other, RSASignatureValidator)


def statuses(mode: str, index: int, peer_id: str, seen: list[dict]) -> dict:
    honest = [status for status in seen if isinstance(status, dict) and isinstance(status.get("epoch"), int)]
    top = max(honest, key=lambda status: status["epoch"], default=None)
    current = min((status["epoch"] for status in honest), default=0)
    if mode == "mixed":
        mode = ("ahead", "busy", "lagging")[index % 3]
    epoch, state_hash, ready = current, hashlib.sha256(peer_id.encode()).hexdigest(), -1
    if mode == "ahead":
        if top is not None and top["epoch"] > current + 1:  # another liar is ahead: back it up
            epoch, state_hash = top["epoch"], top["state_hash"]
        else:
            epoch = FAR_EPOCH
        ready = epoch
    elif mode == "lagging":
        epoch, ready = 0, 0
    # the honest peers' settings fingerprint is public: a Sybil copies it
    fingerprint = next(
        (status["fingerprint"] for status in honest if isinstance(status.get("fingerprint"), str)), ""
    )
    return dict(
        peer_id=peer_id,
        name=f"sybil-{index}",
        epoch=epoch,
        state_hash=state_hash,
        ready_epoch=ready,
        samples=10**6,
        reward=1.0,
        client_mode=False,
        left=False,
        fingerprint=fingerprint,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("initial_peer")
    parser.add_argument("run_id")
    parser.add_argument("--identities", type=int, default=30)
    parser.add_argument("--mode", default="mixed", choices=["ahead", "busy", "lagging", "mixed"])
    args = parser.parse_args()
    keys = [RSAPrivateKey() for _ in range(args.identities)]
    signer = ManyKeysSigner(keys)
    dht = join_with_retries(
        lambda **kwargs: hivemind.DHT(initial_peers=[args.initial_peer], record_validators=[signer], **kwargs)
    )
    identities = [(str(peer_id_of_key(key)), RSASignatureValidator(key).local_public_key) for key in keys]
    key = f"{args.run_id}.peers"
    print(f"sybil client: {len(identities)} identities, mode {args.mode}", flush=True)
    while True:
        found = dht.get(key, latest=True, return_future=True)
        try:
            result = found.result(timeout=5)
            seen = (
                [item.value for item in result.value.values()]
                if result and isinstance(result.value, dict)
                else []
            )
        except Exception:
            seen = []
        for index, (peer_id, marker) in enumerate(identities):
            dht.store(
                key,
                statuses(args.mode, index, peer_id, seen),
                get_dht_time() + 10,
                subkey=marker,
                return_future=True,
            )
        time.sleep(2.0)


if __name__ == "__main__":
    main()
