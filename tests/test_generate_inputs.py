"""What `generate` feeds the model, step by step, pinned on a recording stand-in: left padding and
its mask, position ids that number each row's real tokens from 0 (as in training, where rows are
right-padded), each sampled code fed back as its vocabulary id, in both halves of a guided batch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.lm.generate import Sampling, generate
from pipeline.lm.vocab import VocabLayout

# text ids 0..9 (pad 0), codes 10..13, <boi> 14, <eoi> 15
LAYOUT = VocabLayout("text", condition_vocab=10, codebook_size=4, grid=(1, 3), tokenizer={}, pad_id=0)
BOI = 14


class Recorder(torch.nn.Module):
    """Records each call's inputs; its logits make code (tokens the rows have seen) % 4 the most
    likely, the same for every row, so greedy sampling draws 0, 1, 2 after a 4-token prefix."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate takes the device from the parameters
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        self.calls.append(SimpleNamespace(ids=input_ids.tolist(), positions=position_ids.tolist(),
                                          mask=None if attention_mask is None else attention_mask.tolist()))
        seen = input_ids.shape[1] + (past_key_values or 0)
        logits = torch.zeros(input_ids.shape[0], 1, LAYOUT.vocab_size)
        logits[:, :, LAYOUT.image_offset + seen % LAYOUT.codebook_size] = 5.0
        return SimpleNamespace(logits=logits, past_key_values=seen)


def test_captions_of_two_lengths_are_left_padded_masked_and_numbered_from_zero():
    model = Recorder()
    codes = generate(model, LAYOUT, [[1, 5, 6], [1]], [1], [0, 1], Sampling(cfg=2.0, temperature=0))
    assert codes.tolist() == [[0, 1, 2], [0, 1, 2]]
    first, second, third = model.calls
    # rows: the two conditions, then the null condition for each (cfg != 1)
    assert first.ids == [[1, 5, 6, BOI], [0, 0, 1, BOI], [0, 0, 1, BOI], [0, 0, 1, BOI]]
    assert first.mask == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert first.positions == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    # then one new token per row (the KV cache holds the rest): the code drawn, as its vocabulary id
    assert second.ids == [[10]] * 4 and second.positions == [[4], [2], [2], [2]]
    assert second.mask == [[1] * 5, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert third.ids == [[11]] * 4 and third.positions == [[5], [3], [3], [3]]


def test_without_the_kv_cache_the_whole_prefix_is_fed_with_the_same_numbering():
    model = Recorder()
    generate(model, LAYOUT, [[1, 5, 6], [1]], [1], [0, 1], Sampling(cfg=1.0, temperature=0), kv_cache=False)
    last = model.calls[-1]
    assert last.ids == [[1, 5, 6, BOI, 10, 11], [0, 0, 1, BOI, 10, 11]]  # cfg 1: no null rows
    assert last.positions == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]


def test_rows_of_one_length_get_no_mask():
    model = Recorder()
    generate(model, LAYOUT, [[1, 5], [2, 7]], [3, 4], [0, 1], Sampling(cfg=2.0, temperature=0))
    assert [c.mask for c in model.calls] == [None, None, None]
    assert model.calls[0].positions == [[0, 1, 2]] * 4


def test_a_rep_layout_prompts_with_rep_before_boi_as_in_training():
    from dataclasses import replace
    model = Recorder()
    layout = replace(LAYOUT, rep=True)  # <rep> is row 16
    generate(model, layout, [[1, 5], [1]], [1], [0, 1], Sampling(cfg=1.0, temperature=0), kv_cache=False)
    assert model.calls[0].ids == [[1, 5, 16, BOI], [0, 1, 16, BOI]]
    assert model.calls[-1].positions == [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]]
