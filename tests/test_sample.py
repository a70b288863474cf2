"""Sampling: full grids, KV cache = recomputation, CFG 1 = the conditional branch, seeds per image,
the batch drawn at once without host syncs, and the KV-cache API of transformers 5.17 and 5.24."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.lm.generate import Sampling, cache_keyword, generate, guide, sample_rows
from pipeline.lm.causal_lm import LAYOUT_FILE, build_from_preset
from pipeline.models.registry import build
from pipeline.lm.vocab import VocabLayout
from stages.cli import main


def tiny_export(path, codebook: str, classes: int = 3):
    """A randomly initialised class-conditional model in the export layout."""
    tok = build("tokenizers", "kmeans", codebook)
    ref = {"name": "kmeans", "weights_sha256": tok.weights_sha256, "weights_path": codebook,
           "resolution": tok.resolution, "grid": list(tok.grid), "codebook_size": tok.codebook_size}
    layout = VocabLayout("class", classes + 1, tok.codebook_size, tok.grid, ref)
    torch.manual_seed(0)
    model = build_from_preset("tiny", layout.vocab_size, layout.image_tokens + 3).eval()
    model.save_pretrained(path)
    (path / LAYOUT_FILE).write_text(json.dumps(layout.to_dict()))
    return model, layout


def test_every_sequence_is_a_full_grid_and_kv_cache_matches_recompute(codebook, tmp_path):
    model, layout = tiny_export(tmp_path, codebook)
    conds, seeds = [[0], [1], [2], [0]], [1, 2, 3, 4]
    for sampling in (Sampling(cfg=3.0, top_k=20, top_p=0.9), Sampling(cfg=1.0, temperature=0)):
        cached = generate(model, layout, conds, [layout.null_class], seeds, sampling)
        full = generate(model, layout, conds, [layout.null_class], seeds, sampling, kv_cache=False)
        assert cached.shape == (4, layout.image_tokens)
        assert int(cached.min()) >= 0 and int(cached.max()) < layout.codebook_size
        assert torch.equal(cached, full)


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: `.item()`/`bool()` on a tensor,
    data-sized outputs, and torch.multinomial (it checks its input with two `.item()` calls)."""

    NAMES = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.multinomial")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.NAMES):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_batch_is_drawn_at_once_as_multinomial_draws_each_row_without_host_syncs(codebook, tmp_path):
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    seeds = range(5)
    with HostSyncs() as syncs:
        tokens = sample_rows(logits, [torch.Generator().manual_seed(s) for s in seeds], Sampling())
        top = sample_rows(logits, [torch.Generator().manual_seed(s) for s in seeds], Sampling(top_k=10, top_p=0.9))
    assert syncs.ops == []
    # the very draw torch.multinomial makes per row: seeds recorded before give the same images
    expected = [torch.multinomial(row.softmax(-1), 1, generator=torch.Generator().manual_seed(s)) for row, s in zip(logits, seeds)]
    assert torch.equal(tokens, torch.cat(expected))
    assert all(t in row.topk(10).indices for t, row in zip(top, logits))

    model, layout = tiny_export(tmp_path, codebook)
    with HostSyncs() as syncs:  # class conditions need no padding, so no mask check either
        generate(model, layout, [[0], [1]], [layout.null_class], [1, 2], Sampling(cfg=2.0, top_k=20))
    assert syncs.ops == []


class PastKeyValues(torch.nn.Module):
    """A causal LM with transformers 5.17's KV-cache API: `past_key_values` in and out (no `cache`)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        name = cache_keyword(self.lm)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                      logits_to_keep=logits_to_keep, **{name: past_key_values})
        return SimpleNamespace(logits=out.logits, past_key_values=getattr(out, name))


def test_the_kv_cache_goes_by_the_name_the_models_forward_takes(codebook, tmp_path):
    model, layout = tiny_export(tmp_path, codebook)
    assert cache_keyword(PastKeyValues(model)) == "past_key_values"
    s = Sampling(cfg=2.0, top_k=20)
    old_api = generate(PastKeyValues(model), layout, [[0], [2]], [layout.null_class], [3, 4], s)
    assert torch.equal(old_api, generate(model, layout, [[0], [2]], [layout.null_class], [3, 4], s, kv_cache=False))


def test_cfg_one_is_the_conditional_branch_alone(codebook, tmp_path):
    model, layout = tiny_export(tmp_path, codebook)
    cond, uncond = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    one = Sampling(cfg=1.0)
    # with cfg 1 the null condition is never consulted; with cfg 3 it is
    a = generate(model, layout, [[1], [2]], [layout.null_class], [7, 8], one)
    b = generate(model, layout, [[1], [2]], [0], [7, 8], one)
    assert torch.equal(a, b)
    c = generate(model, layout, [[1], [2]], [layout.null_class], [7, 8], Sampling(cfg=3.0))
    d = generate(model, layout, [[1], [2]], [0], [7, 8], Sampling(cfg=3.0))
    assert not torch.equal(c, d)


def test_an_image_depends_on_its_seed_not_its_batch(codebook, tmp_path):
    model, layout = tiny_export(tmp_path, codebook)
    s = Sampling(cfg=2.0)
    together = generate(model, layout, [[0], [2]], [layout.null_class], [11, 12], s)
    alone = generate(model, layout, [[2]], [layout.null_class], [12], s)
    assert torch.equal(together[1], alone[0])


def test_sample_cli_writes_pngs_grid_and_jsonl(codebook, tmp_path):
    tiny_export(tmp_path / "model", codebook)
    out = tmp_path / "samples"
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "model"), "--out", str(out), "--n", "2",
                                       "--recipe", "sample-official", "--seed", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["class"] for r in rows] == [0, 0, 1, 1, 2, 2] and [r["seed"] for r in rows] == list(range(5, 11))
    assert rows[0]["cfg"] == 4.0 and rows[0]["top_k"] == 2000
    assert Image.open(out / rows[3]["file"]).size == (16, 16)
    assert Image.open(out / "grid.png").size == (32, 48)
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "model"), "--out", str(out), "--prompt", "a bag"])
    assert result.exit_code != 0 and "this model is class-conditioned: give --class, not --prompt" in result.output


def test_sample_refuses_a_different_tokenizer_and_says_where_the_moved_one_was(codebook, tmp_path):
    import shutil

    import numpy as np
    from pipeline.models.image_tokenizers import save_kmeans_codebook
    codebook = shutil.copy(codebook, tmp_path / "codebook.safetensors")
    tiny_export(tmp_path / "model", str(codebook))
    other = tmp_path / "other.safetensors"
    save_kmeans_codebook(other, np.zeros((64, 48), dtype=np.float32), patch=4, resolution=16)
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "model"), "--out", str(tmp_path / "s"),
                                       "--tokenizer-path", str(other), "--no-progress"])
    assert result.exit_code != 0 and "is not the kmeans tokenizer recorded" in result.output
    moved = tmp_path / "moved.safetensors"
    codebook.rename(moved)  # the recorded path is gone: say so and how to point at the weights
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "model"), "--out", str(tmp_path / "s"), "--no-progress"])
    assert result.exit_code != 0 and f"the kmeans image tokenizer is not at the recorded '{codebook}'" in result.output
    assert "Pass --tokenizer-path" in result.output
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "model"), "--out", str(tmp_path / "s"), "--no-progress",
                                       "--tokenizer-path", str(moved), "--class", "1"])
    assert result.exit_code == 0, result.output
