"""Loading the model and tokenizer: any transformers causal LM by hub id or local path, or — by default — a tiny
Qwen2 model built from the config with a character tokenizer made locally (no network), cached in the work dir."""

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
    spec = json.dumps([config.model_dump(exclude={"name_or_path", "dtype"}), alphabet], sort_keys=True)
    return cache_root / f"tiny-qwen2-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def load_model_and_tokenizer(
    config: ModelConfig, alphabet: str, cache_root: Path
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The model and tokenizer to train.

    With ``config.name_or_path`` empty, a tiny Qwen2 model is built from the config (seeded by ``init_seed``, so
    peers built from the same config start identical) and saved under ``cache_root``; later runs load it from
    there with ``from_pretrained``, the same call that loads a hub id or a local directory.

    :raises UserError: when ``name_or_path`` is neither an existing directory nor a loadable hub id
    """
    dtype = getattr(torch, config.dtype)
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
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model.name_or_path: cannot load {source!r}: {first_line[:300]}", exit_code=2) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
