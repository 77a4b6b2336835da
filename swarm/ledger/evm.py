"""The EVM anchor: each period's Merkle root posted to a tiny append-only registry contract, through web3.py.

Needs the ``evm`` extra (``pip install '.[evm]'``); nothing else in swarm imports this module, so swarm runs without
web3. :func:`swarm.ledger.anchor.make_anchor` imports it on demand.

**The contract** is hand-assembled (no compiler needed, nothing to trust but the listing below): its source is
:data:`RUNTIME_ASM` and :data:`INIT_ASM`, which :func:`assemble` turns into bytecode at import time — read the
listing, not a hex blob. It speaks the Solidity ABI (:data:`ABI`), so any EVM tool can call it and decode its
events:

* ``post(uint256 period, bytes32 root)`` — only the deployer (the *owner*, kept in storage slot 0) may call it;
  writes ``root`` into slot ``keccak256(period)`` **once**: a second ``post`` for the same period reverts
  ``AlreadyAnchored()``, one from anyone else reverts ``NotOwner()``; a zero root, ether sent along, short calldata
  or an unknown function reverts ``BadCall()``. Each accepted root emits
  ``Anchored(uint256 indexed period, bytes32 root, uint256 timestamp)`` (the block's timestamp).
* ``rootOf(uint256 period) -> bytes32`` (zero: not anchored) and ``owner() -> address``.

No code path writes slot 0 after deployment and a period's slot is a keccak-256 image (never 0), so the owner is
fixed for ever and an anchored root can neither change nor disappear: the registry is append-only. The contract
holds no ether and has no upgrade, self-destruct or delegate path. :class:`EvmAnchor` refuses an address whose
code is not exactly :data:`RUNTIME`, so these guarantees hold for every contract it reads.

Gas: a ``post`` costs about 48k gas (21k transaction + 22.1k for the new storage slot + 2.1k owner read +
~1.9k log + calldata); measured figures are in the README.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

from eth_account import Account
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import TimeExhausted

from swarm.ledger.anchor_types import AnchoredRoot, check_root
from swarm.ledger.entries import LedgerError

# ---- the contract -----------------------------------------------------------------------------------------------

SELECTORS = {  # 4-byte selectors: keccak256(signature)[:4] (tests recompute them)
    "post(uint256,bytes32)": "fe335cc8",
    "rootOf(uint256)": "dc299d69",
    "owner()": "8da5cb5b",
    "NotOwner()": "30cd7471",
    "AlreadyAnchored()": "a0094ce3",
    "BadCall()": "cf0e4328",
}
ANCHORED_TOPIC = "770041f1a960bfc5b73fb4938dd18b041e2e22692a6230c82927bf60734173ed"  # keccak256("Anchored(uint256,bytes32,uint256)")

# Runtime code. One instruction per line; "name:" defines a label, "@name" pushes its offset (always PUSH2);
# comments after ";" show the stack (top on the right) after the instruction.
RUNTIME_ASM = """
        PUSH1 0x00
        CALLDATALOAD
        PUSH1 0xe0
        SHR                     ; sel                       (first 4 calldata bytes)
        DUP1
        PUSH4 0xfe335cc8        ; post(uint256,bytes32)
        EQ
        PUSH2 @post
        JUMPI                   ; sel
        DUP1
        PUSH4 0xdc299d69        ; rootOf(uint256)
        EQ
        PUSH2 @root_of
        JUMPI                   ; sel
        PUSH4 0x8da5cb5b        ; owner()
        EQ
        PUSH2 @owner
        JUMPI                   ;
bad_call:                       ; revert BadCall()
        JUMPDEST
        PUSH4 0xcf0e4328
        PUSH2 @revert
        JUMP
not_owner:                      ; revert NotOwner()
        JUMPDEST
        PUSH4 0x30cd7471
        PUSH2 @revert
        JUMP
already:                        ; revert AlreadyAnchored()
        JUMPDEST
        PUSH4 0xa0094ce3
