"""One command that proves each GPU path of arra-pipe on one GPU and measures it (issue 11).

Stages, in order of importance so that a spent time budget skips the least useful ones:

- install: what the box lacks (deepspeed, webdataset, faiss, pydantic) from the wheels built by
  benchmarks/device_wheels.sh and carried with the tree, `--no-deps` into a private folder, so
  the box's torch and transformers stay; then the versions in use.
- data: synthetic 256 px PNGs in class folders, and random weights at real size in the published
  formats (tests/model_checkpoints.py): LlamaGen VQ-16 `vq_ds16_c2i.pt` and DINOv2-B. DINOv2-B
  rather than EfficientNet-Lite0 keeps its 17 MB of packaged weights off the carried tree.
- extract: `arra-pipe extract` end to end (decoding workers, bf16 models, shard writing): img/s.
- bare-forward: the same two networks alone on a ready float batch on the device, same batch and
  precision; their combined rate is what extraction would reach if nothing else cost time.
- train-zero2 (llamagen-l, micro-batch 32), then resume (the same command with more steps must
  say "resumed"), train-zero0, train-zero3 and train-gpus1 (`--gpus 1`): tokens/s and step time
  (medians after warm-up, from the run's metrics.jsonl), MFU = tokens/s x (6N + 12·L·d·T) over
  989 TFLOP/s dense bf16 (N: LM weights without the input embedding; 12·L·d·T: attention scores
  and values, forward and backward, PaLM's count), and peak memory: the train stage records
  none, so each command runs under a wrapper that reads torch.cuda.max_memory_allocated at exit.
- sample-small-batch / sample-large-batch: `arra-pipe sample` (KV cache) at batch 16 and 128;
  img/s between the end of the first batch and the last (PNG times), so loading is left out.
- eval: `arra-pipe eval --no-fid` on the device (the Inception file does not travel). The large
  batch's samples come back as samples.tar for FID on a machine that has it.

A failing stage is recorded (type, message, end of its log) and the next one runs; stages whose
input failed are skipped and say why. Written to --out (default $OUT): summary.json,
summary.md, samples.tar, logs.tar.gz. `--cpu-dry-run` runs every stage with tiny sizes on the
CPU (tests/test_device_check.py): it checks the plumbing, its figures mean nothing.

    bash benchmarks/device_wheels.sh      # here, once: wheels/ (ignored by git, 23 MiB)
    python3 benchmarks/device_check.py    # on the GPU box, from the tree's root, wheels/ carried
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM, dense bf16
NEEDED = ("deepspeed", "webdataset", "faiss", "pydantic")  # imports the GPU box lacks
SAMPLES_TAR_BYTES = 12 * 2**20  # under the 16 MiB a returned file may have
TAIL_LINES = 25

# Runs `arra-pipe ARGS` in this process and writes its peak CUDA memory at exit: the stages do not
# record it, and the CLI stays the only contract with them.
PEAK_WRAPPER = """
import atexit, json, os, runpy, sys
def peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        with open(os.environ["DEVICE_CHECK_PEAK"], "w") as f:
            json.dump({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}, f)
