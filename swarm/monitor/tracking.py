"""Weights & Biases tracking: one W&B run per peer, grouped by the swarm's run id, with the config logged.

Mode (``monitor.wandb``): ``auto`` uses ``WANDB_MODE`` if set, else ``online`` when an API key is available
(``WANDB_API_KEY`` or a ``wandb login``), else ``offline`` — never an interactive prompt. Offline runs are
written under ``WORKDIR/wandb/`` and can be uploaded later with ``wandb sync``. Tracking is best effort: if W&B
cannot start, the peer logs one warning and trains on (the same figures are in ``WORKDIR/metrics.jsonl``).
"""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any

from swarm.config import SwarmConfig
from swarm.ledger.entries import MICRO
from swarm.monitor.callbacks import SwarmCallback

logger = logging.getLogger(__name__)


def resolve_wandb_mode(setting: str, environ: dict[str, str] | None = None) -> str:
    """``online``, ``offline`` or ``disabled`` for a ``monitor.wandb`` setting (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return setting
    if environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(environ["WANDB_MODE"], environ["WANDB_MODE"])
    return "online" if environ.get("WANDB_API_KEY") or _has_netrc_login() else "offline"


def _has_netrc_login() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class RunTracker:
    """Logs one peer's epochs to its own W&B run (a no-op when tracking is disabled or failed to start)."""

    def __init__(self, run: Any | None):
        self.run = run

    @classmethod
    def start(cls, config: SwarmConfig, peer_name: str, peer_id: str) -> RunTracker:
        mode = resolve_wandb_mode(config.monitor.wandb)
        if mode == "disabled":
            return cls(None)
        try:
            import wandb

            run = wandb.init(
                project=config.monitor.wandb_project,
                entity=config.monitor.wandb_entity,
                group=config.run_id,
                job_type="peer",
                name=peer_name,
                id=f"{config.run_id}-{peer_name}",  # a restarted peer continues its own run
                resume="allow",
                mode=mode,
                dir=str(config.workdir),
                config=dict(config.model_dump(mode="json"), peer_id=peer_id),
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
        except Exception as error:  # no network, bad key, unwritable dir: never worth stopping training for
            logger.warning(f"W&B tracking disabled: {type(error).__name__}: {error}")
            return cls(None)
        logger.info(f"W&B run {run.name} ({mode}) in group {config.run_id}")
        return cls(run)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as error:
            logger.warning(f"W&B logging failed, tracking disabled: {error}")
            self.run = None

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """Log a ``wandb.Table`` (e.g. the swarm's credits table at the end of the run), at ``step`` if given."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.log(
                {key: wandb.Table(columns=columns, data=rows)}, **({} if step is None else dict(step=step))
            )
        except Exception as error:
            logger.warning(f"W&B table logging failed: {error}")

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:
                logger.warning(f"W&B run did not finish cleanly: {error}")
            self.run = None


class WandbCallback(SwarmCallback):
    """Starts the peer's W&B run when it joins, logs every epoch with swarm-level figures, finishes at the end."""

    def __init__(self) -> None:
        self.tracker = RunTracker(None)

    def on_start(self, trainer) -> None:
        self.tracker = RunTracker.start(trainer.config, trainer.identity.name, str(trainer.identity.peer_id))

    def on_epoch_end(self, trainer, metrics) -> None:
        self.tracker.log(metrics.flat(), metrics.epoch)

    def on_completions(self, trainer, samples) -> None:
        names = sorted({name for sample in samples for name in sample["rewards"]})
        rows = [
            [
                sample["epoch"],
                sample["prompt"],
                sample["completion"],
                sample["reward"],
                *(sample["rewards"].get(name) for name in names),
            ]
            for sample in samples
        ]
        self.tracker.log_table(
            "completions",
            ["epoch", "prompt", "completion", "reward", *names],
            rows,
            step=samples[0]["epoch"] if samples else None,
        )

    def on_eval(self, trainer, evaluation) -> None:
        self.tracker.log(evaluation["figures"], evaluation["epoch"])

    def on_end(self, trainer) -> None:
        balances = trainer.credits()
        if balances:
            rows = [
                [peer, balance.final / MICRO, balance.provisional / MICRO, balance.banned]
                for peer, balance in sorted(balances.items())
            ]
            self.tracker.log_table("credits", ["peer", "final", "provisional", "banned"], rows)
        self.tracker.finish()