revert:                         ; revert with the 4-byte error selector on top of the stack
        JUMPDEST
        PUSH1 0xe0
        SHL
        PUSH1 0x00
        MSTORE                  ; memory[0:4] = selector
        PUSH1 0x04
        PUSH1 0x00
        REVERT
post:                           ; post(uint256 period, bytes32 root)
        JUMPDEST                ; sel
        CALLVALUE
        PUSH2 @bad_call
        JUMPI                   ; non-payable
        PUSH1 0x44
        CALLDATASIZE
        LT
        PUSH2 @bad_call
        JUMPI                   ; calldata >= 4 + 32 + 32 bytes
        PUSH1 0x00
        SLOAD                   ; sel owner
        CALLER
        EQ
        ISZERO
        PUSH2 @not_owner
        JUMPI                   ; sel                       (only the owner)
        PUSH1 0x24
        CALLDATALOAD            ; sel root
        DUP1
        ISZERO
        PUSH2 @bad_call
        JUMPI                   ; sel root                  (root != 0: zero means "not anchored")
        PUSH1 0x04
        CALLDATALOAD
        PUSH1 0x00
        MSTORE                  ; memory[0:32] = period
        PUSH1 0x20
        PUSH1 0x00
        SHA3                    ; sel root slot             (slot = keccak256(period))
        DUP1
        SLOAD
        PUSH2 @already
        JUMPI                   ; sel root slot             (write once)
        DUP2
        DUP2
        SSTORE                  ; sel root slot             (storage[slot] = root)
        POP
        PUSH1 0x00
        MSTORE                  ; sel                       (memory[0:32] = root)
        TIMESTAMP
        PUSH1 0x20
        MSTORE                  ; sel                       (memory[32:64] = block timestamp)
        PUSH1 0x04
        CALLDATALOAD            ; sel period
        PUSH32 0x770041f1a960bfc5b73fb4938dd18b041e2e22692a6230c82927bf60734173ed
        PUSH1 0x40
        PUSH1 0x00
        LOG2                    ; sel                       (Anchored(period indexed, root, timestamp))
        STOP
root_of:                        ; rootOf(uint256 period) -> bytes32
        JUMPDEST
        CALLVALUE
        PUSH2 @bad_call
        JUMPI
        PUSH1 0x24
        CALLDATASIZE
        LT
        PUSH2 @bad_call
        JUMPI
        PUSH1 0x04
        CALLDATALOAD
        PUSH1 0x00
        MSTORE
        PUSH1 0x20
        PUSH1 0x00
        SHA3
        SLOAD                   ; sel root
        PUSH2 @return_word
        JUMP
owner:                          ; owner() -> address
        JUMPDEST
        CALLVALUE
        PUSH2 @bad_call
        JUMPI
        PUSH1 0x00
        SLOAD                   ; owner
return_word:                    ; return the word on top of the stack
        JUMPDEST
        PUSH1 0x00
        MSTORE
        PUSH1 0x20
        PUSH1 0x00
        RETURN
"""

# Deployment code: remember the deployer as owner, return the runtime code that follows this code. "@end" is
# where this code ends (the runtime's offset), "@runtime_size" the runtime's length.
INIT_ASM = """
        CALLER
        PUSH1 0x00
        SSTORE                  ; storage[0] = deployer (the owner)
        PUSH2 @runtime_size
        DUP1
        PUSH2 @end
        PUSH1 0x00
        CODECOPY                ; size                      (memory[0:size] = runtime)
        PUSH1 0x00
        RETURN
