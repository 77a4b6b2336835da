"""Logging set-up for a peer: concise lines on stderr and the same lines in a log file in the work directory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Route ``swarm.*`` logs at ``level`` (and hivemind's warnings) to stderr and, if given, ``log_file``."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
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
    if level != "debug":  # failed rounds are retried and reported by swarm itself, without hivemind's tracebacks
        logging.getLogger("hivemind.averaging").setLevel(logging.CRITICAL)
