"""Stage 2: train an autoregressive text/class-to-image LM with the ARRA loss under DeepSpeed ZeRO.

Reads only feature sets: no teacher model is imported or loaded here. Everything that can be
wrong with the inputs (missing teacher column, dims, codebook, grid, sequence length) is checked
before the model is built. A run directory holds:

    <run>/train_config.json     options, vocabulary layout, DeepSpeed config
    <run>/deepspeed_config.json the generated (or given) DeepSpeed config
    <run>/model/                LM config, text tokenizer, arra_vocab.json (for export)
    <run>/checkpoints/<tag>/    DeepSpeed checkpoint + per-rank data cursor and RNG state
    <run>/metrics.jsonl         one line per optimizer step
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.errors import ArraError
from pipeline.data.featureset import FeatureSet
from pipeline.data.remote import redact
from pipeline.data.files import atomic_write_bytes, atomic_write_json, read_json
from pipeline.lm.causal_lm import (LAYOUT_FILE, add_residual_dropout, add_token_dropout, build_from_preset,
                                   extend_vocab, is_chameleon, load_lm, load_text_lm, preset_config, zero_head_rows)
from pipeline.lm.image_vocab import check_ids, check_init_dir, external_layout, lumina_tokens
from pipeline.data.lock import main_rank_lock
from pipeline.lm.caption_arra import CaptionARRAModel
from pipeline.lm.caption_prefix import CAPTIONS_FILE, CaptionEmbedder
from pipeline.lm.objective import Objective
from pipeline.lm.rope2d import install
from pipeline.options import flag_of
from pipeline.data.prefetch import Prefetch
from pipeline.data.train_data import Conditioner, TrainStream
from pipeline.lm.vocab import VocabLayout
from pipeline.models.weights import deepspeed_loads_weights_only, load_torch
from stages.options import TrainOptions


CHECKPOINT_GLOB = "step" + "[0-9]" * 8
COMPLETE = "arra_complete.json"  # written by rank 0 once every rank has written its part of a checkpoint


class TrainError(ArraError):
    """The inputs or options cannot make a training run."""


# ---------------------------------------------------------------------------------------------
# launching: re-run ourselves under a launcher when more than one process is asked for


def launch_command(procs: int, hostfile: str | None, launcher: str, argv: list[str],
                   env: dict | None = None) -> list[str] | None:
    """The launcher command that runs `arra-pipe <argv>` as `procs` ranks on this node (or on the
    hostfile's nodes), or None to train in this process: one rank, or already started as a rank.
    Launchers run from this interpreter (no venv on PATH needed) on a free master port, so a second
    job on the node does not collide with the first."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or (procs <= 1 and not hostfile):
        return None
    if launcher == "torchrun":
        if hostfile:
            raise TrainError("--hostfile starts ranks on several nodes with --launcher deepspeed, not torchrun")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                "-m", "stages.cli", *argv]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", env.get("MASTER_PORT") or str(_free_port())]
    if hostfile:
        if not Path(hostfile).is_file():
            raise TrainError(f"--hostfile {hostfile}: no such file")
        cmd += ["--hostfile", hostfile]
    elif env.get("CUDA_VISIBLE_DEVICES"):
        # the runner drops CUDA_VISIBLE_DEVICES when told a GPU count; naming the devices keeps them
        visible = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        if procs > len(visible):
            raise TrainError(f"{procs} ranks asked for but CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
                             f"shows {len(visible)} GPUs")
        cmd += ["--include", "localhost:" + ",".join(visible[:procs])]
    else:
        cmd += ["--num_gpus", str(procs)]
    return cmd + ["--module", "stages.cli", *argv]


def run_launcher(cmd: list[str], device: str) -> int:
    """Run the launcher; if this process dies, even by SIGKILL, the launcher gets SIGTERM and stops its ranks."""
    from pipeline.distributed import die_with_parent
    env = {**os.environ, **({"DS_ACCELERATOR": "cpu"} if device == "cpu" else {})}
    return subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)


def _init_process_group(device: str) -> None:
    """Join the ranks' process group. A world of one gets a group over an in-memory store and takes
    no port: a free port picked up front can be taken by another program before the group binds it."""
    import deepspeed
    if device == "cpu":
        # DeepSpeed's shared-memory all-reduce for CPU is JIT-compiled (about a minute on first use)
        # and its segments collide between concurrent jobs on one host; plain gloo is enough here.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "gloo" if device == "cpu" else "nccl"
    if int(os.environ["WORLD_SIZE"]) == 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


# ---------------------------------------------------------------------------------------------
# checks on the feature sets, before any model exists


