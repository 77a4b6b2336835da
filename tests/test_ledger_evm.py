"""The EVM anchor against an in-process chain (web3's EthereumTesterProvider on py-evm): the hand-assembled registry
deploys, takes one root per period from its owner only, refuses a second root for a period, gives every root back,
and a ledger whose recorded root differs from the on-chain one fails verification naming the period.

Needs the ``evm`` extra (``./launch.sh test`` installs it through the ``test`` extra); without it only the test
that swarm imports and fails cleanly without web3 runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.errors import UserError
from swarm.identity import Identity
from swarm.ledger.anchor import anchor_key, anchor_meta, anchored_roots, make_anchor, open_anchor
from swarm.ledger.balances import Rules, balances
from swarm.ledger.config import LedgerConfig
from swarm.ledger.entries import LedgerError, commitment_body
from swarm.ledger.merkle import MerkleTree
from swarm.ledger.store import LedgerCorrupted, LedgerStore
from swarm.network.records import Commitment

OWNER_KEY = "0x" + "00" * 31 + "01"  # eth-tester's first funded account (accounts[0])
ROOTS = ["11" * 32, "22" * 32, "33" * 32]


@pytest.fixture(scope="module")
def evm():
    pytest.importorskip("web3", reason="the evm extra is not installed: pip install '.[evm]'")
    pytest.importorskip("eth_tester", reason="the evm extra is not installed: pip install '.[evm]'")
    from swarm.ledger import evm as module

    return module


@pytest.fixture(scope="module")
def w3(evm):
    from web3 import EthereumTesterProvider, Web3

    return Web3(EthereumTesterProvider())


@pytest.fixture
def registry(evm, w3) -> str:
    """A fresh registry owned by accounts[0], deployed through the node (an unlocked account)."""
    return evm.deploy_anchor_contract(w3, w3.eth.accounts[0])


@pytest.fixture
def owner(evm, w3, registry):
    """The owner's anchor, signing locally with its private key (the path a real deployment takes)."""
    return evm.EvmAnchor(w3, registry, evm.load_private_key(OWNER_KEY))


def raw_post(w3, registry: str, sender: str, period: int, root: bytes, value: int = 0) -> dict:
    """Send post(period, root) straight to the contract, bypassing the adapter's checks; returns the receipt."""
    from swarm.ledger.evm import ABI

    data = w3.eth.contract(address=registry, abi=ABI).encode_abi("post", args=[period, root])
    tx_hash = w3.eth.send_transaction(
        {"from": sender, "to": registry, "data": data, "gas": 200_000, "value": value}
    )
    return w3.eth.get_transaction_receipt(tx_hash)


def revert_of(w3, registry: str, sender: str, period: int, root: bytes) -> str | None:
    """The error name an eth_call of post(period, root) from ``sender`` reverts with (None: it would succeed)."""
    from swarm.ledger.evm import ABI, revert_reason

    try:
        w3.eth.contract(address=registry, abi=ABI).functions.post(period, root).call({"from": sender})
    except Exception as error:  # noqa: BLE001 - eth-tester raises its own TransactionFailed
        return revert_reason(error) or f"undecoded: {error}"
    return None


# ---- the contract ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_listing_assembles_to_the_pinned_code_and_its_constants_are_right(evm):
    from eth_utils import keccak

    for signature, selector in evm.SELECTORS.items():
        assert keccak(text=signature)[:4].hex() == selector, signature
        assert f"0x{selector}" in evm.RUNTIME_ASM, signature
    assert keccak(text="Anchored(uint256,bytes32,uint256)").hex() == evm.ANCHORED_TOPIC
    assert evm.assemble(evm.RUNTIME_ASM) == evm.RUNTIME
    assert evm.INIT.endswith(evm.RUNTIME) and len(evm.RUNTIME) < 256
    # Pinned: any change to the listing changes this, and every deployed registry shows it as its code hash.
    assert evm.CODEHASH == "0x9ff989848fe8d9f914f4650423cddff9634801ec99bfcd299da0f7d43b4f8fb7"
    assert evm.period_slot(0) == int(keccak((0).to_bytes(32, "big")).hex(), 16)
    for bad in ("BOGUS", "PUSH1 0x1", "PUSH2 @nowhere", "ADD"):
        with pytest.raises(ValueError):
            evm.assemble(bad)