end:
"""

_OPCODES = {
    "STOP": 0x00,
    "LT": 0x10,
    "EQ": 0x14,
    "ISZERO": 0x15,
    "SHL": 0x1B,
    "SHR": 0x1C,
    "SHA3": 0x20,
    "CALLER": 0x33,
    "CALLVALUE": 0x34,
    "CALLDATALOAD": 0x35,
    "CALLDATASIZE": 0x36,
    "CODECOPY": 0x39,
    "TIMESTAMP": 0x42,
    "POP": 0x50,
    "MSTORE": 0x52,
    "SLOAD": 0x54,
    "SSTORE": 0x55,
    "JUMP": 0x56,
    "JUMPI": 0x57,
    "JUMPDEST": 0x5B,
    "DUP1": 0x80,
    "DUP2": 0x81,
    "LOG2": 0xA2,
    "RETURN": 0xF3,
    "REVERT": 0xFD,
    **{f"PUSH{n}": 0x5F + n for n in range(1, 33)},
}


def assemble(listing: str, constants: dict[str, int] | None = None) -> bytes:
    """EVM bytecode of ``listing`` (the format of :data:`RUNTIME_ASM`): mnemonics of the opcodes used here,
    ``PUSHn 0x..`` with an immediate of exactly n bytes, ``label:`` and ``PUSH2 @label``; ``@name`` may also name
    one of ``constants``. Two passes; a label pushes its byte offset.

    :raises ValueError: an unknown mnemonic or label, or an immediate that does not fit its PUSH
    """
    program: list[tuple[str, str | None]] = []
    labels: dict[str, int] = {}
    offset = 0
    for raw in listing.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.endswith(":"):
            labels[line[:-1]] = offset
            continue
        mnemonic, _, argument = line.partition(" ")
        if mnemonic not in _OPCODES:
            raise ValueError(f"unknown mnemonic {mnemonic!r}")
        program.append((mnemonic, argument.strip() or None))
        offset += 1 + (int(mnemonic[4:]) if mnemonic.startswith("PUSH") else 0)
    values = {**labels, **(constants or {})}
    code = bytearray()
    for mnemonic, argument in program:
        code.append(_OPCODES[mnemonic])
        if not mnemonic.startswith("PUSH"):
            if argument is not None:
                raise ValueError(f"{mnemonic} takes no immediate")
            continue
        width = int(mnemonic[4:])
        if argument is None:
            raise ValueError(f"{mnemonic} needs an immediate")
        if argument.startswith("@"):
            if argument[1:] not in values:
                raise ValueError(f"unknown label {argument}")
            value = values[argument[1:]]
        else:
            if not argument.startswith("0x") or len(argument) != 2 + 2 * width:
                raise ValueError(f"{mnemonic} needs a 0x immediate of exactly {width} bytes, got {argument}")
            value = int(argument, 16)
        code += value.to_bytes(width, "big")  # OverflowError if a label does not fit
    return bytes(code)


RUNTIME: bytes = assemble(RUNTIME_ASM)
"""The registry's deployed code (what :class:`EvmAnchor` expects at its address)."""
CODEHASH: str = "0x" + keccak(RUNTIME).hex()
"""keccak256 of :data:`RUNTIME` (what ``EXTCODEHASH`` / a block explorer shows for every registry)."""
INIT: bytes = assemble(INIT_ASM, {"runtime_size": len(RUNTIME)}) + RUNTIME
"""The deployment transaction's data: :data:`INIT_ASM` followed by :data:`RUNTIME`."""

ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "post",
        "stateMutability": "nonpayable",
        "outputs": [],
        "inputs": [{"name": "period", "type": "uint256"}, {"name": "root", "type": "bytes32"}],
    },
    {
        "type": "function",
        "name": "rootOf",
        "stateMutability": "view",
        "inputs": [{"name": "period", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bytes32"}],
    },
    {
        "type": "function",
        "name": "owner",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "address"}],
    },
    {
        "type": "event",
        "name": "Anchored",
        "anonymous": False,
        "inputs": [
            {"name": "period", "type": "uint256", "indexed": True},
            {"name": "root", "type": "bytes32", "indexed": False},
            {"name": "timestamp", "type": "uint256", "indexed": False},
        ],
    },
    {"type": "error", "name": "NotOwner", "inputs": []},
    {"type": "error", "name": "AlreadyAnchored", "inputs": []},
    {"type": "error", "name": "BadCall", "inputs": []},
]
"""The Solidity ABI the registry speaks."""

