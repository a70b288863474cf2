"""Chameleon-family LMs and checkpoints with image tokens of their own (issue 16, items 2 and 3):
the code -> token table and Lumina-mGPT's sequence layout counted by hand, sampling that draws only
codes and closes rows itself, ARRA on a tiny Chameleon checkpoint written in the published layout
(train, export, plain transformers load with the trained logits, sampling), and ARRA-Adapt from a
Lumina-mGPT-style directory and from a checkpoint whose layout file declares its image tokens."""

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
from pipeline.data.train_data import IGNORE, make_sequences
from pipeline.errors import ArraError
from pipeline.lm.generate import generate
from pipeline.lm.sampling import Sampling
from pipeline.lm.vocab import ImageTokens, VocabLayout

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

# text ids 0..4; codes 0..3 at ids 40, 30, 20, 10; <boi> 5, <eoi> 6, <sep> 7, size token 8, newline 9
TOKENS = ImageTokens(ids=(40, 30, 20, 10), boi=5, eoi=6, before_boi=(7,), after_boi=(8, 8), newline=9)
LAYOUT = VocabLayout("text", condition_vocab=50, codebook_size=4, grid=(2, 2), tokenizer={}, pad_id=0, native=TOKENS)


def arra_pipe(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_lumina_layout_of_a_2x2_grid_counted_by_hand():
    codes = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    ids, attn, labels, align = make_sequences(LAYOUT, [[1], [2, 3]], codes)
    x = IGNORE
    assert ids.tolist() == [[1, 7, 5, 8, 8, 40, 30, 9, 20, 10, 9, 6, 0],
                            [2, 3, 7, 5, 8, 8, 10, 20, 9, 30, 40, 9, 6]]
    assert attn.tolist() == [[1] * 12 + [0], [1] * 13]
    # every token after the size tokens is a target: codes, newlines and <eoi>
    assert labels.tolist() == [[x] * 5 + [40, 30, 9, 20, 10, 9, 6, x], [x] * 6 + [10, 20, 9, 30, 40, 9, 6]]
    # GVA: the positions whose next token is a code (the last size token, a row's codes but its last, a newline)
    assert align.astype(int).tolist() == [[0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0],
                                          [0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]]
    _, _, _, boi = make_sequences(LAYOUT, [[1], [2, 3]], codes, "boi")
    assert [list(np.flatnonzero(row)) for row in boi] == [[2], [3]]
    assert (LAYOUT.vocab_size, LAYOUT.image_offset, LAYOUT.tail_len, LAYOUT.pad) == (50, None, 11, 0)


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

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate takes the device from the parameters
        self.fed = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        self.fed.append(input_ids.tolist())
        logits = torch.zeros(input_ids.shape[0], 1, LAYOUT.vocab_size)
        logits[..., [1, 9, 40, 30, 20, 10]] = torch.tensor([100.0, 90.0, 4.0, 4.0, 5.0, 4.0])
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_sampling_draws_only_codes_and_puts_the_newline_at_each_row_end():
    model = Recorder()
    codes = generate(model, LAYOUT, [[1, 2]], [1], [0], Sampling(cfg=1.0, temperature=0))
    assert codes.tolist() == [[2, 2, 2, 2]]
    # the condition and prefix, then each drawn code as its token id, the newline after the first row
    assert model.fed == [[[1, 2, 7, 5, 8, 8]], [[20]], [[20]], [[9]], [[20]]]
    model = Recorder()
    codes = generate(model, LAYOUT, [[1, 2]] * 8, [1], list(range(8)), Sampling(cfg=3.0, temperature=2.0))
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
    assert layout.image_prefix == [vocab[n] for n in ("<reserved08706>", "<racm3:break>", "<reserved08802>", "<reserved08802>")]
    assert (layout.eoi, layout.newline) == (vocab["<eoss>"], vocab["<reserved08799>"])
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
    ids = torch.tensor([[1, 5, *layout.image_prefix]])
    with torch.no_grad():  # the logits generate reads are the head's, image tokens not masked
        assert torch.equal(model(input_ids=ids).logits, model.lm_head(model.model(ids).last_hidden_state))
    fed.clear()
    codes = generate(model, layout, [[1, 5]], [1], [0], Sampling(cfg=1.0, temperature=0))
    slots = layout.image_slots[:len(fed) - 1]                        # what each step after the prefix fed
    assert (np.array(fed[1:])[~slots] == layout.newline).all() and len(fed) - 1 == 4 * 5 - 2
    assert np.array_equal(np.array(fed[1:])[slots], layout.code_ids[codes[0, :-1].numpy()])
    assert torch.equal(codes, generate(model, layout, [[1, 5]], [1], [0], Sampling(cfg=1.0, temperature=0), kv_cache=False))
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
