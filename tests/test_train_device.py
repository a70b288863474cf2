"""Training code paths that only a GPU takes, run on the CPU: the step's figures on the device given,
the GPU generator in the resume state, ranks bound to their GPU while prefetching, the GPU precision
config (fp32 masters under bf16 autocast), ZeRO-3 built partitioned and activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.data.prefetch import Prefetch
from pipeline.models.weights import deepspeed_loads_weights_only, load_torch
from stages.train import (TrainError, TrainOptions, deepspeed_config, rank_state, restore_rank_state, resume_tag,
                          step_figures)
from test_train import MINI, arra_pipe, metrics, tiny_text_lm

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fmnist(run_extract_module):
    return run_extract_module(MINI, source_options={"split": "test"}, shard_size=128, batch_size=50)


# ---------------------------------------------------------------------------------------------
# the step's figures


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_step_figures_are_reduced_on_the_device_given(device, monkeypatch):
    """On `meta` a figure made on the CPU (as `torch.tensor(float(tokens))` was) cannot join the
    losses, as it could not on CUDA; the all-reduce gets the device tensor NCCL needs."""
    device = torch.device(device)
    reduced_on = []

    def all_reduce(tensor, *args, **kwargs):  # two ranks with the same figures
        reduced_on.append(tensor.device)
        if device.type == "cpu":
            tensor.mul_(2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    sums = {"loss": torch.tensor(5.0, device=device), "ce": torch.tensor(3.0, device=device)}
    names, figures = step_figures(sums, 2, 100, 8, 2, device, grad_norm=torch.tensor(0.5, device=device))
    assert reduced_on == [device] and figures.device == device
    if device.type == "cpu":  # losses averaged over micro-steps and ranks, counts summed, the norm as it was
        assert dict(zip(names, figures.tolist())) == {"ce": 1.5, "loss": 2.5, "tokens": 200, "samples": 16, "grad_norm": 0.5}
        names, figures = step_figures(sums, 1, 100, 8, 1, device, grad_norm=3.0)
        assert dict(zip(names, figures.tolist())) == {"ce": 3, "loss": 5, "tokens": 100, "samples": 8, "grad_norm": 3}


# ---------------------------------------------------------------------------------------------
# resume state


def test_resume_state_holds_and_restores_the_gpu_generator(monkeypatch, tmp_path):
    calls = []
    gpu_state = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state.tolist(), device)))
    gpu = torch.device("cuda", 3)
    torch.manual_seed(5)
    torch.save(rank_state(7, 4, gpu), tmp_path / "arra_state_rank3.pt")
    expected = torch.rand(4)
    state = load_torch(tmp_path / "arra_state_rank3.pt")  # as resume reads it: weights only
    assert (state["step"], state["world"]) == (7, 4) and torch.equal(state["cuda_rng"], gpu_state)
    restore_rank_state(state, gpu)
    assert torch.equal(torch.rand(4), expected)
    assert calls == [("get", gpu), ("set", gpu_state.tolist(), gpu)]
    assert "cuda_rng" not in rank_state(1, 1, torch.device("cpu"))


def test_a_checkpoint_resumes_only_with_as_many_ranks_as_wrote_it(tmp_path):
    for name, world in (("new", 2), ("old", None)):  # old: written before the world size was recorded
        ckpt = tmp_path / name
        (ckpt / "step00000010").mkdir(parents=True)
        (ckpt / "latest").write_text("step00000010")
        for rank in range(2):
            state = rank_state(10, world, torch.device("cpu"))
            torch.save({k: v for k, v in state.items() if v is not None}, ckpt / "step00000010" / f"arra_state_rank{rank}.pt")
        assert resume_tag(ckpt, 2) == "step00000010"
        for other in (1, 4):
            with pytest.raises(TrainError, match=f"step00000010 was written by 2 ranks and this run has {other}"):
                resume_tag(ckpt, other)
    assert resume_tag(tmp_path / "none", 3) is None


# ---------------------------------------------------------------------------------------------
# prefetch


def test_prefetch_keeps_the_order_and_raises_where_the_error_happened():
    def batches():
        for i in range(5):
            yield {"x": torch.tensor([i])}
        raise ValueError("shard 3 is corrupt")
    with Prefetch(batches(), pin=torch.device("cpu"), depth=2) as it:
        assert [int(next(it)["x"]) for _ in range(5)] == list(range(5))
        for _ in range(2):
            with pytest.raises(ValueError, match="shard 3 is corrupt"):
                next(it)


def test_prefetch_pins_for_a_gpu_on_that_gpu_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(("set_device", device, threading.current_thread().name)))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: seen.append(("pin", threading.current_thread().name)) or self)
    batches = ({"x": torch.tensor([i]), "y": torch.tensor([i])} for i in range(2))
    with Prefetch(batches, pin=torch.device("cuda", 5)) as it:
        assert [int(b["x"]) for b in it] == [0, 1]
    assert seen == [("set_device", torch.device("cuda", 5), "prefetch")] + [("pin", "prefetch")] * 4
    seen.clear()
    with Prefetch(iter([{"x": torch.tensor([0])}]), pin=torch.device("cpu")) as it:
        assert [int(b["x"]) for b in it] == [0]
    assert seen == []


def test_leaving_a_prefetch_stops_its_thread():
    def endless():
        while True:
            yield {"x": torch.zeros(1)}
    start = time.perf_counter()
    with Prefetch(endless(), pin=torch.device("cpu"), depth=2) as it:
        next(it)
        thread = it._thread
    assert not thread.is_alive() and time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


def test_buckets_and_zero3_thresholds_follow_the_width():
    opts = TrainOptions(sets=[], run="", zero=3, device="cuda")
    zero = deepspeed_config(opts, 8, 1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1024 ** 2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 ** 2) and zero["stage3_param_persistence_threshold"] == 10240
    config = deepspeed_config(opts, 8, 1024)
    assert config["bf16"]["enabled"] and not config["torch_autocast"]["enabled"]  # ZeRO 1-3: fp32 master partitions
    plain = deepspeed_config(TrainOptions(sets=[], run="", zero=0, device="cuda"), 8, 1024)
    assert not plain["bf16"]["enabled"] and plain["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    cpu = deepspeed_config(TrainOptions(sets=[], run="", zero=0), 1, 1024)
    assert not cpu["bf16"]["enabled"] and not cpu["torch_autocast"]["enabled"]


def test_zero0_with_the_gpu_precision_keeps_and_exports_fp32_masters(fmnist, tmp_path):
    """The config `--device cuda --zero 0` generates, run on the CPU (DeepSpeed's CPU accelerator
    autocasts to bf16 too): the checkpointed module and the export are fp32 weights, not bf16-rounded."""
    gpu = deepspeed_config(TrainOptions(sets=[], run="", device="cuda", zero=0, micro_batch=8), 1, 64)
    (tmp_path / "ds.json").write_text(json.dumps(gpu))
    run = tmp_path / "run"
    arra_pipe("train", fmnist, "--out", run, "--deepspeed-config", tmp_path / "ds.json", "--steps", "3",
              "--micro-batch", "8", "--lr", "3e-3", "--no-progress")
    with deepspeed_loads_weights_only():
        module = torch.load(run / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt")["module"]
    assert {v.dtype for v in module.values()} == {torch.float32}
    arra_pipe("export", run, "--out", tmp_path / "hf")
    from safetensors.torch import load_file
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    for name, w in exported.items():
        assert w.dtype == torch.float32 and torch.equal(w, module["lm." + name])
    w = exported["model.layers.0.mlp.up_proj.weight"]
    assert (w != w.bfloat16().float()).float().mean() > 0.9  # not bf16 values
    # the run refuses to continue with another number of ranks
    done = subprocess.run([sys.executable, "-m", "stages.cli", "train", str(fmnist), "--out", str(run), "--procs", "2",
                           "--deepspeed-config", str(tmp_path / "ds.json"), "--steps", "4", "--micro-batch", "8",
                           "--lr", "3e-3", "--no-progress"], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode != 0 and "was written by 1 ranks and this run has 2" in done.stderr, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# the 7B path: ZeRO-3 built partitioned, activation checkpointing


def test_zero3_partitioned_build_and_checkpointing_give_the_plain_loss(fmnist, tmp_path):
    """A text LM extended with image codes (the 7B recipe's path), same seed and batch: built
    partitioned under ZeRO-3, with activation checkpointing, and both, the first step's losses and
    gradient norm are the plain run's."""
    lm = tiny_text_lm(tmp_path / "lm", max_positions=64)
    common = ["--model", f"hf:{lm}", "--max-text-len", "16", "--steps", "1", "--micro-batch", "4", "--no-progress"]
    arms = {"plain": ["--zero", "0"], "zero3": ["--zero", "3"], "checkpointed": ["--zero", "0", "--activation-checkpointing"],
            "zero3-checkpointed": ["--zero", "3", "--activation-checkpointing"]}
    first = {}
    for arm, flags in arms.items():
        arra_pipe("train", fmnist, "--out", tmp_path / arm, *common, *flags)
        first[arm] = metrics(tmp_path / arm)[0]
    for arm, m in first.items():
        for k in ("ce", "gva", "loss"):
            assert m[k] == pytest.approx(first["plain"][k], rel=1e-6), (arm, k)
        # ZeRO-3 sums the squares over its flat fp32 partitions in another order
        assert m["grad_norm"] == pytest.approx(first["plain"]["grad_norm"], rel=1e-4), arm


def test_activation_checkpointing_recomputes_each_layer_in_the_backward_pass():
    from pipeline.lm.causal_lm import build_from_preset
    from stages.train import checkpoint_activations
    calls = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        lm = build_from_preset("tiny", 50, 10).train()
        if checkpointed:
            checkpoint_activations(lm)
        for layer in lm.model.layers:  # a module inside the checkpointed layer is entered again in the backward
            layer.mlp.register_forward_pre_hook(lambda *_: calls.append(checkpointed))
        ids = torch.randint(0, 50, (2, 10))
        loss = lm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = [p.grad.clone() for p in lm.parameters()]
        if checkpointed:
            assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, plain))
        plain = grads
    assert calls.count(False) == 2 and calls.count(True) == 4  # 2 layers; checkpointed: forward + recompute


