"""README claims about `arra-pipe train` that only show in what a run writes: the learning-rate
schedule, the z-loss in the logged loss, TensorBoard, --grad-accum, --exclude-keys and --offload cpu.
Each run trains the tiny preset for a few steps in its own process (a process trains once: the
process group goes with the run), with cond-dropout 0 so runs can be compared step by step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from pipeline.data.featureset import FeatureSet

BASE = ["--lambda", "0.5", "--cond-dropout", "0", "--seed", "1", "--lr", "1e-2", "--no-progress"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fmnist(run_extract_module):
    return run_extract_module("data/fashion-mnist-mini", source_options={"split": "test"}, shard_size=128, batch_size=50)


def train(fmnist, run, *args, python: tuple[str, ...] = ("-m", "stages.cli")) -> list[dict]:
    done = subprocess.run([sys.executable, *python, "train", str(fmnist), "--out", str(run), *BASE, *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_losses(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x[k] == pytest.approx(y[k], rel=1e-5) for x, y in zip(a, b) for k in ("ce", "gva", "loss"))


def test_warmup_then_cosine_z_loss_and_tensorboard(fmnist, tmp_path):
    run = tmp_path / "run"
    steps = train(fmnist, run, "--micro-batch", "4", "--steps", "6", "--warmup-steps", "2", "--schedule", "cosine",
                  "--min-lr", "1e-3", "--z-loss", "0.01")
    # the LR logged after step s is the next step's: warm-up (s+1)/2 of 1e-2 up to s = 1, then cosine from
    # 1e-2 at s = 2 down to --min-lr at s = 6: 1e-3 + 9e-3 * (1 + cos(pi * (s - 2) / 4)) / 2, by hand
    assert [r["lr"] for r in steps] == pytest.approx([1e-2, 1e-2, 8.6820e-3, 5.5e-3, 2.3180e-3, 1e-3], rel=1e-4)
    # the logged loss is CE + z-loss * z + lambda * GVA
    for r in steps:
        assert r["z"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.01 * r["z"] + 0.5 * r["gva"], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/ce", "train/gva", "train/z", "train/loss", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    for name in ("ce", "gva", "z", "loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in steps]


def test_grad_accum_steps_as_one_batch_of_all_its_micro_batches(fmnist, tmp_path):
    # 2 micro-batches of 4 rows per step train exactly as 1 of 8: same rows, same mean loss, same update
    whole = train(fmnist, tmp_path / "whole", "--micro-batch", "8", "--steps", "4")
    accumulated = train(fmnist, tmp_path / "accum", "--micro-batch", "4", "--grad-accum", "2", "--steps", "4")
    assert same_losses(whole, accumulated)
    one_micro = train(fmnist, tmp_path / "micro", "--micro-batch", "4", "--steps", "4")
    assert not same_losses(whole, one_micro)  # the comparison can tell runs apart


def test_exclude_keys_reach_the_training_stream(fmnist, tmp_path):
    keys = FeatureSet.open(fmnist).table().column("key").to_pylist()
    unknown, some = tmp_path / "unknown.txt", tmp_path / "some.txt"
    unknown.write_text("no-such-key\n")
    some.write_text("".join(k + "\n" for k in keys[::3]))
    plain = train(fmnist, tmp_path / "plain", "--micro-batch", "8", "--steps", "3")
    assert same_losses(plain, train(fmnist, tmp_path / "unknown", "--micro-batch", "8", "--steps", "3", "--exclude-keys", unknown))
    assert not same_losses(plain, train(fmnist, tmp_path / "some", "--micro-batch", "8", "--steps", "3", "--exclude-keys", some))


# DeepSpeed's CPU Adam computes AdamW on the host; its C++ op takes minutes to JIT-compile, so torch's
# AdamW (the same update) stands in for it. What the test proves is ours: that --offload cpu makes
# DeepSpeed keep the optimizer states on the CPU with its CPU Adam built from our settings, and that
# such a run trains as one without offload.
OFFLOAD_PROBE = """
import json, sys, deepspeed, torch
from stages.cli import main
made = []
class CPUAdamStandIn(torch.optim.AdamW):
    def __init__(self, params, lr, betas, eps, weight_decay=0.0, adamw_mode=True, **_):
        made.append({"lr": lr, "betas": list(betas), "eps": eps, "adamw_mode": adamw_mode})
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
deepspeed.ops.adam.DeepSpeedCPUAdam = CPUAdamStandIn
initialize, probe = deepspeed.initialize, sys.argv.pop(1)
def recorded(**kw):
    out = initialize(**kw)
    json.dump({"cpu_offload": out[0].zero_cpu_offload(), "optimizer": type(out[0].basic_optimizer).__name__,
               "made": made}, open(probe, "w"))
    return out
deepspeed.initialize = recorded
main(sys.argv[1:])
"""


def test_offload_cpu_trains_with_deepspeeds_cpu_adam_as_without_offload(fmnist, tmp_path):
    args = ["--micro-batch", "8", "--steps", "3", "--zero", "2"]
    probe = tmp_path / "probe.json"
    offloaded = train(fmnist, tmp_path / "offload", *args, "--offload", "cpu", python=("-c", OFFLOAD_PROBE, str(probe)))
    assert json.loads(probe.read_text()) == {"cpu_offload": True, "optimizer": "CPUAdamStandIn",
                                             "made": [{"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "adamw_mode": True}]}
    config = json.loads((tmp_path / "offload" / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert same_losses(offloaded, train(fmnist, tmp_path / "plain", *args))
    assert all(math.isfinite(r["loss"]) for r in offloaded)


def test_align_positions_rep_token_trains_exports_and_samples_with_the_rep_row(fmnist, tmp_path):
    """The paper's <REP>: one more vocabulary row, between the condition and <boi> in training and in
    sampling, its hidden state the only one aligned."""
    run, model = tmp_path / "run", tmp_path / "model"
    steps = train(fmnist, run, "--micro-batch", "4", "--steps", "2", "--align-positions", "rep-token")
    assert all(r["gva"] > 0 for r in steps)
    cli = [sys.executable, "-m", "stages.cli"]
    for args in (["export", str(run), "--out", str(model)],
                 ["sample", str(model), "--out", str(tmp_path / "s"), "--class", "3", "--n", "2"]):
        done = subprocess.run([*cli, *args], capture_output=True, text=True, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    layout = json.loads((model / "arra_vocab.json").read_text())
    config = json.loads((model / "config.json").read_text())
    assert layout["rep"] and layout["vocab_size"] == layout["eoi"] + 2 == config["vocab_size"]
    from pipeline.data.samples import read_samples
    files, rows = read_samples(tmp_path / "s")
    assert len(files) == 2 and all(f.is_file() for f in files)
