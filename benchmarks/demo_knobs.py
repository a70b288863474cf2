"""Quality per CPU-second of the demo's training knobs, all on one demo extraction and seed 0.

    PYTHONPATH=. .venv/bin/python benchmarks/demo_knobs.py DEMO_DIR tiny-p256-300 tiny-p256-600 ...

DEMO_DIR holds `train/` and `test/` as `arra-pipe demo` leaves them. Each config trains (one
torch thread, as the demo does), exports, samples 10 per class with cfg 2 and is evaluated
without FID (teacher-space FD, k-NN precision/recall, class-accuracy proxy). One JSON line per
config on stdout; docs/benchmarks/demo-knobs.md holds a table of them.
"""

import argparse
import json
import time

import torch

from pipeline.lm.generate import Sampling
from pipeline.models.registry import load_recipe
from stages.evaluate import evaluate
from stages.export import export
from stages.sample import sample
from stages.train import TrainOptions, train

CONFIGS = {
    "tiny-p1280-300": dict(model="tiny", steps=300),
    "tiny-p256-300": dict(model="tiny", projector_hidden=256, steps=300),
    "tiny-p256-600": dict(model="tiny", projector_hidden=256, steps=600),
    "mini-p256-300": dict(model="mini", projector_hidden=256, steps=300),
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("demo_dir")
parser.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
parser.add_argument("--out", default="/tmp/demo-knobs")
args = parser.parse_args()
torch.set_num_threads(1)
for name in args.configs:
    out, sets = f"{args.out}/{name}", args.demo_dir
    options = {**load_recipe("tiny-cpu"), "save_every": 10**6, **CONFIGS[name]}
    wall, cpu = time.time(), time.process_time()
    train(TrainOptions(sets=[f"{sets}/train"], run=f"{out}/run", progress=False, **options), log=lambda *a, **k: None)
    train_wall, train_cpu = time.time() - wall, time.process_time() - cpu
    export(f"{out}/run", f"{out}/model")
    wall, cpu = time.time(), time.process_time()
    sample(f"{out}/model", f"{out}/samples", n=10, sampling=Sampling(cfg=2.0), progress=False)
    sample_wall, sample_cpu = time.time() - wall, time.process_time() - cpu
    metrics = {m["metric"]: m["value"] for m in
               evaluate(f"{out}/samples", f"{sets}/test", train_set=f"{sets}/train", fid=False)["metrics"]}
    last = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")][-1]
    print(json.dumps({"config": name, **CONFIGS[name], "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
                      "sample_wall_s": round(sample_wall, 1), "sample_cpu_s": round(sample_cpu, 1),
                      "ce": round(last["ce"], 3), "gva": round(last["gva"], 3),
                      "class_acc": metrics["class accuracy (proxy)"], "fd_teacher": round(metrics["FD efficientnet-lite0"], 1),
                      "precision": metrics["precision efficientnet-lite0"], "recall": metrics["recall efficientnet-lite0"]}),
          flush=True)
