"""Logging set-up for a peer: concise lines on stderr and the same lines in a log file in the work directory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    level: str, log_file: Path | None = None, console: Console | None = None, quiet: bool = False
) -> None:
    """Route ``swarm.*`` logs at ``level`` (and hivemind's warnings) to the terminal and, if given, ``log_file``.

    :param console: print through this rich console (so that lines appear above a live dashboard)
    :param quiet: show only warnings and errors on the terminal (the log file keeps everything)
    """
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    terminal: logging.Handler
    if console is not None:
        terminal = RichHandler(console=console, show_path=False, markup=False, log_time_format="%H:%M:%S")
    else:
        terminal = logging.StreamHandler()
        terminal.setFormatter(formatter)
    if quiet:
        terminal.setLevel(logging.WARNING)
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        handlers.append(file_handler)
    swarm_logger = logging.getLogger("swarm")
    swarm_logger.handlers[:] = handlers
    swarm_logger.setLevel(level.upper())
    swarm_logger.propagate = False
    # deprecation chatter from transformers/TRL internals says nothing the user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|accelerate)\.")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    hivemind_logger = logging.getLogger("hivemind")
    hivemind_logger.setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
    if (
        level != "debug"
    ):  # failed rounds are retried and reported by swarm itself, without hivemind's tracebacks
        logging.getLogger("hivemind.averaging").setLevel(logging.CRITICAL)
