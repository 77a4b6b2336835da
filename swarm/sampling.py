"""Seeded, position-keyed sampling: every completion token is a pure function of the model's logits and of
(seed, row, generation, position), so an auditor holding the same model state can recompute any single position
on its own and tell a sampled completion from a chosen one.

The sampler is Gumbel-max: token = argmax over the kept vocabulary of ``logit / temperature + g``, where ``g`` is
standard Gumbel noise. That is exactly a draw from ``softmax(logit / temperature)`` over the kept tokens
(tests/test_sampling.py checks it against ``torch.multinomial``). The noise is not drawn from a generator but
computed by a counter-based hash:

* a position's key: blake2b-64 of ``seed|row|generation|position`` (:func:`position_keys`), split in two 32-bit
  words ``(a, b)``;
* token ``v``'s uniform: ``fmix32(fmix32(v * 0x9E3779B1 + a) ^ b)`` (MurmurHash3's finalizer, computed in int64
  with split multiplications, so it is exact on every device), mapped to ``(h + 0.5) / 2**32``;
* ``g = -log(-log(u))`` in float64.

The kept vocabulary follows transformers' warpers in their order: temperature, then top-k (ties with the k-th
value kept), top-p (the smallest set of most likely tokens whose mass reaches ``top_p``), min-p (tokens at least
``min_p`` times as likely as the most likely one). :func:`keep_mask` takes a *slack*: 0 is the sampler's own set;
a positive slack keeps every token that numerical noise of that size could have kept (lenient), a negative one
only those it could not have dropped (strict). The check (:func:`check_positions`) accepts a committed token when
it is in the lenient set and its score is within the tie margin of the best strict competitor — so an honest
peer whose logits differ from the auditor's by less than the margin always passes, and a chosen token passes a
position only where it happens to be (nearly) the sampler's choice.

:func:`generate` is the peer's generation loop (a KV-cached forward per new token, plain transformers API):
positions are ``cumsum(attention_mask) - 1``, as transformers' ``generate`` computes them for left-padded prompts,
and :func:`completion_logits` recomputes the same logits by one teacher-forced forward pass. A completion ends with
its first stop token (included) or at ``max_new_tokens``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SAMPLER",
    "SampleRequest",
    "Sampler",
    "SamplingParams",
    "check_positions",
    "choose",
    "completion_logits",
    "generate",
    "generate_request",
    "gumbel_noise",
    "keep_mask",
    "pad",
    "position_keys",
    "round_seed",
]

# the sampler and its seed derivation, by name: bound in every contribution's settings (and so its commitment)
SAMPLER = "gumbel-fmix32-v1"

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1


@dataclass(frozen=True)
class SamplingParams:
    """What decides the kept vocabulary and the scale of the logits (transformers' meaning of each knob)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off


def round_seed(run_id: str, peer_id: str, epoch: int) -> int:
    """The sampling seed of a peer's epoch: reproducible by an auditor, different for every run, peer and epoch
    (a peer can neither reuse another epoch's completions nor copy another peer's)."""
    return int.from_bytes(hashlib.sha256(f"{run_id}|{peer_id}|{epoch}|sampling".encode()).digest()[:4], "big")


def position_keys(
    seed: int, rows: Sequence[int], generations: Sequence[int], positions: Sequence[int]
) -> torch.Tensor:
    """One key per (row, generation, position) triple: an (N, 2) int64 tensor of two 32-bit words."""
    words = []
    for row, generation, position in zip(rows, generations, positions, strict=True):
        digest = hashlib.blake2b(f"{seed}|{row}|{generation}|{position}".encode(), digest_size=8).digest()
        words.append((int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:], "big")))
    return torch.tensor(words, dtype=torch.int64).reshape(-1, 2)


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """``h * constant mod 2**32`` for 32-bit ``h`` without int64 overflow: the constant in 16-bit halves."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(keys: torch.Tensor, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise, (N, vocab) float64, a pure function of each row's key and the token index."""
    keys = keys.to(device)
    tokens = torch.arange(vocab, dtype=torch.int64, device=device)
    h = _fmix32((tokens[None, :] * _GOLDEN32 + keys[:, :1]) & _MASK32)
    h = _fmix32(h ^ keys[:, 1:])
    uniform = (h.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(uniform))