@pytest.mark.unit
def test_deploy_records_the_owner_and_the_pinned_code(evm, w3, registry):
    from eth_utils import keccak

    assert "0x" + keccak(bytes(w3.eth.get_code(registry))).hex() == evm.CODEHASH
    anchor = evm.EvmAnchor(w3, registry)  # read-only
    assert anchor.owner() == w3.eth.accounts[0]
    assert anchor.roots() == [] and anchor.root_of(0) is None


# ---- posting and reading back ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_three_periods_post_and_read_back(evm, w3, owner, registry):
    refs, gas, seconds = [], [], []
    for period, root in enumerate(ROOTS):
        start = time.perf_counter()
        refs.append(owner.post(root, period))
        seconds.append(time.perf_counter() - start)
        gas.append(w3.eth.get_transaction_receipt(refs[-1])["gasUsed"])
    assert all(ref.startswith("0x") and len(ref) == 66 for ref in refs) and len(set(refs)) == 3
    anchored = owner.roots()
    assert [(r.period, r.root, r.ref) for r in anchored] == list(zip(range(3), ROOTS, refs))
    assert all(abs(r.posted_at - time.time()) < 3600 for r in anchored)
    assert [owner.root_of(period) for period in range(4)] == [*ROOTS, None]
    # anyone reads the same roots, without a key, through a new connection to the same contract
    assert evm.EvmAnchor(w3, registry).roots() == anchored
    # posting the same root again is a no-op that returns the first posting
    block = w3.eth.block_number
    assert owner.post(ROOTS[1], 1) == refs[1]
    assert w3.eth.block_number == block
    assert max(gas) < 60_000, gas
    print(f"\nevm anchor: gas per post {gas}, wall time per post {[f'{s * 1000:.0f} ms' for s in seconds]}")


@pytest.mark.unit
def test_a_second_root_for_a_period_is_refused(evm, w3, owner, registry):
    ref = owner.post(ROOTS[0], 7)
    with pytest.raises(LedgerError, match=f"period 7 is already anchored on {registry} with root {ROOTS[0]}"):
        owner.post(ROOTS[1], 7)
    # the contract itself enforces it, whatever the client does
    owner_address = w3.eth.accounts[0]
    assert revert_of(w3, registry, owner_address, 7, bytes.fromhex(ROOTS[1])) == "AlreadyAnchored"
    assert raw_post(w3, registry, owner_address, 7, bytes.fromhex(ROOTS[1]))["status"] == 0
    with pytest.raises(LedgerError, match=r"reverted AlreadyAnchored\(\): this period is already anchored"):
        evm._transact(
            w3,
            owner_address,
            {"to": registry, "data": owner.contract.encode_abi("post", args=[7, bytes.fromhex(ROOTS[1])])},
            timeout=10,
        )
    assert owner.root_of(7) == ROOTS[0]
    assert [(r.period, r.root, r.ref) for r in owner.roots()] == [(7, ROOTS[0], ref)]


@pytest.mark.unit
def test_only_the_owner_can_post(evm, w3, owner, registry):
    stranger = w3.eth.accounts[1]
    with pytest.raises(LedgerError, match=f"account {stranger} cannot post to {registry}: only its owner"):
        evm.EvmAnchor(w3, registry, stranger).post(ROOTS[0], 0)
    stranger_key = evm.load_private_key("0x" + "00" * 31 + "02")
    assert stranger_key.address == stranger
    with pytest.raises(LedgerError, match="only its owner"):
        evm.EvmAnchor(w3, registry, stranger_key).post(ROOTS[0], 0)
    assert revert_of(w3, registry, stranger, 0, bytes.fromhex(ROOTS[0])) == "NotOwner"
    assert raw_post(w3, registry, stranger, 0, bytes.fromhex(ROOTS[0]))["status"] == 0
    assert owner.roots() == [] and owner.root_of(0) is None
    # nor can a stranger's own deployment pass for this one: it has another owner
    theirs = evm.deploy_anchor_contract(w3, stranger_key)
    assert evm.EvmAnchor(w3, theirs).owner() == stranger != owner.owner()


@pytest.mark.unit
def test_a_concurrent_post_is_resolved_against_the_chain(evm, w3, owner, monkeypatch):
    """Another process of the same peer anchored the period between the check and the send."""
    first = owner.post(ROOTS[0], 3)
    real, stale = owner.root_of, [0]

    def root_of(period: int) -> str | None:  # the adapter's first check misses the concurrent post
        if stale[0]:
            stale[0] -= 1
            return None
        return real(period)

    monkeypatch.setattr(owner, "root_of", root_of)
    stale[0] = 1
    assert owner.post(ROOTS[0], 3) == first  # same root: the winner's posting
    stale[0] = 1
    with pytest.raises(LedgerError, match="period 3 was anchored .* meanwhile"):
        owner.post(ROOTS[1], 3)


