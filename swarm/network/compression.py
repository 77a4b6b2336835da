"""Gradient/parameter compression for hivemind averaging, plus a numpy-2 fix for hivemind's 8-bit codecs.

hivemind 1.1.12's ``Quantization.extract`` (shared by ``Uniform8BitQuantization`` and
``Quantile8BitQuantization``) reads the codebook length with
``int(np.frombuffer(buffer, count=1, dtype=np.int64))``. On numpy >= 2 converting a 1-element,
1-dimensional array with ``int()`` raises ``TypeError``. Inside ``DecentralizedAverager`` that error is
raised in a background task, logged at debug level and swallowed, so an all-reduce "succeeds" while only
part of the tensors are actually averaged.

Importing this module applies :func:`patch_hivemind_quantization`, which replaces ``Quantization.extract``
with an equivalent implementation that reads the length with ``.item()``. After the import, every
compression returned by :func:`make_compression` round-trips through
``serialize_torch_tensor``/``deserialize_torch_tensor`` on numpy 1.x and 2.x alike.
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.compression.quantization import Quantization
from hivemind.proto import runtime_pb2

__all__ = ["COMPRESSION_NAMES", "as_received", "make_compression", "patch_hivemind_quantization"]

COMPRESSION_NAMES: tuple[str, ...] = ("none", "fp16", "8bit")

_PATCH_MARKER = "_swarm_numpy2_patched"


def _extract_numpy2_safe(self: Quantization, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    """Same logic as hivemind 1.1.12 ``Quantization.extract``, except that the codebook length is read with
    ``.item()`` so that it works on numpy 2.x, and that read-only buffers are copied before torch wraps them."""
    codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64).item())
    codebook = np.frombuffer(
        serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype
    )
    quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    # upstream wraps the read-only buffers with torch.as_tensor (UserWarning "not writable"); converting with
    # numpy first gives the same values without the warning (both versions copy the indices once)
    quantized = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
    codebook = torch.from_numpy(codebook.copy()).to(dtype=getattr(torch, serialized_tensor.dtype))
    return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


setattr(_extract_numpy2_safe, _PATCH_MARKER, True)


def patch_hivemind_quantization() -> None:
    """Make hivemind's 8-bit quantization codecs work with numpy 2.x.

    Replaces ``hivemind.compression.quantization.Quantization.extract`` with a numpy-2-safe version of the
    same algorithm. Idempotent: calling it more than once (or after the module-level call made on import)
    is a no-op. Subclasses that override ``extract`` themselves (e.g. ``BlockwiseQuantization``) are not
    touched.
    """
    if getattr(Quantization.extract, _PATCH_MARKER, False):
        return
    Quantization.extract = _extract_numpy2_safe  # type: ignore[method-assign]


def make_compression(name: str) -> CompressionBase:
    """Return the hivemind compression called ``name``.

    * ``"none"``: :class:`hivemind.NoCompression`, lossless (tensors are sent as-is).
    * ``"fp16"``: :class:`hivemind.Float16Compression`, values are sent as float16 (relative error about
      1e-3, values are clamped to the float16 range).
    * ``"8bit"``: :class:`hivemind.Uniform8BitQuantization`, 256 uniform buckets spanning +-3 standard
      deviations around the mean; each value is replaced by its bucket's mean (outliers beyond +-3 sigma are
      clipped into the edge buckets). Safe on numpy 2 because this module patches hivemind on import.

    Raises:
        ValueError: if ``name`` is not one of :data:`COMPRESSION_NAMES`.
    """
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        patch_hivemind_quantization()
        return Uniform8BitQuantization()
    raise ValueError(f"unknown compression {name!r}; allowed values: {', '.join(COMPRESSION_NAMES)}")


def as_received(values: torch.Tensor, compression: CompressionBase) -> torch.Tensor:
    """``values`` after a round trip through ``compression``: what a peer receives when ``values`` is sent."""
    return deserialize_torch_tensor(compression.compress(values, CompressionInfo.from_tensor(values)))


patch_hivemind_quantization()