def keep_mask(
    scaled: torch.Tensor, params: SamplingParams, slack: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Which tokens the warpers keep given temperature-scaled logits (N, V) float64. ``slack`` (in scaled-logit
    units; a float or one per row, (N, 1)) widens (> 0) or narrows (< 0) every boundary by what that much noise in
    the logits could move it."""
    slack = torch.as_tensor(slack, dtype=torch.float64, device=scaled.device)
    slack = slack.reshape(-1, 1) if slack.ndim else slack
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        keep &= scaled >= kth - 2 * slack
    if params.top_p < 1.0:
        keep &= _top_p_keep(scaled.masked_fill(~keep, -torch.inf), params.top_p, slack)
    if params.min_p > 0.0:
        masked = scaled.masked_fill(~keep, -torch.inf)
        log_probs = masked.log_softmax(dim=-1)
        best = log_probs.max(dim=-1, keepdim=True).values
        keep &= log_probs >= best + math.log(params.min_p) - 4 * slack
    return keep


def _top_p_keep(masked: torch.Tensor, top_p: float, slack: torch.Tensor) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens while their cumulative mass (ascending order,
    the token itself included) stays <= 1 - top_p; the most likely token is always kept.

    With a slack, the order of tokens closer than 2 |slack| is not known (either could be below the other: an fp16
    auditor sees two fp32 logits 1.6e-4 apart as equal), so a token's cumulative mass lies between the mass of the
    tokens surely below it plus its own, and the mass of every token that may be below it plus its own. A token may
    be kept (slack > 0) when the larger one can exceed the threshold, and is surely kept (slack < 0) when the
    smaller one does or it is surely the most likely; the threshold itself moves by expm1(2 |slack|), the most a
    mass ratio moves when every logit moves by |slack|."""
    ordered, order = torch.sort(masked, dim=-1)  # ascending, as transformers' TopPLogitsWarper
    probs = ordered.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    if not bool((slack != 0).any()):
        drop_sorted = cumulative <= 1.0 - top_p
        drop_sorted[..., -1] = False  # the most likely token is always kept
        return ~drop_sorted.scatter(-1, order, drop_sorted)
    width = 2 * slack.abs().expand(masked.shape[0], 1)  # how far apart two tokens' scaled logits may move
    before = torch.cat(
        [torch.zeros_like(cumulative[..., :1]), cumulative], dim=-1
    )  # mass of the first j tokens
    own = probs.scatter(-1, order, probs)
    lenient = bool((slack > 0).all())
    bound = masked + width if lenient else masked - width
    # how many tokens are at or below (lenient) / strictly below (strict) each token's bound
    count = torch.searchsorted(ordered, bound.contiguous(), right=lenient)
    mass = before.gather(-1, count)
    mass_with_own = (
        mass if lenient else mass + own
    )  # lenient: its own mass is among those at or below its bound
    threshold = (1.0 - top_p) - torch.expm1(width) * (1 if lenient else -1)
    kept = mass_with_own > threshold
    best = ordered[..., -1:]
    runner_up = ordered[..., -2:-1] if ordered.shape[-1] > 1 else torch.full_like(best, -torch.inf)
    if lenient:
        kept |= masked + width >= best
    else:
        kept |= (masked == best) & (masked - width > runner_up)
    return kept


def _scaled(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return logits.double() / params.temperature


def choose(logits: torch.Tensor, keys: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's token for each row of ``logits`` (N, V), given each row's position key (N, 2)."""
    scaled = _scaled(logits, params)
    scores = scaled + gumbel_noise(keys, scaled.shape[-1], scaled.device)
    return scores.masked_fill(~keep_mask(scaled, params), -torch.inf).argmax(dim=-1)


@dataclass(frozen=True)
class PositionCheck:
    """Per checked position: whether the committed token is acceptable, the sampler's own choice, and whether the
    position fell inside the tie margin (its two best candidates closer than the margin)."""

    ok: torch.Tensor  # (N,) bool
    chosen: torch.Tensor  # (N,) int64
    tie: torch.Tensor  # (N,) bool


def check_positions(
    logits: torch.Tensor,
    keys: torch.Tensor,
    tokens: torch.Tensor,
    params: SamplingParams,
    margin: float,
) -> PositionCheck:
    """Whether each committed token (N,) is the sampler's choice at its position, given the auditor's logits (N, V)
    and the position keys (N, 2), accepting either candidate where two are within the margin: how far the
    auditor's logits may be from the peer's, ``margin`` times the position's largest logit (at least 1)."""
    scaled = _scaled(logits, params)
    magnitude = logits.detach().double().abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    slack = margin * magnitude / params.temperature
    scores = scaled + gumbel_noise(keys, scaled.shape[-1], scaled.device)
    tokens = tokens.to(scaled.device).long()
    vocab = scaled.shape[-1]
    in_vocab = (tokens >= 0) & (tokens < vocab)
    safe = tokens.clamp(0, vocab - 1)
    lenient = keep_mask(scaled, params, slack).gather(-1, safe[:, None]).squeeze(-1)
    strict = keep_mask(scaled, params, -slack)
    own = scores.gather(-1, safe[:, None]).squeeze(-1)
    rivals = scores.masked_fill(~strict, -torch.inf).scatter(-1, safe[:, None], -torch.inf)
    best_rival = rivals.max(dim=-1).values
    exact = scores.masked_fill(~keep_mask(scaled, params), -torch.inf)
    chosen = exact.argmax(dim=-1)
    top2 = exact.topk(min(2, vocab), dim=-1).values
    tie = (top2[:, 0] - top2[:, -1]) <= 2 * slack[:, 0] if vocab > 1 else torch.zeros_like(in_vocab)
    ok = in_vocab & lenient & (own >= best_rival - 2 * slack[:, 0])
    return PositionCheck(ok=ok, chosen=chosen, tie=tie)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one (N, longest) tensor and its attention mask, padded on ``side`` ("left": prompts, as
    TRL and transformers' generation pad them; "right": completions)."""
    width = max((len(ids) for ids in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        if sequence:
            span = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
            ids[index, span] = torch.tensor(list(sequence), dtype=torch.long)
            mask[index, span] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    element_keys: Sequence[tuple[int, int, int]],
    params: SamplingParams,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    """Sample one completion per prompt with the seeded sampler. ``element_keys[i]`` is prompt i's
    (seed, row, generation). Each completion ends with its first stop token (included) or has ``max_new_tokens``
    tokens. The model is put in eval mode for the loop (no dropout) and restored."""
    device = next(model.parameters()).device
    ids, mask = pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    count = len(prompts)
    seeds, rows, generations = zip(*element_keys) if count else ((), (), ())
    if len(set(seeds)) > 1:
        raise ValueError("one generation call samples under one seed")
    seed = seeds[0] if count else 0
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    completions = torch.full((count, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(count, dtype=torch.bool, device=device)
    # transformers 5 renamed the KV-cache argument and output from ``past_key_values`` to ``cache`` in a minor release
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        positions = _positions(mask)
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        step_positions = positions[:, -1:]
        for position in range(max_new_tokens):
            logits = output.logits[:, -1, :]
            keys = position_keys(seed, rows, generations, [position] * count).to(device)
            token = choose(logits, keys, params)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            completions[:, position] = token
            finished |= torch.isin(token, stops)
            if bool(finished.all()) or position + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones((count, 1), dtype=mask.dtype, device=device)], dim=1)
            step_positions = step_positions + 1
            output = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=step_positions,
                use_cache=True,
                **{cache_name: getattr(output, cache_name)},
            )
    finally:
        model.train(was_training)
    result = []
    stop_set = set(int(s) for s in stop_ids)
    for row in completions.tolist():
        out = []
        for token in row:
            out.append(token)
            if token in stop_set:
                break
        result.append(out)
    return result


@torch.no_grad()
def completion_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """The logits (N, L, V) that predicted each completion position, by one teacher-forced forward pass over the
    left-padded prompts and right-padded completions (TRL's tensors), with :func:`generate`'s positions. Only the
    completion's positions are projected on the vocabulary where the model takes ``logits_to_keep`` (transformers'
    causal LMs do): a prompt's logits would cost ``prompt length x vocabulary`` for nothing. The model is put in
    eval mode for the pass and restored."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    width, length = prompt_ids.shape[1], completion_ids.shape[1]
    keep = {"logits_to_keep": length + 1} if _accepts(model, "logits_to_keep") else {}
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), **keep).logits
    finally:
        model.train(was_training)
    if (
        keep
    ):  # the last length + 1 positions: prompt's last token .. completion's last; the last predicts nothing
        return logits[:, :length, :]
    return logits[:, width - 1 : width - 1 + length, :]


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an introspectable signature
        return False


@dataclass(frozen=True)
class SampleRequest:
    """One generation call of a GRPO step: :func:`generate`'s arguments."""

    model: Any
    prompts: list[list[int]]
    element_keys: list[tuple[int, int, int]]  # per prompt: (seed, row, generation)
    params: SamplingParams
    max_new_tokens: int
    stop_ids: list[int]
    pad_id: int


Sampler = Callable[[SampleRequest], list[list[int]]]


def generate_request(request: SampleRequest) -> list[list[int]]:
    """The honest :data:`Sampler`: :func:`generate` on the request."""
    return generate(
        request.model,
        request.prompts,
        request.element_keys,
        request.params,
        request.max_new_tokens,
        request.stop_ids,
        request.pad_id,
    )
