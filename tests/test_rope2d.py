"""2D RoPE over the image grid (issue 16, item 4; `--rope 2d`, LlamaGen's choice): the angles of a
2x3 grid counted by hand, the score between two image codes that follows their grid offset (not their
distance in the sequence), training and sampling that put every row's first code at one position,
and a tiny preset trained, exported and sampled with it (KV cache = recomputation, the layout telling
`sample` to install it, `--init` with the other kind refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import write_image
from pipeline.data.train_data import TrainStream
from pipeline.errors import ArraError
from pipeline.lm.causal_lm import build_from_preset, load_lm
from pipeline.lm.generate import generate
from pipeline.lm.rope2d import GridRotary, image_start, install, token_positions
from pipeline.lm.sampling import Sampling
from pipeline.lm.vocab import VocabLayout
from test_generate_inputs import LAYOUT as GENERATE_LAYOUT, Recorder

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# a 2x3 grid of 8 codes after captions of up to 2 tokens: code 0 sits at position 2 + 1 (<boi>) = 3
GRID = VocabLayout("text", condition_vocab=10, codebook_size=8, grid=(2, 3), tokenizer={}, pad_id=0, max_text_len=2,
                   rope="2d")


def test_the_angles_of_a_2x3_grid_after_a_2_token_caption_counted_by_hand():
    assert image_start(GRID) == 3
    rotary = GridRotary(head_dim=8, base=10000.0, start=3, width=3)
    # caption, caption, <boi>, codes (0,0) (0,1) (0,2) (1,0) (1,1) (1,2), <eoi>: (row, column) angles
    rows_cols = [(0, 0), (1, 1), (2, 2), (3, 3), (3, 4), (3, 5), (4, 3), (4, 4), (4, 5), (5, 3)]
    # head_dim 8: two pairs per half, LlamaGen's ladder over head_dim/2 = 4 dims: 1 and 10000 ** -0.5
    angles = torch.tensor([[r, r / 100, c, c / 100] for r, c in rows_cols])
    cos, sin = rotary(torch.zeros(1, 10, 8), torch.arange(10)[None])
    assert cos.shape == sin.shape == (1, 10, 8)
    assert torch.allclose(cos[0], torch.cat([angles, angles], -1).cos(), atol=1e-6)
    assert torch.allclose(sin[0], torch.cat([angles, angles], -1).sin(), atol=1e-6)
    # installed on a Llama preset in place of its 1D rotary module, for the layout's grid
    lm = install(build_from_preset("tiny", GRID.vocab_size, 16), GRID)
    assert isinstance(lm.model.rotary_emb, GridRotary)
    assert (lm.model.rotary_emb.head_dim, lm.model.rotary_emb.start, lm.model.rotary_emb.width) == (16, 3, 3)


def rotated_score(rotary, q: torch.Tensor, k: torch.Tensor, query_at: int, key_at: int) -> float:
    """The attention logit (unscaled) of a query at position `query_at` for a key at `key_at`, as
    transformers' Llama rotates them."""
    def turn(x, at):
        cos, sin = rotary(x, torch.tensor([[at]]))
        return apply_rotary_pos_emb(x, x, cos, sin)[0]
    return float((turn(q, query_at) * turn(k, key_at)).sum())


