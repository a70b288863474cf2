"""Chameleon-family LMs and checkpoints with image tokens of their own (issue 16, items 2 and 3):
the code -> token table and Lumina-mGPT's sequence layout counted by hand (with the final <sep> and the
unconditional row from <boi>, also in Chameleon's own ids), sampling that draws only codes and closes
rows itself, ARRA on a tiny Chameleon checkpoint written in the published layout (train, export, plain
transformers load with the trained logits, sampling with and without KV cache), --image-head, and
ARRA-Adapt from a Lumina-mGPT-style directory and from a checkpoint whose layout file declares its
image tokens."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import model_checkpoints as mc
from conftest import write_image
from pipeline.data.train_data import IGNORE, Conditioner, make_sequences
from pipeline.errors import ArraError
from pipeline.lm.generate import generate
from pipeline.lm.sampling import Sampling
from pipeline.lm.vocab import ImageTokens, VocabLayout

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

# text ids 0..4; codes 0..3 at ids 40, 30, 20, 10; <boi> 5, <eoi> 6, <sep> 7, size token 8, newline 9
TOKENS = ImageTokens(ids=(40, 30, 20, 10), boi=5, eoi=6, before_boi=(7,), after_boi=(8, 8), newline=9, after_eoi=(7,),
                     uncond="from-boi")
LAYOUT = VocabLayout("text", condition_vocab=50, codebook_size=4, grid=(2, 2), tokenizer={}, pad_id=0, native=TOKENS)


def arra_pipe(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def words(captions, truncation, max_length):
    """A text tokenizer's call: BOS 0, then ids 11, 12, ... one a word."""
    return {"input_ids": [[0, *range(11, 11 + len(c.split()))][:max_length] for c in captions]}


