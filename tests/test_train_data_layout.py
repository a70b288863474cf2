"""Training sequences of a text layout by hand: caption ids as the condition (the null caption for
dropped rows), and rows of mixed caption lengths, the shortest first, each laid out on its own."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import ArraError
from pipeline.lm.arra import IGNORE
from pipeline.data.train_data import Conditioner, make_sequences
from pipeline.lm.vocab import VocabLayout

# 5 text ids, 4 codes at 5..8, <boi> 9, <eoi> 10, pad 0
LAYOUT = VocabLayout("text", condition_vocab=5, codebook_size=4, grid=(1, 2), tokenizer={}, pad_id=0)


def letters(captions, max_length, **_):
    """A stand-in text tokenizer: a = 1, b = 2, ..., cut at max_length."""
    return {"input_ids": [[ord(ch) - 96 for ch in text][:max_length] for text in captions]}


def test_text_conditions_are_caption_ids_and_the_null_caption_when_dropped():
    conditioner = Conditioner(LAYOUT, letters, max_text_len=2)
    assert conditioner.null == []
    labels = np.array([0, 0, 0])
    assert conditioner(labels, ["ab", "cab", "d"], np.array([False, True, False])) == [[1, 2], [], [4]]


def test_rows_of_mixed_caption_lengths_shortest_first():
    codes = np.array([[0, 1], [2, 3]])
    ids, attn, labels, align = make_sequences(LAYOUT, [[1], [2, 3]], codes)
    x = IGNORE
    assert ids.tolist() == [[1, 9, 5, 6, 10, 0], [2, 3, 9, 7, 8, 10]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert labels.tolist() == [[x, x, 5, 6, 10, x], [x, x, x, 7, 8, 10]]
    assert align.astype(int).tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    _, _, _, boi = make_sequences(LAYOUT, [[1], [2, 3]], codes, "boi")
    assert boi.astype(int).tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]


def test_a_rep_layout_puts_rep_between_the_condition_and_boi_and_aligns_it_alone():
    """The paper's <REP>: one more row (11), after the caption; it predicts nothing (<boi> follows)."""
    codes = np.array([[0, 1], [2, 3]])
    layout = replace(LAYOUT, rep=True)
    assert (layout.rep_token, layout.vocab_size, layout.image_prefix) == (11, 12, [11, 9])
    ids, attn, labels, align = make_sequences(layout, [[1], [2, 3]], codes, "rep-token")
    x = IGNORE
    assert ids.tolist() == [[1, 11, 9, 5, 6, 10, 0], [2, 3, 11, 9, 7, 8, 10]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert labels.tolist() == [[x, x, x, 5, 6, 10, x], [x, x, x, x, 7, 8, 10]]
    assert align.astype(int).tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0]]
    _, _, _, image = make_sequences(layout, [[1], [2, 3]], codes, "image")   # <rep> is never an image position
    assert image.astype(int).tolist() == [[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]
    with pytest.raises(ArraError, match="rep-token needs a layout with a <rep> token"):
        make_sequences(LAYOUT, [[1]], codes[:1], "rep-token")
