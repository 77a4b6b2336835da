"""The ``swarm`` command: ``run`` one peer, ``local`` to simulate a swarm on this machine, ``config`` to print the
effective configuration. User errors print one line on stderr and exit non-zero, without a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from swarm.arguments import add_config_options, config_from_args, explicit_keys
from swarm.doctor import add_doctor_parser, run_doctor
from swarm.errors import UserError
from swarm.export import add_export_parser, run_export
from swarm.ledger.cli import add_ledger_parser, run_ledger
from swarm.recipe_cli import add_recipe_parser, run_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm", description="Fine-tune one language model together with peers over the Hivemind DHT."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start a peer: join a swarm, or start one")
    add_config_options(run)
    run.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="multiaddress of a peer to join (repeatable; also SWARM_INITIAL_PEERS, network.initial_peers)",
    )
    run.add_argument(
        "--tier",
        choices=["auto", "cpu", "gpu-8gb", "gpu-12gb", "gpu-24gb"],
        help="use configs/TIER.yaml; auto: detect the hardware and pick one (what ./launch.sh does)",
    )
    run.add_argument("--expected-peers", type=int, default=1, help="wait for this many peers before epoch 0")
    run.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)  # used by swarm local
    # used by swarm local, whose peers all run the one config it validated: no need to read the swarm's settings
    run.add_argument("--settings-from-parent", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--plain", action="store_true", help="log lines instead of the live dashboard")
    run.add_argument("--quiet", action="store_true", help="only warnings and errors on the terminal")

    local = commands.add_parser(
        "local", help="simulate a swarm: N peers as separate processes on this machine"
    )
    add_config_options(local)
    local.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    local.add_argument(
        "--cheaters",
        type=int,
        default=1,
        help="with verify.attack: how many peers (the last ones) cheat (default 1)",
    )
    local.add_argument("--timeout", type=float, help="kill the simulation after this many seconds")
    local.add_argument("--plain", action="store_true", help="print progress lines instead of a live table")

    config = commands.add_parser("config", help="print the effective configuration as YAML")
    add_config_options(config)
    add_ledger_parser(commands)
    add_doctor_parser(commands)
    add_recipe_parser(commands)
    add_export_parser(commands)
    return parser


def join_swarm_settings(config, explicit: list[str]):
    """With initial peers: the config this peer runs with in their swarm (:func:`swarm.shared_settings.reconcile`),
    saying on stderr what it took from the swarm.

    :raises UserError: one line naming each explicitly chosen setting that differs from the swarm's
    """
    from swarm.network.discovery import discover
    from swarm.shared_settings import describe, reconcile

    if not config.network.initial_peers:
        return config
    found = discover(config.network.initial_peers, timeout=config.network.startup_timeout / 4)
    if found is None:
        print(
            "swarm: warning: no initial peer announced its swarm's settings; starting with this peer's own (peers "
            "with other settings do not average with it)",
            file=sys.stderr,
        )
        return config
    recipe = (
        found.settings.get("recipe", {}).get("name")
        if isinstance(found.settings.get("recipe"), dict)
        else None
    )
    if (
        isinstance(recipe, str)
        and (recipe.endswith(".py") or "/" in recipe)
        and "recipe.name" not in explicit
    ):
        raise UserError(
            f"the swarm at initial peer {found.peer_id} runs the recipe file {recipe!r}: pass --recipe "
            f"with your copy of it",
            exit_code=2,
        )
    joined, taken = reconcile(config, found.settings, explicit, f"initial peer {found.peer_id}")
    if taken:
        print(
            f"swarm: joining run {joined.run_id!r} with the swarm's settings ({describe(taken)})",
            file=sys.stderr,
        )
    return joined


_MAIN_PID = os.getpid()
# set by the first SIGINT/SIGTERM; callbacks run with it (e.g. the trainer's stop()), so that a stop request survives
# a KeyboardInterrupt that Python swallows — raised inside a finalizer (``__del__``) it is only printed as ignored
_INTERRUPTED = threading.Event()
_ON_INTERRUPT: list[Callable[[], None]] = []


def _raise_keyboard_interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked hivemind process inherited this handler
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # what default_int_handler, which it inherited before, did
        signal.signal(signum, signal.SIG_DFL)  # SIGTERM: just terminate quietly
        os.kill(os.getpid(), signum)
        return
    _INTERRUPTED.set()
    for callback in _ON_INTERRUPT:
        callback()
    raise KeyboardInterrupt


def _raised_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` was raised while a KeyboardInterrupt was being handled (anywhere in its context chain)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _interrupt_on_sigint_and_sigterm() -> None:
    """Ctrl+C and SIGTERM both mean "stop cleanly" — even if this process was started with SIGINT ignored, as
    background jobs of a non-interactive shell are."""
    from swarm.network.averager import quiet_interrupted_steps

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    quiet_interrupted_steps()
    _quiet_swallowed_interrupts()


def _quiet_swallowed_interrupts() -> None:
    """A stop request whose KeyboardInterrupt was raised inside a finalizer is not lost (``_INTERRUPTED`` and the
    callbacks have it), so Python's "Exception ignored ... KeyboardInterrupt" traceback is replaced by a debug line;
    every other unraisable exception is reported as before."""
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _INTERRUPTED.is_set():
            logging.getLogger(__name__).debug("stop requested while an object was being finalized")
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def _stop_when_parent_dies() -> None:
    """Stop this peer gracefully (as on SIGTERM) if the process that started it goes away, even by kill -9."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _apply_tier(args: argparse.Namespace) -> None:
    """``--tier``: point ``args.config`` at the tier's config, saying what was picked and why."""
    from swarm.config import PROJECT_ROOT
    from swarm.hardware import choose_tier, detect_hardware

    if args.config is not None:
        raise UserError("--tier and --config cannot be used together: a tier is a config", exit_code=2)
    if args.tier == "auto":
        choice = choose_tier(detect_hardware())
        print(f"swarm: {choice.reason} (configs/{choice.name}.yaml)", file=sys.stderr)
        for note in choice.notes:
            print(f"swarm: note: {note}", file=sys.stderr)
        args.config = choice.config_path
    else:
        args.config = PROJECT_ROOT / "configs" / f"{args.tier}.yaml"


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from swarm.monitor.dashboard import Dashboard, DashboardCallback, DashboardState
    from swarm.monitor.logs import setup_logging
    from swarm.monitor.summary import PEER_SUMMARY_FILE, write_summary
    from swarm.monitor.tracking import WandbCallback
    from swarm.training.trainer import SwarmTrainer

    if args.tier:
        _apply_tier(args)
    config = config_from_args(args)
    if not args.settings_from_parent:
        config = join_swarm_settings(config, explicit_keys(args))
    console = Console(stderr=True)
    live = console.is_terminal and not (args.plain or args.quiet)
    # under the live dashboard only warnings print above it; peer.log keeps every line
    setup_logging(
        config.log_level,
        Path(config.workdir) / "peer.log",
        console=console if live else None,
        quiet=args.quiet or live,
    )
    _interrupt_on_sigint_and_sigterm()
    if args.exit_with_parent:
        _stop_when_parent_dies()
    trainer = SwarmTrainer(config, expected_peers=args.expected_peers, callbacks=[WandbCallback()])
    _ON_INTERRUPT.append(trainer.stop)
    if _INTERRUPTED.is_set():  # interrupted while the trainer was being built
        trainer.stop()
    dashboard = None
    if live:
        state = DashboardState(name=trainer.identity.name, run_id=config.run_id, epoch=trainer.peer.epoch)
        trainer.callbacks.append(DashboardCallback(state))
        dashboard = Dashboard(state, console).start()
        _ON_INTERRUPT.insert(
            0, lambda: state.set_phase("stopping… (finishing the epoch's work, saving the checkpoint)")
        )
    interrupted = False
    try:
        report = trainer.train()
    except KeyboardInterrupt:
        interrupted = True
        report = trainer.report()
    except Exception as error:
        if not _INTERRUPTED.is_set() or not _raised_by_interrupt(error):
            raise
        # e.g. torch.save's cleanup failing on the file the KeyboardInterrupt cut short: the stop, not a bug
        logging.getLogger("swarm").info("stopped by Ctrl+C while busy", exc_info=error)  # peer.log only
        interrupted = True
        report = trainer.report()
    finally:
        if dashboard is not None:
            dashboard.stop()
    summary = report.as_summary()
    write_summary(Path(config.workdir) / PEER_SUMMARY_FILE, config.run_id, [summary])
    if args.summary:
        write_summary(args.summary, config.run_id, [summary])
    print(f"{report.name}: stopped at epoch {report.epochs}, {report.samples} samples, checkpoint saved")
    return 130 if interrupted or _INTERRUPTED.is_set() else 0