_ERRORS = {SELECTORS[f"{name}()"]: name for name in ("NotOwner", "AlreadyAnchored", "BadCall")}
_EXPLAIN = {
    "NotOwner": "the sending account is not the contract's owner",
    "AlreadyAnchored": "this period is already anchored (the registry is write-once)",
    "BadCall": "the contract refused the call (zero root, ether sent or malformed calldata)",
}


def period_slot(period: int) -> int:
    """The storage slot holding ``period``'s root: ``keccak256(uint256(period))``."""
    return int.from_bytes(keccak(period.to_bytes(32, "big")), "big")


def revert_reason(error: BaseException) -> str | None:
    """The registry's error name (``NotOwner``, ``AlreadyAnchored``, ``BadCall``) a failed call or gas estimate
    carries, if any: from web3's ``ContractCustomError.data`` (JSON-RPC nodes) or from the ``b'...'`` revert data
    in the message (eth-tester)."""
    data = getattr(error, "data", None)
    candidates = [data.hex() if isinstance(data, bytes) else data] if data is not None else []
    for arg in error.args:
        if isinstance(arg, bytes):
            candidates.append(arg.hex())
        elif isinstance(arg, str):
            candidates += re.findall(r"0x([0-9a-fA-F]{8})(?![0-9a-fA-F])", arg)
            for literal in re.findall(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"", arg):
                try:
                    candidates.append(ast.literal_eval(literal).hex())
                except (ValueError, SyntaxError):
                    continue
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.removeprefix("0x")[:8].lower() in _ERRORS:
            return _ERRORS[candidate.removeprefix("0x")[:8].lower()]
    return None


# ---- accounts and transactions ----------------------------------------------------------------------------------

Sender = Any  # an address (str) the node signs for, or a local signer (eth_account LocalAccount)


def _address(account: Sender) -> str:
    return to_checksum_address(account if isinstance(account, str) else account.address)


def _transact(web3: Web3, account: Sender, tx: dict[str, Any], timeout: float) -> tuple[str, Any]:
    """Send ``tx`` from ``account`` (signed locally when it is a local signer, by the node when an address) and
    wait for its receipt. :returns: (transaction hash hex, receipt) :raises LedgerError: on any failure"""
    tx = {**tx, "from": _address(account)}
    try:
        if "gas" not in tx:
            tx["gas"] = int(web3.eth.estimate_gas(tx) * 1.2) + 1000  # raises ContractLogicError on a revert
        if isinstance(account, str):
            tx_hash = web3.eth.send_transaction(tx)
        else:
            tx.setdefault("nonce", web3.eth.get_transaction_count(tx["from"], "pending"))
            tx.setdefault("chainId", web3.eth.chain_id)
            if "gasPrice" not in tx and "maxFeePerGas" not in tx:
                tx.update(_fees(web3))
            signed = account.sign_transaction(tx)
            tx_hash = web3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = web3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)
    except TimeExhausted:
        raise LedgerError(
            f"evm anchor: no receipt within {timeout:.0f}s (the transaction may still be mined)"
        ) from None
    except Exception as error:  # noqa: BLE001 - providers raise their own types (web3, eth-tester, OSError...)
        reason = revert_reason(error)
        if reason is not None:
            raise LedgerError(f"evm anchor: the contract reverted {reason}(): {_EXPLAIN[reason]}") from None
        raise LedgerError(f"evm anchor: {type(error).__name__}: {str(error)[:300]}") from None
    tx_hex = "0x" + bytes(tx_hash).hex()
    if receipt["status"] != 1:
        raise LedgerError(f"evm anchor: transaction {tx_hex} reverted (block {receipt['blockNumber']})")
    return tx_hex, receipt


