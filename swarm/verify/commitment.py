"""What a peer commits to before averaging, and the contribution file it serves to auditors (docs/design.md §2, step 4).

A :class:`~swarm.network.records.Commitment` binds, by hashes, everything an auditor later replays: the model state
the gradient was computed at, the rows, the rollouts with their claimed rewards and advantages, and the gradient
sent into averaging. The contribution itself is kept in ``WORKDIR/contributions/epoch-E.pt`` for the audit window
and streamed to auditors over hivemind P2P. Guarantees:

* :func:`save_contribution` writes atomically (a crash leaves the previous file or none, never a torn one);
* :func:`load_contribution` reads untrusted bytes with ``torch.load(weights_only=True)`` (tensors, lists, dicts and
  scalars only — no code) and raises :class:`MalformedContribution` for anything that is not a contribution;
* :func:`commitment_mismatch` names the first committed field a served contribution does not match.

The rollouts hash also binds the signed bundles of other peers' rollouts a contribution trained on (rollout
sharing, :mod:`swarm.sharing`), so a peer cannot swap them after committing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from swarm.network.averager import CONTRIBUTION, served_file_name
from swarm.network.records import Commitment
from swarm.node.state import tensors_hash
from swarm.trl_adapter import GRPOSettings
from swarm.verify.contribution import Contribution

_TENSOR_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "rewards", "advantages")


_SERVED_EPOCH = re.compile(r"^epoch-(\d+)[-.]")  # the epoch of a served file (staging copies included)


class MalformedContribution(ValueError):
    """Bytes served as a contribution that are not one."""


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows as canonical JSON: the ``data_seed`` field of a commitment."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def rollouts_hash(contribution: Contribution) -> str:
    """sha256 over the rollouts' token ids, the shuffle order, the claimed rewards and advantages and the settings
    they were computed with (the sampler, its seed, temperature, top-k/p, min-p, maximum length and stop tokens):
    a peer cannot claim other sampling settings after committing."""
    hasher = hashlib.sha256()
    hasher.update(
        json.dumps(
            [
                asdict(contribution.settings),
                contribution.prompt_token_ids,
                contribution.completion_token_ids,
                contribution.order,
                contribution.reward_names,
                contribution.shared_groups,
            ]
        ).encode()
    )
    for canonical, signature in contribution.shared_bundles:
        hasher.update(hashlib.sha256(canonical).digest() + hashlib.sha256(signature).digest())
    for name in _TENSOR_FIELDS:
        tensor = getattr(contribution, name).detach().cpu().contiguous()
        hasher.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def gradient_hash(epoch: int, gradient: list[torch.Tensor]) -> str:
    return tensors_hash(epoch, gradient)


def token_count(contribution: Contribution) -> int:
    return int(contribution.prompt_mask.sum()) + int(contribution.completion_mask.sum())


def make_commitment(peer_id: str, epoch: int, contribution: Contribution, precision: str) -> Commitment:
    return Commitment(
        peer_id=peer_id,
        epoch=epoch,
        state_hash=contribution.state_hash,
        data_seed=rows_digest(contribution.rows),
        samples=contribution.num_completions,
        tokens=token_count(contribution),
        rollouts_hash=rollouts_hash(contribution),
        gradient_hash=gradient_hash(epoch, contribution.gradient),
        precision=precision,
    )


def commitment_mismatch(contribution: Contribution, commitment: Commitment) -> str | None:
    """The first field of ``commitment`` that ``contribution`` does not match, or None when it matches."""
    checks = dict(
        state_hash=contribution.state_hash,
        data_seed=rows_digest(contribution.rows),
        samples=contribution.num_completions,
        tokens=token_count(contribution),
        rollouts_hash=rollouts_hash(contribution),
        gradient_hash=gradient_hash(commitment.epoch, contribution.gradient),
    )
    for name, value in checks.items():
        if getattr(commitment, name) != value:
            return name
    return None


def _settings(value: Any) -> GRPOSettings:
    """The served settings, each field of the type :class:`GRPOSettings` declares (a bool is not an int, an int is
    a float). :raises MalformedContribution: naming the field"""
    if not isinstance(value, dict) or set(value) != {f.name for f in fields(GRPOSettings)}:
        raise MalformedContribution("settings are malformed")
    defaults = GRPOSettings()
    checked: dict[str, Any] = {}
    for name, item in value.items():
        default = getattr(defaults, name)
        if name == "micro_batch_size":
            ok = item is None or type(item) is int
        elif name == "stop_token_ids":
            ok = isinstance(item, tuple | list) and all(type(token) is int for token in item)
            item = tuple(item) if ok else item
        elif isinstance(default, float):
            ok = type(item) in (int, float)
            item = float(item) if ok else item
        else:
            ok = type(item) is type(default)
        if not ok:
            raise MalformedContribution(f"settings.{name} is a {type(item).__name__}")
        checked[name] = item
    return GRPOSettings(**checked)


# ---- the contribution file ----------------------------------------------------------------------------------------
def contribution_path(directory: Path, epoch: int, part: str = CONTRIBUTION, step: int | None = None) -> Path:
    """The file the averager's ``rpc_download_contribution`` serves for ``epoch`` (``part``/``step``: a DiLoCo
    epoch's other files, :func:`~swarm.network.averager.served_file_name`)."""
    return Path(directory) / served_file_name(epoch, part, step)