def open_sets(paths: list[str], teacher: str | None, lam: float) -> tuple[list[FeatureSet], str | None, int | None]:
    """Open the sets and agree on tokenizer and teacher; returns (sets, teacher, teacher dim)."""
    sets = [FeatureSet.open(p) for p in paths]
    first = sets[0].manifest["tokenizer"]
    for fs in sets[1:]:
        tok = fs.manifest["tokenizer"]
        for k in ("name", "codebook_size", "grid", "weights_sha256"):
            if tok[k] != first[k]:
                raise TrainError(f"{fs.path}: tokenizer {k} is {tok[k]!r} but {sets[0].path} has {first[k]!r}; "
                                 "sets trained together must share one tokenizer")
    if teacher is None:
        common = set.intersection(*(set(fs.teachers) for fs in sets))
        if lam > 0 and len(common) != 1:
            raise TrainError(f"name the teacher column with --teacher (the sets have {sorted(common) or 'none in common'})")
        teacher = next(iter(common)) if len(common) == 1 and lam > 0 else None
    dim = None
    if teacher is not None:
        for fs in sets:
            if teacher not in fs.teachers:
                raise TrainError(f"{fs.path}: no teacher column feat.{teacher}; it has {sorted(fs.teachers)}")
            d = fs.teachers[teacher]["dim"]
            if dim is not None and d != dim:
                raise TrainError(f"{fs.path}: feat.{teacher} is {d}-d but another set has {dim}-d")
            dim = d
    return sets, teacher, dim


def class_count(sets: list[FeatureSet]) -> int:
    for fs in sets:
        if "labels" not in fs.manifest:
            raise TrainError(f"{fs.path}: the manifest has no label counts (made by an older arra-pipe); re-extract it")
    classes = max(fs.manifest.get("labels", {}).get("classes", 0) for fs in sets)
    unlabelled = sum(fs.manifest.get("labels", {}).get("unlabelled", 0) for fs in sets)
    if classes == 0 or unlabelled:
        raise TrainError(f"--condition class needs a label on every row; {unlabelled} rows have none "
                         f"({', '.join(str(fs.path) for fs in sets)}); use --condition text")
    return classes


def text_tokenizer(opts: TrainOptions, sets: list[FeatureSet], out: Path, is_main: bool):
    """The caption tokenizer: a local HF tokenizer directory, or a small BPE trained on the captions."""
    from transformers import AutoTokenizer
    if opts.text_tokenizer and opts.text_tokenizer != "train":
        return AutoTokenizer.from_pretrained(opts.text_tokenizer, trust_remote_code=False)
    if is_main and not (out / "tokenizer.json").exists():
        from pipeline.lm.text_tokenizer import train_bpe
        captions = (c for fs in sets for b in fs.batches() for c in b.column("caption").to_pylist())
        train_bpe(captions, opts.text_vocab).save_pretrained(out)
    distributed.barrier()
    return AutoTokenizer.from_pretrained(out)


def caption_source(opts: TrainOptions, sets: list[FeatureSet]) -> dict | None:
    """--condition caption-features: the caption-feature column every set has (one encoder, the same
    weights), its encoder's record and the embedder's file, as the layout file records them; None for
    other conditions. Only the column is read, never the encoder."""
    if opts.condition != "caption-features":
        return None
    if opts.init or opts.model.startswith("hf:"):
        raise TrainError("--condition caption-features is for presets built from random init (--model tiny, llamagen-b, "
                         "...); an hf: LM or an --init model (Chameleon-family ones too) reads captions as its own text "
                         "tokens: use --condition text")
    found = [fs.captions for fs in sets]
    for fs, columns in zip(sets, found):
        if not columns:
            raise TrainError(f"{fs.path}: no caption-feature column for --condition caption-features; extract the set "
                             "with --caption-encoder NAME (e.g. flan-t5-xl)")
    common = set.intersection(*(set(c) for c in found))
    if len(common) != 1:
        raise TrainError(f"--condition caption-features needs one caption-feature column common to every set; they have "
                         f"{[sorted(c) for c in found]}")
    column = common.pop()
    first = found[0][column]
    for fs, columns in zip(sets[1:], found[1:]):
        if (columns[column]["weights_sha256"], columns[column]["max_tokens"]) != (first["weights_sha256"], first["max_tokens"]):
            raise TrainError(f"{fs.path}: {column} was made by other encoder weights or max tokens than {sets[0].path}'s")
    return {"column": column, "encoder": first, "dim": first["dim"], "tokens": first["max_tokens"], "file": CAPTIONS_FILE}