@pytest.mark.unit
def test_bad_roots_bad_calls_and_wrong_contracts_are_refused(evm, w3, owner, registry):
    for root, period in (("00" * 32, 0), ("AB" * 32, 0), ("ab" * 31, 0), (ROOTS[0], -1), (ROOTS[0], True)):
        with pytest.raises(LedgerError):
            owner.post(root, period)
    with pytest.raises(LedgerError, match="read-only"):
        evm.EvmAnchor(w3, registry).post(ROOTS[0], 0)
    owner_address = w3.eth.accounts[0]
    assert revert_of(w3, registry, owner_address, 0, b"\0" * 32) == "BadCall"  # zero means "not anchored"
    assert raw_post(w3, registry, owner_address, 0, bytes.fromhex(ROOTS[0]), value=1)["status"] == 0
    assert w3.eth.get_balance(registry) == 0
    for data in ("0xdeadbeef", "0x" + evm.SELECTORS["post(uint256,bytes32)"] + "00" * 40, "0x"):
        with pytest.raises(Exception) as refused:  # noqa: B017 - eth-tester raises its own TransactionFailed
            w3.eth.call({"from": owner_address, "to": registry, "data": data})
        assert evm.revert_reason(refused.value) == "BadCall", data
    with pytest.raises(LedgerError, match="is not a swarm root registry \\(no code there\\)"):
        evm.EvmAnchor(w3, w3.eth.accounts[2])
    assert owner.roots() == []


# ---- ledger verification ------------------------------------------------------------------------------------------


def ledger_with_roots(path: Path, identity: Identity, periods: int) -> list[str]:
    """A ledger with one credit per period and a recorded root for each period; returns the roots."""
    roots = []
    with LedgerStore(path) as store:
        store.set_meta("rules", json.dumps(dataclasses.asdict(Rules(require_attestation=False))))
        for period in range(periods):
            mine = Commitment(
                peer_id=str(identity.peer_id),
                epoch=period,
                state_hash="s" * 64,
                data_seed=f"{period:064x}",
                samples=8,
                tokens=800,
                rollouts_hash="r" * 64,
                gradient_hash="g" * 64,
                precision="fp32",
            )
            store.append(
                identity,
                commitment=commitment_body(mine),
                kind="contribution",
                subject=str(identity.peer_id),
                epoch=period,
                samples=8,
                tokens=800,
                refs=[mine.digest()],
            )
            root = MerkleTree(balances(store.entries(), store.rules(), period)).root
            store.record_root(period, period, store.max_id(), root, "")
            roots.append(root)
    return roots


@pytest.mark.unit
def test_verify_detects_a_root_that_differs_from_the_chain(evm, w3, owner, registry, tmp_path, monkeypatch):
    monkeypatch.setattr(
        evm.EvmAnchor,
        "connect",
        classmethod(lambda cls, url, contract, key=None, **kw: cls(w3, contract, key, **kw)),
    )
    settings = LedgerConfig(anchor="evm", anchor_rpc_url="http://node.invalid:8545", anchor_contract=registry)
    meta = anchor_meta(settings, tmp_path)
    assert meta == {
        "kind": "evm",
        "path": str(tmp_path / "ledger_roots.jsonl"),
        "rpc_url": "http://node.invalid:8545",
        "contract": registry,
        "from_block": 0,
    }
    roots = ledger_with_roots(tmp_path / "ledger.db", Identity.load_or_create(tmp_path / "key"), 2)
    assert roots[0] != roots[1]
    owner.post(roots[0], 0)
    owner.post(ROOTS[2], 1)  # the chain holds another root for period 1 than this ledger recorded
    with LedgerStore(tmp_path / "ledger.db") as store:
        anchored = anchored_roots(meta)
        assert anchored == {0: roots[0], 1: ROOTS[2]}
        with pytest.raises(LedgerCorrupted, match=f"bad root of period 1: the anchor holds {ROOTS[2]}"):
            store.verify(anchored)
        assert store.verify({0: roots[0]}) == 2  # the matching period alone verifies


