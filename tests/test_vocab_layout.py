"""The vocabulary layout pinned to hand-counted ids: where the image codes start, <boi>, <eoi>, the
null class, padding, and what `arra_vocab.json` records and reads back."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.lm.vocab import VocabLayout

TOKENIZER = {"name": "kmeans", "weights_sha256": "ab" * 32, "resolution": 16}


def test_class_layout_ids_counted_by_hand():
    # 10 classes + the null class = ids 0..10, 16 codes = ids 11..26, <boi> 27, <eoi> 28
    layout = VocabLayout("class", condition_vocab=11, codebook_size=16, grid=(2, 3), tokenizer=TOKENIZER)
    assert (layout.image_offset, layout.boi, layout.eoi, layout.vocab_size) == (11, 27, 28, 29)
    assert layout.null_class == 10 and layout.image_tokens == 6
    assert layout.pad == 28  # a class layout pads with <eoi> (pad_id left at -1)


def test_text_layout_pads_with_the_tokenizers_pad_id():
    for pad_id in (0, 5):
        layout = VocabLayout("text", condition_vocab=100, codebook_size=8, grid=(4, 4), tokenizer=TOKENIZER, pad_id=pad_id)
        assert (layout.image_offset, layout.boi, layout.eoi, layout.vocab_size) == (100, 108, 109, 110)
        assert layout.pad == pad_id and layout.image_tokens == 16


def test_arra_vocab_json_records_every_id_and_reads_back():
    layout = VocabLayout("class", condition_vocab=11, codebook_size=16, grid=(2, 3), tokenizer=TOKENIZER)
    recorded = {"condition": "class", "condition_vocab": 11, "codebook_size": 16, "grid": [2, 3], "tokenizer": TOKENIZER,
                "pad_id": -1, "image_offset": 11, "boi": 27, "eoi": 28, "vocab_size": 29}
    assert {k: v for k, v in layout.to_dict().items() if k in recorded} == recorded
    assert VocabLayout.from_dict(layout.to_dict()) == layout
    text = VocabLayout("text", 100, 8, (4, 4), TOKENIZER, pad_id=3)
    assert VocabLayout.from_dict(text.to_dict()) == text
    # a file written before pad_id was recorded reads as a layout that pads with <eoi>
    old = {k: v for k, v in layout.to_dict().items() if k != "pad_id"}
    assert VocabLayout.from_dict(old) == layout and VocabLayout.from_dict(old).pad == 28


def test_a_layout_cannot_be_changed_after_it_is_made():
    layout = VocabLayout("class", 11, 16, (2, 3), TOKENIZER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.codebook_size = 32


def test_max_text_len_zero_means_not_recorded():
    # 0 is the "not recorded" value: sampling then cuts captions at train's default 64 and --init accepts
    # any --max-text-len. A class layout keeps 0, and an arra_vocab.json written before the caption
    # length was recorded must read as 0, not as a length that would cut captions.
    assert VocabLayout("class", 11, 16, (2, 3), TOKENIZER).max_text_len == 0
    assert VocabLayout("class", 11, 16, (2, 3), TOKENIZER).to_dict()["max_text_len"] == 0
    text = VocabLayout("text", 100, 8, (4, 4), TOKENIZER, pad_id=3, max_text_len=32)
    assert VocabLayout.from_dict(text.to_dict()).max_text_len == 32
    legacy = {k: v for k, v in text.to_dict().items() if k != "max_text_len"}
    assert VocabLayout.from_dict(legacy).max_text_len == 0


def test_a_layout_recorded_before_the_rep_token_has_none_and_a_rep_layout_keeps_it():
    text = VocabLayout("text", 100, 8, (4, 4), TOKENIZER, pad_id=3, max_text_len=32)
    legacy = {k: v for k, v in text.to_dict().items() if k != "rep"}   # an arra_vocab.json of before
    assert VocabLayout.from_dict(legacy) == text and VocabLayout.from_dict(legacy).vocab_size == 110
    rep = dataclasses.replace(text, rep=True)
    assert VocabLayout.from_dict(rep.to_dict()) == rep and (rep.rep_token, rep.vocab_size) == (110, 111)
