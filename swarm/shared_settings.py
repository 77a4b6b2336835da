"""What every peer of one swarm must share, and what a joiner does when its own settings differ.

Peers average gradients and replay each other's work: they must agree on the run, the model and its LoRA
adapter, the recipe and its options, every hyperparameter that changes a step, the averaging and verification
protocol, rollout sharing and the ledger's rules (:data:`SHARED`). Everything else — the work directory, the
network, timeouts, logging, a cheater's ``verify.attack`` — is the peer's own.

Every peer announces :func:`shared_settings` and their :func:`fingerprint` (``swarm/network/run_records.py``).
A joiner compares them with its own (:func:`reconcile`): it takes the swarm's values for every setting it did not
choose itself, and refuses to start — with one line naming each difference — when a setting it chose explicitly
(``--set``, ``--recipe``, ``SWARM_*``, or a ``--config`` file it named) differs. Never a silent run of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from swarm.config import SwarmConfig
from swarm.errors import UserError

# section -> the fields that must match (None: every field of the section); "run_id" is a top-level field
SHARED: dict[str, frozenset[str] | None] = {
    "run_id": None,
    "model": None,
    "recipe": None,
    "warm_start": None,
    "training": frozenset(
        {
            "trainer",
            "learning_rate",
            "weight_decay",
            "max_grad_norm",
            "prompts_per_round",
            "num_generations",
            "max_completion_length",
            "temperature",
            "seed",
        }
    ),
    "averaging": frozenset(
        {"strategy", "options", "compression", "aggregation", "clip_tau", "clip_iterations", "max_weight"}
    ),
    "diloco": None,
    "verify": frozenset(
        {
            "enabled",
            "audit_probability",
            "recheck_auditors",
            "audit_window",
            "ban_epochs",
            "precision",
            "tolerance",
        }
    ),
    "sharing": None,
    "ledger": frozenset(
        {
            "enabled",
            "credit_per_sample",
            "audit_credit",
            "slash_amount",
            "slash_per_sample",
            "provisional_epochs",
            "slash_quorum",
            "require_attestation",
        }
    ),
}


def shared_settings(config: SwarmConfig) -> dict[str, Any]:
    """The settings of ``config`` that every peer of its swarm must share, as plain JSON values."""
    dumped = config.model_dump(mode="json")
    settings: dict[str, Any] = {}
    for section, fields in SHARED.items():
        value = dumped[section]
        if isinstance(value, dict):
            value = {key: item for key, item in value.items() if fields is None or key in fields}
        settings[section] = value
    return settings


def fingerprint(settings: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``settings``: equal settings, equal fingerprints."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted != "recipe.options":
            flat.update(_flat(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (this peer's value, the swarm's value) for every shared setting that differs."""
    a, b = _flat(mine), _flat(theirs)
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def describe(found: Mapping[str, tuple[Any, Any]]) -> str:
    """``key: X here, Y in the swarm`` for each difference, joined by ``; ``."""
    return "; ".join(
        f"{key}: {json.dumps(mine)} here, {json.dumps(theirs)} in the swarm"
        for key, (mine, theirs) in found.items()
    )


def chosen_differences(
    found: Mapping[str, tuple[Any, Any]], explicit: Iterable[str]
) -> dict[str, tuple[Any, Any]]:
    """The differences under keys (or sections) the user set on purpose: those a joiner refuses to override."""
    chosen = [key.strip() for key in explicit]
    return {
        key: values
        for key, values in found.items()
        if any(key == mine or key.startswith(mine + ".") or mine.startswith(key + ".") for mine in chosen)
    }


def adopt(config: SwarmConfig, settings: Mapping[str, Any], source: str) -> SwarmConfig:
    """``config`` with every shared setting taken from ``settings`` (another peer's: validated like any config).

    :raises UserError: naming ``source`` when those settings are not a valid configuration here
    """
    tree = config.model_dump(mode="json")
    for section, value in settings.items():
        if section not in SHARED:
            raise UserError(
                f"{source} announces an unknown setting {section!r}: it runs another version of swarm"
            )
        if isinstance(value, Mapping) and isinstance(tree.get(section), dict):
            tree[section].update(value)
        else:
            tree[section] = value
    try:
        return SwarmConfig.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{source} announces settings this peer cannot use: {key}: {first['msg']}") from None


def reconcile(
    config: SwarmConfig, swarm: Mapping[str, Any], explicit: Iterable[str], source: str
) -> tuple[SwarmConfig, dict[str, tuple[Any, Any]]]:
    """The config a joiner runs with, and what it took from the swarm (empty when nothing differed).

    :param swarm: the shared settings its initial peer announces
    :param explicit: dotted keys (or sections) the user set on purpose; a difference under one of them refuses
    :param source: who announced ``swarm`` (for messages)
    :raises UserError: one line naming each explicitly set setting that differs from the swarm's
    """
    found = differences(shared_settings(config), swarm)
    if not found:
        return config, {}
    refused = chosen_differences(found, explicit)
    if refused:
        raise UserError(
            f"this peer's settings differ from the swarm's at {source}: {describe(refused)} "
            f"(drop those settings to use the swarm's, or start a swarm of your own without --join)",
            exit_code=2,
        )
    return adopt(config, swarm, source), found
