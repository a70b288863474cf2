"""Sampling pinned to numbers: guidance, temperature, top-k and top-p on hand-computed logits (ties
and the exact top-p boundary included), and a statistical check of the whole loop on a toy model
whose answer is known in closed form.

Nucleus (top-p) definition pinned here: sort by probability, keep the smallest prefix whose
probability reaches top_p; a token is dropped when the mass before it already reaches top_p.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.lm.generate import Sampling, filter_logits, generate, guide, sample_rows
from pipeline.lm.vocab import VocabLayout


def probs(logits: list[float], **sampling) -> list[float]:
    """The distribution one row is drawn from."""
    return filter_logits(torch.tensor([logits]), Sampling(**sampling)).softmax(-1)[0].tolist()


def softmax(values: list[float]) -> list[float]:
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


def close(got: list[float], want: list[float]):
    assert got == pytest.approx(want, abs=1e-6), (got, want)


def test_python_defaults_are_the_sample_defaults():
    """`stages.sample.sample` falls back to Sampling(): the same settings as `arra-pipe sample` with no
    flags. Settings are frozen (hashable, never changed by a run)."""
    import dataclasses

    from stages.cli import main
    flags = {p.name: p.default for p in main.commands["sample"].params}
    assert Sampling() == Sampling(cfg=2.0, temperature=1.0, top_k=0, top_p=1.0)
    assert Sampling() == Sampling(flags["cfg"], flags["temperature"], flags["top_k"], flags["top_p"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sampling().cfg = 1.0


def test_guidance_moves_away_from_the_unconditional_logits():
    cond = torch.tensor([[2.0, 0.0, -1.0]])
    uncond = torch.tensor([[0.0, 1.0, -1.0]])
    # scale*cond + (1-scale)*uncond: at 3, [6, 0, -3] - 2*[0, 1, -1]
    assert guide(cond, uncond, 3.0).tolist() == [[6.0, -2.0, -1.0]]
    assert guide(cond, uncond, 1.0).tolist() == cond.tolist()
    assert guide(cond, uncond, 0.0).tolist() == uncond.tolist()
    assert guide(cond, uncond, 0.5).tolist() == [[1.0, 0.5, -1.0]]


def test_temperature_divides_the_logits():
    close(probs([2.0, 1.0, 0.0], temperature=0.5), softmax([4.0, 2.0, 0.0]))
    close(probs([2.0, 1.0, 0.0], temperature=2.0), softmax([1.0, 0.5, 0.0]))


def test_top_k_keeps_the_k_largest_and_every_token_tied_with_the_kth():
    first, second = softmax([3.0, 2.0])
    close(probs([3.0, 1.0, 2.0, 0.0], top_k=2), [first, 0.0, second, 0.0])
    # tokens 1 and 2 tie for second place: both stay, so three tokens share the mass
    kept = softmax([3.0, 1.0, 1.0])
    close(probs([3.0, 1.0, 1.0, 0.0], top_k=2), [*kept, 0.0])
    close(probs([3.0, 1.0, 1.0, 0.0], top_k=1), [1.0, 0.0, 0.0, 0.0])
    # top_k 0 and top_k >= the vocabulary filter nothing
    close(probs([3.0, 1.0, 1.0, 0.0], top_k=0), softmax([3.0, 1.0, 1.0, 0.0]))
    close(probs([3.0, 1.0, 1.0, 0.0], top_k=4), softmax([3.0, 1.0, 1.0, 0.0]))


# probabilities 0.5, 0.25, 0.125, 0.125 (exact in float32), the largest not first
HALVES = [math.log(2), 2 * math.log(2), 0.0, 0.0]


def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p():
    assert torch.tensor([HALVES]).softmax(-1)[0].tolist() == [0.25, 0.5, 0.125, 0.125]
    close(probs(HALVES, top_p=0.4), [0.0, 1.0, 0.0, 0.0])            # 0.5 alone reaches 0.4
    close(probs(HALVES, top_p=0.5), [0.0, 1.0, 0.0, 0.0])            # and exactly 0.5
    close(probs(HALVES, top_p=0.6), [1 / 3, 2 / 3, 0.0, 0.0])        # 0.5 < 0.6 <= 0.75
    # the boundary exactly: the mass before the third token is 0.75, so at p = 0.75 it is out
    # and just above 0.75 it is in (one of the two tied 0.125 tokens: the set stays smallest)
    assert torch.tensor([HALVES]).softmax(-1).sort(descending=True).values.cumsum(-1)[0, 1] == 0.75
    close(probs(HALVES, top_p=0.75), [1 / 3, 2 / 3, 0.0, 0.0])
    above = probs(HALVES, top_p=0.76)
    close(above[:2], [2 / 7, 4 / 7])
    assert sorted(above[2:]) == pytest.approx([0.0, 1 / 7], abs=1e-6)
    close(probs(HALVES, top_p=0.99), [0.25, 0.5, 0.125, 0.125])
    close(probs(HALVES, top_p=1.0), [0.25, 0.5, 0.125, 0.125])


def test_top_p_runs_on_the_tempered_top_k_distribution():
    # 0.4, 0.3, 0.2, 0.1: top_k 2 leaves 4/7, 3/7, and 4/7 alone reaches 0.5 (on the
    # unfiltered probabilities 0.4 would not, and the second token would stay)
    logits = [math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]
    close(probs(logits, top_k=2, top_p=0.5), [1.0, 0.0, 0.0, 0.0])
    close(probs(logits, top_p=0.5), [4 / 7, 3 / 7, 0.0, 0.0])
    # temperature first: at T=1 the mass before the third token is 0.7, which reaches 0.65; at
    # T=2 the probabilities go as sqrt(p) and it is 0.607, which does not, so three tokens stay
    close(probs(logits, top_p=0.65), [4 / 7, 3 / 7, 0.0, 0.0])
    tempered = softmax([x / 2 for x in logits])
    assert tempered[0] + tempered[1] == pytest.approx(0.607, abs=1e-3)
    close(probs(logits, temperature=2.0, top_p=0.65), [t / sum(tempered[:3]) for t in tempered[:3]] + [0.0])


def test_temperature_zero_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 7.0]])
    assert sample_rows(logits, [torch.Generator(), torch.Generator()], Sampling(temperature=0)).tolist() == [1, 2]


def test_filtered_tokens_are_never_drawn():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, 2.5]]).repeat(400, 1)
    gens = [torch.Generator().manual_seed(s) for s in range(400)]
    drawn = sample_rows(logits, gens, Sampling(top_k=2))
    assert set(drawn.tolist()) == {0, 4}
    gens = [torch.Generator().manual_seed(s) for s in range(400)]
    assert set(sample_rows(logits, gens, Sampling(top_k=4)).tolist()) == {0, 1, 2, 4}


class ToyLM(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the condition token the row starts with:
    `table[condition]` over the whole vocabulary (the API of transformers 5.17: past_key_values).
    Tokens outside the image codes get a logit far above the rest, so a sampler that looked
    outside the image span would draw them."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        seq = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        return SimpleNamespace(logits=self.table[seq[:, 0]][:, None, :], past_key_values=seq)


TOY = VocabLayout("class", condition_vocab=3, codebook_size=4, grid=(1, 2), tokenizer={})  # classes 0, 1; null 2
COND = {0: [1.0, 0.0, 0.0, 0.0], 1: [0.0, 0.0, 0.0, 1.0]}  # class 0 favours code A=0, class 1 code D=3
UNCOND = [0.0, 0.5, 0.0, 0.0]                              # the null class favours code B=1


def toy_model() -> ToyLM:
    table = torch.full((TOY.vocab_size, TOY.vocab_size), 30.0)
    lo, hi = TOY.image_offset, TOY.image_offset + TOY.codebook_size
    for c, row in [*COND.items(), (TOY.null_class, UNCOND)]:
        table[c, lo:hi] = torch.tensor(row)
    return ToyLM(table)


def test_guidance_moves_samples_towards_the_condition_on_a_toy_model():
    """2,000 images of each class, 2 codes each, at cfg 0 (the null condition alone), 1 (the
    condition alone) and 2 (the default): every code's frequency is within 5 standard errors of
    softmax(uncond + cfg * (cond - uncond)), no probability below 0.06, so the normal bound holds
    for any seeds (the seeds are fixed anyway)."""
    n, freq_a = 2000, {}
    for cfg in (0.0, 1.0, 2.0):
        codes = generate(toy_model(), TOY, [[0]] * n + [[1]] * n, [TOY.null_class], list(range(2 * n)), Sampling(cfg=cfg))
        assert codes.shape == (2 * n, 2) and int(codes.max()) < TOY.codebook_size
        assert codes.is_inference()  # no autograd graph kept across the steps
        for label, rows in ((0, codes[:n]), (1, codes[n:])):
            want = softmax([u + cfg * (c - u) for c, u in zip(COND[label], UNCOND)])
            assert min(want) > 0.06
            draws = rows.flatten()
            for code, p in enumerate(want):
                freq = float((draws == code).float().mean())
                assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / draws.numel()), (cfg, label, code, freq, p)
        freq_a[cfg] = float((codes[:n] == 0).float().mean())
    # A for class 0: 1/(e^0.5+3) = 0.215, e/(e+3) = 0.475, e^2/(e^2+e^-0.5+2) = 0.739
    assert freq_a[0.0] < 0.3 < freq_a[1.0] < 0.6 < freq_a[2.0]
