"""`arra-pipe demo`: the pipeline end to end on Fashion-MNIST, with no network, in a few minutes.

Uses the 2,000 + 500 image subset committed in data/ unless `data` is given (the full set is what
`arra-pipe run` is for). It fits the kmeans tokenizer, extracts train and test sets with the
EfficientNet-Lite0 teacher, trains a tiny class-conditional model with the ARRA loss (DeepSpeed,
one CPU process), exports it as a Hugging Face model, samples 10 images per class, evaluates them
against the test split (FID, FD in teacher space, class-accuracy proxy) and writes report.html.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.files import atomic_write_json
from pipeline.distributed import torch_threads
from pipeline.lm.generate import Sampling
from pipeline.models.registry import load_recipe
from pipeline.data.sources import SourceOptions
from stages.evaluate import evaluate
from stages.experiment import EMBEDDED_FASHION_MNIST, Timer, _flags
from stages.export import export
from stages.extract import extract
from stages.inspect import describe
from stages.options import ExtractOptions
from stages.report import demo_report, format_table, read_metrics
from stages.sample import sample
from stages.tokenizer_fit import fit_tokenizer
from stages.train import TrainOptions, train


CODEBOOK_SIZE = 256  # 4x fewer codes than `run` uses: fitted in seconds, and a vocabulary a tiny model learns in few steps
PROJECTOR_HIDDEN = 256  # the default (the teacher's 1280) made the projector ~95 % of a 64-wide model's step
FID_REFERENCE = 200  # test images through TF-Inception (~0.5 CPU-s each); FID is compared at equal counts only
MINUTES = "about 3.4 (5 CPU-minutes)"  # measured on 2 quiet cores in a fresh clone, README "Quick start"


def run_demo(out: str, data: str | None, workers: int, teacher_resolution: int, steps: int = 300, log=print) -> Path:
    """Run every stage, timing each beside the command that repeats it; returns report.html."""
    out, data = Path(out), Path(data) if data else EMBEDDED_FASHION_MNIST
    out.mkdir(parents=True, exist_ok=True)
    codebook, run, model, samples = out / "kmeans-codebook.safetensors", out / "run", out / "model", out / "samples"
    log(f"demo: {data}{' (the embedded 2,000 + 500 image subset)' if data == EMBEDDED_FASHION_MNIST else ''} -> {out}\n"
        f"  fit a {CODEBOOK_SIZE}-code kmeans tokenizer, extract train/test with EfficientNet-Lite0 @{teacher_resolution} px,\n"
        f"  train the tiny model {steps} steps, export, sample 10 per class, evaluate, write {out / 'report.html'}\n"
        f"  takes {MINUTES} minutes on 2 idle CPU cores, longer on busy ones"
        + ("" if data == EMBEDDED_FASHION_MNIST else ", for the subset; longer for a larger --data"))
    timer, commands = Timer(), {}
    if codebook.exists():
        log(f"tokenizer: reusing {codebook}")
    else:
        s = timer("tokenizer fit", fit_tokenizer, str(data), str(codebook), codebook_size=CODEBOOK_SIZE, workers=workers, log=log)
        log(f"tokenizer: {codebook}, {s['codebook_size']} codes fitted on {s['images']} images, PSNR {s['psnr_db']:.2f} dB")
    commands["tokenizer fit"] = f"arra-pipe tokenizer fit {data} --out {codebook} --codebook-size {CODEBOOK_SIZE}"
    for split in ("train", "test"):
        result = timer(f"extract {split}", extract, ExtractOptions(
            source=str(data), out=str(out / split), source_options=SourceOptions(split=split), tokenizer_path=str(codebook),
            teacher_resolution=teacher_resolution, workers=workers), log=log)
        commands[f"extract {split}"] = (f"arra-pipe extract {data} --split {split} --out {out / split} "
                                        f"--tokenizer-path {codebook} --teacher-resolution {teacher_resolution}")
        log(f"{split}: {result.status}, {result.rows} rows" +
            (f", {result.rows_extracted / result.seconds:.0f} rows/s" if result.seconds else ""))
        log(describe(out / split) + "\n")
    options = {**load_recipe("tiny-cpu"), "projector_hidden": PROJECTOR_HIDDEN, "steps": steps, "save_every": steps}
    log(f"training: recipe tiny-cpu, {steps} steps -> {run}")
    with torch_threads(1):
        timer("train", train, TrainOptions(sets=[str(out / "train")], run=str(run), progress=True, **options), log=log)
    commands["train"] = f"arra-pipe train {out / 'train'} --out {run} {_flags(options)}"
    first, last = read_metrics(run)[0], read_metrics(run)[-1]
    log(f"trained {last['step']} steps: CE {first['ce']:.3f} -> {last['ce']:.3f}, GVA {first['gva']:.3f} -> {last['gva']:.3f}")
    timer("export", export, str(run), str(model))
    commands["export"] = f"arra-pipe export {run} --out {model}"
    log(f"exported {model} (loads with transformers.AutoModelForCausalLM)")
    with torch_threads(1):
        timer("sample", sample, str(model), str(samples), n=10, sampling=Sampling(cfg=2.0), progress=False)
    commands["sample"] = f"arra-pipe sample {model} --out {samples} --n 10 --cfg 2.0"
    log(f"sampled 10 images per class: {samples / 'grid.png'} (one row per class)")
    result = timer("eval", evaluate, str(samples), str(out / "test"), train_set=str(out / "train"), fid_reference=FID_REFERENCE)
    (samples / "eval.json").write_text(json.dumps(result, indent=1))
    commands["eval"] = f"arra-pipe eval --generated {samples} --reference {out / 'test'} --train-set {out / 'train'} --fid-reference {FID_REFERENCE}"
    log(format_table(result))
    atomic_write_json(out / "demo.json", {"steps": [{"name": k, "command": c, "seconds": timer.seconds.get(k, 0.0)}
                                                    for k, c in commands.items()]})
    page = demo_report(out)
    log(f"report: {page} (and report.md)")
    return page