@pytest.mark.unit
def test_open_anchor_reads_the_config_and_the_key(evm, w3, registry, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        evm.EvmAnchor,
        "connect",
        classmethod(
            lambda cls, url, contract, key=None, **kw: (
                seen.append((url, contract, key, kw)) or cls(w3, contract)
            )
        ),
    )
    settings = LedgerConfig(
        anchor="evm",
        anchor_rpc_url="http://node.invalid:8545",
        anchor_contract=registry,
        anchor_from_block=5,
        anchor_timeout=9,
    )
    assert isinstance(
        open_anchor(settings, tmp_path, environ={"SWARM_ANCHOR_KEY": f" {OWNER_KEY}\n"}), evm.EvmAnchor
    )
    assert seen[-1] == ("http://node.invalid:8545", registry, OWNER_KEY, {"from_block": 5, "timeout": 9})
    open_anchor(settings, tmp_path, environ={})
    assert seen[-1][2] is None  # no key anywhere: read-only
    key_file = tmp_path / "anchor.key"
    key_file.write_text(OWNER_KEY + "\n")
    with_file = settings.model_copy(update={"anchor_key_file": key_file})
    assert anchor_key(with_file, environ={"SWARM_ANCHOR_KEY": "ignored"}) == OWNER_KEY
    with pytest.raises(LedgerError, match="anchor_key_file: cannot read"):
        anchor_key(settings.model_copy(update={"anchor_key_file": tmp_path / "missing"}), environ={})
    with pytest.raises(LedgerError, match="not a 32-byte hex string") as refused:
        evm.load_private_key("0x1234")
    assert "1234" not in str(refused.value)
    with pytest.raises(ValueError, match="evm needs ledger.anchor_rpc_url and ledger.anchor_contract"):
        LedgerConfig(anchor="evm")
    with pytest.raises(LedgerError, match="needs ledger.anchor_rpc_url"):
        make_anchor("evm")


@pytest.mark.unit
def test_an_unreachable_node_is_one_clear_error(evm):
    with pytest.raises(LedgerError, match="evm anchor: cannot read contract .*Connection refused"):
        make_anchor("evm", rpc_url="http://127.0.0.1:9", contract="0x" + "00" * 20)


# ---- without the extra --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_swarm_imports_without_web3_and_names_the_extra(tmp_path, monkeypatch):
    probe = (
        "import sys, swarm, swarm.cli, swarm.ledger.anchor, swarm.ledger.cli, swarm.ledger.config, "
        "swarm.ledger.store; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('web3', 'eth_account', 'eth_tester', 'eth_utils') or m == 'swarm.ledger.evm'))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        == "[]"
    )
    monkeypatch.setitem(sys.modules, "web3", None)  # import web3 now raises ImportError
    monkeypatch.delitem(sys.modules, "swarm.ledger.evm", raising=False)
    with pytest.raises(
        UserError, match=r"^ledger\.anchor: the evm anchor needs web3: pip install '\.\[evm\]'"
    ):
        make_anchor("evm", rpc_url="http://node.invalid:8545", contract="0x" + "00" * 20)
    with pytest.raises(UserError, match="pip install"):
        anchored_roots({"kind": "evm", "rpc_url": "http://node.invalid:8545", "contract": "0x" + "00" * 20})


@pytest.mark.unit
def test_swarm_ledger_verify_checks_roots_against_the_chain(evm, w3, owner, registry, tmp_path, monkeypatch):
    import argparse

    from swarm.ledger.cli import add_ledger_parser, run_ledger

    monkeypatch.setattr(
        evm.EvmAnchor,
        "connect",
        classmethod(lambda cls, url, contract, key=None, **kw: cls(w3, contract, key, **kw)),
    )
    settings = LedgerConfig(anchor="evm", anchor_rpc_url="http://node.invalid:8545", anchor_contract=registry)
    roots = ledger_with_roots(tmp_path / "ledger.db", Identity.load_or_create(tmp_path / "key"), 2)
    with LedgerStore(tmp_path / "ledger.db") as store:
        store.set_meta("anchor", json.dumps(anchor_meta(settings, tmp_path)))
    parser = argparse.ArgumentParser()
    add_ledger_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ledger", "verify", "--db", str(tmp_path / "ledger.db")])
    owner.post(roots[0], 0)
    assert run_ledger(args, out=io.StringIO()) == 0
    owner.post(ROOTS[2], 1)  # the chain holds another root for period 1 than this ledger recorded
    with pytest.raises(UserError, match=f"bad root of period 1: the anchor holds {ROOTS[2]}"):
        run_ledger(args, out=io.StringIO())
