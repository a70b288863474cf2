"""`arra-pipe demo`: the pipeline end to end on Fashion-MNIST, with no network.

Uses Debian's full Fashion-MNIST (`apt-get install dataset-fashion-mnist`) when installed, else
the 2,000 + 500 image subset committed in data/. It fits the kmeans tokenizer, extracts train and
test sets with the EfficientNet-Lite0 teacher, trains a tiny class-conditional model with the ARRA
loss (DeepSpeed, one CPU process) and exports it as a Hugging Face model.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.registry import load_recipe
from pipeline.sources import SourceOptions
from stages.extract import ExtractOptions, extract
from stages.inspect import describe
from stages.tokenizer_fit import fit_tokenizer
from stages.export import export
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
    log(f"exported {export(str(run), str(out / 'model'))} (loads with transformers.AutoModelForCausalLM)")