def contribution_bytes(contribution: Contribution) -> bytes:
    payload = {f.name: getattr(contribution, f.name) for f in fields(contribution)}
    payload["settings"] = asdict(contribution.settings)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_served(
    directory: Path,
    epoch: int,
    data: bytes,
    keep_epochs: int,
    part: str = CONTRIBUTION,
    step: int | None = None,
) -> Path:
    """Write one served file of ``epoch`` atomically and delete every served file older than ``keep_epochs``."""
    path = contribution_path(directory, epoch, part, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, path)
    for old in path.parent.glob("epoch-*"):
        match = _SERVED_EPOCH.match(old.name)
        if match is not None and int(match.group(1)) <= epoch - keep_epochs:
            old.unlink(missing_ok=True)
    return path


def save_contribution(directory: Path, epoch: int, contribution: Contribution, keep_epochs: int) -> Path:
    """Write the contribution of ``epoch`` atomically and delete those older than ``keep_epochs`` epochs."""
    return save_served(directory, epoch, contribution_bytes(contribution), keep_epochs)


def load_contribution(data: bytes) -> Contribution:
    """Parse a served contribution. :raises MalformedContribution: naming what is wrong"""
    try:
        with (
            warnings.catch_warnings()
        ):  # untrusted bytes may claim any pickle protocol; the error says enough
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise MalformedContribution(f"not a contribution file ({type(error).__name__})") from None
    if not isinstance(payload, dict):
        raise MalformedContribution("not a contribution file (no field table)")
    expected = {f.name for f in fields(Contribution)}
    if set(payload) != expected:
        raise MalformedContribution(f"fields {sorted(set(payload) ^ expected)} missing or unexpected")
    try:
        payload["settings"] = _settings(payload["settings"])
        for name in (*_TENSOR_FIELDS,):
            if not isinstance(payload[name], torch.Tensor):
                raise MalformedContribution(f"{name} is not a tensor")
        if not (
            isinstance(payload["gradient"], list)
            and all(isinstance(t, torch.Tensor) for t in payload["gradient"])
        ):
            raise MalformedContribution("gradient is not a list of tensors")
        for name in ("prompt_token_ids", "completion_token_ids"):
            value = payload[name]
            if not (
                isinstance(value, list)
                and all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in value)
            ):
                raise MalformedContribution(f"{name} is not a list of token id lists")
        if not (isinstance(payload["order"], list) and all(isinstance(i, int) for i in payload["order"])):
            raise MalformedContribution("order is not a list of indices")
        if not (isinstance(payload["rows"], list) and all(isinstance(row, dict) for row in payload["rows"])):
            raise MalformedContribution("rows is not a list of rows")
        if not (
            isinstance(payload["shared_bundles"], list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, bytes) for part in pair)
                for pair in payload["shared_bundles"]
            )
        ):
            raise MalformedContribution("shared_bundles is not a list of [bundle, signature] byte pairs")
        if not (
            isinstance(payload["shared_groups"], list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and all(type(i) is int for i in pair)
                for pair in payload["shared_groups"]
            )
        ):
            raise MalformedContribution("shared_groups is not a list of [bundle, group] index pairs")
        if not (
            isinstance(payload["param_names"], list)
            and isinstance(payload["reward_names"], list)
            and isinstance(payload["state_hash"], str)
        ):
            raise MalformedContribution("param_names, reward_names or state_hash is malformed")
        return Contribution(**payload)
    except MalformedContribution:
        raise
    except Exception as error:
        raise MalformedContribution(f"malformed ({type(error).__name__}: {error})") from None