def _fees(web3: Web3) -> dict[str, int]:
    """EIP-1559 fees when the chain has a base fee, a legacy gas price otherwise."""
    block = web3.eth.get_block("latest")
    base = block.get("baseFeePerGas")
    if base is None:
        return {"gasPrice": web3.eth.gas_price}
    tip = web3.eth.max_priority_fee
    return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base + tip}


def deploy_anchor_contract(web3: Web3, account: Sender, timeout: float = 120.0) -> str:
    """Deploy a new registry owned by ``account`` (an address the node signs for, or a local signer).

    :returns: the contract's checksum address
    :raises LedgerError: when the deployment fails or the deployed code is not :data:`RUNTIME`
    """
    _, receipt = _transact(web3, account, {"data": "0x" + INIT.hex()}, timeout)
    address = receipt["contractAddress"]
    if address is None or bytes(web3.eth.get_code(address)) != RUNTIME:
        raise LedgerError(f"evm anchor: deployment in block {receipt['blockNumber']} left no registry code")
    return to_checksum_address(address)


def load_private_key(text: str) -> Any:
    """A local signer from a hex private key (``0x`` optional, surrounding whitespace ignored).
    :raises LedgerError: without echoing the key"""
    try:
        return Account.from_key(text.strip())
    except Exception:  # noqa: BLE001 - eth_account raises several types; never show the key
        raise LedgerError("evm anchor: the private key is not a 32-byte hex string") from None


# ---- the adapter --------------------------------------------------------------------------------------------------


