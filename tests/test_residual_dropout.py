"""--residual-dropout: dropout on each decoder layer's attention and MLP outputs before the residual
add, as hooks on any transformers decoder; off in eval mode, and the saved model carries none."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ArraError
from pipeline.lm.causal_lm import add_residual_dropout, build_from_preset


def hidden_states(lm, ids):
    return lm(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def test_dropping_every_branch_leaves_each_layer_the_identity_and_eval_is_untouched():
    torch.manual_seed(0)
    lm = build_from_preset("tiny", 40, 16)
    ids = torch.randint(0, 40, (2, 9))
    lm.eval()
    plain = hidden_states(lm, ids)
    add_residual_dropout(lm, 1.0)          # every branch output zeroed
    assert all(torch.equal(a, b) for a, b in zip(hidden_states(lm, ids), plain))  # eval: no dropout
    lm.train()
    dropped = hidden_states(lm, ids)
    for k in range(1, len(dropped) - 1):  # only the residual stream is left: block k passes its input on
        assert torch.equal(dropped[k], dropped[0])  # (the last hidden state is after the final norm)
    assert not torch.equal(dropped[1], plain[1])


def test_half_of_each_branch_is_dropped_and_the_rest_scaled():
    torch.manual_seed(0)
    lm = build_from_preset("tiny", 40, 16).train()
    seen = []
    mlp = lm.model.layers[0].mlp
    mlp.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))  # before ours: the raw branch
    add_residual_dropout(lm, 0.5)
    kept = []
    mlp.register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))  # after ours
    lm(input_ids=torch.randint(0, 40, (4, 12)), use_cache=False)
    raw, out = seen[0], kept[0]
    zero = out == 0
    assert 0.45 < zero.float().mean() < 0.55
    torch.testing.assert_close(out[~zero], 2 * raw[~zero])


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ArraError, match="no decoder layers with self_attn and mlp"):
        add_residual_dropout(torch.nn.Linear(2, 2), 0.1)


def test_token_dropout_drops_input_embeddings_in_training_only():
    from pipeline.lm.causal_lm import add_token_dropout
    torch.manual_seed(0)
    lm = build_from_preset("tiny", 40, 16)
    add_token_dropout(lm, 0.5)
    ids = torch.randint(0, 40, (4, 12))
    raw = lm.get_input_embeddings().weight[ids]
    lm.eval()
    assert torch.equal(hidden_states(lm, ids)[0], raw)
    lm.train()
    dropped = hidden_states(lm, ids)[0]
    zero = dropped == 0
    assert 0.45 < zero.float().mean() < 0.55
    torch.testing.assert_close(dropped[~zero], 2 * raw[~zero])


def test_zero_init_head_starts_every_logit_at_zero():
    torch.manual_seed(0)
    lm = build_from_preset("tiny", 40, 16, zero_head=True)
    logits = lm(input_ids=torch.randint(0, 40, (2, 5)), use_cache=False).logits
    assert torch.equal(logits, torch.zeros_like(logits))
    assert build_from_preset("tiny", 40, 16).get_output_embeddings().weight.abs().sum() > 0