def test_the_score_of_two_codes_follows_their_grid_offset_not_their_distance_in_the_sequence():
    q, k = torch.randn(2, 1, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    start, width = 4, 3
    at = lambda r, c: start + r * width + c  # noqa: E731  a code's position on a 3x3 grid
    grid = GridRotary(16, 10000.0, start, width)
    flat = LlamaRotaryEmbedding(LlamaConfig(hidden_size=16, num_attention_heads=1))
    for rotary, same_distance_same_score in ((flat, True), (grid, False)):
        # (0,2) -> (1,0) and (0,0) -> (0,1): one step apart in the sequence, other offsets on the grid
        wrap = rotated_score(rotary, q, k, at(1, 0), at(0, 2))
        along = rotated_score(rotary, q, k, at(0, 1), at(0, 0))
        assert (abs(wrap - along) < 1e-5) == same_distance_same_score
    # one row down, both: the same offset, the same score
    assert rotated_score(grid, q, k, at(2, 0), at(1, 2)) == pytest.approx(rotated_score(grid, q, k, at(1, 0), at(0, 2)), abs=1e-5)
    assert rotated_score(grid, q, k, at(2, 1), at(1, 1)) == pytest.approx(rotated_score(grid, q, k, at(1, 1), at(0, 1)), abs=1e-5)


def test_training_and_sampling_put_every_row_s_first_code_at_one_position():
    """Captions of 3 and 1 tokens (max 4): code 0 is at 4 + 1 = 5 in both rows, right-padded in a
    training batch as left-padded in sampling; 1D keeps numbering each row's real tokens from 0."""
    layout = replace(GENERATE_LAYOUT, rope="2d", max_text_len=4)
    conditions, codes = [[1, 5, 6], [1]], np.array([[0, 1, 2], [3, 0, 1]])
    stream = object.__new__(TrainStream)  # only what a batch is made of
    stream.layout, stream.cond_dropout, stream.align_positions = layout, 0.0, "image"
    stream.conditioner = lambda labels, captions, drop: conditions
    batch = stream._batch({"label": np.zeros(2), "caption": [None, None], "codes": codes}, np.random.default_rng(0))
    assert batch["position_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 8, 8]]
    is_code = (batch["input_ids"] >= 10) & (batch["input_ids"] < 14)
    assert batch["position_ids"][is_code].view(2, 3).tolist() == [[5, 6, 7]] * 2
    model = Recorder()
    generate(model, layout, conditions, [1], [0, 1], Sampling(cfg=1.0, temperature=0), kv_cache=False)
    assert model.calls[-1].positions == [[1, 2, 3, 4, 5, 6], [3, 3, 3, 4, 5, 6]]  # ... <boi> at 4, codes from 5
    stream.layout = GENERATE_LAYOUT
    assert "position_ids" not in stream._batch({"label": np.zeros(2), "caption": [None, None], "codes": codes},
                                               np.random.default_rng(0))
    mask = torch.tensor([[0, 0, 1, 1]])
    assert token_positions(GENERATE_LAYOUT, mask, torch.tensor([2])).tolist() == [[0, 0, 0, 1]]


def test_a_2d_model_samples_the_same_codes_with_and_without_the_kv_cache():
    """Captions of different lengths and guidance: left padding, masks, and each row's own shift."""
    torch.manual_seed(0)
    lm = install(build_from_preset("tiny", GRID.vocab_size, 16), GRID).eval()
    for sampling in (Sampling(cfg=3.0, top_k=5), Sampling(cfg=1.0, temperature=0)):
        cached = generate(lm, GRID, [[1, 2], [3], [4, 5]], [0], [1, 2, 3], sampling)
        assert torch.equal(cached, generate(lm, GRID, [[1, 2], [3], [4, 5]], [0], [1, 2, 3], sampling, kv_cache=False))


def test_models_whose_rotary_module_is_not_a_llama_s_are_refused():
    config = SimpleNamespace(model_type="chameleon", rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                             head_dim=16, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ArraError, match="--rope 2d replaces the rotary module of a Llama.*this LM is chameleon"):
        install(SimpleNamespace(config=config), GRID)
    scaled = build_from_preset("tiny", GRID.vocab_size, 16)
    scaled.config.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ArraError, match="rope linear"):
        install(scaled, GRID)


def test_1d_is_the_default_and_layouts_written_before_2d_existed_read_as_1d():
    """1D numbers are today's (tests/test_sampling_numbers.py pins them, unchanged)."""
    from stages.options import TrainOptions
    assert TrainOptions(sets=[], run="").rope == "1d"
    flat = replace(GRID, rope="1d")
    assert VocabLayout.from_dict({k: v for k, v in flat.to_dict().items() if k != "rope"}) == flat
    assert VocabLayout.from_dict(GRID.to_dict()) == GRID


# ---------------------------------------------------------------------------------------------
# end to end: a tiny preset trained with --rope 2d, exported, sampled


def arra_pipe(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def rope2d_export(run_extract_module, tmp_path_factory):
    """16 images of two classes (4x4 codes), a tiny preset trained 2 steps with --rope 2d, exported."""
    root = tmp_path_factory.mktemp("rope2d")
    for i in range(16):
        write_image(root / "src" / ("bag" if i % 2 else "boot") / f"{i}.png", seed=i)
    sets = run_extract_module(root / "src", name="rope2d-set")
    arra_pipe("train", sets, "--out", root / "run", "--rope", "2d", "--steps", "2", "--micro-batch", "4",
              "--lr", "3e-3", "--no-progress")
    arra_pipe("export", root / "run", "--out", root / "hf")
    return sets, root / "hf"


def test_the_export_is_a_plain_llama_and_sample_installs_2d_rope_from_the_layout(rope2d_export, tmp_path, monkeypatch):
    import stages.sample
    _, out = rope2d_export
    layout = VocabLayout.from_dict(json.loads((out / "arra_vocab.json").read_text()))
    assert layout.rope == "2d" and layout.grid == (4, 4)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    plain, grid = load_lm(out).eval(), install(load_lm(out), layout).eval()
    ids = torch.tensor([[0, layout.boi, *layout.code_ids[:8].tolist()]])
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, grid(ids).logits)
    s = Sampling(cfg=2.0, top_k=20)
    cached = generate(grid, layout, [[0], [1]], [layout.null_class], [0, 1], s)
    assert torch.equal(cached, generate(grid, layout, [[0], [1]], [layout.null_class], [0, 1], s, kv_cache=False))
    installed = []
    monkeypatch.setattr(stages.sample, "install", lambda lm, lay: installed.append(lay.rope) or install(lm, lay))
    stages.sample.sample(str(out), str(tmp_path / "s"), classes=[0, 1], sampling=s, progress=False)
    assert installed == ["2d"]
    rows = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["codes"] for r in rows] == cached.tolist()


def test_training_builds_its_lm_with_2d_rope_and_init_needs_the_same(rope2d_export, tmp_path, monkeypatch):
    from stages.train import TrainError, TrainOptions, open_sets, plan_model, train
    sets, out = rope2d_export
    opened, _, _ = open_sets([str(sets)], None, 1.0)
    for rope, rotary in (("2d", GridRotary), ("1d", LlamaRotaryEmbedding)):
        opts = TrainOptions(sets=[str(sets)], run=str(tmp_path / rope), rope=rope)
        layout, build, _, _ = plan_model(opts, opened, tmp_path / rope, True)
        assert layout.rope == rope and isinstance(build().model.rotary_emb, rotary)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train() sets them for its one process
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrainError, match="trained with --rope 2d; pass the same \\(not 1d\\)"):
        train(TrainOptions(sets=[str(sets)], run=str(tmp_path / "run"), init=str(out), steps=1, micro_batch=2,
                           progress=False))
