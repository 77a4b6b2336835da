"""The ``ledger`` section of the config: the credit rules every peer of a swarm must share, replication and anchoring.

Amounts are in credits (floats in YAML, converted once to integer micro-credits by :meth:`LedgerConfig.rules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swarm.ledger.balances import Rules
from swarm.ledger.entries import MICRO

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

LEDGER_FILE = "ledger.db"
DEFAULT_SLASH_QUORUM = 2  # no single peer can slash another
ROOTS_FILE = "ledger_roots.jsonl"


class LedgerConfig(BaseModel):
    """What the ledger credits, and how it replicates and anchors. The rules (the first block) must be the same on
    every peer of a swarm, or their balances differ; they are stored in each peer's ledger so that
    ``swarm ledger balance`` reads balances under the rules they were written with."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    # --- rules (credits) ---
    credit_per_sample: float = Field(1.0, ge=0)  # per verified sample (prompt × generation) of a contribution
    audit_credit: float = Field(10.0, ge=0)  # per audit an auditor performed
    slash_amount: float = Field(100.0, ge=0)  # fixed penalty of a failed audit
    slash_per_sample: float = Field(20.0, ge=0)  # further penalty per sample of the failed contribution
    provisional_epochs: int | None = Field(None, ge=0)  # None: verify.audit_window
    # distinct failing auditors a slash needs (and they must outnumber those that passed it); None: 2
    slash_quorum: int | None = Field(None, ge=1)
    require_attestation: bool = True  # credit only commitments another member of the round attested
    # --- replication ---
    sync_interval: float = Field(5.0, gt=0)  # seconds between publishing this peer's entries and pulling others'
    record_ttl: float = Field(7 * 24 * 3600.0, gt=0)  # seconds a published chunk of entries stays in the DHT
    # --- anchoring ---
    anchor: Literal["none", "file", "evm"] = "file"  # evm: needs the evm extra (pip install '.[evm]')
    anchor_path: Path | None = None  # file anchor; None: WORKDIR/ledger_roots.jsonl
    anchor_every: int = Field(5, gt=0)  # epochs per period: one Merkle root per period
    anchor_rpc_url: str | None = None  # evm: JSON-RPC endpoint (http(s)://, ws(s):// or an IPC socket path)
    anchor_contract: str | None = None  # evm: address of the root registry (swarm.ledger.evm.deploy_anchor_contract)
    anchor_key_env: str = "SWARM_ANCHOR_KEY"  # evm: env variable holding the owner's hex private key
    anchor_key_file: Path | None = None  # evm: file holding that key instead (wins over anchor_key_env)
    anchor_from_block: int = Field(0, ge=0)  # evm: first block scanned for posted roots (the deployment block)
    anchor_timeout: float = Field(120.0, gt=0)  # evm: seconds to wait for a post's receipt

    @model_validator(mode="after")
    def _evm_settings(self) -> LedgerConfig:
        if self.anchor == "evm" and not (self.anchor_rpc_url and self.anchor_contract):
            raise ValueError("ledger.anchor: evm needs ledger.anchor_rpc_url and ledger.anchor_contract")
        return self

    def rules(self, config: SwarmConfig) -> Rules:
        """The :class:`Rules` these settings give in ``config`` (defaults taken from its ``verify`` section)."""
        return Rules(
            credit_per_sample=round(self.credit_per_sample * MICRO),
            audit_credit=round(self.audit_credit * MICRO),
            slash_amount=round(self.slash_amount * MICRO),
            slash_per_sample=round(self.slash_per_sample * MICRO),
            provisional_epochs=(
                config.verify.audit_window if self.provisional_epochs is None else self.provisional_epochs
            ),
            slash_quorum=DEFAULT_SLASH_QUORUM if self.slash_quorum is None else self.slash_quorum,
            require_attestation=self.require_attestation,
        )

    def anchor_file(self, workdir: Path) -> Path:
        return self.anchor_path if self.anchor_path is not None else Path(workdir) / ROOTS_FILE


def ledger_config(config: SwarmConfig) -> LedgerConfig:
    """``config.ledger`` once SwarmConfig has the section, the defaults before."""
    section = getattr(config, "ledger", None)
    return section if isinstance(section, LedgerConfig) else LedgerConfig()