def plan_model(opts: TrainOptions, sets: list[FeatureSet], model_dir: Path, is_main: bool):
    """Decide the vocabulary layout and how to build the LM, checking every size against the sets.
    Returns (layout, builder, tokenizer, hidden size); the builder makes the LM later, once the
    DeepSpeed config (which the hidden size sizes) can say whether to build it partitioned."""
    tok = sets[0].manifest["tokenizer"]
    tok_ref = {k: tok.get(k) for k in ("name", "weights_sha256", "weights_path", "resolution", "grid", "codebook_size")}
    rep = opts.align_positions == "rep-token"
    if opts.zero_init_head and (opts.init or opts.model.startswith("hf:")):
        raise TrainError("--zero-init-head is for presets built from random init, not a pretrained head "
                         "(--init or --model hf:; see --image-head)")
    if opts.image_head and not (opts.init or opts.model.startswith("hf:")):
        raise TrainError("--image-head is for a pretrained LM's head (--model hf: or --init); a preset's starts at "
                         "random, or at zero with --zero-init-head")
    if opts.init:
        layout, build, tokenizer, max_positions, hidden = _plan_init(opts, tok, tok_ref, rep)
    elif opts.model.startswith("hf:"):
        layout, build, tokenizer, max_positions, hidden = _plan_hf(opts, tok, tok_ref, rep)
    else:
        layout, build, tokenizer, max_positions, hidden = _plan_preset(opts, sets, model_dir, is_main, tok, tok_ref, rep)
    if layout.condition == "caption-features" and opts.init:
        raise TrainError(f"--init {opts.init}: continuing a --condition caption-features model is not supported yet "
                         "(its caption embedder is not loaded); train it from the preset")
    markers = layout.tail_len - layout.image_tokens  # (<rep>) <boi> ... <eoi>, and a model's own tokens around them
    need = (1 if layout.condition == "class" else layout.max_text_len) + layout.tail_len
    if max_positions is not None and need > max_positions:
        raise TrainError(f"sequences need {need} positions ({layout.grid[0]}x{layout.grid[1]} image codes + condition + "
                         f"{markers}) but the model has max_position_embeddings {max_positions}; lower --max-text-len "
                         "or the grid")
    return layout, (_with_grid_rope(build, layout) if layout.rope == "2d" else build), tokenizer, hidden


def _with_grid_rope(build, layout: VocabLayout):
    """`build`, then 2D RoPE over the grid on the LM it built (refused there for an LM that is no Llama)."""
    return lambda: install(build(), layout)


def _plan_init(opts: TrainOptions, tok: dict, tok_ref: dict, rep: bool):
    """ARRA-Adapt: the checkpoint at --init, as it is; (layout, builder, tokenizer, max positions, hidden)."""
    from transformers import AutoConfig
    layout = _init_layout(opts, tok, tok_ref, rep)
    tokenizer = _maybe_tokenizer(opts.init) if layout.condition == "text" else None
    config = AutoConfig.from_pretrained(opts.init, trust_remote_code=False)
    return (layout, lambda: set_image_head(load_lm(opts.init), opts, layout), tokenizer,
            config.max_position_embeddings, config.hidden_size)


