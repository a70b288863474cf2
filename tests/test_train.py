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

from pipeline.data.featureset import FeatureSet

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


def test_resume_across_an_epoch_with_dropout_accumulation_and_a_schedule_is_exact(fmnist, tmp_path):
    """500 rows, 8 x 2 per step: epoch 1 starts at step 31. Resuming from step 17 crosses into epoch 1
    (the stream is rebuilt there), resuming from step 34 starts inside it (epoch and position from
    the step); dropout draws from the restored generator; warm-up then cosine follow the step."""
    args = ["--micro-batch", "8", "--grad-accum", "2", "--steps", "36", "--save-every", "17", "--keep-checkpoints", "0",
            "--dropout", "0.1", "--warmup-steps", "3", "--schedule", "cosine", "--lr", "3e-3", "--seed", "5", "--no-progress"]
    whole = tmp_path / "whole"
    arra_pipe("train", fmnist, "--out", whole, *args)
    timing = ("tokens_per_s", "samples_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert [r["epoch"] for r in metrics(whole)][30:32] == [0, 1]
    for stop in ("step00000017", "step00000034"):
        run = tmp_path / stop
        shutil.copytree(whole, run)
        for later in sorted((run / "checkpoints").glob("step*")):
            if later.name > stop:
                shutil.rmtree(later)
        (run / "checkpoints" / "latest").write_text(stop)
        arra_pipe("train", fmnist, "--out", run, *args)
        assert strip(metrics(run)) == strip(metrics(whole)), stop


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
    from pipeline.lm.text_tokenizer import train_bpe
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
    # captions are cut as in training wherever the model goes: sampling reads the length from the layout,
    # and continuing it with another length is refused
    assert layout["max_text_len"] == 16
    from stages.train import TrainError, TrainOptions, train
    with pytest.raises(TrainError, match="trained with --max-text-len 16; pass the same \\(not 64\\)"):
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "adapt"), init=str(tmp_path / "hf"), progress=False))


@pytest.fixture(scope="module")
def zero0_export(fmnist, tmp_path_factory):
    """A one-process ZeRO-0 run (the whole module in one checkpoint file) and its export."""
    run = tmp_path_factory.mktemp("z0") / "run"
    arra_pipe("train", fmnist, "--out", run, "--zero", "0", "--steps", "3", "--micro-batch", "4", "--lr", "3e-3",
              "--no-progress")
    arra_pipe("export", run, "--out", run.parent / "hf")
    return run, run.parent / "hf"


