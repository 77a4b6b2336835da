"""Tests for swarm.identity: a persistent, private key file whose peer id is the one libp2p derives, and whose
DHT records are attributed to that same peer id."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from swarm.errors import UserError
from swarm.identity import Identity, peer_name
from swarm.network.records import owner_peer_id

pytestmark = pytest.mark.unit

NAME_PATTERN = re.compile(r"^[a-z]+-[a-z]+-[a-z]+$")


@pytest.fixture(scope="module")
def identity_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity") / "nested" / "dir" / "identity.key"
    Identity.load_or_create(path)
    return path


def test_creates_a_private_key_file(identity_path: Path) -> None:
    assert identity_path.is_file()
    assert stat.S_IMODE(identity_path.stat().st_mode) == 0o600


def test_stable_across_loads(identity_path: Path) -> None:
    before = identity_path.read_bytes()
    first = Identity.load_or_create(identity_path)
    second = Identity.load_or_create(identity_path)
    assert first.peer_id == second.peer_id
    assert first.name == second.name
    assert first.private_key.to_bytes() == second.private_key.to_bytes()
    assert identity_path.read_bytes() == before  # loading never rewrites the key


def test_peer_id_is_what_libp2p_derives_from_the_file(identity_path: Path) -> None:
    identity = Identity.load_or_create(identity_path)
    blob = identity_path.read_bytes()
    assert identity.peer_id == PeerID.from_identity(blob)
    proto = crypto_pb2.PrivateKey.FromString(blob)
    assert proto.key_type == crypto_pb2.KeyType.RSA
    assert proto.data == identity.private_key.to_bytes()


def test_name_is_deterministic_and_readable(identity_path: Path) -> None:
    identity = Identity.load_or_create(identity_path)
    assert NAME_PATTERN.match(identity.name), identity.name
    assert identity.name == peer_name(identity.peer_id) == peer_name(str(identity.peer_id))


def test_two_keys_give_two_identities(tmp_path: Path, identity_path: Path) -> None:
    first = Identity.load_or_create(identity_path)
    other = Identity.load_or_create(tmp_path / "other.key")
    assert other.peer_id != first.peer_id
    assert other.private_key.to_bytes() != first.private_key.to_bytes()
    assert NAME_PATTERN.match(other.name)


def test_names_spread_over_many_peer_ids() -> None:
    names = {peer_name(f"peer-{index}") for index in range(200)}
    assert len(names) > 190  # a readable name is only useful if two peers rarely share one


@pytest.mark.parametrize("content", [b"", b"not a key at all", b"\x08\x00\x12\x03abc"])
def test_corrupt_key_file_is_a_user_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        Identity.load_or_create(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content  # the user's file is left for them to inspect


def test_non_rsa_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"x" * 64).SerializeToString()
    )
    with pytest.raises(UserError, match=re.escape(str(path))):
        Identity.load_or_create(path)


def test_signed_records_are_owned_by_the_identity_peer_id(identity_path: Path, tmp_path: Path) -> None:
    identity = Identity.load_or_create(identity_path)
    subkey = RSASignatureValidator(identity.private_key).local_public_key
    assert owner_peer_id(subkey) == str(identity.peer_id)

    other = Identity.load_or_create(tmp_path / "other.key")
    other_subkey = RSASignatureValidator(other.private_key).local_public_key
    assert owner_peer_id(other_subkey) == str(other.peer_id) != str(identity.peer_id)
    assert owner_peer_id(b"no owner here") is None
    assert owner_peer_id(subkey + other_subkey) is None  # two claimed owners: not attributable
