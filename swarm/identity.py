"""A peer's persistent identity: one RSA key that is both its libp2p identity and the key its DHT records are
signed with, the peer id derived from it, and a short human-readable name derived from the id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import UserError

_ADJECTIVES = (
    "amber agile bold brave bright calm clever cosmic crisp daring eager fancy fierce gentle giant golden "
    "happy hidden humble icy jolly keen lively lucky mellow mighty misty noble nimble patient quick quiet "
    "rapid rosy rustic shiny silent sleek snowy solar sturdy swift tidy tiny vivid wild wise witty zesty"
).split()
_ANIMALS = (
    "albatross badger beaver bison camel cheetah cobra condor coyote crane dingo dolphin eagle falcon ferret "
    "gazelle gecko heron hyena ibis jaguar koala lemur leopard lynx magpie marten moose narwhal ocelot otter "
    "panda panther pelican puffin raven salmon seal shark sparrow tapir tiger toucan walrus wombat yak zebra"
).split()


def peer_name(peer_id: PeerID | str) -> str:
    """A deterministic, human-readable name for a peer id, e.g. ``swift-amber-otter``."""
    digest = hashlib.sha256(str(peer_id).encode()).digest()
    first = _ADJECTIVES[digest[0] % len(_ADJECTIVES)]
    second = _ADJECTIVES[digest[1] % len(_ADJECTIVES)]
    animal = _ANIMALS[int.from_bytes(digest[2:4], "big") % len(_ANIMALS)]
    return f"{first}-{second}-{animal}"


def _rsa_key_from_der(der: bytes) -> RSAPrivateKey:
    # hivemind's RSAPrivateKey can only generate keys; its pickle state is the DER bytes, so restore through that
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


@dataclass(frozen=True)
class Identity:
    """A peer's key pair. The file at ``path`` (mode 0600) holds a libp2p ``PrivateKey`` protobuf, which is what
    hivemind's p2p daemon reads with ``identity_path``; the same key signs the peer's DHT records."""

    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID

    @property
    def name(self) -> str:
        return peer_name(self.peer_id)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the identity at ``path``, creating a new key there (mode 0600) if the file does not exist.

        :raises UserError: if the file exists but is not a valid key, or cannot be written
        """
        path = Path(path)
        if not path.exists():
            key = RSAPrivateKey()
            blob = crypto_pb2.PrivateKey(
                key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()
            ).SerializeToString()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # O_EXCL: two processes racing to create the key never both win; the loser reads the winner's key
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load_or_create(path)
            except OSError as error:
                raise UserError(f"{path}: cannot create identity key: {error.strerror}") from None
            with os.fdopen(fd, "wb") as file:
                file.write(blob)
                file.flush()
                os.fsync(file.fileno())
        try:
            blob = path.read_bytes()
            proto = crypto_pb2.PrivateKey.FromString(blob)
            if proto.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError("not an RSA key")
            key = _rsa_key_from_der(proto.data)
            peer_id = PeerID.from_identity(blob)
        except Exception as error:  # a corrupt file can fail in protobuf, cryptography or multihash code
            raise UserError(
                f"{path}: not a valid identity key ({error}); move it away to create a new one"
            ) from None
        return cls(path=path, private_key=key, peer_id=peer_id)
