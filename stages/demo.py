"""`arra-pipe demo`: the pipeline end to end on Fashion-MNIST, with no network.

Uses Debian's full Fashion-MNIST (`apt-get install dataset-fashion-mnist`) when installed, else
the 2,000 + 500 image subset committed in data/. It fits the kmeans tokenizer, extracts train and
test sets with the EfficientNet-Lite0 teacher, trains a tiny class-conditional model with the ARRA
loss (DeepSpeed, one CPU process), exports it as a Hugging Face model, samples 10 images per class
and evaluates them against the test split (FID, FD in teacher space, class-accuracy proxy).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.generate import Sampling
from pipeline.registry import load_recipe
from pipeline.sources import SourceOptions
from stages.evaluate import evaluate, format_table
from stages.export import export
from stages.extract import ExtractOptions, extract
from stages.inspect import describe
from stages.sample import sample
from stages.tokenizer_fit import fit_tokenizer
from stages.train import TrainOptions, train

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_FASHION_MNIST = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"


def default_data() -> Path:
    return DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else EMBEDDED_FASHION_MNIST


def run_demo(out: str, data: str | None, workers: int, teacher_resolution: int, steps: int = 300, log=print) -> None:
    out, data = Path(out), Path(data) if data else default_data()
    out.mkdir(parents=True, exist_ok=True)
    log(f"data: {data}")
    codebook = out / "kmeans-codebook.safetensors"
    if codebook.exists():
        log(f"tokenizer: reusing {codebook}")
    else:
        s = fit_tokenizer(str(data), str(codebook), workers=workers, log=log)
        log(f"tokenizer: {codebook}, {s['codebook_size']} codes fitted on {s['images']} images, PSNR {s['psnr_db']:.2f} dB")
    for split in ("train", "test"):
        result = extract(ExtractOptions(source=str(data), out=str(out / split), source_options=SourceOptions(split=split),
                                        tokenizer_path=str(codebook), teacher_resolution=teacher_resolution,
                                        workers=workers), log=log)
        log(f"{split}: {result.status}, {result.rows} rows" +
            (f", {result.rows_extracted / result.seconds:.0f} rows/s" if result.seconds else ""))
        log(describe(out / split) + "\n")
    run = out / "run"
    options = {**load_recipe("tiny-cpu"), "steps": steps, "save_every": steps, "progress": True}
    log(f"training: recipe tiny-cpu, {steps} steps -> {run}")
    train(TrainOptions(sets=[str(out / "train")], run=str(run), **options), log=log)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    log(f"trained {last['step']} steps: CE {first['ce']:.3f} -> {last['ce']:.3f}, GVA {first['gva']:.3f} -> {last['gva']:.3f}")
    model = export(str(run), str(out / "model"))
    log(f"exported {model} (loads with transformers.AutoModelForCausalLM)")
    samples = sample(str(model), str(out / "samples"), n=10, sampling=Sampling(cfg=2.0), progress=False)
    log(f"sampled 10 images per class: {samples / 'grid.png'} (one row per class)")
    result = evaluate(str(samples), str(out / "test"), train_set=str(out / "train"), fid_reference=500)
    log(format_table(result))
