"""Sequence layout and the GVA position mask (the official code's negative slice got this wrong
for padded batches), plus the reader's rank split and determinism."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.lm.arra import ARRAModel
from pipeline.lm.objective import Objective
from pipeline.data.train_data import IGNORE, make_sequences
from pipeline.lm.vocab import VocabLayout

LAYOUT = VocabLayout("text", condition_vocab=50, codebook_size=16, grid=(2, 3), tokenizer={}, pad_id=0)


def test_mask_covers_exactly_the_positions_that_predict_image_codes_with_padding():
    conditions = [[1, 7, 8, 9, 10], [1], [1, 5, 6]]          # variable-length captions
    codes = np.arange(18).reshape(3, 6) % 16
    ids, attn, labels, align = make_sequences(LAYOUT, conditions, codes)
    assert ids.shape == (3, 5 + 6 + 2)
    for i, cond in enumerate(conditions):
        k = len(cond)
        row = ids[i]
        assert row[k] == LAYOUT.boi and row[k + 7] == LAYOUT.eoi
        is_image = (row >= LAYOUT.image_offset) & (row < LAYOUT.boi)
        predicts_image = np.zeros_like(is_image)
        predicts_image[:-1] = is_image[1:]                   # hidden state t predicts token t+1
        assert np.array_equal(align[i], predicts_image)
        assert not align[i][:k].any() and not align[i][attn[i] == 0].any()  # never text or padding
        assert np.array_equal(labels[i] != IGNORE, is_image | (row == LAYOUT.eoi) & (attn[i] == 1))
        assert attn[i].sum() == k + 8 and (row[attn[i] == 0] == LAYOUT.pad).all()


def test_a_row_is_laid_out_alike_alone_and_in_a_batch_of_other_lengths():
    """Equal-length batches take whole-batch slices, mixed ones go row by row: same layout."""
    conditions = [[1, 7, 8], [1], [1, 5]]
    codes = np.random.default_rng(0).integers(0, 16, (3, 6)).astype(np.uint16)
    for positions in ("image", "boi"):
        batch = make_sequences(LAYOUT, conditions, codes, positions)
        for i, cond in enumerate(conditions):
            alone = make_sequences(LAYOUT, [cond], codes[i:i + 1], positions)
            t = alone[0].shape[1]
            for together, single, fill in zip(batch, alone, (LAYOUT.pad, 0, IGNORE, False)):
                assert np.array_equal(together[i, :t], single[0]) and (together[i, t:] == fill).all()


def test_boi_aligns_only_the_boi_position():
    _, _, _, align = make_sequences(LAYOUT, [[1, 2], [1]], np.zeros((2, 6), dtype=np.uint16), "boi")
    assert align.sum() == 2 and align[0, 2] and align[1, 1]


def test_gva_sees_only_the_masked_hidden_states():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=LAYOUT.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32))
    model = ARRAModel(lm, 8, Objective(lam=1.0, align_layer=1))
    seen = []
    model.projector.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ids, attn, labels, align = (torch.from_numpy(a) for a in
                                make_sequences(LAYOUT, [[1, 7, 8], [1]], np.ones((2, 6), dtype=np.uint16)))
    loss, metrics = model(ids, attn, labels, align, torch.randn(2, 8))
    assert seen == [torch.Size([12, 16])]                    # 2 rows x 6 image positions, nothing else
    assert torch.isclose(loss, metrics["ce"] + metrics["gva"])
    # moving padding or text tokens' hidden states cannot change GVA at layer 0 (the embeddings)
    model0 = ARRAModel(lm, 8, Objective(lam=1.0, align_layer=0))
    feats = torch.randn(2, 8)
    base = model0(ids, attn, labels, align, feats)[1]["gva"]
    changed = ids.clone()
    changed[0, 1] = 30                                       # a caption token
    changed[1, -1] = 31                                      # padding
    assert torch.equal(model0(changed, attn, labels, align, feats)[1]["gva"], base)
