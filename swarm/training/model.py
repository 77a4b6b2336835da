"""Loading the model and tokenizer: any transformers causal LM by hub id or local path, or — by default — a tiny
Qwen2 model built from the config with a character tokenizer made locally (no network), cached in the work dir.
Optionally wrapped in LoRA adapters (peft), over a base loaded in 4-bit (bitsandbytes, CUDA only)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from swarm.config import ModelConfig
from swarm.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<eos>")
# ModelConfig fields that do not change the base model's weights (left out of the tiny model's cache key)
NOT_IN_BASE_MODEL = {
    "name_or_path",
    "dtype",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "load_in_4bit",
}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` plus ``<pad>`` and ``<eos>`` (unknown characters map to pad)."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def _tiny_model(config: ModelConfig, vocab_size: int) -> Qwen2ForCausalLM:
    model_config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.init_seed)
        return Qwen2ForCausalLM(model_config)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def tiny_model_dir(config: ModelConfig, alphabet: str, cache_root: Path) -> Path:
    spec = json.dumps([config.model_dump(exclude=NOT_IN_BASE_MODEL), alphabet], sort_keys=True)
    return cache_root / f"tiny-qwen2-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def load_model_and_tokenizer(
    config: ModelConfig, alphabet: str, cache_root: Path
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The model and tokenizer to train.

    With ``config.name_or_path`` empty, a tiny Qwen2 model is built from the config (seeded by ``init_seed``, so
    peers built from the same config start identical) and saved under ``cache_root``; later runs load it from
    there with ``from_pretrained``, the same call that loads a hub id or a local directory.

    With ``config.lora_r > 0`` the model is wrapped in LoRA adapters (:func:`add_lora`): only the adapters
    require grad, so only they are optimized and averaged. ``config.load_in_4bit`` loads the base in 4-bit NF4.

    :raises UserError: when ``name_or_path`` is neither an existing directory nor a loadable hub id, when
        ``load_in_4bit`` is set without CUDA, bitsandbytes or LoRA, or when no LoRA target module exists
    """
    dtype = getattr(torch, config.dtype)
    quantization = _four_bit_kwargs(config) if config.load_in_4bit else {}  # checked before any download
    source = config.name_or_path
    if source is None:
        path = tiny_model_dir(config, alphabet, cache_root)
        if not (path / "config.json").is_file():
            tokenizer = build_char_tokenizer(alphabet)
            model = _tiny_model(config, len(tokenizer))
            staging = path.with_name(path.name + f".tmp{os.getpid()}")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                os.replace(staging, path)
            except OSError:  # another peer sharing the cache finished first: use theirs
                pass
        source = str(path)
    elif _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model.name_or_path: {source} does not exist", exit_code=2)
    # the tiny model's config says qwen2, so AutoTokenizer would rebuild it as a byte-level Qwen2Tokenizer
    tokenizer_class = PreTrainedTokenizerFast if config.name_or_path is None else AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **quantization)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"model.name_or_path: cannot load {source!r}: {first_line[:300]}", exit_code=2
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.lora_r > 0:
        model = add_lora(model, config)
    return model, tokenizer


def _four_bit_kwargs(config: ModelConfig) -> dict:
    """``from_pretrained`` arguments for a 4-bit NF4 base (QLoRA). :raises UserError: naming ``model.load_in_4bit``"""
    from swarm.hardware import check_four_bit, detect_hardware

    if config.lora_r <= 0:
        raise UserError(
            "model.load_in_4bit: a 4-bit model can only be trained through LoRA adapters: "
            "set model.lora_r (e.g. 16) or model.load_in_4bit=false",
            exit_code=2,
        )
    check_four_bit(detect_hardware())
    from transformers import BitsAndBytesConfig

    compute = torch.float16 if config.dtype == "float16" else torch.bfloat16
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return dict(quantization_config=quantization_config, device_map={"": torch.cuda.current_device()})


def add_lora(model: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """Wrap ``model`` in LoRA adapters (peft); only the adapters require grad afterwards.

    LoRA's A matrices are initialised at random: the generator is seeded with ``config.init_seed`` (inside a
    forked RNG, so the caller's random state is untouched), so every peer starts from identical adapters, as it
    must for the averaged updates to mean anything. B starts at zero: the wrapped model computes what the base
    did. On a 16-bit base, peft keeps the adapters in float32.

    :raises UserError: when none of ``config.lora_target_modules`` exists in the model
    """
    from peft import LoraConfig, get_peft_model

    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # layer norms to fp32 and input grads on; no gradient checkpointing (the trainer does not expect it)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
    )
    try:
        with torch.random.fork_rng():
            torch.manual_seed(config.init_seed)
            return get_peft_model(model, lora_config)
    except ValueError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model.lora_target_modules: {first_line[:300]}", exit_code=2) from None
