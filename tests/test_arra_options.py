"""ARRAModel's options pinned: the z-loss by hand and independent of GVA, which --align-layer values
are accepted, GVA without a teacher refused, and the defaults of the Python API equal to train's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.lm.arra import ARRAModel
from pipeline.lm.objective import Objective
from pipeline.data.train_data import IGNORE, make_sequences
from pipeline.lm.vocab import VocabLayout

LAYOUT = VocabLayout("class", condition_vocab=3, codebook_size=8, grid=(2, 2), tokenizer={})
LAYERS = 3


def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=LAYOUT.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=LAYERS, num_attention_heads=2, max_position_embeddings=16))
    with torch.no_grad():  # logits of a few units, so that logsumexp^2 is far from 0
        lm.lm_head.weight.normal_(0, 2.0)
    return lm


def batch():
    codes = np.array([[0, 3, 5, 7], [2, 2, 6, 1]], dtype=np.uint16)
    return tuple(torch.from_numpy(a) for a in make_sequences(LAYOUT, [[0], [1]], codes))


def z_by_hand(lm, ids, attn, labels) -> float:
    """Mean over the positions that predict a label of log(sum(exp(logits)))^2, in float64."""
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=attn).logits.double()
    terms = [logits[i, t].exp().sum().log() ** 2
             for i in range(ids.shape[0]) for t in range(ids.shape[1] - 1) if labels[i, t + 1] != IGNORE]
    assert len(terms) == 2 * (LAYOUT.image_tokens + 1)
    return float(sum(terms) / len(terms))


@pytest.mark.parametrize("lam", [0.0, 0.6])
def test_z_loss_is_the_mean_squared_logsumexp_and_independent_of_gva(lam):
    lm = tiny_lm()
    ids, attn, labels, align = batch()
    teacher = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    without = ARRAModel(lm, 6, Objective(lam=lam, z_loss=0.0))
    loss0, metrics0 = without(ids, attn, labels, align, teacher)
    assert "z" not in metrics0                                     # off means not computed
    with_z = ARRAModel(lm, 6, Objective(lam=lam, z_loss=0.25))
    with_z.projector = without.projector                           # the same GVA term in both
    loss, metrics = with_z(ids, attn, labels, align, teacher)
    z = z_by_hand(lm, ids, attn, labels)
    assert z > 1.0
    assert float(metrics["z"]) == pytest.approx(z, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(loss0.detach()) + 0.25 * z, rel=1e-5)
    assert ("gva" in metrics) == (lam > 0)


def test_align_layer_runs_from_the_embeddings_to_the_last_block():
    lm = tiny_lm()
    for layer in (0, LAYERS):
        assert ARRAModel(lm, 6, Objective(align_layer=layer)).objective.align_layer == layer
    with pytest.raises(ValueError, match=f"--align-layer {LAYERS + 1} is outside 0..{LAYERS}"):
        ARRAModel(lm, 6, Objective(align_layer=LAYERS + 1))
    with pytest.raises(ValueError, match="--align-layer must be >= 0, not -1"):
        Objective(align_layer=-1)


def test_gva_without_a_teacher_is_refused_and_lambda_zero_needs_none():
    lm = tiny_lm()
    for teacher_dim in (None, 0):
        with pytest.raises(ValueError, match="needs a teacher column"):
            ARRAModel(lm, teacher_dim, Objective(lam=0.5))
    assert ARRAModel(lm, None, Objective(lam=0.0)).projector is None
    widths = [m.weight.shape for m in ARRAModel(lm, 6, Objective(lam=0.5)).projector if isinstance(m, torch.nn.Linear)]
    assert widths == [(6, 16), (6, 6)]                             # hidden width defaults to the teacher's


def test_python_defaults_are_the_train_defaults():
    """benchmarks/gva_overhead.py builds ARRAModel with the default Objective: it is train's
    (--projector-hidden has none: the teacher's width)."""
    from stages.cli import main
    flags = {p.name: p.default for p in main.commands["train"].params}
    assert ARRAModel.__init__.__defaults__ == (Objective(),)
    assert vars(Objective()) == {"lam": 1.0, "align_layer": 1, "align_positions": "image", "align_loss": "cosine",
                                 "projector_hidden": None, "z_loss": 0.0}
    assert all(flags[k] == v for k, v in vars(Objective()).items())