def test_lumina_layout_of_a_2x2_grid_counted_by_hand():
    conditioner = Conditioner(LAYOUT, words, max_text_len=8)
    # the caption ends with <sep>; a dropped one leaves nothing before <boi> (no BOS either)
    conditions = conditioner(np.zeros(3), ["a", "a b", "a"], np.array([False, False, True]))
    assert conditions == [[0, 11, 7], [0, 11, 12, 7], []] and conditioner.null == []
    codes = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 1, 1]])
    ids, attn, labels, align = make_sequences(LAYOUT, conditions, codes)
    x = IGNORE
    assert ids.tolist() == [[0, 11, 7, 5, 8, 8, 40, 30, 9, 20, 10, 9, 6, 7, 0],
                            [0, 11, 12, 7, 5, 8, 8, 10, 20, 9, 30, 40, 9, 6, 7],
                            [5, 8, 8, 30, 30, 9, 30, 30, 9, 6, 7, 0, 0, 0, 0]]
    assert attn.tolist() == [[1] * 14 + [0], [1] * 15, [1] * 11 + [0] * 4]
    # every token after the size tokens is a target: codes, newlines, <eoi> and the final <sep>
    assert labels.tolist() == [[x] * 6 + [40, 30, 9, 20, 10, 9, 6, 7, x], [x] * 7 + [10, 20, 9, 30, 40, 9, 6, 7],
                               [x] * 3 + [30, 30, 9, 30, 30, 9, 6, 7, x, x, x, x]]
    # GVA: the positions whose next token is a code (the last size token, a row's codes but its last, a newline)
    assert align.astype(int).tolist() == [[0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0],
                                          [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0],
                                          [0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    _, _, _, boi = make_sequences(LAYOUT, conditions, codes, "boi")
    assert [list(np.flatnonzero(row)) for row in boi] == [[3], [4], [0]]
    assert (LAYOUT.vocab_size, LAYOUT.image_offset, LAYOUT.tail_len, LAYOUT.pad) == (50, None, 12, 0)
    assert (LAYOUT.prompt_end, LAYOUT.image_prefix, LAYOUT.image_suffix) == ([7], [5, 8, 8], [6, 7])


def meta_vocabulary() -> dict:
    """Chameleon 7B's ids of the tokens the layout uses (spec §3: <reservedNNNNN> is NNNNN + 4, <eoss>
    8196, <racm3:break> 8197); code c at id 4 + c (the codes' order plays no part here)."""
    vocab = {mc.image_token_name(c): 4 + c for c in range(8192)}
    return {**vocab, "<eoss>": 8196, "<racm3:break>": 8197, **{f"<reserved{n:05d}>": n + 4 for n in (8706, 8799, 8816)}}


def test_the_official_sequence_and_unconditional_row_in_chameleons_ids():
    """512 px: a 32x32 grid, <h> = <w> = <reserved08816> (16 cells of 2 codes) = 8820. Training:
    [BOS] caption 8710 8197 8820 8820 (32 codes 8803) x 32 8196 8710, targets from the first code to the
    last 8710; a dropped caption and the CFG branch alike: 8197 8820 8820 ..., as the official sampler's
    unconditional branch, which re-runs the model on the sequence from <boi> (no BOS)."""
    from pipeline.lm.image_vocab import lumina_tokens
    tokens = lumina_tokens(meta_vocabulary(), {"name": "chameleon", "codebook_size": 8192, "grid": [32, 32]}, "test")
    layout = VocabLayout("text", 8821, 8192, (32, 32), {}, pad_id=1, max_text_len=8, native=tokens)
    conditioner = Conditioner(layout, words, max_text_len=8)
    codes = np.random.default_rng(0).integers(0, 8192, (2, 1024))
    conditions = conditioner(np.zeros(2), ["a bag", "a bag"], np.array([False, True]))
    ids, attn, labels, _ = make_sequences(layout, conditions, codes)
    image = [[t for r in range(32) for t in [*(4 + codes[i, 32 * r:32 * r + 32]).tolist(), 8803]] for i in (0, 1)]
    assert ids[0].tolist() == [0, 11, 12, 8710, 8197, 8820, 8820, *image[0], 8196, 8710]
    assert labels[0].tolist() == [IGNORE] * 7 + [*image[0], 8196, 8710]
    assert ids[1, :attn[1].sum()].tolist() == [8197, 8820, 8820, *image[1], 8196, 8710]
    assert labels[1, :attn[1].sum()].tolist() == [IGNORE] * 3 + [*image[1], 8196, 8710]
    model = Recorder(layout.vocab_size)
    generate(model, layout, conditioner.encode(["a bag"]), conditioner.null, [0], Sampling(cfg=4.0, temperature=0))
    (first, *_), (mask, *_), (positions, *_) = model.fed, model.masks, model.positions
    real = [[t for t, m in zip(row, keep) if m] for row, keep in zip(first, mask)]
    assert real == [[0, 11, 12, 8710, 8197, 8820, 8820], [8197, 8820, 8820]]
    assert positions[1][-3:] == [0, 1, 2]  # the unconditional row starts at position 0, as it does alone


def test_a_native_layout_reads_back_from_arra_vocab_json_and_appended_ones_write_as_before():
    consecutive = replace(LAYOUT, native=ImageTokens(tuple(range(4, 8)), 8, 9))
    assert consecutive.to_dict()["native"]["image_ids"] == {"offset": 4}
    assert LAYOUT.to_dict()["native"]["image_ids"] == [40, 30, 20, 10]
    for layout in (LAYOUT, consecutive):
        assert VocabLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    appended = VocabLayout("class", 11, 16, (2, 3), {})
    assert "native" not in appended.to_dict() and appended.code_ids.tolist() == list(range(11, 27))
    with pytest.raises(ArraError, match="rep-token appends a <rep> row"):
        replace(LAYOUT, rep=True)


class Recorder(torch.nn.Module):
    """Records what each step feeds. Its logits favour a text token (1), then the newline (9), then
    code 2 (id 20): a sampler not restricted to the codes' ids, or one reading codes as an offset,
    draws something else."""

    def __init__(self, vocab: int = LAYOUT.vocab_size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate takes the device from the parameters
        self.vocab, self.fed, self.masks, self.positions = vocab, [], [], []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        self.fed.append(input_ids.tolist())
        self.masks.append(None if attention_mask is None else attention_mask.tolist())
        self.positions.append(position_ids.tolist())
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[..., [1, 9, 40, 30, 20, 10]] = torch.tensor([100.0, 90.0, 4.0, 4.0, 5.0, 4.0])
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_sampling_draws_only_codes_and_puts_the_newline_at_each_row_end():
    model = Recorder()
    codes = generate(model, LAYOUT, [[1, 2, 7]], [], [0], Sampling(cfg=1.0, temperature=0))
    assert codes.tolist() == [[2, 2, 2, 2]]
    # the condition and prefix, then each drawn code as its token id, the newline after the first row
    assert model.fed == [[[1, 2, 7, 5, 8, 8]], [[20]], [[20]], [[9]], [[20]]]
    model = Recorder()
    codes = generate(model, LAYOUT, [[1, 2, 7]] * 8, [], list(range(8)), Sampling(cfg=3.0, temperature=2.0))
    assert codes.shape == (8, 4) and ((codes >= 0) & (codes < 4)).all() and len(set(codes.flatten().tolist())) > 1
    assert all({t for row in step for t in row} <= {40, 30, 20, 10} for i, step in enumerate(model.fed[1:]) if i != 2)
    assert model.fed[3] == [[9]] * 16  # both halves of the guided batch


def test_a_chameleon_lm_needs_sets_of_chameleons_vqgan():
    from pipeline.lm.image_vocab import lumina_tokens
    vocab = {mc.image_token_name(c): 10 + c for c in range(16)}
    with pytest.raises(ArraError, match=r"--model hf:X: the model's image tokens are 16 codes of image tokenizer "
                                        r"'chameleon' .* the sets have 64 codes of 'kmeans' .*--tokenizer chameleon"):
        lumina_tokens(vocab, {"name": "kmeans", "codebook_size": 64, "grid": [4, 4]}, "--model hf:X")


# ---------------------------------------------------------------------------------------------
# end to end on tiny checkpoints


@pytest.fixture(scope="module")
def chameleon_set(run_extract_module, tmp_path_factory):
    """16 images coded by a tiny Chameleon VQGAN (8192 codes, 64 px -> 4x4), captions "a bag" / "a boot"."""
    root = tmp_path_factory.mktemp("chameleon-set")
    for i in range(16):
        write_image(root / "src" / ("a_bag" if i % 2 else "a_boot") / f"{i}.png", size=(64, 64), seed=i)
    vqgan = mc.write_chameleon(root / "tokenizer")
    return run_extract_module(root / "src", name="chameleon", tokenizer="chameleon", tokenizer_path=str(vqgan),
                              tokenizer_resolution=64)


@pytest.fixture(scope="module")
def arra_run(chameleon_set, tmp_path_factory):
    """ARRA from a tiny Chameleon checkpoint: two steps, exported."""
    root = tmp_path_factory.mktemp("arra-chameleon")
    lm = mc.write_chameleon_lm(root / "chameleon")
    arra_pipe("train", chameleon_set, "--out", root / "run", "--model", f"hf:{lm}", "--steps", "2", "--micro-batch", "4",
              "--lr", "1e-3", "--max-text-len", "8", "--no-progress")
    arra_pipe("export", root / "run", "--out", root / "hf")
    return lm, root / "run", root / "hf"


def test_export_loads_in_plain_transformers_with_the_trained_logits(arra_run):
    from transformers import ChameleonForConditionalGeneration

    from stages.export import consolidated_state_dict
    lm, run, out = arra_run
    exported = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ChameleonForConditionalGeneration"]
    trained = ChameleonForConditionalGeneration(exported.config).eval()
    state = consolidated_state_dict(run / "checkpoints", None)
    trained.load_state_dict({k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")})
    layout = VocabLayout.from_dict(json.loads((out / "arra_vocab.json").read_text()))
    ids = torch.tensor([[1, 5, *layout.image_prefix, *layout.code_ids[:6].tolist()]])
    with torch.no_grad():
        logits = [m.lm_head(m.model(ids).last_hidden_state) for m in (exported, trained)]
    assert torch.equal(*logits)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(0 < r["ce"] < 2 * math.log(exported.config.vocab_size) and r["gva"] > 0 for r in steps)
    # Chameleon's own image rows, found by name, in Lumina-mGPT's layout; nothing appended
    vocab = exported.config.vocabulary_map
    assert layout.vocab_size == exported.config.vocab_size == len(vocab)
    assert layout.code_ids.tolist() == [vocab[mc.image_token_name(c)] for c in range(8192)]
    sep = vocab["<reserved08706>"]
    assert layout.prompt_end + layout.image_prefix == [sep, *(vocab[n] for n in ("<racm3:break>", "<reserved08802>", "<reserved08802>"))]
    assert (layout.image_suffix, layout.newline) == ([vocab["<eoss>"], sep], vocab["<reserved08799>"])
    assert layout.drops_prompt and json.loads((run / "train_config.json").read_text())["image_head"] == "zero"
    # D8: the head's image rows started at zero (two Adam steps at lr 1e-3 move a weight by at most about 2e-3)
    rows = torch.as_tensor(layout.code_ids)
    original = ChameleonForConditionalGeneration.from_pretrained(lm).lm_head.weight[rows]
    assert original.abs().max() > 0.02 and exported.lm_head.weight[rows].abs().max() < 3e-3


def test_sampling_the_export_draws_codes_and_closes_each_row(arra_run, tmp_path):
    from pipeline.lm.causal_lm import load_lm
    from stages.sample import sample
    _, _, out = arra_run
    layout = VocabLayout.from_dict(json.loads((out / "arra_vocab.json").read_text()))
    model = load_lm(out).eval()
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, o: fed.append(args[0][0, -1].item()))
    cond = [1, 5, *layout.prompt_end]                                # a caption's ids end with <sep>
    ids = torch.tensor([cond + layout.image_prefix])
    with torch.no_grad():  # the logits generate reads are the head's, image tokens not masked
        assert torch.equal(model(input_ids=ids).logits, model.lm_head(model.model(ids).last_hidden_state))
    fed.clear()
    codes = generate(model, layout, [cond], [], [0], Sampling(cfg=1.0, temperature=0))
    slots = layout.image_slots[:len(fed) - 1]                        # what each step after the prefix fed
    assert (np.array(fed[1:])[~slots] == layout.newline).all() and len(fed) - 1 == 4 * 5 - 2
    assert np.array_equal(np.array(fed[1:])[slots], layout.code_ids[codes[0, :-1].numpy()])
    assert torch.equal(codes, generate(model, layout, [cond], [], [0], Sampling(cfg=1.0, temperature=0), kv_cache=False))
    # guided: the unconditional row (from <boi>, shorter, left-padded) gives the same codes either way
    for s in (Sampling(cfg=4.0, temperature=0), Sampling(cfg=4.0)):
        assert torch.equal(*(generate(model, layout, [cond, cond[1:]], [], [0, 1], s, kv_cache=kv) for kv in (True, False)))
    sample(str(out), str(tmp_path / "s"), prompts=["a bag"], n=2, sampling=Sampling(cfg=2.0), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["codes"]) == 16 and 0 <= min(r["codes"]) <= max(r["codes"]) < 8192 for r in rows)


def test_init_from_a_lumina_mgpt_directory_keeps_its_image_head(chameleon_set, tmp_path):
    """No arra_vocab.json, `architectures` naming Lumina-mGPT's own class: read as Chameleon, layout
    from its vocabulary_map; lr 0 exports the weights unchanged (the image rows are not zeroed)."""
    from safetensors.torch import load_file
    lumina = mc.write_chameleon_lm(tmp_path / "lumina", lumina=True)
    arra_pipe("train", chameleon_set, "--out", tmp_path / "adapt", "--init", lumina, "--steps", "1", "--micro-batch", "4",
              "--lr", "0", "--max-text-len", "8", "--no-progress")
    arra_pipe("export", tmp_path / "adapt", "--out", tmp_path / "hf")
    before, after = load_file(lumina / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    vocab = json.loads((lumina / "config.json").read_text())["vocabulary_map"]
    native = json.loads((tmp_path / "hf" / "arra_vocab.json").read_text())["native"]
    assert native["image_ids"] == [vocab[mc.image_token_name(c)] for c in range(8192)]
    assert (native["boi"], native["newline"]) == (vocab["<racm3:break>"], vocab["<reserved08799>"])


def test_image_head_zero_or_keep_whatever_the_start(chameleon_set, tmp_path):
    """--image-head against each start's default: zero from Lumina-mGPT (ARRA-Adapt, as the official code
    does, D8) leaves the head's image rows at zero and its text rows the checkpoint's; keep from a Chameleon
    (ARRA) leaves them all the checkpoint's. A resume with the other choice is refused, naming the flag."""
    from safetensors.torch import load_file

    from stages.train import TrainError, TrainOptions, check_same_options, open_sets, plan_model
    lm = mc.write_chameleon_lm(tmp_path / "lumina", lumina=True)
    head = load_file(lm / "model.safetensors")["lm_head.weight"]
    sets = open_sets([str(chameleon_set)], None, 0.0)[0]
    for start, choice in (({"init": str(lm)}, "zero"), ({"model": f"hf:{lm}"}, "keep")):
        opts = TrainOptions(sets=[str(chameleon_set)], run=str(tmp_path / "run"), image_head=choice, max_text_len=8,
                            **start)
        layout, build, _, _ = plan_model(opts, sets, tmp_path / "model", True)
        built = build().lm_head.weight.detach()
        image = torch.as_tensor(layout.code_ids)
        text = torch.ones(len(head), dtype=torch.bool).index_fill(0, image, False)
        assert torch.equal(built[text], head[text]) and head[image].abs().max() > 0
        assert torch.equal(built[image], torch.zeros_like(head[image]) if choice == "zero" else head[image])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"options": {"image_head": "zero"}}))
    with pytest.raises(TrainError, match="--image-head: was 'zero', now 'keep'"):
        check_same_options(tmp_path / "run", opts)


def write_layout_lm(folder, codes: int = 64):
    """A Llama whose last rows are image tokens (code c at a reversed id, listed in ids.txt), <boi>,
    <eoi> and a newline, declared by a layout file for the kmeans sets (64 codes, 4x4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.lm.text_tokenizer import train_bpe
    tokenizer = train_bpe(["a photo of a bag", "a photo of a boot", "an ankle boot"] * 20, 300)
    n = len(tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + codes + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "ids.txt").write_text("".join(f"{n + codes - 1 - c}\n" for c in range(codes)))
    layout = {"condition": "text", "tokenizer": "kmeans", "codebook_size": codes, "grid": [4, 4], "image_ids": "ids.txt",
              "boi": n + codes, "eoi": n + codes + 1, "newline": n + codes + 2}
    (folder / "arra_layout.json").write_text(json.dumps(layout))
    return folder, layout


def test_init_from_a_checkpoint_with_a_layout_file(run_extract_module, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from stages.train import TrainOptions, train
    for i in range(8):
        write_image(tmp_path / "src" / ("a_bag" if i % 2 else "a_boot") / f"{i}.png", seed=i)
    kmeans = run_extract_module(tmp_path / "src", name="kmeans")
    lm, declared = write_layout_lm(tmp_path / "lm")
    arra_pipe("train", kmeans, "--out", tmp_path / "adapt", "--init", lm, "--steps", "1", "--micro-batch", "4",
              "--lr", "0", "--max-text-len", "8", "--no-progress")
    arra_pipe("export", tmp_path / "adapt", "--out", tmp_path / "hf")
    before, after = load_file(lm / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    native = json.loads((tmp_path / "hf" / "arra_vocab.json").read_text())["native"]
    assert native["image_ids"] == [int(x) for x in (lm / "ids.txt").read_text().split()]
    assert (native["boi"], native["eoi"], native["newline"]) == (declared["boi"], declared["eoi"], declared["newline"])
    # a layout file for another grid or codebook than the sets', or with ids the model does not have, is refused
    # before any model is built, naming it
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train() sets them for its one process
        monkeypatch.delenv(k, raising=False)
    for change, message in (({"grid": [8, 8]}, "the model's image tokens are 64 codes of image tokenizer 'kmeans' on a [8, 8]"),
                            ({"codebook_size": 128}, "the model's image tokens are 128 codes"),
                            ({"image_ids": {"offset": declared["boi"] - 10}}, "ids outside the model's")):
        (lm / "arra_layout.json").write_text(json.dumps({**declared, **change}))
        with pytest.raises(ArraError, match=re.escape(f"{lm / 'arra_layout.json'}: {message}")):
            train(TrainOptions(sets=[str(kmeans)], run=str(tmp_path / "refused"), init=str(lm), steps=1, micro_batch=2,
                               max_text_len=8, progress=False))


def test_arra_from_chameleon_under_zero3_on_two_processes(chameleon_set, tmp_path):
    """The 7B recipe's path: the LM built partitioned, its head's image rows zeroed while gathered, the
    frozen VQ encoder consolidated with the rest: every other weight within two Adam steps of the checkpoint."""
    from safetensors.torch import load_file
    lm = mc.write_chameleon_lm(tmp_path / "chameleon")
    arra_pipe("train", chameleon_set, "--out", tmp_path / "run", "--model", f"hf:{lm}", "--zero", "3", "--procs", "2",
              "--steps", "2", "--micro-batch", "4", "--lr", "1e-3", "--max-text-len", "8", "--no-progress")
    arra_pipe("export", tmp_path / "run", "--out", tmp_path / "hf")
    before, after = load_file(lm / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    image = torch.as_tensor(VocabLayout.from_dict(json.loads((tmp_path / "hf" / "arra_vocab.json").read_text())).code_ids)
    text = torch.ones(len(before["lm_head.weight"]), dtype=torch.bool).index_fill(0, image, False)
    assert after["lm_head.weight"][image].abs().max() < 3e-3 < before["lm_head.weight"][image].abs().max()
    assert (after["lm_head.weight"][text] - before["lm_head.weight"][text]).abs().max() < 3e-3
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith("model.vqmodel."):
            assert torch.equal(after[k], before[k]), k
        elif k != "lm_head.weight":
            assert (after[k] - before[k]).abs().max() < 3e-3, k


def test_a_layout_file_that_does_not_parse_is_named(tmp_path):
    from pipeline.lm.image_vocab import read_layout_file
    file, tok = tmp_path / "arra_layout.json", {"name": "kmeans", "codebook_size": 4, "grid": [2, 2]}
    for text, message in (("{not json", "not a JSON layout file"), ("[1, 2]", "a layout file is one JSON object"),
                          (json.dumps({"tokenizer": "kmeans", "codebook_size": 4, "grid": [2, 2], "image_ids": "ids.txt",
                                       "boi": 4, "eoi": 5}), f"{tmp_path / 'ids.txt'} (image_ids of {file}): not a readable")):
        file.write_text(text)
        with pytest.raises(ArraError, match=re.escape(message)):
            read_layout_file(file, tok)
    (tmp_path / "ids.txt").write_text("0 1 two 3")
    with pytest.raises(ArraError, match=re.escape(f"{tmp_path / 'ids.txt'} (image_ids of {file}): not a readable list")):
        read_layout_file(file, tok)
    (tmp_path / "ids.txt").write_text("0 1 2 3")
    assert tuple(read_layout_file(file, tok).ids) == (0, 1, 2, 3)
