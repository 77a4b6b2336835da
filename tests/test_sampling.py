"""The seeded sampler (swarm/sampling.py): it draws from the distribution ordinary sampling draws from, keeps the
vocabulary transformers' warpers keep, stops where it says, and any single position can be recomputed on its own —
which is what lets an auditor tell a sampled completion from a chosen one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from swarm.config import ModelConfig
from swarm.recipe import load_recipe
from swarm.sampling import (
    SamplingParams,
    _fmix32,
    check_positions,
    choose,
    completion_logits,
    generate,
    gumbel_noise,
    keep_mask,
    pad,
    position_keys,
    round_seed,
)
from swarm.training.model import load_model_and_tokenizer

pytestmark = pytest.mark.unit

FILTERS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
]


def _reference_fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer, in Python integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens with non-zero probability, and its degrees of freedom."""
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the kept vocabulary was drawn"
    statistic = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    return statistic, int(support.sum()) - 1


def _chi_square_critical(df: int) -> float:
    """The statistic a correct sampler exceeds with probability ~1e-4 (Wilson–Hilferty approximation)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_the_hash_is_murmur3s_finalizer_exactly_in_int64() -> None:
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    assert _fmix32(torch.tensor(values, dtype=torch.int64)).tolist() == [_reference_fmix32(v) for v in values]


def test_noise_is_a_pure_function_of_the_position_key() -> None:
    keys = position_keys(7, [0, 0, 1, 0], [0, 1, 0, 0], [3, 3, 3, 4])
    first, second = gumbel_noise(keys, 50), gumbel_noise(keys, 50)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    # another seed, row, generation or position gives other noise
    assert len({tuple(row.tolist()) for row in first}) == 4
    assert not torch.equal(gumbel_noise(position_keys(8, [0], [0], [3]), 50)[0], first[0])
    # a position on its own is the same as in a batch
    assert torch.equal(gumbel_noise(position_keys(7, [1], [0], [3]), 50)[0], first[2])


def test_round_seeds_differ_per_run_peer_and_epoch() -> None:
    seeds = {round_seed(run, peer, epoch) for run in ("a", "b") for peer in ("p", "q") for epoch in (0, 1)}
    assert len(seeds) == 8 and round_seed("a", "p", 0) == round_seed("a", "p", 0)


@pytest.mark.parametrize(
    "params", FILTERS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"
)
def test_the_kept_vocabulary_is_what_transformers_warpers_keep(params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=generator) * 3
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    if params.min_p:
        warped = MinPLogitsWarper(params.min_p)(None, warped)
    ours = keep_mask(logits.double() / params.temperature, params)
    assert torch.equal(ours, torch.isfinite(warped))


@pytest.mark.parametrize(
    "params", FILTERS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"
)
def test_the_sampler_draws_what_multinomial_sampling_draws(params: SamplingParams) -> None:
    """Both the seeded sampler and torch.multinomial on the warped distribution pass the same chi-square test
    (threshold at p ~ 1e-4; the keys and generator are fixed, so the test is deterministic)."""
    vocab, draws = 24, 30000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    keep = keep_mask(logits.double()[None] / params.temperature, params)[0]
    probs = (logits.double() / params.temperature).masked_fill(~keep, -math.inf).softmax(-1)
    keys = position_keys(11, [0] * draws, [0] * draws, list(range(draws)))
    ours = torch.bincount(choose(logits.expand(draws, vocab), keys, params), minlength=vocab).double()
    theirs = torch.bincount(
        torch.multinomial(probs, draws, replacement=True, generator=torch.Generator().manual_seed(4)),
        minlength=vocab,
    ).double()
    for counts in (ours, theirs):
        statistic, df = _chi_square(counts, probs)
        assert statistic < _chi_square_critical(df), (statistic, df, params)


def test_the_check_accepts_the_sampler_rejects_others_and_accepts_either_side_of_a_tie() -> None:
    params = SamplingParams(temperature=1.0, top_k=8)
    logits = torch.randn(500, 32, generator=torch.Generator().manual_seed(5))
    keys = position_keys(1, [0] * 500, [0] * 500, list(range(500)))
    chosen = choose(logits, keys, params)
    honest = check_positions(logits, keys, chosen, params, margin=1e-4)
    assert honest.ok.all() and torch.equal(honest.chosen, chosen)
    # an honest peer whose logits differ by less than the margin passes
    nudged = logits + 1e-5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(6))
    assert check_positions(nudged, keys, chosen, params, margin=1e-4).ok.all()
    # any other token fails almost everywhere (only where it ties with the sampler's choice may it pass)
    other = (chosen + 1) % 32
    rejected = check_positions(logits, keys, other, params, margin=1e-4)
    assert (~rejected.ok).float().mean() > 0.99
    # out-of-vocabulary and filtered-out tokens fail
    assert not check_positions(logits[:1], keys[:1], torch.tensor([32]), params, 1e-4).ok.any()
    outside = logits[0].argsort()[0:1]  # the least likely token: outside top-8
    assert not check_positions(logits[:1], keys[:1], outside, params, 1e-4).ok.any()
    # a tie: make the runner-up score within the margin of the winner; both are accepted
    scores = logits[:1].double() + gumbel_noise(keys[:1], 32)
    best, runner = scores[0].topk(2).indices.tolist()
    tied = logits[:1].clone()
    tied[0, runner] += float(scores[0, best] - scores[0, runner]) - 5e-5
    for token in (best, runner):
        assert check_positions(tied, keys[:1], torch.tensor([token]), params, 1e-4).ok.all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    recipe = load_recipe("arithmetic")
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(), recipe.tokenizer_alphabet(), Path(tmp_path_factory.mktemp("models"))
    )
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in recipe.assigned_rows("run", "peer", 0, 6)]
    return model, tokenizer, prompts


def test_generation_stops_at_the_stop_token_or_the_maximum_and_every_position_recomputes_alone(tiny) -> None:
    model, tokenizer, prompts = tiny
    keys = [(9, index, 0) for index in range(len(prompts))]
    # the tiny model rarely samples its eos: make one frequent token a stop token too, so both endings occur
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("1")]
    completions = generate(model, prompts, keys, SamplingParams(1.0), 12, stop_ids, tokenizer.pad_token_id)
    assert completions == generate(
        model, prompts, keys, SamplingParams(1.0), 12, stop_ids, tokenizer.pad_token_id
    )
    assert all(
        1 <= len(ids) <= 12 and not set(ids[:-1]) & set(stop_ids) and (ids[-1] in stop_ids or len(ids) == 12)
        for ids in completions
    )
    assert {len(ids) == 12 for ids in completions} == {True, False}, "both endings should occur"
    # one teacher-forced pass over all completions recomputes each position's choice
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = pad(completions, tokenizer.pad_token_id, "right")
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    for index, ids in enumerate(completions):
        position_keys_ = position_keys(9, [index] * len(ids), [0] * len(ids), list(range(len(ids))))
        checked = check_positions(
            logits[index, : len(ids)], position_keys_, torch.tensor(ids), SamplingParams(1.0), 1e-4
        )
        assert checked.ok.all(), (index, ids, checked.chosen.tolist())
    # a single prompt on its own gives the same completion (no dependence on the batch)
    alone = generate(
        model, prompts[2:3], keys[2:3], SamplingParams(1.0), 12, stop_ids, tokenizer.pad_token_id
    )
    assert alone == completions[2:3]


def test_trls_own_step_samples_with_the_seeded_sampler_from_the_prompts_and_stop_tokens_the_adapter_derives(
    tiny,
) -> None:
    """What a receiver of shared rollouts and an auditor recompute (prompt token ids, stop tokens, each
    completion) is what TRL's GRPO step used: a canary for the adapter's reading of TRL."""
    from swarm.recipe import load_recipe
    from swarm.trl_adapter import GRPOSettings, prompt_token_ids, stop_token_ids
    from swarm.verify.replay import capture_contribution

    model, tokenizer, _ = tiny
    recipe = load_recipe("arithmetic")
    rows = recipe.assigned_rows("run", "peer", 3, 3)
    settings = GRPOSettings(num_generations=2, max_completion_length=6, seed=21)
    contribution = capture_contribution(model, tokenizer, recipe, rows, settings)
    assert contribution.prompt_token_ids == [
        prompt_token_ids(tokenizer, row["prompt"]) for row in rows for _ in range(2)
    ]
    stops = list(stop_token_ids(model, tokenizer))
    keys = [(21, index // 2, index % 2) for index in range(6)]
    again = generate(
        model, contribution.prompt_token_ids, keys, SamplingParams(1.0), 6, stops, tokenizer.pad_token_id
    )
    assert contribution.completion_token_ids == again


def test_the_check_in_chunks_finds_what_one_pass_finds_and_keeps_only_the_completion_logits(tiny) -> None:
    """A real model's vocabulary makes one pass over every completion too big: the chunked check (here one
    completion per forward pass and 3 positions per block) counts and names exactly what the single pass does, and
    the logits kept for the completion alone are the full pass's."""
    from swarm.trl_adapter import GRPOSettings
    from swarm.verify.checks import check_sampled

    model, tokenizer, prompts = tiny
    settings = GRPOSettings(num_generations=1, max_completion_length=8, seed=5)
    keys = [(5, index, 0) for index in range(len(prompts))]
    completions = generate(
        model, prompts, keys, settings.sampling_params(), 8, [tokenizer.eos_token_id], tokenizer.pad_token_id
    )
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = pad(completions, tokenizer.pad_token_id, "right")
    full = model(
        input_ids=torch.cat([prompt_ids, completion_ids], 1),
        attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        position_ids=(torch.cat([prompt_mask, completion_mask], 1).cumsum(-1) - 1).clamp(min=0),
    ).logits[:, prompt_ids.shape[1] - 1 : -1]
    kept = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert torch.allclose(kept, full, atol=1e-6)
    row_keys = [(index, 0) for index in range(len(prompts))]
    vocab = model.config.vocab_size
    forged = [list(ids) for ids in completions]
    forged[3][1] = (forged[3][1] + 1) % vocab
    for sample in (completions, forged):
        whole = check_sampled(model, prompt_ids, prompt_mask, sample, row_keys, settings, 1e-4)
        chunked = check_sampled(
            model, prompt_ids, prompt_mask, sample, row_keys, settings, 1e-4, budget=3 * vocab
        )
        assert whole.first_forged == chunked.first_forged
    assert whole.first_forged[:3] == (3, 0, 1)
    honest = check_sampled(
        model, prompt_ids, prompt_mask, completions, row_keys, settings, 1e-4, budget=3 * vocab
    )
    assert honest.first_forged is None and honest.checked == sum(map(len, completions))


