"""FLAN-T5 caption features (LlamaGen's text-to-image condition) as a cached column: extracted once
by a T5 encoder in the published on-disk format, trained on from the shards alone, exported with
the caption embedder beside the LM, and sampled with the recorded encoder on the prompts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_image
from pipeline.data.featureset import FeatureSet
from pipeline.data.jobs import JobError
from pipeline.data.train_data import Conditioner, TrainStream
from pipeline.lm.caption_prefix import CaptionEmbedder
from pipeline.lm.vocab import VocabLayout

ENCODER, COLUMN, DIM, TOKENS = "flan-t5-xl", "caption.flan-t5-xl", 2048, 120
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
CAPTIONS = ["a red cat", "the blue shirt on a dog", "shoe", "", "a bag with a shoe", "the cat and the dog",
            "red blue " * 80, "a dog"]  # the seventh is 161 tokens long: cut at 120


def write_t5(folder: Path, seed: int = 0) -> Path:
    """A tiny random T5 (FLAN-T5-XL's width, 2 layers) as google/flan-t5-xl publishes it: config.json,
    sharded safetensors with model.safetensors.index.json, and the fast tokenizer's tokenizer.json
    (a Unigram model over a few words and letters, </s> appended, pad 0 / eos 1 / unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5ForConditionalGeneration
    words = "a the cat dog red blue shirt shoe bag on of and with".split()
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"])
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=DIM, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True, max_shard_size="4MB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def captioned_folder(root: Path, captions=CAPTIONS) -> Path:
    """An image folder of two classes whose images have .txt captions beside them."""
    for i, caption in enumerate(captions):
        image = write_image(root / f"class{i % 2}" / f"im{i}.png", seed=i)
        image.with_suffix(".txt").write_text(caption)
    return root


def arra_pipe(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return write_t5(tmp_path_factory.mktemp("t5") / "flan-t5-xl")


@pytest.fixture(scope="module")
def captioned(t5, run_extract_module, tmp_path_factory):
    source = captioned_folder(tmp_path_factory.mktemp("src") / "images")
    return run_extract_module(source, "captioned", caption_encoder=ENCODER, caption_encoder_path=str(t5))


def test_the_column_is_a_direct_t5_encoder_forward_cut_at_120_tokens(t5, captioned):
    from transformers import PreTrainedTokenizerFast, T5EncoderModel
    fs = FeatureSet.open(captioned)
    record = fs.manifest["caption_encoder"]
    assert (record["name"], record["dim"], record["max_tokens"]) == (ENCODER, DIM, TOKENS)
    assert fs.columns[COLUMN]["kind"] == "caption" and fs.captions[COLUMN]["weights_sha256"] == record["weights_sha256"]
    assert fs.verify() == []
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(t5 / "tokenizer.json"))
    net = T5EncoderModel.from_pretrained(t5, use_safetensors=True).eval()
    table = fs.table([COLUMN])
    lengths = []
    for caption, stored in zip(table.column("caption").to_pylist(), table.column(COLUMN).to_pylist()):
        ids = tokenizer(caption)["input_ids"]
        ids = ids if len(ids) <= TOKENS else ids[:TOKENS - 1] + [1]  # truncated, </s> kept last
        with torch.no_grad():
            direct = net(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(np.asarray(stored, dtype=np.float32), direct.astype(np.float16).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
        lengths.append(len(stored))
    assert max(lengths) == TOKENS and min(lengths) == 1  # the long caption is cut; "" is </s> alone


def test_extraction_refuses_a_source_without_captions_an_old_set_and_another_encoder(t5, run_extract, tmp_path):
    bare = tmp_path / "bare"
    for i in range(3):
        write_image(bare / f"im{i}.png", seed=i)  # no class folder, no .txt: every caption is empty
    with pytest.raises(JobError, match=f"--caption-encoder {ENCODER}: .*has no captions"):
        run_extract(bare, tmp_path / "bare-set", caption_encoder=ENCODER, caption_encoder_path=str(t5))
    source = captioned_folder(tmp_path / "src", CAPTIONS[:3])
    run_extract(source, tmp_path / "plain")
    with pytest.raises(JobError, match="without caption.flan-t5-xl: --caption-encoder"):
        run_extract(source, tmp_path / "plain", caption_encoder=ENCODER, caption_encoder_path=str(t5))
    run_extract(source, tmp_path / "with", caption_encoder=ENCODER, caption_encoder_path=str(t5))
    other = write_t5(tmp_path / "other-t5", seed=1)
    with pytest.raises(JobError, match="different extraction"):
        run_extract(source, tmp_path / "with", caption_encoder=ENCODER, caption_encoder_path=str(other))


def stream(fs: FeatureSet, cond_dropout: float) -> TrainStream:
    layout = VocabLayout("caption-features", 1, 64, tuple(fs.manifest["tokenizer"]["grid"]), {}, max_text_len=TOKENS)
    return TrainStream([fs], None, layout, 8, cond_dropout=cond_dropout, conditioner=Conditioner(layout), captions=COLUMN)


def test_batches_carry_right_aligned_features_and_cond_dropout_one_only_the_unconditional(captioned):
    fs = FeatureSet.open(captioned)
    stored = {k: np.asarray(v, dtype=np.float16) for k, v in
              zip(fs.table([COLUMN]).column("key").to_pylist(), fs.table([COLUMN]).column(COLUMN).to_pylist())}
    batch = next(stream(fs, 0.0).epoch(0))
    assert (batch["input_ids"][:, :TOKENS] == 0).all() and (batch["labels"][:, :TOKENS + 1] == -100).all()
    assert sorted(batch["caption_len"].tolist()) == sorted(len(v) for v in stored.values())
    for caption, n in zip(batch["caption"], batch["caption_len"].tolist()):
        assert (caption[:TOKENS - n] == 0).all()
        assert any(np.array_equal(caption[TOKENS - n:].numpy(), v) for v in stored.values() if len(v) == n)
    dropped = next(stream(fs, 1.0).epoch(0))
    assert (dropped["caption_len"] == 0).all()
    embedder = CaptionEmbedder(DIM, 64, TOKENS)
    with torch.no_grad():
        out = embedder(dropped["caption"], dropped["caption_len"])
        torch.testing.assert_close(out, embedder.mlp(embedder.uncond).expand_as(out))


def test_the_guidance_branch_and_the_lm_prefix_are_the_embedder_s(captioned):
    from pipeline.lm.causal_lm import build_from_preset
    from stages.sample import feeding
    fs = FeatureSet.open(captioned)
    features = [np.asarray(v, dtype=np.float16) for v in fs.table([COLUMN]).column(COLUMN).to_pylist()[:2]]
    embedder = CaptionEmbedder(DIM, 64, TOKENS)
    lm = build_from_preset("tiny", 80, TOKENS + 20)
    embedder.attach(lm)
    ids = torch.zeros((4, TOKENS + 3), dtype=torch.long)
    with torch.no_grad(), feeding(embedder, features, True, torch.device("cpu")):
        assert embedder.fed[1].tolist() == [len(features[0]), len(features[1]), 0, 0]
        prefix = embedder(*embedder.fed)
        embedded = lm.get_input_embeddings()(ids)
        step = lm.get_input_embeddings()(ids[:, :1])  # a cached generation step passes through
    uncond = embedder.mlp(embedder.uncond)
    torch.testing.assert_close(prefix[2:], uncond.expand(2, -1, -1).detach())
    torch.testing.assert_close(embedded[:, :TOKENS], prefix)
    torch.testing.assert_close(step, lm.get_input_embeddings().weight[:1].expand(4, 1, -1).detach())
    with pytest.raises(Exception, match="without caption features"):
        lm.get_input_embeddings()(ids)


def test_train_export_sample_end_to_end_never_loading_t5_in_train(captioned, tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    code = (f"from stages.train import train, TrainOptions\n"
            f"train(TrainOptions(sets=[{str(captioned)!r}], run={str(run)!r}, steps=2, micro_batch=4, progress=False, "
            "condition='caption-features', cond_dropout=0.5, lam=0.5, rope='2d'))\n"
            "import sys\n"
            "bad = [m for m in sys.modules if m.startswith(('pipeline.models.caption_encoder', 'pipeline.models.registry', 'transformers.models.t5'))]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    arra_pipe("export", run, "--out", model)
    from safetensors.torch import load_file
    layout = json.loads((model / "arra_vocab.json").read_text())
    assert layout["condition"] == "caption-features" and layout["captions"]["column"] == COLUMN
    assert layout["captions"]["encoder"]["weights_sha256"] == FeatureSet.open(captioned).captions[COLUMN]["weights_sha256"]
    weights = load_file(str(model / layout["captions"]["file"]))
    assert sorted(weights) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "uncond"]
    assert weights["uncond"].shape == (TOKENS, DIM)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe blue shirt\n")
    arra_pipe("sample", model, "--out", tmp_path / "samples", "--prompts", prompts, "--n", "2", "--cfg", "3", "--no-progress")
    rows = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red cat"] * 2 + ["the blue shirt"] * 2
    assert all((tmp_path / "samples" / r["file"]).is_file() for r in rows)


def test_training_refuses_sets_without_the_column_and_models_that_are_no_preset(captioned, run_extract, tmp_path):
    from stages.train import TrainError, TrainOptions, caption_source, train
    _, plain = run_extract(captioned_folder(tmp_path / "src", CAPTIONS[:4]), tmp_path / "plain")
    with pytest.raises(TrainError, match=f"{plain}: no caption-feature column for --condition caption-features; "
                                         "extract the set with --caption-encoder"):
        train(TrainOptions(sets=[str(plain)], run=str(tmp_path / "run"), condition="caption-features", steps=1))
    sets = [FeatureSet.open(captioned)]
    for other in ({"model": "hf:/some/lm"}, {"init": str(tmp_path)}):
        opts = TrainOptions(sets=[str(captioned)], run=str(tmp_path / "run"), condition="caption-features", **other)
        with pytest.raises(TrainError, match="caption-features is for presets"):
            caption_source(opts, sets)


def test_a_damaged_caption_column_or_embedder_is_refused_by_name(captioned, tmp_path):
    import shutil
    from safetensors.torch import save_file
    from pipeline.data.featureset import FeatureSetError
    from pipeline.errors import ArraError
    from pipeline.lm.caption_prefix import load_embedder
    copy = tmp_path / "set"
    shutil.copytree(captioned, copy)
    tar = copy / FeatureSet.open(copy).columns[COLUMN]["shards"][0]["name"]
    tar.write_bytes(tar.read_bytes()[:-700])
    with pytest.raises(FeatureSetError, match=f"{COLUMN}/.*truncated or replaced.*extract --overwrite"):
        FeatureSet.open(copy).table([COLUMN])
    assert any(COLUMN in p for p in FeatureSet.open(copy).verify())
    save_file({"uncond": torch.zeros(TOKENS, 8)}, str(tmp_path / "arra_captions.safetensors"))
    record = {"file": "arra_captions.safetensors", "dim": DIM, "tokens": TOKENS}
    with pytest.raises(ArraError, match="arra_captions.safetensors: not the caption embedder"):
        load_embedder(tmp_path, record, 64)


def test_a_sharded_checkpoint_index_names_only_files_beside_it(tmp_path):
    """The shards an index names are hashed with it: plain file names in the checkpoint folder only (a
    path out of it is refused, not read), and an index that is not one is refused naming it."""
    from pipeline.models.weights import WeightsError, checkpoint_files
    spec = {"name": "flan-t5-xl", "files": ["config.json", "model.safetensors.index.json|model.safetensors"]}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-1.safetensors").write_bytes(b"x")
    (tmp_path.parent / "outside.safetensors").write_bytes(b"secret")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors"}}))
    assert checkpoint_files(spec, tmp_path) == [tmp_path / "config.json", index, tmp_path / "model-1.safetensors"]
    for shard in ("../outside.safetensors", str(tmp_path.parent / "outside.safetensors"), ".."):
        index.write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(WeightsError, match=f"{re.escape(str(index))} names shards that are not plain file names"):
            checkpoint_files(spec, tmp_path)
    for text in ("{not json", "[1, 2]", json.dumps({"weight_map": {"a": 1, "b": "x"}})):
        index.write_text(text)
        with pytest.raises(WeightsError, match=f"{re.escape(str(index))} is not a checkpoint index"):
            checkpoint_files(spec, tmp_path)