class EvmAnchor:
    """Posts roots to, and reads them from, the registry at ``contract`` (see the module docstring).

    Guarantees: :meth:`post` returns only once the root is in a mined block with a successful receipt (it does
    not wait for further confirmations); the same root for the same period again is a no-op returning the first
    posting's transaction hash; a different root for an anchored period raises :class:`LedgerError` before sending
    anything — and the contract itself reverts it should a concurrent post win the race. :meth:`roots` reads the
    ``Anchored`` events, which only successful posts emit, so it lists exactly the anchored roots.

    :param web3: a connected :class:`web3.Web3`
    :param contract: the registry's address; refused unless its code is :data:`RUNTIME`
    :param account: who posts — an address the node signs for, a local signer (eth_account), or None for a
        read-only anchor (:meth:`post` raises)
    :param from_block: the first block scanned for ``Anchored`` events (the deployment block is enough)
    :param timeout: seconds :meth:`post` waits for a receipt
    :raises LedgerError: when the node is unreachable or ``contract`` holds other code
    """

    def __init__(
        self,
        web3: Web3,
        contract: str,
        account: Sender | None = None,
        *,
        from_block: int = 0,
        timeout: float = 120.0,
    ):
        self.web3, self.account, self.from_block, self.timeout = web3, account, from_block, timeout
        try:
            self.address = to_checksum_address(contract)
            code = bytes(web3.eth.get_code(self.address))
        except Exception as error:  # noqa: BLE001 - any provider failure
            raise LedgerError(f"evm anchor: cannot read contract {contract!r}: {str(error)[:300]}") from None
        if code != RUNTIME:
            raise LedgerError(
                f"evm anchor: {self.address} is not a swarm root registry "
                f"({'no code' if not code else 'different code'} there)"
            )
        self.contract = web3.eth.contract(address=self.address, abi=ABI)

    @classmethod
    def connect(
        cls,
        rpc_url: str,
        contract: str,
        private_key: str | None = None,
        *,
        from_block: int = 0,
        timeout: float = 120.0,
    ) -> EvmAnchor:
        """An anchor on the node at ``rpc_url`` (``http(s)://`` or ``ws(s)://`` URL, or an IPC socket path),
        posting with ``private_key`` (hex; None: read-only)."""
        if rpc_url.startswith(("http://", "https://")):
            provider: Any = Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout})
        elif rpc_url.startswith(("ws://", "wss://")):
            from web3 import LegacyWebSocketProvider

            provider = LegacyWebSocketProvider(rpc_url)
        else:
            provider = Web3.IPCProvider(rpc_url, timeout=timeout)
        account = load_private_key(private_key) if private_key is not None else None
        return cls(Web3(provider), contract, account, from_block=from_block, timeout=timeout)

    def owner(self) -> str:
        """The registry owner's checksum address (the only account that can post)."""
        return to_checksum_address(self._call(self.contract.functions.owner()))

    def root_of(self, period: int) -> str | None:
        """The root anchored for ``period`` (64 hex digits), read from contract storage; None if none."""
        word = bytes(self._guard(lambda: self.web3.eth.get_storage_at(self.address, period_slot(period))))
        return None if not any(word) else word.rjust(32, b"\0").hex()

    def post(self, root: str, period: int) -> str:
        """Anchor ``root`` for ``period`` (see the class docstring); :returns: the transaction hash (``0x`` hex).
        :raises LedgerError: a malformed root or period (including period >= 2**256 and the all-zero root), a
            read-only anchor, an account that is not the owner, a period anchored with another root, or a failed
            transaction"""
        check_root(root, period)
        if period >= 2**256 or not int(root, 16):
            raise LedgerError(f"evm anchor: cannot anchor root {root} for period {period}")
        existing = self.root_of(period)
        if existing is not None:
            if existing == root:
                return next((r.ref for r in self.roots() if r.period == period), "")
            raise LedgerError(
                f"evm anchor: period {period} is already anchored on {self.address} with root "
                f"{existing}; refusing {root}"
            )
        if self.account is None:
            raise LedgerError("evm anchor: read-only (no private key configured), cannot post")
        sender, owner = _address(self.account), self.owner()
        if sender != owner:
            raise LedgerError(
                f"evm anchor: account {sender} cannot post to {self.address}: only its owner {owner} can"
            )
        data = self.contract.encode_abi("post", args=[period, bytes.fromhex(root)])
        try:
            tx_hash, _ = _transact(self.web3, self.account, {"to": self.address, "data": data}, self.timeout)
        except LedgerError:
            # A concurrent post (another process of this peer) may have anchored the period since the check above.
            existing = self.root_of(period)
            if existing == root:
                return next((r.ref for r in self.roots() if r.period == period), "")
            if existing is not None:
                raise LedgerError(
                    f"evm anchor: period {period} was anchored on {self.address} with root "
                    f"{existing} meanwhile; refusing {root}"
                ) from None
            raise
        return tx_hash

    def roots(self) -> list[AnchoredRoot]:
        """Every root the registry holds, oldest first (from its ``Anchored`` events since ``from_block``)."""
        logs = self._guard(
            lambda: self.web3.eth.get_logs(
                {
                    "address": self.address,
                    "fromBlock": self.from_block,
                    "toBlock": "latest",
                    "topics": ["0x" + ANCHORED_TOPIC],
                }
            )
        )
        found = []
        for log in sorted(logs, key=lambda log: (log["blockNumber"], log["logIndex"])):
            topics, data = log["topics"], bytes(log["data"])
            if len(topics) != 2 or len(data) != 64:
                continue  # cannot come from RUNTIME; ignore rather than trust
            found.append(
                AnchoredRoot(
                    period=int.from_bytes(bytes(topics[1]), "big"),
                    root=data[:32].hex(),
                    posted_at=int.from_bytes(data[32:], "big"),
                    ref="0x" + bytes(log["transactionHash"]).hex(),
                )
            )
        return found

    def _call(self, function: Any) -> Any:
        return self._guard(function.call)

    def _guard(self, read: Any) -> Any:
        try:
            return read()
        except Exception as error:  # noqa: BLE001 - any provider failure
            raise LedgerError(
                f"evm anchor: {self.address}: {type(error).__name__}: {str(error)[:300]}"
            ) from None


__all__: Sequence[str] = (
    "ABI",
    "CODEHASH",
    "INIT",
    "RUNTIME",
    "EvmAnchor",
    "assemble",
    "deploy_anchor_contract",
    "load_private_key",
    "period_slot",
    "revert_reason",
)
