"""The live terminal dashboard of ``swarm run``: what the peer is doing, refreshed twice a second.

Log lines print above it (through the same rich console) and also go to ``WORKDIR/peer.log``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarm.monitor.callbacks import SwarmCallback


@dataclass
class DashboardState:
    """What the dashboard shows; the trainer updates it, the refresh thread reads it."""

    name: str
    run_id: str
    phase: str = "starting"
    phase_since: float = field(default_factory=time.monotonic)
    epoch: int = 0
    peers_online: int = 1
    samples_per_s: float | None = None
    reward: float | None = None
    loss: float | None = None
    trainer: str = "grpo"  # what the last round ran (EpochRecord.trainer)
    last_round: str = ""
    group_size: int = 0
    my_samples: int = 0
    swarm_samples: int = 0
    # how long computing the previous epoch took: the ETA of the next averaging
    last_compute_s: float | None = None
    audits: dict[str, int] | None = None  # verification figures (Verifier.figures()); None: verification off
    credit: str | None = None  # this peer's ledger balance, as text; None: ledger off
    # rollout sharing figures (RolloutSharing.figures()); None: sharing off
    sharing: dict[str, int] | None = None
    held_out: str | None = None  # the last held-out evaluation, as text; None: none yet

    def set_phase(self, phase: str) -> None:
        self.phase, self.phase_since = phase, time.monotonic()


def render(state: DashboardState) -> Table:
    table = Table(title=f"swarm · {state.name} · run {state.run_id}", show_header=False, min_width=60)
    table.add_column(style="bold cyan")
    table.add_column()
    elapsed = time.monotonic() - state.phase_since
    if state.phase.startswith("computing") and state.last_compute_s is not None:
        next_averaging = f"in ~{max(0.0, state.last_compute_s - elapsed):.0f}s"
    elif state.phase.startswith("averaging"):
        next_averaging = "now"
    else:
        next_averaging = "…"
    rows = [
        ("now", f"{state.phase} ({elapsed:.0f}s)"),
        ("next averaging", next_averaging),
        ("epoch", str(state.epoch)),
        ("peers online", str(state.peers_online)),
        ("my samples/s", "…" if state.samples_per_s is None else f"{state.samples_per_s:.1f}"),
        (
            "mean reward",
            "— (SFT round: no rewards)"
            if state.trainer == "sft" and state.reward is None
            else "…"
            if state.reward is None
            else f"{state.reward:.3f}",
        ),
        ("loss", "…" if state.loss is None else f"{state.loss:.4f}"),
        ("last round", f"{state.last_round} (group of {state.group_size})" if state.last_round else "…"),
        ("samples (mine / swarm)", f"{state.my_samples} / {state.swarm_samples}"),
        *_audit_rows(state.audits),
        ("my credit", state.credit or "ledger off"),
        ("held-out", state.held_out or "…"),
        *_sharing_rows(state.sharing),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def format_credit(ledger: dict) -> str:
    """'12.000000 (4.000000 provisional)' — this peer's credit (the ``ledger`` group of an epoch's metrics), with the
    part still inside its audit window."""
    text = f"{ledger['my_credit']:.6f}"
    if ledger["my_credit_provisional"]:
        text += f" ({ledger['my_credit_provisional']:.6f} provisional)"
    return text + (" · banned" if ledger["banned"] else "")


def _sharing_rows(sharing: dict[str, int] | None) -> list[tuple[str, str]]:
    if sharing is None:
        return []
    return [
        (
            "shared rollouts (published / used)",
            f"{sharing['published_groups']} / {sharing['used_groups']} groups",
        )
    ]


def _audit_rows(audits: dict[str, int] | None) -> list[tuple[str, str]]:
    if audits is None:
        return [("audits", "verification off")]
    return [
        ("my audits passed / failed", f"{audits['my_audits_passed']} / {audits['my_audits_failed']}"),
        ("audits I ran (cheats found)", f"{audits['audits_done']} ({audits['cheats_found']})"),
        ("banned peers", str(audits["banned_peers"])),
    ]


class Dashboard:
    """A rich ``Live`` view of a :class:`DashboardState`, refreshed by a background thread until :meth:`stop`."""

    def __init__(self, state: DashboardState, console: Console, refresh_per_second: float = 2.0):
        self.state, self.console = state, console
        self._live = Live(render(state), console=console, auto_refresh=False, transient=False)
        self._stop = threading.Event()
        self._interval = 1.0 / refresh_per_second
        self._thread = threading.Thread(target=self._loop, name="dashboard", daemon=True)

    def start(self) -> Dashboard:
        self._live.start()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._live.update(render(self.state), refresh=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._live.update(render(self.state), refresh=True)
        self._live.stop()


def format_held_out(evaluation: dict) -> str:
    """'epoch 20: greedy reward 0.612 · correct 0.410 · sampled reward 0.550'."""
    figures = evaluation["figures"]
    greedy = [
        f"{key.removeprefix('eval/greedy/')} {value:.3f}"
        for key, value in figures.items()
        if key.startswith("eval/greedy/")
    ]
    sampled = figures.get("eval/sampled/reward")
    text = f"epoch {evaluation['epoch']}: greedy " + " · ".join(greedy)
    return text + (f" · sampled reward {sampled:.3f}" if sampled is not None else "")


class DashboardCallback(SwarmCallback):
    """Feeds a :class:`DashboardState` from the trainer's hooks."""

    def __init__(self, state: DashboardState):
        self.state = state

    def on_phase(self, trainer, phase: str) -> None:
        self.state.epoch = trainer.peer.epoch
        self.state.set_phase(phase)

    def on_eval(self, trainer, evaluation) -> None:
        self.state.held_out = format_held_out(evaluation)

    def on_epoch_end(self, trainer, metrics) -> None:
        state, train, swarm = self.state, metrics.train, metrics.swarm
        state.epoch = swarm["epoch"]
        state.peers_online, state.swarm_samples = swarm["peers_online"], swarm["swarm_samples"]
        state.my_samples = train["total_samples"]
        wall = train["compute_s"] + swarm["sync_s"]
        state.samples_per_s = train["samples"] / wall if wall > 0 else None
        state.reward, state.loss, state.trainer = train["reward"], train["loss"], train["trainer"]
        state.last_round, state.group_size = swarm["outcome"], swarm["group_size"]
        state.last_compute_s = train["compute_s"]
        state.audits = metrics.verify or None
        state.credit = format_credit(metrics.ledger) if metrics.ledger else None
        if state.credit is not None and not metrics.ledger["my_credit"] and swarm["group_size"] < 2:
            state.credit += " (solo: nothing to audit, nothing credited)"
        state.sharing = metrics.sharing or None