def test_export_writes_the_weights_of_the_checkpoint(zero0_export):
    """Against the module state of the last checkpoint, read here with plain torch.load."""
    import importlib

    from safetensors.torch import load_file

    from pipeline.models.weights import DEEPSPEED_GLOBALS
    run, exported = zero0_export
    allowed = [getattr(importlib.import_module(m), n) for m, _, n in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    with torch.serialization.safe_globals(allowed):
        module = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    lm, projector = load_file(exported / "model.safetensors"), load_file(exported / "arra_projector.safetensors")
    assert {f"lm.{k}" for k in lm} | {f"projector.{k}" for k in projector} == set(module)
    for name, weight in module.items():
        got = lm[name[3:]] if name.startswith("lm.") else projector[name[len("projector."):]]
        assert got.dtype == torch.float32 and torch.equal(got, weight), name


def test_init_continues_from_the_exported_weights(zero0_export, fmnist, tmp_path):
    """ARRA-Adapt: `--init` starts from the exported LM, so two steps at lr 0 export it unchanged."""
    from safetensors.torch import load_file
    _, exported = zero0_export
    arra_pipe("train", fmnist, "--out", tmp_path / "adapt", "--init", exported, "--steps", "2", "--micro-batch", "4",
              "--lr", "0", "--no-progress")
    arra_pipe("export", tmp_path / "adapt", "--out", tmp_path / "hf")
    before, after = load_file(exported / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layout = lambda d: {k: v for k, v in json.loads((d / "arra_vocab.json").read_text()).items() if k != "training"}  # noqa: E731
    assert layout(tmp_path / "hf") == layout(exported)
    assert json.loads((tmp_path / "adapt" / "train_config.json").read_text())["model"] == str(exported)


def test_init_from_another_grid_or_codebook_is_refused(zero0_export, run_extract, tmp_path, monkeypatch):
    """A set of another grid meets the grid check; one of the same grid and size but another
    codebook meets the codebook check."""
    from conftest import write_image
    from pipeline.models.image_tokenizers import save_kmeans_codebook
    from stages.train import TrainError, TrainOptions, train
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # train() sets them for its one process
        monkeypatch.delenv(k, raising=False)
    for i in range(4):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i}.png", seed=i)
    rng = np.random.default_rng(1)
    cases = {"grid": (8, r"trained on a \(4, 4\) grid, the sets have \(2, 2\)"),     # 8 px in 4 px patches
             "codebook": (16, r"image vocabulary is 64 codes of tokenizer kmeans \(sha256 [0-9a-f]{12}\), "
                              r"the sets have 64 codes of kmeans")}
    for name, (resolution, message) in cases.items():
        book = tmp_path / f"{name}.safetensors"
        save_kmeans_codebook(book, rng.random((64, 48), dtype=np.float32), patch=4, resolution=resolution)
        run_extract(tmp_path / "src", out=tmp_path / name, tokenizer_path=str(book))
        with pytest.raises(TrainError, match=message):
            train(TrainOptions(sets=[str(tmp_path / name)], run=str(tmp_path / f"run-{name}"), init=str(zero0_export[1]),
                               steps=1, micro_batch=2, progress=False))



def test_init_from_a_model_without_rep_refuses_rep_token_alignment(zero0_export, fmnist, tmp_path, monkeypatch):
    from stages.train import TrainError, TrainOptions, train
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrainError, match="the model has no <rep> token for --align-positions rep-token"):
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "run"), init=str(zero0_export[1]), steps=1,
                           micro_batch=2, progress=False, align_positions="rep-token"))


def test_training_never_imports_a_teacher(fmnist, tmp_path):
    code = (f"from stages.train import train, TrainOptions\n"
            f"train(TrainOptions(sets=[{str(fmnist)!r}], run={str(tmp_path / 'run')!r}, steps=2, micro_batch=4, progress=False))\n"
            "import sys\n"
            "bad = [m for m in sys.modules if m.startswith(('pipeline.models.teachers', 'pipeline.models.registry', 'efficientnet'))]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_one_process_takes_no_port(fmnist, tmp_path):
    """A one-rank run binds no master port, so a port taken by another program between our choice and
    the bind (EADDRINUSE, seen in CI) cannot stop it: here the port it is told of is already taken."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken.getsockname()[1])}
        env.pop("WORLD_SIZE", None)
        done = subprocess.run([sys.executable, "-m", "stages.cli", "train", str(fmnist), "--out", str(tmp_path / "run"),
                               "--steps", "1", "--micro-batch", "4", "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 1


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
    from stages.add_columns import add_teachers
    from stages.options import ExtractOptions
    for i in range(24):
        write_image(tmp_path / "src" / f"c{i % 3}" / f"{i:02d}.png", seed=i)
    out = run_extract_module(tmp_path / "src", name="added", shard_size=8, batch_size=4)
    add_teachers(ExtractOptions(source=None, out=str(out), teachers=("dinov2-s",),
                                teacher_paths={"dinov2-s": str(mc.write_dinov2(tmp_path / "dino", 384))},
                                teacher_resolution=TEACHER_RES, workers=0, progress=False, batch_size=4, shard_size=8),
                 log=lambda m: None)
    assert "dinov2-s" in FeatureSet.open(out).columns
    run = tmp_path / "run"
    arra_pipe("train", out, "--out", run, "--teacher", "dinov2-s", "--steps", "2", "--micro-batch", "4", "--no-progress")
    config = json.loads((run / "train_config.json").read_text())
    assert (config["teacher"], config["teacher_dim"]) == ("dinov2-s", 384)
    assert all("gva" in r for r in metrics(run))