atexit.register(peak)
runpy.run_module("stages.cli", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Sizes:
    device: str
    tiny: bool  # tiny checkpoints (tests) instead of the real architectures
    images: int
    image_px: int
    tokenizer_px: int  # LlamaGen VQ-16 input (its native 256 on the GPU)
    teacher_px: int  # DINOv2-B input (its native 224 on the GPU)
    batch: int  # extraction and bare forward
    workers: int
    shard: int
    bare_iters: int
    recipe: str
    micro_batch: int
    steps: int
    resume_steps: int
    warmup: int  # first steps left out of the medians
    sample: tuple  # (batch, images) of the small and the large batch
    one_gpu: tuple  # flags of the train-gpus1 arm


GPU = Sizes(device="cuda", tiny=False, images=8192, image_px=256, tokenizer_px=256, teacher_px=224, batch=256,
            workers=min(12, os.cpu_count() or 1), shard=1024, bare_iters=10, recipe="arra-base-llamagen-l",
            micro_batch=32, steps=30, resume_steps=40, warmup=5, sample=((16, 64), (128, 256)), one_gpu=("--gpus", "1"))
# 64 px images and a 4x4 code grid: the tiny networks at 256 px would take minutes on two cores
DRY = Sizes(device="cpu", tiny=True, images=32, image_px=64, tokenizer_px=64, teacher_px=56, batch=8, workers=1,
            shard=16, bare_iters=2, recipe="tiny-cpu", micro_batch=4, steps=2, resume_steps=4, warmup=1,
            sample=((2, 4), (4, 8)), one_gpu=("--procs", "1"))


class StageError(Exception):
    """A stage failed; `tail` is the end of its log."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-TAIL_LINES:]) if path.exists() else ""


def median(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        raise StageError(f"metrics.jsonl has no {key!r}")
    return statistics.median(values)


def write_image(args: tuple) -> int:
    """A smooth random image (an 8x8 field upsampled) in one of 10 class folders; returns its bytes."""
    folder, i, size = args
    rng = np.random.default_rng(i)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    path = folder / f"class{i % 10}" / f"{i:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    field.save(path)
    return path.stat().st_size


def lm_matmul_params(model_dir: Path) -> tuple[int, object]:
    """Parameters of the saved LM config that take part in matmuls (all but the input embedding)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel(), config


class Check:
    def __init__(self, args, sizes: Sizes, work: Path):
        self.args, self.sizes, self.work, self.out = args, sizes, work, args.out
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.stages: list[dict] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if sizes.device == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
        self.images, self.set = work / "images", work / "set"
        self.vq, self.dino = work / "weights" / "vq_ds16_c2i.pt", work / "weights" / "dinov2-b"
        self.info: dict = {}

    # ---- running stages

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn, needs: tuple = ()) -> None:
        record = {"stage": name, "status": "ok", "seconds": 0.0, "figures": {}}
        failed = [n for n in needs if next((s["status"] for s in self.stages if s["stage"] == n), None) != "ok"]
        if self.left() < self.args.reserve:
            record.update(status="skipped", note=f"time budget of {self.args.budget:.0f} s spent")
        elif failed:
            record.update(status="skipped", note=f"needs {', '.join(failed)}, which did not succeed")
        else:
            start = time.monotonic()
            try:
                record["figures"] = fn() or {}
            except Exception as exc:  # keep going: record what failed and run the next stage
                record.update(status="error", error={
                    "type": type(exc).__name__, "message": str(exc)[:2000],
                    "log_tail": getattr(exc, "tail", "") or "\n".join(traceback.format_exc().splitlines()[-TAIL_LINES:])})
            record["seconds"] = round(time.monotonic() - start, 2)
        self.stages.append(record)
        print(f"[{time.monotonic() - self.start:6.0f} s] {name}: {record['status']} "
              f"{json.dumps(record['figures']) if record['status'] == 'ok' else record.get('note') or record['error']['message']}",
              flush=True)
        self.write_summary()

    def cli(self, name: str, *args) -> tuple[str, dict]:
        """`arra-pipe ARGS` in a subprocess (its own process group, killed whole at the budget's end);
        returns its output and its peak CUDA memory (empty when it used none)."""
        log, peak = self.logs / f"{name}.log", self.work / f"peak-{name}.json"
        cmd = [sys.executable, "-c", PEAK_WRAPPER, *map(str, args)]
        with open(log, "a") as f:
            f.write("$ arra-pipe " + " ".join(map(str, args)) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, "DEVICE_CHECK_PEAK": str(peak)}, start_new_session=True)
            try:
                code = proc.wait(timeout=max(1.0, self.left() - self.args.reserve / 2))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StageError("stopped: the time budget ran out", tail(log)) from None
        if code:
            raise StageError(f"arra-pipe {args[0]} exited with {code}", tail(log))
        return log.read_text(errors="replace"), (json.loads(peak.read_text()) if peak.exists() else {})

    # ---- the stages

    def install(self) -> dict:
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
        figures = {"missing": missing}
        if missing:
            wheels = sorted(self.args.wheels.glob("*.whl"))
            if not wheels:
                raise StageError(f"{', '.join(missing)} not installed and no wheels in {self.args.wheels}: "
                                 "run `bash benchmarks/device_wheels.sh` where pip works and carry wheels/")
            site = self.work / "site"
            log = self.logs / "install.log"
            with open(log, "w") as f:
                done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                       "--disable-pip-version-check", "--target", str(site), *map(str, wheels)],
                                      stdout=f, stderr=subprocess.STDOUT)
            if done.returncode:
                raise StageError(f"pip install exited with {done.returncode}", tail(log))
            # after the tree (cwd first on sys.path) so the arra-pipe wheel does not shadow it
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), self.env.get("PYTHONPATH")]))
            sys.path.append(str(site))
            figures["installed"] = [w.name for w in wheels]
        import torch
        cuda = torch.cuda.is_available()
        self.info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     **{name: version(name) for name in ("transformers", "deepspeed", "faiss-cpu", "webdataset", "pydantic")},
                     "gpu": torch.cuda.get_device_name(0) if cuda else None}
        if self.sizes.device == "cuda" and not cuda:
            raise StageError("torch sees no CUDA device")
        return {**figures, **self.info}

    def data(self) -> dict:
        import model_checkpoints as mc
        s = self.sizes
        start = time.monotonic()
        with get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:  # no fork: CUDA is up here
            sizes = pool.map(write_image, [(self.images, i, s.image_px) for i in range(s.images)], chunksize=64)
        images_s = time.monotonic() - start
        self.vq.parent.mkdir(parents=True, exist_ok=True)
        mc.write_llamagen(self.vq, tiny=s.tiny)
        mc.write_dinov2(self.dino, 768, tiny=s.tiny)
        return {"images": s.images, "px": s.image_px, "mean_png_kib": sum(sizes) / len(sizes) / 1024,
                "images_s": images_s, "weights_mib": sum(p.stat().st_size for p in self.vq.parent.rglob("*") if p.is_file()) / 2**20}

    def extract(self) -> dict:
        s = self.sizes
        out, peak = self.cli("extract", "extract", self.images, "--out", self.set, "--tokenizer", "llamagen-vq16",
                             "--tokenizer-path", self.vq, "--tokenizer-resolution", s.tokenizer_px,
                             "--teacher", "dinov2-b", "--teacher-path", self.dino, "--teacher-resolution", s.teacher_px,
                             "--batch-size", s.batch, "--device", s.device, "--workers", s.workers,
                             "--shard-size", s.shard, "--no-progress")
        m = re.search(r"extracted (\d+) records in ([\d.]+) s", out)
        if not m:
            raise StageError("extract did not report its rate", tail(self.logs / "extract.log"))
        rows, seconds = int(m[1]), float(m[2])
        return {"rows": rows, "img_per_s": rows / seconds, "batch": s.batch, **peak}

    def bare_forward(self) -> dict:
        """Tokenizer encode and teacher forward alone, as benchmarks/models_throughput.py times them."""
        import torch
        import models_throughput as mt
        from pipeline.models.registry import build
        s, device = self.sizes, torch.device(self.sizes.device)
        figures = {"batch": s.batch}
        for key, kind, name, weights, size, fwd in (
                ("tokenizer", "tokenizers", "llamagen-vq16", self.vq, s.tokenizer_px, lambda m, x: m.vq.encode(x).image_tokens),
                ("teacher", "teachers", "dinov2-b", self.dino, s.teacher_px, mt.BARE_TEACHER["dinov2"])):
            option = {"resolution" if kind == "tokenizers" else "input_size": size}
            model = build(kind, name, str(weights), **option).to(device).eval()
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            x = mt.float_batch(torch.randint(0, 256, (s.batch, size, size, 3), dtype=torch.uint8), model, device)
            with model.autocast():
                figures[f"{key}_img_per_s"] = mt.rate(lambda: fwd(model, x), s.batch, s.bare_iters, device)
            del model, x
        figures["both_img_per_s"] = 1 / (1 / figures["tokenizer_img_per_s"] + 1 / figures["teacher_img_per_s"])
        if device.type == "cuda":
            figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
        return figures

    def train_args(self, run: Path, zero: int, steps: int, launch: tuple | None = None) -> list:
        s = self.sizes
        return ["train", self.set, "--out", run, "--recipe", s.recipe, "--micro-batch", s.micro_batch,
                "--zero", zero, "--steps", steps, "--save-every", 10**9, "--keep-checkpoints", 1, "--no-progress",
                *(launch or ("--device", s.device))]

    def train_figures(self, run: Path, first_step: int, peak: dict) -> dict:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["step"] > first_step][self.sizes.warmup:]
        if not timed:
            raise StageError("no steps after the warm-up in metrics.jsonl")
        tokens_s, samples_s = median(timed, "tokens_per_s"), median(timed, "samples_per_s")
        params, config = lm_matmul_params(run / "model")
        seq = tokens_s / samples_s
        flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq
        return {"steps_timed": len(timed), "tokens_per_s": tokens_s, "step_s": self.sizes.micro_batch / samples_s,
                "mfu": tokens_s * flops_per_token / PEAK_BF16_FLOPS, "lm_params_m": params / 1e6,
                "tokens_per_seq": seq, "loss": timed[-1].get("loss"), **peak}

    def train(self, name: str, zero: int, launch: tuple | None = None, keep: bool = False) -> dict:
        run = self.work / name
        _, peak = self.cli(name, *self.train_args(run, zero, self.sizes.steps, launch))
        figures = {"zero": zero, "launch": " ".join(launch or ("--device", self.sizes.device)),
                   **self.train_figures(run, 0, peak)}
        if not keep:
            shutil.rmtree(run, ignore_errors=True)  # checkpoints of llamagen-l are ~5 GB each
        return figures

    def resume(self) -> dict:
        run, s = self.work / "train-zero2", self.sizes
        out, peak = self.cli("resume", *self.train_args(run, 2, s.resume_steps))
        m = re.search(r"resumed.*\bstep (\d+)", out)
        if not m or int(m[1]) != s.steps:
            raise StageError(f"the re-run with --steps {s.resume_steps} did not say it resumed at step {s.steps}",
                             tail(self.logs / "resume.log"))
        return {"resumed_at": int(m[1]), "steps": s.resume_steps, **self.train_figures(run, s.steps, peak)}

    def sample(self, name: str, batch: int, n: int) -> dict:
        out = self.work / name
        _, peak = self.cli(name, "sample", self.work / "train-zero2", "--out", out, "--class", 0, "--n", n,
                           "--batch-size", batch, "--device", self.sizes.device, "--no-progress")
        times = [(out / "images" / f"{i:05d}.png").stat().st_mtime for i in (batch - 1, n - 1)]
        return {"batch": batch, "images": n, "img_per_s": (n - batch) / (times[1] - times[0]), **peak}

    def eval(self) -> dict:
        report = self.work / "eval.json"
        _, peak = self.cli("eval", "eval", "--generated", self.work / "sample-large-batch", "--reference", self.set,
                           "--train-set", self.set, "--teacher-path", self.dino, "--no-fid",
                           "--device", self.sizes.device, "--out", report)
        metrics = json.loads(report.read_text())["metrics"]
        return {f"{m['metric']} ({m['space']})": m["value"] for m in metrics} | peak

    # ---- what comes back

    def pack_samples(self) -> None:
        """The large batch's first PNGs (and their samples.jsonl rows), within one returnable file."""
        folder = self.work / "sample-large-batch"
        if not (folder / "samples.jsonl").exists():
            return
        rows, total = [], 0
        for line in (folder / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            total += (folder / row["file"]).stat().st_size
            if total > SAMPLES_TAR_BYTES:
                break
            rows.append(row)
        with tarfile.open(self.out / "samples.tar", "w") as tar:
            for row in rows:
                tar.add(folder / row["file"], arcname=f"samples/{row['file']}")
            listing = "".join(json.dumps(r) + "\n" for r in rows).encode()
            entry = tarfile.TarInfo("samples/samples.jsonl")
            entry.size = len(listing)
            tar.addfile(entry, io.BytesIO(listing))

    def write_summary(self) -> None:
        summary = {"mode": "cpu-dry-run" if self.args.cpu_dry_run else "gpu", "budget_s": self.args.budget,
                   "elapsed_s": round(time.monotonic() - self.start, 1), "sizes": asdict(self.sizes),
                   "environment": self.info, "stages": self.stages}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "summary.md").write_text(markdown(summary))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return f"{len(value)} ({', '.join(map(str, value[:3]))}{', …' if len(value) > 3 else ''})" if value else "none"
    return str(value)


