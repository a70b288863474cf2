"""Stage 2 on CPU: DeepSpeed ZeRO-0/3 with two processes, exact resume, export, checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.featureset import FeatureSet

MINI = "data/fashion-mnist-mini"
TRAIN = ["--micro-batch", "8", "--steps", "20", "--lr", "3e-3", "--save-every", "10", "--no-progress",
         "--cond-dropout", "0.1", "--seed", "3"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def arra_pipe(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fmnist(run_extract_module):
    return run_extract_module(MINI, source_options={"split": "test"}, shard_size=128, batch_size=50)


@pytest.fixture(scope="module")
def zero3_run(fmnist, tmp_path_factory):
    run = tmp_path_factory.mktemp("z3") / "run"
    arra_pipe("train", fmnist, "--out", run, "--zero", "3", "--procs", "2", *TRAIN)
    return run


def falls(values: list[float]) -> bool:
    return np.mean(values[-4:]) < np.mean(values[:4])


def test_zero3_two_processes_ce_and_gva_fall(zero3_run):
    m = metrics(zero3_run)
    assert [r["step"] for r in m] == list(range(1, 21))
    assert falls([r["ce"] for r in m]) and falls([r["gva"] for r in m]), m
    config = json.loads((zero3_run / "train_config.json").read_text())
    assert config["world"] == 2 and config["deepspeed"]["zero_optimization"]["stage"] == 3
    assert config["teacher"] == "efficientnet-lite0" and config["teacher_dim"] == 1280


def test_zero0_two_processes_ce_and_gva_fall(fmnist, tmp_path):
    """Started by the DeepSpeed launcher (as --gpus is), which passes --local_rank to every rank."""
    run = tmp_path / "run"
    arra_pipe("train", fmnist, "--out", run, "--zero", "0", "--procs", "2", "--launcher", "deepspeed", *TRAIN)
    m = metrics(run)
    assert falls([r["ce"] for r in m]) and falls([r["gva"] for r in m]), m
    assert all(r["grad_norm"] > 0 for r in m)


def test_resume_after_a_stop_reproduces_the_losses(zero3_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    # a stop after step 10: the last checkpoint is step 10, the metrics went a bit further
    shutil.rmtree(run / "checkpoints" / "step00000020")
    (run / "checkpoints" / "latest").write_text("step00000010")
    arra_pipe("train", fmnist_path(zero3_run), "--out", run, "--zero", "3", "--procs", "2", *TRAIN)
    timing = ("tokens_per_s", "samples_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics(run)) == strip(metrics(zero3_run))


def fmnist_path(run: Path) -> str:
    return json.loads((run / "train_config.json").read_text())["sets"][0]


def test_export_loads_in_transformers_with_the_trained_logits(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    out = tmp_path / "hf"
    arra_pipe("export", zero3_run, "--out", out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    layout = json.loads((out / "arra_vocab.json").read_text())
    assert (out / "model.safetensors").exists() and (out / "arra_projector.safetensors").exists()
    assert layout["boi"] == layout["image_offset"] + 64 and layout["grid"] == [4, 4]
    assert layout["tokenizer"]["name"] == "kmeans" and len(layout["tokenizer"]["weights_sha256"]) == 64
    # DeepSpeed's own consolidation tool on our checkpoint gives the same weights
    consolidated = tmp_path / "fp32"
    tool = subprocess.run([sys.executable, str(zero3_run / "checkpoints" / "zero_to_fp32.py"),
                           str(zero3_run / "checkpoints"), str(consolidated)], capture_output=True, text=True, env=ENV)
    assert tool.returncode == 0, tool.stderr[-3000:]
    from safetensors.torch import load_file
    files = sorted(consolidated.glob("*.safetensors")) or sorted(consolidated.glob("*.bin"))
    state = {}
    for f in files:
        state.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    reference = LlamaForCausalLM(exported.config)
    reference.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("lm.")})
    ids = torch.tensor([[3, layout["boi"], *range(layout["image_offset"], layout["image_offset"] + 16)]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference.eval()(ids).logits)


def tiny_text_lm(path: Path, max_positions: int) -> Path:
    """A text-only causal LM directory (tiny Llama + BPE tokenizer), as `--model hf:PATH` expects."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from pipeline.text_tokenizer import train_bpe
    tokenizer = train_bpe(["a photo of a sneaker", "a photo of a bag", "an ankle boot"] * 20, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_mismatched_inputs_are_refused_before_the_model_is_built(fmnist, tmp_path, monkeypatch):
    import stages.train as train_stage
    from stages.train import TrainError, TrainOptions, train
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    built = []
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: built.append(a))
    monkeypatch.setattr(train_stage, "load_text_lm", lambda *a, **k: built.append(a))
    with pytest.raises(TrainError, match="no teacher column feat.clip-l; it has \\['efficientnet-lite0'\\]"):
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "a"), teacher="clip-l", progress=False))
    short = tiny_text_lm(tmp_path / "short-lm", max_positions=16)
    with pytest.raises(TrainError, match="need 28 positions .* max_position_embeddings 16"):
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "b"), model=f"hf:{short}", max_text_len=10,
                           progress=False))
    assert not built