def test_an_auditor_computing_in_lower_precision_holds_peers_to_its_own_class_margin(tiny) -> None:
    from swarm.verify.checks import computing_class

    model, _, _ = tiny
    assert computing_class(model) == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert computing_class(model) == "bf16"
    assert computing_class(model) == "fp32"


@pytest.mark.parametrize(
    "params", FILTERS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"
)
def test_a_peer_whose_logits_differ_by_less_than_the_margin_always_passes_even_where_tokens_tie(
    params: SamplingParams,
) -> None:
    """Lower-precision logits tie where the peer's did not (an fp16 auditor rounds two fp32 logits 1.6e-4 apart
    to one value), so which of two tokens sits at a filter's boundary depends on who computes. Logits on a coarse
    grid make such ties frequent; the peer samples from them moved by up to half the margin, the auditor checks
    with the grid's: every honest position passes, at every filter."""
    generator = torch.Generator().manual_seed(11)
    auditor = (torch.randn(4000, 12, generator=generator) * 4).round() / 8  # many exact ties
    margin = 5e-3
    scale = auditor.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    peer = auditor + (torch.rand(auditor.shape, generator=generator) - 0.5) * margin * scale
    keys = position_keys(3, [0] * 4000, [0] * 4000, list(range(4000)))
    tokens = choose(peer, keys, params)
    checked = check_positions(auditor, keys, tokens, params, margin)
    assert checked.ok.all(), f"{int((~checked.ok).sum())} honest positions rejected"
