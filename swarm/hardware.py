"""What this machine can train: hardware detection, the configuration tier that fits it, and a memory check that
refuses a model that cannot fit *before* anything is downloaded or allocated (instead of an OOM hours later).

* :func:`detect_hardware` — CUDA GPUs and their VRAM, Apple MPS, CPUs, RAM, whether bitsandbytes is installed.
* :func:`choose_tier` — ``cpu`` / ``gpu-8gb`` / ``gpu-12gb`` / ``gpu-24gb`` (``configs/<tier>.yaml``) and why.
* :func:`estimate_training_memory` — a deliberately generous estimate of the peak memory of one training round.
* :func:`check_fits` — raises :class:`~swarm.errors.UserError` (one line) when the estimate exceeds the memory of
  the device the peer will train on. Models it knows nothing about are let through with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.errors import UserError

if TYPE_CHECKING:
    from swarm.config import ModelConfig, TrainingConfig

logger = logging.getLogger(__name__)

GIB = 1024**3
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# ---- hardware ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory: int  # bytes of VRAM


@dataclass(frozen=True)
class Hardware:
    """A snapshot of the machine. Every field has a default so tests can fabricate any machine."""

    cuda_devices: tuple[CudaDevice, ...] = ()
    mps: bool = False  # Apple silicon GPU (unified memory: shares RAM)
    cpu_count: int = 1
    total_ram: int | None = None  # bytes; None: unknown
    available_ram: int | None = None  # bytes; None: unknown
    bitsandbytes: bool = False  # the bitsandbytes package is installed (4-bit loading possible with CUDA)

    @property
    def gpu(self) -> CudaDevice | None:
        """The CUDA device training runs on (torch's default device, index 0 of the visible devices)."""
        return self.cuda_devices[0] if self.cuda_devices else None

    def describe(self) -> str:
        parts = [f"{d.name} ({d.total_memory / GIB:.1f} GiB VRAM)" for d in self.cuda_devices]
        if self.mps:
            parts.append("Apple MPS")
        ram = f", {self.total_ram / GIB:.1f} GiB RAM" if self.total_ram else ""
        parts.append(f"{_cores(self.cpu_count)}{ram}")
        return ", ".join(parts)


def _cores(count: int) -> str:
    return f"{count} CPU core" + ("s" if count != 1 else "")


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """``/proc/meminfo`` as bytes (Linux only; empty elsewhere)."""
    values = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return values


def _ram() -> tuple[int | None, int | None]:
    info = _meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            if available is None and "SC_AVPHYS_PAGES" in os.sysconf_names:
                available = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return total, available


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect_hardware() -> Hardware:
    """Look at this machine. Touches no network and allocates nothing beyond torch's CUDA query."""
    import torch

    devices: list[CudaDevice] = []
    try:
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                devices.append(CudaDevice(index, props.name, int(props.total_memory)))
    except (RuntimeError, AssertionError) as error:  # a broken driver: treat as no GPU, but say so
        logger.warning(f"CUDA is installed but unusable ({error}); treating this machine as CPU-only")
        devices = []
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    total, available = _ram()
    return Hardware(
        cuda_devices=tuple(devices),
        mps=mps,
        cpu_count=_cpu_count(),
        total_ram=total,
        available_ram=available,
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
    )


# ---- model sizes ------------------------------------------------------------------------------------------------

# config.json fields of the hub models the tier configs name (enough to count parameters and size activations),
# so a hub model is checked before a single byte of it is downloaded.
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # 494M parameters
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    # 1.54B
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    # 3.09B
    "Qwen/Qwen2.5-3B-Instruct": dict(
        _QWEN25,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
    ),
    # 7.62B
    "Qwen/Qwen2.5-7B-Instruct": dict(
        _QWEN25,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
for _name in list(KNOWN_MODELS):  # the base models have the same shapes as their instruct versions
    KNOWN_MODELS[_name.removesuffix("-Instruct")] = KNOWN_MODELS[_name]

DECODER_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


@dataclass(frozen=True)
class Architecture:
    """The sizes of a dense decoder-only transformer (Qwen2 / Llama style)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v
    qk_norm: bool  # Qwen3 normalises q and k per head

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """From a ``config.json`` mapping. :raises ValueError: for architectures this module cannot count"""
        model_type = config.get("model_type")
        if model_type not in DECODER_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {', '.join(DECODER_MODEL_TYPES)}")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                qk_norm=model_type == "qwen3",
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"config.json lacks or mangles {error}") from None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by peft target name."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return dict(
            q_proj=(h, q),
            k_proj=(h, kv),
            v_proj=(h, kv),
            o_proj=(q, h),
            gate_proj=(h, i),
            up_proj=(h, i),
            down_proj=(i, h),
        )

    def num_parameters(self) -> int:
        shapes = self.module_shapes()
        per_layer = sum(fan_in * fan_out for fan_in, fan_out in shapes.values())
        if self.qkv_bias:
            per_layer += shapes["q_proj"][1] + 2 * shapes["k_proj"][1]
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        per_layer += 2 * self.hidden_size  # input and post-attention RMSNorm
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * per_layer + self.hidden_size  # + the final norm

    def lora_parameters(self, rank: int, target_modules: list[str]) -> int:
        """Trainable parameters of rank-``rank`` LoRA adapters on ``target_modules`` of every layer."""
        shapes = self.module_shapes()
        per_layer = sum(rank * sum(shapes[name]) for name in dict.fromkeys(target_modules) if name in shapes)
        return self.num_layers * per_layer


def count_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a Qwen2/Qwen3/Llama/Mistral-style model from its ``config.json`` (exact for those)."""
    return Architecture.from_config(config).num_parameters()


def model_architecture(model_config: ModelConfig, tiny_vocab_size: int = 256) -> Architecture | None:
    """The architecture ``model_config`` names, found without downloading anything; None when unknown.

    The tiny default model's vocabulary is its recipe's alphabet; ``tiny_vocab_size`` bounds it.
    """
    name = model_config.name_or_path
    if name is None:
        return Architecture(
            hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            num_layers=model_config.num_layers,
            num_heads=model_config.num_heads,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.hidden_size // model_config.num_heads,
            vocab_size=tiny_vocab_size,
            tie_word_embeddings=True,
            qkv_bias=True,
            qk_norm=False,
        )
    directory = Path(name).expanduser()
    if (directory / "config.json").is_file():
        try:
            return Architecture.from_config(json.loads((directory / "config.json").read_text()))
        except (OSError, ValueError) as error:
            logger.warning(
                f"model.name_or_path: cannot size {directory / 'config.json'} ({error}); "
                f"skipping the memory check"
            )
            return None
    known = {key.lower(): value for key, value in KNOWN_MODELS.items()}.get(name.lower())
    if known is not None:
        return Architecture.from_config(known)
    logger.warning(
        f"model.name_or_path: {name} is not a model whose size is known here; skipping the memory "
        f"check (known: {', '.join(sorted(KNOWN_MODELS))}, or any local Qwen2/Llama directory)"
    )
    return None


# ---- memory estimate --------------------------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FOUR_BIT_BYTES_PER_PARAM = 0.6  # NF4: 0.5 byte + double-quantised block constants; embeddings kept wider
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34  # Korthikanti et al. 2022, 16-bit, no recomputation, no s^2 term
LOGIT_BYTES_PER_TOKEN_VOCAB = 8  # 16-bit logits, their temperature-scaled copy, their gradient, log-softmax
CUDA_RUNTIME_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
# Python, torch, transformers, TRL, hivemind: a tiny-model peer peaked at 578 MiB
CPU_RUNTIME_BYTES = int(0.6 * GIB)
DEFAULT_ROW_TOKENS = 512  # prompt + completion tokens per training row when the caller does not say
DEFAULT_ROWS = 8


def estimate_breakdown(
    num_params: int,
    dtype: str = "bfloat16",
    lora: bool = False,
    four_bit: bool = False,
    *,
    trainable_params: int | None = None,
    batch_tokens: int = 0,
    hidden_size: int = 0,
    num_layers: int = 0,
    vocab_size: int = 0,
    kv_size: int = 0,
    generation_tokens: int | None = None,
    device: str = "cuda",
    audit_window: int = 0,
) -> dict[str, int]:
    """The parts of :func:`estimate_training_memory` in bytes, by name (for messages and tests)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    width = DTYPE_BYTES[dtype]
    weights = num_params * (FOUR_BIT_BYTES_PER_PARAM if four_bit else width)
    if lora:
        # peft keeps adapters in float32 on a 16-bit base (autocast_adapter_dtype); ~1% of the model if unknown
        trainable = trainable_params if trainable_params is not None else num_params // 100
        trainable_width = 4
        weights += trainable * trainable_width
    else:
        trainable, trainable_width = num_params, width
    activation_width = 4 if dtype == "float32" else 2
    parts = {
        "weights": int(weights),
        "gradients": trainable * trainable_width,
        "optimizer": 2 * trainable * trainable_width,  # AdamW exp_avg + exp_avg_sq, same dtype as the param
        "activations": batch_tokens
        * hidden_size
        * num_layers
        * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER
        * activation_width
        // 2,
        "logits": batch_tokens * vocab_size * LOGIT_BYTES_PER_TOKEN_VOCAB,
        # GRPO generates the whole round's completions in one batch: its KV cache
        "kv_cache": (batch_tokens if generation_tokens is None else generation_tokens)
        * num_layers
        * 2
        * kv_size
        * activation_width,
        "runtime": CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
    }
    if device != "cuda":  # gradient averaging copies the gradients to host memory (sent and received)
        parts["averaging"] = 2 * trainable * 4
        if (
            audit_window
        ):  # on the host too, so on a GPU they are not VRAM: the verifier's states and replay model
            parts["audit_states"] = audit_window * trainable * trainable_width + int(weights)
    return parts


def estimate_training_memory(
    num_params: int,
    dtype: str = "bfloat16",
    lora: bool = False,
    four_bit: bool = False,
    **sizes: Any,
) -> int:
    """Peak bytes of one training round, on the generous side. Not a prediction to the megabyte: a guard.

    * weights: ``num_params`` × bytes per ``dtype`` (0.6 byte/param in 4-bit), plus fp32 LoRA adapters;
    * gradients and AdamW's two statistics: on every parameter for full fine-tuning, on the adapters only with
      LoRA (``trainable_params``; 1% of the model if not given);
    * activation allowance (needs ``batch_tokens`` = rows per forward/backward × tokens per row, and the sizes
      ``hidden_size``, ``num_layers``, ``vocab_size``, ``kv_size``): 34 bytes per token per hidden unit per layer
      in 16-bit (Korthikanti et al. 2022, no recomputation; attention scores not materialised by SDPA) — stored
      with LoRA too, since gradients flow through the frozen layers to the adapters — plus 12 bytes per token per
      vocabulary entry for the logits and loss (TRL computes them for completion tokens only: generous), plus the
      KV cache of generating ``generation_tokens`` (default ``batch_tokens``) at once;
    * runtime: 1 GiB on CUDA (context, workspaces, fragmentation), 0.6 GiB on CPU; on CPU/MPS also two fp32
      copies of the trainable parameters for gradient averaging and, with verification (``audit_window`` > 0),
      the verifier's copies of the trainable parameters for each epoch of the window plus the model it replays on.
    """
    return sum(estimate_breakdown(num_params, dtype, lora, four_bit, **sizes).values())


def row_tokens_of(rows: list[dict[str, Any]], completion_tokens: int) -> int:
    """Tokens per row for the memory check: the longest row's prompt and completion in characters (at least as many
    as tokens for the tokenizers in use) plus the ``completion_tokens`` a GRPO round generates."""
    return max(len(row["prompt"]) + len(row.get("completion") or "") for row in rows) + completion_tokens


def batch_tokens_for(training: TrainingConfig | None, row_tokens: int | None = None) -> tuple[int, int]:
    """(tokens in one forward/backward, tokens generated at once): rows per micro-batch, resp. per round, ×
    (prompt + completion) tokens per row. Default: 8 rows of 512 tokens."""
    if training is None:
        rows = per_round = DEFAULT_ROWS
    else:
        per_round = training.prompts_per_round * (
            training.num_generations if training.trainer != "sft" else 1
        )
        rows = min(training.micro_batch_size or per_round, per_round)
    if row_tokens is None:
        completion = training.max_completion_length if training is not None else None
        row_tokens = completion + 256 if completion else DEFAULT_ROW_TOKENS  # 256: a generous prompt
    return rows * row_tokens, per_round * row_tokens


# ---- the check --------------------------------------------------------------------------------------------------


def check_four_bit(hw: Hardware) -> None:
    """:raises UserError: when ``model.load_in_4bit`` cannot work on this machine"""
    if hw.gpu is None:
        raise UserError(
            "model.load_in_4bit: 4-bit loading needs an NVIDIA GPU with CUDA and none was found; "
            "set model.load_in_4bit=false",
            exit_code=2,
        )
    if not hw.bitsandbytes:
        raise UserError(
            "model.load_in_4bit: the bitsandbytes package is not installed "
            "(pip install bitsandbytes), or set model.load_in_4bit=false",
            exit_code=2,
        )


def training_device(hw: Hardware) -> tuple[str, int | None, str]:
    """(device kind, bytes it has for training or None when unknown, its description)."""
    if hw.gpu is not None:
        return (
            "cuda",
            hw.gpu.total_memory,
            f"the {hw.gpu.name} has {hw.gpu.total_memory / GIB:.1f} GiB of VRAM",
        )
    ram = hw.available_ram if hw.available_ram is not None else hw.total_ram
    kind = "mps" if hw.mps else "cpu"
    where = "this Mac has" if hw.mps else "this machine has"
    return (
        kind,
        ram,
        f"{where} {ram / GIB:.1f} GiB of free RAM" if ram is not None else f"{where} unknown RAM",
    )


def estimate_for(
    model_config: ModelConfig,
    hw: Hardware,
    batch_tokens: int,
    generation_tokens: int | None = None,
    audit_window: int = 0,
) -> tuple[Architecture, int] | None:
    """(architecture, estimated bytes) for ``model_config`` on ``hw``; None when the model's size is unknown."""
    arch = model_architecture(model_config)
    if arch is None:
        return None
    lora = model_config.lora_r > 0
    device, _, _ = training_device(hw)
    estimate = estimate_training_memory(
        arch.num_parameters(),
        model_config.dtype,
        lora=lora,
        four_bit=model_config.load_in_4bit,
        trainable_params=arch.lora_parameters(model_config.lora_r, model_config.lora_target_modules)
        if lora
        else None,
        batch_tokens=batch_tokens,
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        vocab_size=arch.vocab_size,
        kv_size=arch.num_kv_heads * arch.head_dim,
        generation_tokens=generation_tokens,
        device=device,
        audit_window=audit_window,
    )
    return arch, estimate


def check_fits(
    model_config: ModelConfig,
    hw: Hardware,
    training: TrainingConfig | None = None,
    batch_tokens: int | None = None,
    row_tokens: int | None = None,
    audit_window: int = 0,
) -> None:
    """Refuse, before any download or allocation, a model that cannot train in this machine's memory.

    :param training: sizes the batch (``micro_batch_size`` or the whole round, ``max_completion_length``);
        default: 8 rows of 512 tokens
    :param batch_tokens: overrides the batch size derived from ``training``
    :param row_tokens: (prompt + completion) tokens per row when known (the trainer measures its recipe's rows);
        default: ``max_completion_length`` + 256, or 512
    :param audit_window: ``verify.audit_window`` when this peer verifies (it keeps that many states), else 0
    :raises UserError: one line naming the model, the estimate and the memory available; also when
        ``model.load_in_4bit`` is set without CUDA or bitsandbytes. Unknown models pass with a logged warning.
    """
    if model_config.load_in_4bit:
        check_four_bit(hw)
    tokens, generated = batch_tokens_for(training, row_tokens)
    if batch_tokens is not None:
        tokens, generated = batch_tokens, max(batch_tokens, generated if training is not None else 0)
    sized = estimate_for(model_config, hw, tokens, generated, audit_window)
    if sized is None:
        return
    arch, estimate = sized
    _, available, where = training_device(hw)
    if available is None:
        logger.warning(
            f"cannot tell how much memory this machine has; skipping the memory check "
            f"(training needs about {estimate / GIB:.1f} GiB)"
        )
        return
    if estimate <= available:
        return
    name = model_config.name_or_path or "the tiny default model"
    mode = (f"LoRA r={model_config.lora_r}" if model_config.lora_r else "full fine-tuning") + (
        " in 4-bit" if model_config.load_in_4bit else f" in {model_config.dtype}"
    )
    hints = [] if model_config.lora_r else ["set model.lora_r=16"]
    if not model_config.load_in_4bit and hw.gpu is not None and hw.bitsandbytes and model_config.lora_r:
        hints.append("model.load_in_4bit=true")
    hints += ["lower training.micro_batch_size", "pick a smaller model or tier config"]
    raise UserError(
        f"model {name} ({arch.num_parameters() / 1e9:.2f}B parameters, {mode}, {tokens} tokens per batch) needs "
        f"about {estimate / GIB:.1f} GiB to train but {where}: {', '.join(hints)}",
        exit_code=2,
    )


# ---- tiers ------------------------------------------------------------------------------------------------------

# (tier, smallest VRAM in GiB) from the largest down; below the smallest GPU tier, the CPU tier
GPU_TIERS = (("gpu-24gb", 20.0), ("gpu-12gb", 11.0), ("gpu-8gb", 0.0))


@dataclass(frozen=True)
class TierChoice:
    name: str
    config_path: Path
    reason: str  # one sentence for a human: the hardware, the tier, the model and how it is trained
    notes: tuple[str, ...] = field(default=())  # further remarks (e.g. 4-bit is available)


def _describe_model(config_path: Path) -> str:
    from swarm.config import load_config

    model = load_config(config_path, environ={}).model
    name = (model.name_or_path or "the tiny offline model").rsplit("/", 1)[-1]
    how = f"with LoRA r={model.lora_r}" if model.lora_r else "fully fine-tuned"
    precision = (
        "4-bit"
        if model.load_in_4bit
        else {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[model.dtype]
    )
    return f"{name} {how} in {precision}"


def choose_tier(hw: Hardware, configs_dir: Path = CONFIGS_DIR) -> TierChoice:
    """The tier config for ``hw``: ``cpu`` without a CUDA GPU (Apple MPS included: MPS training through TRL is
    not supported by this project yet), else by the VRAM of the training GPU."""
    gpu = hw.gpu
    notes: list[str] = []
    if gpu is None:
        name = "cpu"
        what = "Apple MPS (not used for training yet)" if hw.mps else "no CUDA GPU"
        hardware = f"{what}, {_cores(hw.cpu_count)}" + (
            f", {hw.total_ram / GIB:.1f} GiB RAM" if hw.total_ram else ""
        )
    else:
        vram = gpu.total_memory / GIB
        name = next(tier for tier, smallest in GPU_TIERS if vram >= smallest)
        hardware = f"{gpu.name} with {vram:.1f} GiB VRAM"
        if hw.bitsandbytes:
            notes.append("bitsandbytes is installed: model.load_in_4bit=true (with LoRA) fits a bigger model")
    path = configs_dir / f"{name}.yaml"
    return TierChoice(name, path, f"{hardware}: {name}, {_describe_model(path)}", tuple(notes))
