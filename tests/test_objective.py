"""The ARRA objective pinned against a plain re-computation on a hand-built batch.

The batch is text-conditioned with captions of three lengths, so rows are right-padded by
different amounts. The expected CE, GVA and their gradients are computed here row by row and
position by position, each row run through the LM alone (no padding), the projector written out
as matrix products and the losses as sums: nothing of pipeline.lm.arra or pipeline.data.train_data is
used for the expected numbers.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.lm.arra import ARRAModel
from pipeline.lm.objective import Objective
from pipeline.data.train_data import IGNORE, make_sequences
from pipeline.lm.vocab import VocabLayout

LAYOUT = VocabLayout("text", condition_vocab=20, codebook_size=8, grid=(2, 2), tokenizer={}, pad_id=0)
REP = LAYOUT.eoi + 1                                      # the <rep> row a layout with `rep` adds
CONDITIONS = [[1, 5, 6], [1], [1, 7]]                     # captions of 3, 1 and 2 tokens
CODES = np.array([[0, 3, 5, 7], [2, 2, 6, 1], [4, 0, 3, 6]], dtype=np.uint16)
TEACHER_DIM, ALIGN_LAYER, LAM = 6, 1, 0.37
N = 4                                                     # image codes per row (2x2 grid)


def hand_row(i: int, positions: str) -> tuple[list[int], int, list[int]]:
    """Row i as `caption <boi> c1..c4 <eoi>` (`caption <rep> <boi> ...` for rep-token), where <boi>
    is, and the aligned positions: those whose next token is a code (<boi>..c3), <boi> alone, or <rep>."""
    cond = CONDITIONS[i]
    marks = [REP, LAYOUT.boi] if positions == "rep-token" else [LAYOUT.boi]
    seq = cond + marks + [LAYOUT.image_offset + int(x) for x in CODES[i]] + [LAYOUT.eoi]
    boi = len(cond) + len(marks) - 1
    return seq, boi, {"image": list(range(boi, boi + N)), "boi": [boi], "rep-token": [len(cond)]}[positions]


def hand_batch(positions: str):
    """The rows right-padded with pad_id; labels on the codes and <eoi>."""
    rows = [hand_row(i, positions) for i in range(len(CONDITIONS))]
    t = max(len(seq) for seq, _, _ in rows)
    ids = np.full((3, t), LAYOUT.pad_id, dtype=np.int64)
    attn = np.zeros((3, t), dtype=np.int64)
    labels = np.full((3, t), IGNORE, dtype=np.int64)
    align = np.zeros((3, t), dtype=bool)
    for i, (seq, boi, aligned) in enumerate(rows):
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        labels[i, boi + 1:len(seq)] = seq[boi + 1:]
        align[i, aligned] = True
    return ids, attn, labels, align


def tiny_arra(kind: str, lam: float = LAM, vocab: int = LAYOUT.vocab_size) -> ARRAModel:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=16))
    with torch.no_grad():  # weights of unit scale: a row's caption moves its hidden states, and so GVA
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 if p is lm.model.embed_tokens.weight else 0.3)
    model = ARRAModel(lm, TEACHER_DIM, Objective(lam=lam, align_layer=ALIGN_LAYER, align_loss=kind, projector_hidden=10))
    if model.projector is not None:
        with torch.no_grad():  # no zero biases: every weight of the projector shows in the numbers
            for p in model.projector.parameters():
                p.normal_(0, 0.5)
    return model


def teacher_rows() -> torch.Tensor:
    """Three clearly different targets, float16 as stored in a feature set."""
    return torch.tensor(np.random.default_rng(1).normal(size=(3, TEACHER_DIM)), dtype=torch.float16)


def expected_terms(model: ARRAModel, teacher: torch.Tensor, positions: str, kind: str):
    """(CE, GVA) computed plainly: each row alone through the LM, the hidden state of block 1 taken
    from the block itself, the projector as W2 gelu(W1 h + b1) + b2, losses as explicit sums."""
    captured = []
    hook = model.lm.model.layers[ALIGN_LAYER - 1].register_forward_hook(lambda m, a, out: captured.append(out))
    w1, b1 = model.projector[0].weight, model.projector[0].bias
    w2, b2 = model.projector[2].weight, model.projector[2].bias
    ce_terms, gva_per_row = [], []
    try:
        for i in range(len(CONDITIONS)):
            seq, boi, aligned = hand_row(i, positions)
            captured.clear()
            logits = model.lm(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
            hidden = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
            hidden = hidden[0]
            for t in range(boi, len(seq) - 1):         # <boi>..c4 predict c1..c4, <eoi>
                ce_terms.append(-torch.log_softmax(logits[t], dim=-1)[seq[t + 1]])
            target = teacher[i].float()
            row = []
            for p in aligned:
                a = w1 @ hidden[p] + b1
                s = w2 @ (0.5 * a * (1 + torch.erf(a / math.sqrt(2)))) + b2
                if kind == "cosine":
                    row.append(1 - (s * target).sum() / (s.norm() * target.norm()))
                else:
                    row.append(((s - target) ** 2).sum() / TEACHER_DIM)
            gva_per_row.append(sum(row) / len(row))
    finally:
        hook.remove()
    return sum(ce_terms) / len(ce_terms), sum(gva_per_row) / len(gva_per_row)


@pytest.mark.parametrize("positions", ["image", "boi", "rep-token"])
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_loss_is_ce_plus_lambda_gva_computed_by_hand(kind, positions):
    ids, attn, labels, align = hand_batch(positions)
    layout = replace(LAYOUT, rep=positions == "rep-token")
    for ours, hand in zip(make_sequences(layout, CONDITIONS, CODES, positions), (ids, attn, labels, align)):
        assert np.array_equal(ours, hand)
    model = tiny_arra(kind, vocab=layout.vocab_size)
    teacher = teacher_rows()
    loss, metrics = model(*(torch.from_numpy(a) for a in (ids, attn, labels, align)), teacher=teacher)
    ce, gva = expected_terms(model, teacher, positions, kind)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ce"], ce.detach(), **close)
    torch.testing.assert_close(metrics["gva"], gva.detach(), **close)
    torch.testing.assert_close(loss.detach(), (ce + LAM * gva).detach(), **close)
    # every row is aligned with its own target: another pairing gives another loss
    shifted = model(*(torch.from_numpy(a) for a in (ids, attn, labels, align)), teacher=teacher.roll(1, 0))[1]["gva"]
    assert abs(float(shifted) - float(gva.detach())) > 0.05

    names, params = zip(*model.named_parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True)
    ce_grad = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    gva_grad = torch.autograd.grad(gva, params, allow_unused=True)
    dense = lambda grads: {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}  # noqa: E731
    got, ce_grad, gva_grad = dense(got), dense(ce_grad), dense(gva_grad)
    above = ("lm.model.norm.", "lm.lm_head.") + tuple(f"lm.model.layers.{k}." for k in range(ALIGN_LAYER, 3))
    for name in names:
        g, gc, gg = got[name], ce_grad[name], gva_grad[name]
        torch.testing.assert_close(g, gc + LAM * gg, rtol=1e-4, atol=1e-6, msg=name)
        if name.startswith(above):                               # GVA stops at its layer
            assert not gg.any(), name
            torch.testing.assert_close(g, gc, rtol=1e-4, atol=1e-6, msg=name)
        elif name.startswith("projector."):                      # only GVA reaches the projector
            assert not gc.any() and gg.abs().max() > 1e-3, name
    for below in ("lm.model.embed_tokens.weight", "lm.model.layers.0.mlp.down_proj.weight"):  # and reaches below it
        assert gva_grad[below].abs().max() > 1e-4, below


def test_lambda_zero_has_no_projector_and_the_loss_is_ce():
    ids, attn, labels, align = hand_batch("image")
    model = tiny_arra("cosine", lam=0.0)
    loss, metrics = model(*(torch.from_numpy(a) for a in (ids, attn, labels, align)), teacher=teacher_rows())
    assert model.projector is None and "gva" not in metrics
    with_gva = tiny_arra("cosine")
    ce, _ = expected_terms(with_gva, teacher_rows(), "image", "cosine")  # same seed, same LM
    torch.testing.assert_close(loss.detach(), ce.detach(), rtol=1e-5, atol=1e-6)