def test_arra_variant_extends_a_text_lm_with_image_tokens(fmnist, tmp_path):
    from transformers import AutoModelForCausalLM
    lm = tiny_text_lm(tmp_path / "lm", max_positions=64)
    old = AutoModelForCausalLM.from_pretrained(lm).get_input_embeddings().weight.detach()
    run = tmp_path / "run"
    arra_pipe("train", fmnist, "--out", run, "--model", f"hf:{lm}", "--steps", "2", "--micro-batch", "4",
              "--lr", "0", "--max-text-len", "16", "--no-progress")
    arra_pipe("export", run, "--out", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    layout = json.loads((tmp_path / "hf" / "arra_vocab.json").read_text())
    emb = model.get_input_embeddings().weight.detach()
    assert layout["condition"] == "text" and layout["image_offset"] == old.shape[0]
    assert emb.shape[0] == layout["vocab_size"] == old.shape[0] + 64 + 2
    assert torch.equal(emb[:old.shape[0]], old)  # lr 0: the text rows are untouched
    assert torch.allclose(emb[old.shape[0]:], old.mean(0, keepdim=True).expand(66, -1))
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_init_from_another_tokenizer_or_grid_is_refused(zero3_run, run_extract_module, tmp_path, monkeypatch):
    from pipeline.tokenizers import save_kmeans_codebook
    from stages.train import TrainError, TrainOptions, train
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    export_dir = tmp_path / "hf"
    arra_pipe("export", zero3_run, "--out", export_dir)
    other = tmp_path / "other.safetensors"
    save_kmeans_codebook(other, np.random.default_rng(1).random((128, 12), dtype=np.float32), patch=2, resolution=8)
    other_set = run_extract_module(MINI, source_options={"split": "test"}, tokenizer_path=str(other), name="other")
    with pytest.raises(TrainError, match=r"trained on a \(4, 4\) grid, the sets have \(4, 4\)|image vocabulary"):
        train(TrainOptions(sets=[str(other_set)], run=str(tmp_path / "c"), init=str(export_dir), progress=False))


def test_training_never_imports_a_teacher(fmnist, tmp_path):
    code = (f"from stages.train import train, TrainOptions\n"
            f"train(TrainOptions(sets=[{str(fmnist)!r}], run={str(tmp_path / 'run')!r}, steps=2, micro_batch=4, progress=False))\n"
            "import sys\n"
            "bad = [m for m in sys.modules if m.startswith(('pipeline.teachers', 'pipeline.registry', 'efficientnet'))]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_lambda_zero_is_the_plain_baseline_with_the_same_lm_init(fmnist, tmp_path):
    from stages.export import consolidated_state_dict
    for lam in ("0", "1"):
        arra_pipe("train", fmnist, "--out", tmp_path / lam, "--lambda", lam, "--steps", "1", "--micro-batch", "4",
                  "--lr", "0", "--no-progress")
    plain = consolidated_state_dict(tmp_path / "0" / "checkpoints", None)
    arra = consolidated_state_dict(tmp_path / "1" / "checkpoints", None)
    assert not any(k.startswith("projector.") for k in plain) and any(k.startswith("projector.") for k in arra)
    assert all(torch.equal(v, arra[k]) for k, v in plain.items())
    assert "gva" not in metrics(tmp_path / "0")[0] and "gva" in metrics(tmp_path / "1")[0]


def test_training_reads_a_teacher_added_as_a_column(run_extract_module, tmp_path):
    import model_checkpoints as mc
    from conftest import TEACHER_RES, write_image
    from stages.extract import ExtractOptions, extract
    for i in range(24):
        write_image(tmp_path / "src" / f"c{i % 3}" / f"{i:02d}.png", seed=i)
    out = run_extract_module(tmp_path / "src", name="added", shard_size=8, batch_size=4)
    extract(ExtractOptions(source=None, out=str(out), teachers=("dinov2-s",),
                           teacher_paths={"dinov2-s": str(mc.write_dinov2(tmp_path / "dino", 384))},
                           teacher_resolution=TEACHER_RES, workers=0, progress=False, batch_size=4, shard_size=8),
            log=lambda m: None)
    assert "dinov2-s" in FeatureSet.open(out).columns
    run = tmp_path / "run"
    arra_pipe("train", out, "--out", run, "--teacher", "dinov2-s", "--steps", "2", "--micro-batch", "4", "--no-progress")
    config = json.loads((run / "train_config.json").read_text())
    assert (config["teacher"], config["teacher_dim"]) == ("dinov2-s", 384)
    assert all("gva" in r for r in metrics(run))