BUILD = """
import os, importlib, torch
os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
import deepspeed
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from pipeline.lm.causal_lm import build_from_preset, extend_vocab, load_text_lm
from stages.train import built_partitioned, param_groups
config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}}}}
with built_partitioned(config):
    text, _ = load_text_lm({lm!r})
    old = text.get_input_embeddings().num_embeddings
    extend_vocab(text, old + 10)
    preset = build_from_preset("tiny", 100, 20)
    zero_head = build_from_preset("tiny", 100, 20, zero_head=True)
# (transformers' resize leaves the grown embeddings whole; deepspeed.initialize partitions them)
for params in (text.model.layers.parameters(), preset.parameters()):
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "not partitioned"
for lm in (text, preset):
    matrices = [n for n, _ in lm.named_parameters() if "norm" not in n]  # Llama: all but the RMSNorm gains
    assert len(param_groups(lm, 0.1)[0]["params"]) == len(matrices) > 0
    every = param_groups(lm, 0.1, decay_all=True)  # the official optimizer: norms decay too, judged whole
    assert len(every[0]["params"]) == len(list(lm.parameters())) and not every[1]["params"]
with deepspeed.zero.GatheredParameters(list(text.get_input_embeddings().parameters())):
    rows = text.get_input_embeddings().weight.detach().clone()
assert rows.shape[0] == old + 10 and torch.allclose(rows[old:], rows[:old].mean(0, keepdim=True).expand(10, -1))
with deepspeed.zero.GatheredParameters(list(preset.parameters())):
    std = float(preset.get_input_embeddings().weight.std())
assert abs(std - 0.02) < 0.002, std  # the LM's own init ran on the gathered weights, not left at N(0, 1)
with deepspeed.zero.GatheredParameters(list(zero_head.parameters())):
    assert float(zero_head.get_output_embeddings().weight.abs().sum()) == 0  # zeroed whole, not a shard
    assert float(zero_head.get_input_embeddings().weight.std()) > 0.01
"""


def test_zero3_builds_the_lm_partitioned_with_its_own_init(tmp_path):
    from stages.train import _free_port
    lm = tiny_text_lm(tmp_path / "lm", max_positions=64)
    done = subprocess.run([sys.executable, "-c", BUILD.format(port=_free_port(), lm=str(lm))], capture_output=True,
                          text=True, env=ENV, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