def markdown(summary: dict) -> str:
    env = summary["environment"]
    head = ("CPU dry run: checks the plumbing with tiny sizes; no figure here means anything."
            if summary["mode"] == "cpu-dry-run" else f"GPU: {env.get('gpu')}.")
    lines = ["# arra-pipe device check", "",
             f"{head} {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
             + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "transformers", "deepspeed") if env.get(k)) + ".",
             "", "| stage | status | s | figures |", "|---|---|---|---|"]
    for s in summary["stages"]:
        what = ("; ".join(f"{k} {fmt(v)}" for k, v in s["figures"].items()) if s["status"] == "ok"
                else s.get("note") or f"{s['error']['type']}: {s['error']['message']}")
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {what.replace('|', '/').replace(chr(10), ' ')} |")
    by = {s["stage"]: s["figures"] for s in summary["stages"] if s["status"] == "ok"}
    if "extract" in by and "bare-forward" in by:
        lines += ["", f"Extraction end to end reached {by['extract']['img_per_s'] / by['bare-forward']['both_img_per_s']:.2f}"
                  " of the bare tokenizer + teacher forward rate."]
    if "train-gpus1" in by and "train-zero2" in by:
        lines += ["", f"`{by['train-gpus1']['launch']}` trained at {by['train-gpus1']['tokens_per_s'] / by['train-zero2']['tokens_per_s']:.2f}"
                  " of the single-process ZeRO-2 tokens/s."]
    lines += ["", "MFU: tokens/s x (6N + 12·L·d·T) / 989 TFLOP/s (dense bf16); N = LM weights without the input "
              "embedding, T = tokens per sequence. Peak memory: torch.cuda.max_memory_allocated of the command's "
              "process (none when it launched ranks). FID: from samples.tar on a machine with the Inception file."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="where the summary goes (default: $OUT)")
    p.add_argument("--cpu-dry-run", action="store_true", help="every stage with tiny sizes on the CPU")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages; later ones are skipped")
    p.add_argument("--reserve", type=float, default=None, help="seconds kept for the summary (default 20; dry run 0)")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheelhouse of benchmarks/device_wheels.sh")
    p.add_argument("--work", type=Path, help="scratch folder, kept (default: a temporary one, removed)")
    args = p.parse_args()
    if args.out is None:
        p.error("--out is required when $OUT is not set")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.reserve = args.reserve if args.reserve is not None else (0.0 if args.cpu_dry_run else 20.0)
    sizes = DRY if args.cpu_dry_run else GPU
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="arra-device-check-"))
    check = Check(args, sizes, work)
    try:
        check.stage("install", check.install)
        check.stage("data", check.data)
        check.stage("extract", check.extract, needs=("data",))
        check.stage("bare-forward", check.bare_forward, needs=("data",))
        check.stage("train-zero2", lambda: check.train("train-zero2", 2, keep=True), needs=("extract",))
        check.stage("resume", check.resume, needs=("train-zero2",))
        for name, (batch, n) in zip(("sample-small-batch", "sample-large-batch"), sizes.sample):
            check.stage(name, lambda name=name, batch=batch, n=n: check.sample(name, batch, n), needs=("train-zero2",))
        check.stage("eval", check.eval, needs=("extract", "sample-large-batch"))
        check.stage("train-zero0", lambda: check.train("train-zero0", 0), needs=("extract",))
        check.stage("train-zero3", lambda: check.train("train-zero3", 3), needs=("extract",))
        check.stage("train-gpus1", lambda: check.train("train-gpus1", 2, sizes.one_gpu), needs=("extract",))
    finally:
        check.pack_samples()
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(check.logs, arcname="logs")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [s["stage"] for s in check.stages if s["status"] != "ok"]
    print(f"wrote {args.out / 'summary.json'} and summary.md; " + (f"not ok: {', '.join(failed)}" if failed else "all stages ok"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
