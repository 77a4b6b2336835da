"""The ledger's settings as the ledger uses them: the credit :class:`Rules` a config gives (every peer of a swarm
must share them), file names, and the section itself (:class:`swarm.config.LedgerConfig`, re-exported here).

Amounts in the config are credits (floats in YAML), converted once to integer micro-credits by :func:`rules_of`.
"""

from __future__ import annotations

from swarm.config import LEDGER_ROOTS_FILE as ROOTS_FILE
from swarm.config import LedgerConfig, SwarmConfig
from swarm.ledger.balances import Rules
from swarm.ledger.entries import MICRO

__all__ = ["DEFAULT_SLASH_QUORUM", "LEDGER_FILE", "ROOTS_FILE", "LedgerConfig", "ledger_config", "rules_of"]

LEDGER_FILE = "ledger.db"
DEFAULT_SLASH_QUORUM = 2  # no single peer can slash another


def rules_of(config: SwarmConfig, settings: LedgerConfig | None = None) -> Rules:
    """The :class:`Rules` that ``settings`` (default: ``config.ledger``) give in ``config`` (defaults taken from its
    ``verify`` section)."""
    settings = ledger_config(config) if settings is None else settings
    return Rules(
        credit_per_sample=round(settings.credit_per_sample * MICRO),
        audit_credit=round(settings.audit_credit * MICRO),
        slash_amount=round(settings.slash_amount * MICRO),
        slash_per_sample=round(settings.slash_per_sample * MICRO),
        provisional_epochs=(
            config.verify.audit_window if settings.provisional_epochs is None else settings.provisional_epochs
        ),
        slash_quorum=DEFAULT_SLASH_QUORUM if settings.slash_quorum is None else settings.slash_quorum,
        require_attestation=settings.require_attestation,
    )


def ledger_config(config: SwarmConfig) -> LedgerConfig:
    """``config.ledger`` once SwarmConfig has the section, the defaults before."""
    section = getattr(config, "ledger", None)
    return section if isinstance(section, LedgerConfig) else LedgerConfig()