def cmd_local(args: argparse.Namespace) -> int:
    from swarm.local import run_local

    _interrupt_on_sigint_and_sigterm()
    config = config_from_args(args)  # validated once here, so a bad config fails before any process starts
    if args.peers < 1:
        raise UserError(f"--peers must be at least 1, got {args.peers}", exit_code=2)
    if args.cheaters < 0 or args.cheaters > max(1, args.peers - 1):
        raise UserError(
            f"--cheaters must be between 0 and {max(1, args.peers - 1)} (fewer than --peers), got "
            f"{args.cheaters}",
            exit_code=2,
        )
    return run_local(args, config, main=run_forked_peer)


def run_forked_peer(argv: list[str]) -> int:
    """``swarm ARGV`` in a process forked from ``swarm local``: this module's stop handling starts afresh (the
    fork inherited the parent's pid, flags and callbacks), then :func:`main` runs."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    _INTERRUPTED.clear()
    _ON_INTERRUPT.clear()
    return main(argv)


def cmd_config(args: argparse.Namespace) -> int:
    from swarm.config import dump_config

    print(dump_config(config_from_args(args)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = dict(
        run=cmd_run,
        local=cmd_local,
        config=cmd_config,
        ledger=run_ledger,
        doctor=run_doctor,
        recipe=run_recipe,
        export=run_export,
    )
    try:
        return handlers[args.command](args)
    except UserError as error:
        print(f"swarm: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("swarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
