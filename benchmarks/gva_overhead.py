"""What GVA costs per training step: the same LM trained with lambda = 0 against lambda = 1.

lambda = 0 is the plain AR baseline (`ARRAModel` builds no projector, no hidden states are kept);
lambda = 1 adds the hidden states of the align layer, the 2-layer projector over the image
positions, the cosine loss and the projector's AdamW update. Both arms share one LM and one AdamW
(the projector's parameters get no gradient in the lambda = 0 arm, so AdamW skips them) and run the
same batch (`make_sequences`, class condition + grid*grid codes), forward + backward + step, plain
torch on CPU. The arms alternate (ABBA) over the repetitions to cancel drift from other load on the
machine; printed are the medians and the overhead (issue goal: <= 3%).

    .venv/bin/python benchmarks/gva_overhead.py [--preset P] [--batch B] [--grid G] [--steps S] [--extra P:B:G,...]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.lm.arra import ARRAModel  # noqa: E402
from pipeline.lm.objective import Objective  # noqa: E402
from pipeline.lm.causal_lm import build_from_preset  # noqa: E402
from pipeline.data.train_data import make_sequences  # noqa: E402
from pipeline.lm.vocab import VocabLayout  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--preset", default="llamagen-b")
p.add_argument("--batch", type=int, default=2)
p.add_argument("--grid", type=int, default=8, help="image codes per row = grid*grid (the paper: 32)")
p.add_argument("--steps", type=int, default=12, help="timed steps per arm, after one warm-up step each")
p.add_argument("--extra", default="tiny:8:16,llamagen-b:1:16", help="more sizes as PRESET:BATCH:GRID,... ('' for none)")
p.add_argument("--teacher-dim", type=int, default=512, help="teacher feature width (BiomedCLIP: 512)")
p.add_argument("--codebook", type=int, default=8192)
p.add_argument("--align-layer", type=int, default=1)
p.add_argument("--threads", type=int, default=1,
               help="torch threads (0: torch's default); 1 keeps timings steady when other jobs share the cores")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def measure(preset: str, batch: int, grid: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layout = VocabLayout("class", 11, args.codebook, (grid, grid), {"name": "synthetic"})
    ids, attn, labels, align = make_sequences(layout, [[int(y)] for y in rng.integers(0, 10, batch)],
                                              rng.integers(0, args.codebook, (batch, grid * grid)))
    data = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
            "labels": torch.from_numpy(labels), "align_mask": torch.from_numpy(align),
            "teacher": torch.randn(batch, args.teacher_dim)}
    lm = build_from_preset(preset, layout.vocab_size, ids.shape[1])
    arms = {0: ARRAModel(lm, None, Objective(lam=0.0)), 1: ARRAModel(lm, args.teacher_dim, Objective(align_layer=args.align_layer))}
    opt = torch.optim.AdamW(arms[1].parameters(), lr=1e-5)

    def step(lam: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        loss, _ = arms[lam](**data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c

    step(0), step(1)  # warm-up (allocates AdamW state)
    times = {0: [], 1: []}
    for r in range(args.steps):
        for lam in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[lam].append(step(lam))
    wall = [statistics.median(t[0] for t in times[lam]) for lam in (0, 1)]
    cpu = [statistics.median(t[1] for t in times[lam]) for lam in (0, 1)]
    return {"size": f"{preset} b{batch} g{grid}", "tokens": ids.shape[1] * batch,
            "lm_M": sum(x.numel() for x in lm.parameters()) / 1e6,
            "proj_M": sum(x.numel() for x in arms[1].projector.parameters()) / 1e6,
            "wall": wall, "cpu": cpu}


sizes = [(args.preset, args.batch, args.grid)]
sizes += [(s.split(":")[0], int(s.split(":")[1]), int(s.split(":")[2])) for s in args.extra.split(",") if s]
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; teacher dim {args.teacher_dim}, codebook "
      f"{args.codebook}, align layer {args.align_layer}; {args.steps} timed steps per arm (AdamW, fp32, CPU)")
arm_head = f"{'lambda=0':>9s} {'lambda=1':>9s} {'overhead':>8s}"
print(f"{'':45s}{'wall s per step':^28s}  {'CPU s per step':^28s}")
print(f"{'size':24s} {'tokens':>6s} {'LM M':>6s} {'proj M':>6s} {arm_head}  {arm_head}")
for preset, batch, grid in sizes:
    r = measure(preset, batch, grid)
    cells = [f"{a:9.4f} {b:9.4f} {b / a - 1:8.1%}" for a, b in (r["wall"], r["cpu"])]
    print(f"{r['size']:24s} {r['tokens']:6d} {r['lm_M']:6.1f} {r['proj_M']:6.2f} {cells[0]}  {cells[1]}", flush=True)
print("medians of steps (forward + backward + AdamW step); overhead = lambda=1 / lambda=0 - 1 (goal <= 3%);\n"
      "CPU s (process time) is less disturbed than wall s by other jobs on the cores")
