"""Crash-safe checkpoints: written to a temporary file, fsynced, then atomically renamed over the old one, so a
crash or ``kill -9`` at any moment leaves either the previous checkpoint or the new one — never a torn file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(staging, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:  # the previous checkpoint stays; the unfinished file goes
        staging.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved payload, or None when there is none or it cannot be read (then the peer starts over/from peers)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        logger.warning(f"{path}: unreadable checkpoint ignored ({type(error).__name__}: {error})")
        return None
    return payload if isinstance(payload, dict) else None