def _plan_hf(opts: TrainOptions, tok: dict, tok_ref: dict, rep: bool):
    """ARRA: a local LM directory. A text-only LM gets the image codes and <boi>/<eoi> appended (rows at
    the mean of the old ones). A Chameleon-family LM has image rows of its own, used as they are in
    Lumina-mGPT's sequence layout; as in the official code (D8), their output-head rows start at zero
    unless --image-head keep. Returns (layout, builder, tokenizer, max positions, hidden)."""
    from transformers import AutoConfig, AutoTokenizer
    path = opts.model[3:]
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    grid, codebook = tuple(tok["grid"]), tok["codebook_size"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    if is_chameleon(path):
        native = lumina_tokens(getattr(config, "vocabulary_map", None), tok, f"--model hf:{path}")
        check_ids(native, codebook, config.vocab_size, f"--model hf:{path}")
        layout = VocabLayout("text", config.vocab_size, codebook, grid, tok_ref, pad, opts.max_text_len, rep, native,
                             opts.rope)
    else:
        layout = VocabLayout("text", max(config.vocab_size, len(tokenizer)), codebook, grid, tok_ref, pad,
                             opts.max_text_len, rep, rope=opts.rope)

    def build():
        model, _ = load_text_lm(path)
        extend_vocab(model, layout.vocab_size)  # nothing to add where the model has image rows of its own
        return set_image_head(model, opts, layout)
    return layout, build, tokenizer, config.max_position_embeddings, config.hidden_size


def image_head(opts: TrainOptions, layout: VocabLayout) -> str | None:
    """What a pretrained LM's image rows of the output head start as (--image-head; None for a preset):
    by default zeroed for a Chameleon-family --model hf: (the official start, D8), kept for --init (a head
    that already draws images) and a text-only LM (new rows at the mean)."""
    if not (opts.init or opts.model.startswith("hf:")):
        return None
    return opts.image_head or ("zero" if layout.native and not opts.init else "keep")


def set_image_head(model, opts: TrainOptions, layout: VocabLayout):
    """`model` with its head's image rows zeroed when `image_head` says so (gathered whole under ZeRO-3)."""
    if image_head(opts, layout) == "zero":
        zero_head_rows(model, layout.code_ids)
    return model


def _plan_preset(opts: TrainOptions, sets: list[FeatureSet], model_dir: Path, is_main: bool, tok: dict, tok_ref: dict,
                 rep: bool):
    """ARRA-Base: a preset from random init; (layout, builder, tokenizer, max positions, hidden)."""
    grid, codebook = tuple(tok["grid"]), tok["codebook_size"]  # the manifest's reader names a missing key
    tokenizer = None
    if opts.condition == "class":
        layout = VocabLayout("class", class_count(sets) + 1, codebook, grid, tok_ref, rep=rep, rope=opts.rope)
    elif opts.condition == "caption-features":  # one placeholder row; the prefix is the caption embedder's
        layout = VocabLayout("caption-features", 1, codebook, grid, tok_ref, max_text_len=caption_source(opts, sets)["tokens"],
                             rep=rep, rope=opts.rope)
    else:
        tokenizer = text_tokenizer(opts, sets, model_dir, is_main)
        layout = VocabLayout("text", len(tokenizer), codebook, grid, tok_ref, tokenizer.pad_token_id, opts.max_text_len, rep,
                             rope=opts.rope)
    max_positions = (1 if opts.condition == "class" else layout.max_text_len) + layout.tail_len
    hidden = preset_config(opts.model, layout.vocab_size, max_positions).hidden_size

    def build():
        return build_from_preset(opts.model, layout.vocab_size, max_positions, opts.dropout, opts.zero_init_head)
    return layout, build, tokenizer, max_positions, hidden


def _init_layout(opts: TrainOptions, tok: dict, tok_ref: dict, rep: bool) -> VocabLayout:
    """ARRA-Adapt: the layout of the model at --init, checked against the sets' tokenizer (`tok`) and
    these options; captions are cut at --max-text-len as the model was trained. An export of ours
    records its layout; another checkpoint declares it in a layout file, or has Chameleon's."""
    exported = Path(opts.init) / LAYOUT_FILE
    layout = (VocabLayout.from_dict(read_json(exported)) if exported.is_file()
              else external_layout(opts.init, tok, tok_ref, opts.max_text_len))
    grid, codebook = tuple(tok["grid"]), tok["codebook_size"]
    if layout.grid != grid:
        raise TrainError(f"--init {opts.init}: the model was trained on a {layout.grid} grid, "
                         f"the sets have {grid}")
    if codebook > layout.codebook_size or layout.tokenizer["weights_sha256"] != tok["weights_sha256"]:
        raise TrainError(f"--init {opts.init}: image vocabulary is {layout.codebook_size} codes of tokenizer "
                         f"{layout.tokenizer['name']} (sha256 {layout.tokenizer['weights_sha256'][:12]}), the sets "
                         f"have {codebook} codes of {tok['name']} (sha256 {tok['weights_sha256'][:12]})")
    if layout.condition == "text" and layout.max_text_len not in (0, opts.max_text_len):
        raise TrainError(f"--init {opts.init}: the model was trained with --max-text-len {layout.max_text_len}; "
                         f"pass the same (not {opts.max_text_len}) so captions are cut as they were")
    if layout.rope != opts.rope:
        raise TrainError(f"--init {opts.init}: the model was trained with --rope {layout.rope}; pass the same (not "
                         f"{opts.rope}) so its image codes keep the positions it learned")
    if rep and not layout.rep:
        raise TrainError(f"--init {opts.init}: the model has no <rep> token for --align-positions rep-token; "
                         f"align at boi or image, or train ARRA-Base/ARRA with rep-token from the start")
    return replace(layout, max_text_len=opts.max_text_len if layout.condition == "text" else 0)


def model_depth(opts: TrainOptions) -> int:
    """Decoder layers of the LM these options build, read from its config alone (no weights), so
    that --align-layer is checked before any process group or model exists."""
    if opts.init:
        check_init_dir(opts.init)  # says what --init needs when it is none of the checkpoints it takes
    if opts.init or opts.model.startswith("hf:"):
        from transformers import AutoConfig
        path = opts.init or opts.model[3:]
        if not Path(path, "config.json").is_file():
            raise TrainError(f"{'--init' if opts.init else '--model hf:'} {path}: no config.json; "
                             "a local Hugging Face model directory is needed")
        return AutoConfig.from_pretrained(path, trust_remote_code=False).num_hidden_layers
    return preset_config(opts.model, vocab_size=1, max_positions=1).num_hidden_layers


def _maybe_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer, schedule


def deepspeed_config(opts: TrainOptions, world: int, hidden: int) -> dict:
    """The DeepSpeed config of these options (or the user's file).

    Buckets, prefetch and persistence follow DeepSpeed's `auto` rules from the LM's width (hidden²,
    0.9·hidden², 10·hidden elements): its 5e8 defaults exceed a LlamaGen-L's whole parameter count,
    so ZeRO-2 could not overlap reduction with the backward pass and ZeRO-3 kept everything live.

    Precision on a GPU: ZeRO 1-3 run DeepSpeed's `bf16` (bf16 weights, fp32 master partitions that
    zero_to_fp32 exports). Without ZeRO, DeepSpeed 0.19.8's `bf16` is not that: the engine's
    `_do_optimizer_sanity_check` picks DDP_BFLOAT16, i.e. FP16_UnfusedOptimizer, which accumulates
    gradients in bf16, takes a zero-gradient warm-up step and checkpoints the module in bf16 (a bf16
    with fp32 `grad_accum_dtype` is NotImplementedError there). So ZeRO-0 keeps fp32 weights and
    runs the forward under DeepSpeed's `torch_autocast` (bf16 matmuls): gradients, their all-reduce,
    the optimizer and the checkpointed module (what `export` reads) are all fp32."""
    if opts.deepspeed_config:
        config = read_json(opts.deepspeed_config)
        config.setdefault("train_micro_batch_size_per_gpu", opts.micro_batch)
        config.setdefault("gradient_accumulation_steps", opts.grad_accum)
        return config
    gpu = opts.device == "cuda"
    zero = {"stage": opts.zero, "contiguous_gradients": True, "overlap_comm": gpu,
            "reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden}
    if opts.zero == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden), stage3_param_persistence_threshold=10 * hidden,
                    stage3_max_live_parameters=int(1e9), stage3_max_reuse_distance=int(1e9))
    if opts.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        if opts.zero == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return {"train_micro_batch_size_per_gpu": opts.micro_batch, "gradient_accumulation_steps": opts.grad_accum,
            "train_batch_size": opts.micro_batch * opts.grad_accum * world, "gradient_clipping": opts.clip,
            "bf16": {"enabled": gpu and opts.zero > 0}, "torch_autocast": {"enabled": gpu and opts.zero == 0, "dtype": "bfloat16"},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


@dataclass
class _ZeRO3:
    """All transformers asks of its HfDeepSpeedConfig (which needs accelerate) to build partitioned."""
    config: dict

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def built_partitioned(ds_config: dict):
    """Under ZeRO-3, the LM is built already partitioned, so no rank ever holds the whole fp32 model
    (a 7B one is 28 GB): told the config, transformers' from_config, from_pretrained and
    resize_token_embeddings build under deepspeed.zero.Init and initialise, load or copy each module
    gathered. (A bare deepspeed.zero.Init around a transformers 5 model would skip its weight init.)
    The small projector is partitioned by deepspeed.initialize."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
    holder = _ZeRO3(ds_config)  # transformers keeps only a weak reference
    set_hf_deepspeed_config(holder)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def checkpoint_activations(lm) -> None:
    """--activation-checkpointing: each decoder layer is recomputed in the backward pass instead of
    keeping its activations (non-reentrant torch.utils.checkpoint). transformers 5.2x renamed the
    switch (the old name warns there); 5.17 has only the old one."""
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Decay matrices only (not norms, biases; LlamaGen/nanoGPT convention), or every parameter
    (`decay_all`, the official ARRA code). A parameter built partitioned by ZeRO-3 is judged by its
    whole shape (`ds_shape`), not by its local shard."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if decay_all or len(getattr(p, "ds_shape", p.shape)) >= 2]
    rest = [p for p in params if not decay_all and len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(opts: TrainOptions, total_steps: int):
    """Linear warm-up, then constant or cosine down to min_lr (as a factor of lr)."""
    floor = opts.min_lr / opts.lr if opts.lr else 0.0

    def factor(step: int) -> float:
        if step < opts.warmup_steps:
            return (step + 1) / opts.warmup_steps
        if opts.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - opts.warmup_steps) / max(1, total_steps - opts.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ---------------------------------------------------------------------------------------------
# the run


RESUMABLE = {"steps", "epochs", "save_every", "keep_checkpoints", "progress", "run", "sets"}  # sets: by path, below


def check_same_options(run: Path, opts: TrainOptions) -> None:
    """A resume continues the recorded trajectory, so every option that shapes it must be the one
    the run was started with (only how long to train and how to checkpoint may change); checked
    before anything in the run folder is touched. Options newer than the record are not compared."""
    if not (run / "train_config.json").is_file():
        return
    before = read_json(run / "train_config.json").get("options", {})
    now = json.loads(json.dumps(asdict(opts)))  # tuples as the record holds them
    diffs = [f"{flag_of(TrainOptions, k)}: was {before[k]!r}, now {now[k]!r}"
             for k in sorted(before) if k in now and k not in RESUMABLE and before[k] != now[k]]
    if diffs:
        raise TrainError(f"{run} holds a run started with other settings, and resuming it with these would change "
                         "its course (only --steps, --epochs, --save-every and --keep-checkpoints may change):\n  "
                         + "\n  ".join(diffs) + "\nUse the same options, or another --out.")


def _same_run(run: Path, config: dict) -> None:
    prev = read_json(run / "train_config.json")
    if "layout" in prev:  # as this version writes it (a layout recorded before `rep` existed has none)
        prev["layout"] = VocabLayout.from_dict(prev["layout"]).to_dict()
    for key in ("layout", "model", "teacher", "teacher_dim", "sets", "condition"):
        if prev.get(key) != config.get(key):
            raise TrainError(f"{run} holds a run with {key} = {prev.get(key)!r}, not {config.get(key)!r}; "
                             "use another run directory")


class Metrics:
    """metrics.jsonl (truncated to the resumed step), TensorBoard when installed."""

    def __init__(self, run: Path, start_step: int, enabled: bool):
        self.path, self.enabled, self.tb = run / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])


def train(opts: TrainOptions, log=print) -> dict:
    """Train (or resume) the run at `opts.run`; a second job on the same run folder is refused while
    this one runs."""
    with main_rank_lock(opts.run):
        return _train(opts, log)


def _train(opts: TrainOptions, log) -> dict:
    if opts.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _single_process_env()
    run = Path(opts.run)
    # ---- checks that need no model (the options checked themselves on construction)
    objective = Objective(**{f.name: getattr(opts, f.name) for f in fields(Objective)})
    objective.check_depth(model_depth(opts))
    sets, teacher, teacher_dim = open_sets(opts.sets, opts.teacher, opts.lam)
    captions = caption_source(opts, sets)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    is_main = rank == 0
    device = torch.device("cpu") if opts.device == "cpu" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL, DeepSpeed or pinned memory: else every rank opens a context on GPU 0
    ckpt_dir = run / "checkpoints"
    check_same_options(run, opts)
    tag = resume_tag(ckpt_dir, world, log if is_main else lambda _: None)
    model_dir = run / "model"
    if is_main:
        model_dir.mkdir(parents=True, exist_ok=True)

    _init_process_group(opts.device)
    layout, build, tokenizer, hidden = plan_model(opts, sets, model_dir, is_main)
    exclude = frozenset(k for k in Path(opts.exclude).read_text(encoding="utf-8").splitlines() if k) if opts.exclude else frozenset()
    stream = TrainStream(sets, teacher if opts.lam > 0 else None, layout, opts.micro_batch, rank, world, opts.seed,
                         opts.shuffle_buffer, opts.cond_dropout, Conditioner(layout, tokenizer, opts.max_text_len),
                         objective.align_positions, exclude, captions and captions["column"])
    per_epoch = stream.steps_per_epoch(opts.grad_accum)
    if per_epoch == 0:
        raise TrainError(f"the sets hold too few rows for one step of {world} ranks x {opts.micro_batch} rows x "
                         f"{opts.grad_accum} accumulation")
    total = opts.steps or math.ceil((opts.epochs or 1.0) * per_epoch)
    ds_config = deepspeed_config(opts, world, hidden)
    config = {"options": {**asdict(opts), "sets": [redact(s) for s in opts.sets]}, "layout": layout.to_dict(),
              "model": opts.init or opts.model, "teacher": teacher if opts.lam > 0 else None,
              "teacher_dim": teacher_dim if opts.lam > 0 else None, "condition": layout.condition,
              "sets": [str(fs.path.resolve()) for fs in sets], "steps": total, "steps_per_epoch": per_epoch,
              "world": world, "deepspeed": ds_config, "image_head": image_head(opts, layout), "captions": captions}
    if (run / "train_config.json").exists():
        _same_run(run, config)

    engine = build_engine(opts, build, teacher_dim if opts.lam > 0 else None, objective, ds_config, total, device, captions)
    if is_main:
        save_run_files(run, engine.module.lm.config, tokenizer, layout, config, ds_config)

    # ---- resume
    step = 0
    if tag:
        with deepspeed_loads_weights_only():
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        step = client["step"]
        restore_rank_state(load_torch(ckpt_dir / tag / f"arra_state_rank{rank}.pt"), device)
        if is_main:
            log(f"resumed from {ckpt_dir / tag} at step {step}")
    return train_loop(opts, engine, stream, step, total, per_epoch, Metrics(run, step, is_main), device)


def build_engine(opts: TrainOptions, build, teacher_dim: int | None, objective: Objective, ds_config: dict, total: int,
                 device: torch.device, captions: dict | None = None):
    """The LM (same seed on every rank; LM before projector so lambda 0 and 1 share the LM init), with
    `captions` its caption embedder, the ARRA model around them, the optimizer and schedule, in a
    DeepSpeed engine in training mode."""
    torch.manual_seed(opts.seed)
    from pipeline.lm.arra import ARRAModel
    with built_partitioned(ds_config):
        lm = build()
    if captions:  # attached before token dropout, which then drops the caption prefix too, as LlamaGen's does
        embedder = CaptionEmbedder(captions["dim"], lm.config.hidden_size, captions["tokens"])
        embedder.attach(lm)
    add_residual_dropout(lm, opts.residual_dropout)
    add_token_dropout(lm, opts.token_dropout)
    if opts.activation_checkpointing:
        checkpoint_activations(lm)
    model = CaptionARRAModel(lm, embedder, teacher_dim, objective) if captions else ARRAModel(lm, teacher_dim, objective)
    groups = param_groups(model, opts.weight_decay, opts.decay_all)
    from torch.optim.lr_scheduler import LambdaLR
    schedule = lr_lambda(opts, total)
    if opts.offload == "cpu":  # DeepSpeed's CPU Adam for offloaded optimizer states
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": opts.lr, "betas": list(opts.betas), "eps": 1e-8}}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, eps=1e-8, fused=device.type == "cuda")
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups if optimizer is None else None,
                                           optimizer=optimizer, lr_scheduler=lambda opt: LambdaLR(opt, schedule),
                                           config=ds_config)
    engine.train()  # from_pretrained hands the LM over in eval mode, where dropout and checkpointing are off
    return engine


def save_run_files(run: Path, lm_config, tokenizer, layout: VocabLayout, config: dict, ds_config: dict) -> None:
    """What `export` and a resume read: the LM config, text tokenizer and vocabulary layout (with the
    caption features' record for a caption-features model) in run/model, the run's record and its
    DeepSpeed config."""
    model_dir = run / "model"
    lm_config.save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    captions = {"captions": config["captions"]} if config.get("captions") else {}
    (model_dir / LAYOUT_FILE).write_text(json.dumps({**layout.to_dict(), **captions}, indent=1))
    atomic_write_json(run / "train_config.json", config)
    atomic_write_json(run / "deepspeed_config.json", ds_config)


def train_loop(opts: TrainOptions, engine, stream: TrainStream, step: int, total: int, per_epoch: int,
               metrics: Metrics, device: torch.device) -> dict:
    """Optimizer steps from `step` to `total`: one metrics line per step, a checkpoint every
    --save-every steps and at the end. Returns the last step's figures."""
    from tqdm import tqdm
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ckpt_dir = Path(opts.run) / "checkpoints"
    bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not (rank == 0 and opts.progress),
               dynamic_ncols=True)
    last = {}
    with Prefetch(micro_batches(stream, step, total, per_epoch, opts.grad_accum), pin=device) as batches:
        while step < total:
            start, sums, tokens, samples, grad_norm = time.perf_counter(), {}, 0, 0, None
            for micro in range(opts.grad_accum):
                host = next(batches)
                tokens += int(host["attention_mask"].sum())
                samples += len(host["input_ids"])
                loss, parts = engine(**{k: v.to(device, non_blocking=True) for k, v in host.items()})
                engine.backward(loss)
                if micro == opts.grad_accum - 1 and engine.zero_optimization_stage() == 0:
                    grad_norm = plain_grad_norm(engine.module)
                engine.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
            epoch, step = step // per_epoch, step + 1
            if engine.zero_optimization_stage():
                grad_norm = engine.get_global_grad_norm()
            names, figures = step_figures(sums, opts.grad_accum, tokens, samples, world, device, grad_norm)
            values = dict(zip(names, figures.tolist()))  # the step's one host sync
            seconds = time.perf_counter() - start
            last = {"step": step, "epoch": epoch, **{k: values[k] for k in sorted(sums)}, "lr": engine.get_lr()[0],
                    "grad_norm": values.get("grad_norm"), "tokens_per_s": values["tokens"] / seconds,
                    "samples_per_s": values["samples"] / seconds}
            metrics.write(last)
            bar.update(1)
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("ce", "gva", "loss", "lr", "grad_norm", "tokens_per_s")
                             if last.get(k) is not None}, refresh=False)
            if step % opts.save_every == 0 or step == total:
                save_checkpoint(engine, ckpt_dir, rank, opts.keep_checkpoints, rank_state(step, world, device))
    bar.close()
    distributed.barrier()
    return last


