"""A peer's training state (parameters + optimizer statistics + epoch) as a flat list of tensors, and its hashes.

The layout is a pure function of the model and optimizer structure, so two peers running the same recipe agree on
it, and a state downloaded from a peer (or loaded from a checkpoint) is checked against the hash it was announced
with before it is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZER_TENSOR_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _update(hasher: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict, entries in sorted name order (names, dtypes, shapes and bytes)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        _update(hasher, tensor)
    return hasher.hexdigest()


def tensors_hash(epoch: int, tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the epoch and every tensor of a flat training state."""
    hasher = hashlib.sha256(f"epoch={epoch}".encode())
    for tensor in tensors:
        _update(hasher, tensor)
    return hasher.hexdigest()


def make_optimizer(
    params: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """The optimizer every peer trains with (torch's AdamW; the training section's learning rate and weight decay).
    The auditors of DiLoCo inner steps replay its steps with one built here too."""
    return torch.optim.AdamW(list(params), lr=learning_rate, weight_decay=weight_decay)


@dataclass
class TrainingState:
    """Views over a model and its optimizer as one ordered list of tensors.

    Order: every trainable parameter (``named_parameters`` order), then for each of them the optimizer statistics
    named in :data:`OPTIMIZER_TENSOR_KEYS` that exist. Optimizer statistics that do not exist yet (before the
    first step) are simply absent; the layout travels in the metadata.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]

    def layout(self) -> list[list[Any]]:
        """[[param index, statistic name], ...] for the optimizer statistics in :meth:`tensors`."""
        entries = []
        for index, param in enumerate(self.params):
            stats = self.optimizer.state.get(param, {})
            entries.extend(
                [index, key] for key in OPTIMIZER_TENSOR_KEYS if isinstance(stats.get(key), torch.Tensor)
            )
        return entries

    def tensors(self) -> list[torch.Tensor]:
        params = self.params
        stats = [self.optimizer.state[params[index]][key] for index, key in self.layout()]
        return [param.data for param in params] + stats

    def state_hash(self, epoch: int) -> str:
        return tensors_hash(epoch, self.tensors())

    def snapshot(self, epoch: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(metadata, cloned tensors) — what :meth:`load` accepts and what peers download."""
        tensors = [tensor.detach().clone() for tensor in self.tensors()]
        metadata = dict(epoch=epoch, state_hash=tensors_hash(epoch, tensors), layout=self.layout())
        return metadata, tensors

    def load(self, metadata: dict[str, Any], tensors: list[torch.Tensor]) -> int:
        """Overwrite parameters and optimizer statistics from a snapshot; returns its epoch.

        :raises ValueError: if the snapshot does not match this model's shapes or its own announced hash, or holds a
          value that is not a finite floating-point tensor (checked before anything is overwritten)
        """
        epoch, layout = metadata.get("epoch"), metadata.get("layout")
        if not isinstance(epoch, int) or not isinstance(layout, list):
            raise ValueError("state metadata lacks epoch/layout")
        params = self.params
        if len(tensors) != len(params) + len(layout):
            raise ValueError(f"state has {len(tensors)} tensors, expected {len(params) + len(layout)}")
        for index, value in enumerate(tensors):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state entry {index} is a {type(value).__name__}, not a tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"state entry {index} holds non-finite values")
        if tensors_hash(epoch, tensors) != metadata.get("state_hash"):
            raise ValueError("state tensors do not match their announced hash")
        for param, value in zip(params, tensors):
            if param.shape != value.shape:
                raise ValueError(f"parameter shape {tuple(value.shape)} does not match {tuple(param.shape)}")
            if not value.is_floating_point():
                raise ValueError(f"parameter of dtype {value.dtype}, expected a floating point tensor")
        for entry, value in zip(layout, tensors[len(params) :]):
            if not (
                isinstance(entry, list | tuple)
                and len(entry) == 2
                and isinstance(entry[0], int)
                and 0 <= entry[0] < len(params)
                and entry[1] in OPTIMIZER_TENSOR_KEYS
            ):
                raise ValueError(f"bad optimizer state entry {entry!r}")
            expected = () if entry[1] == "step" else params[entry[0]].shape
            if tuple(value.shape) != tuple(expected):
                raise ValueError(
                    f"optimizer statistic {entry[1]} of parameter {entry[0]} has shape "
                    f"{tuple(value.shape)}, expected {tuple(expected)}"
                )
        with torch.no_grad():
            for param, value in zip(params, tensors):
                param.copy_(value.to(param.dtype))
        self.optimizer.state.clear()
        for (index, key), value in zip(layout, tensors[len(params) :]):
            self.optimizer.state[params[index]][key] = value.clone()
        return epoch