def micro_batches(stream: TrainStream, step: int, total: int, per_epoch: int, accum: int) -> Iterator[dict]:
    """The micro-batches of the steps after `step` up to `total`, in order: each epoch's stream (a pure
    function of seed, epoch and rank) cut to its steps; those a resumed epoch already took are skipped."""
    while step < total:
        epoch, done = divmod(step, per_epoch)
        steps = min(per_epoch - done, total - step)
        yield from itertools.islice(stream.epoch(epoch), done * accum, (done + steps) * accum)
        step += steps


def step_figures(sums: dict[str, torch.Tensor], micro_steps: int, tokens: int, samples: int, world: int,
                 device: torch.device, grad_norm=None) -> tuple[list[str], torch.Tensor]:
    """One step's figures in one tensor on `device`, the training device NCCL reduces on (a CPU figure
    stacked with device losses failed the first GPU step): loss parts averaged over micro-steps and
    ranks, tokens and samples (counted on the host batches) summed over ranks, then the grad norm
    (already global). The caller fetches them with one `.tolist()`, the step's only host sync."""
    keys = sorted(sums)
    figures = torch.cat([torch.stack([sums[k] for k in keys]).double() / micro_steps,
                         torch.full((1,), tokens, dtype=torch.float64, device=device),
                         torch.full((1,), samples, dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(figures)
        figures[:len(keys)] /= world
    names = keys + ["tokens", "samples"]
    if grad_norm is not None:  # a tensor from the optimizer (no sync), or a float
        norm = (grad_norm.to(device, torch.float64).reshape(1) if torch.is_tensor(grad_norm)
                else torch.full((1,), grad_norm, dtype=torch.float64, device=device))
        figures, names = torch.cat([figures, norm]), names + ["grad_norm"]
    return names, figures


def plain_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global gradient norm without ZeRO, left on the device. DeepSpeed 0.19.8 has none there:
    `get_global_grad_norm` returns what an optimizer wrapper leaves in `_global_grad_norm`, and
    ZeRO-0 steps a plain torch optimizer (the norm it clips with is not kept)."""
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


def rank_state(step: int, world: int, device: torch.device) -> dict:
    """What a rank needs beside DeepSpeed's files to continue exactly: the step, the world size that
    dealt the data, and the generators it draws from, the CPU's and its GPU's (each rank uses only
    its own, and restores it whatever the node layout). The data stream has its own generator per
    epoch and rank; nothing draws from Python's or numpy's global ones."""
    state = {"step": step, "world": world, "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def resume_tag(ckpt_dir: Path, world: int, log=print) -> str | None:
    """The checkpoint to resume from, if any: the newest complete one (a stop while a rank was still
    writing leaves an incomplete newer one, which `latest` may name). Each rank's data cursor is its
    own stream (shards dealt by rank and world size, rows shuffled per rank), so only as many ranks
    as wrote a checkpoint can continue it; another count is refused rather than silently re-dealt."""
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else ""
    complete = sorted(p.name for p in ckpt_dir.glob(CHECKPOINT_GLOB) if (p / COMPLETE).is_file())
    tag = complete[-1] if complete else latest  # none complete: written before completeness was recorded
    if not tag:
        if any(ckpt_dir.glob(CHECKPOINT_GLOB)) and (ckpt_dir / "latest").exists():
            raise TrainError(f"{ckpt_dir}: no checkpoint is complete and `latest` names none; remove the step* "
                             "folders to start again, or train into another --out")
        if any(ckpt_dir.glob(CHECKPOINT_GLOB)):  # `latest` is written after the first complete one: a stop during it
            log(f"{ckpt_dir}: the first checkpoint was not finished; starting from step 0")
        return None
    if complete and latest != tag:
        log(f"{ckpt_dir}: `latest` names {latest or 'nothing'}, which not every rank finished writing; "
            f"resuming from {tag}, the newest complete checkpoint")
    if not (ckpt_dir / tag / "arra_state_rank0.pt").is_file():
        raise TrainError(f"{ckpt_dir / tag}: not a complete checkpoint (no arra_state_rank0.pt); remove it and "
                         "`latest` to resume from an earlier one, or train into another --out")
    written = load_torch(ckpt_dir / tag / "arra_state_rank0.pt").get("world")
    if written is None:  # written before the world size was recorded: one state file per rank
        written = len(list((ckpt_dir / tag).glob("arra_state_rank*.pt")))
    if written != world:
        raise TrainError(f"{ckpt_dir / tag} was written by {written} ranks and this run has {world}: the data "
                         f"cursor is per rank, so resume with {written} ranks (or train into another --out)")
    return tag


def save_checkpoint(engine, ckpt_dir: Path, rank: int, keep: int, state: dict) -> None:
    """Every rank writes its state and DeepSpeed's files; once all have (a barrier), rank 0 marks the
    checkpoint complete and only then points `latest` at it (DeepSpeed's own `latest` is written
    by rank 0 without waiting for the others)."""
    step = state["step"]
    tag = f"step{step:08d}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt_dir / tag / f"arra_state_rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    distributed.barrier()
    if rank != 0:
        return
    atomic_write_json(ckpt_dir / tag / COMPLETE, {"step": step, "world": state["world"],
                                                  "files": sorted(p.name for p in (ckpt_dir / tag).iterdir())})
    atomic_write_bytes(ckpt_dir / "latest", tag.encode())
    if keep > 0:
        ours = sorted(p for p in ckpt_dir.glob(CHECKPOINT_GLOB) if (p / "arra_state_rank0.pt").is_file())
        for old in ours[:ours.index(ckpt_dir / tag) + 1][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
