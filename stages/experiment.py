"""`arra-pipe run EXPERIMENT`: a controlled comparison of training arms, end to end.

For the reference experiment (manifests/experiments/fmnist-arra-base.toml): fit the kmeans
tokenizer on the training images, extract train and test sets with the teacher once, then for
every seed train each arm (identical but for lambda: same seed, data order, steps), sample the
same number of images per class, and evaluate every arm against the test set. The results table
(markdown + JSON) gives each figure with its sample count, seeds, wall time and the commands that
reproduce it. No arm is tuned that the others are not.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from pipeline.errors import ArraError
from pipeline.data.files import atomic_write_json
from pipeline.options import flag_of
from pipeline.metrics.significance import paired_test
from pipeline.models.registry import option_names, read_manifest
from pipeline.lm.sampling import Sampling
from pipeline.data.sources import SourceOptions
from stages.evaluate import evaluate
from stages.export import export
from stages.extract import extract
from stages.options import ExtractOptions
from stages.sample import sample
from stages.tokenizer_fit import fit_tokenizer
from stages.train import TrainOptions, train

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _embedded_fashion_mnist() -> Path:
    """The 2,000 + 500 image subset: data/ beside the sources in a checkout (or editable install),
    <prefix>/share/arra-pipe once installed from a wheel (pyproject's data-files)."""
    places = [Path(__file__).resolve().parents[1] / "data", Path(sysconfig.get_path("data")) / "share" / "arra-pipe"]
    return next((p / "fashion-mnist-mini" for p in places if (p / "fashion-mnist-mini").is_dir()),
                places[0] / "fashion-mnist-mini")


EMBEDDED_FASHION_MNIST = _embedded_fashion_mnist()
HEADLINE = ("FID", "FD {teacher}", "FD judge", "class accuracy (proxy)", "class accuracy (judge)")
# each independent-judge figure sits beside the teacher-space one it checks
BESIDE = {"FD judge": "FD {teacher}", "class accuracy (judge)": "class accuracy (proxy)"}


def default_data() -> Path:
    """Debian's full Fashion-MNIST (`apt-get install dataset-fashion-mnist`) when installed, else the subset in data/."""
    return DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else EMBEDDED_FASHION_MNIST


def _flags(options: dict) -> str:
    return " ".join(f"{flag_of(TrainOptions, k)} {v}" for k, v in options.items())


class Timer:
    def __init__(self):
        self.seconds = {}

    def __call__(self, name, fn, *args, **kw):
        start = time.perf_counter()
        out = fn(*args, **kw)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        return out


def run_experiment(name: str, scale: str, seeds: int, out: str, data: str | None = None, ablations: bool = False,
                   workers: int = 2, log=print) -> dict:
    path, exp = read_manifest("experiments", name)
    if scale not in exp["scales"]:
        raise ArraError(f"unknown --scale {scale!r}; {path.name} has {sorted(exp['scales'])}")
    conf = option_names(exp["scales"][scale])
    note, device = conf.pop("note", ""), conf.pop("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArraError(f"--scale {scale} needs a CUDA device")
    out, data = Path(out), Path(data) if data else default_data()
    out.mkdir(parents=True, exist_ok=True)
    timer, commands, teacher = Timer(), [], exp["teacher"]
    sets = _extract_sets(exp, data, out, device, workers, timer, commands, log)
    arms = exp["arms"] + (exp.get("ablations", []) if ablations else [])
    runs = [_run_arm(exp, arm, seed, conf, sets, out, device, timer, commands, log)
            for seed in range(seeds) for arm in arms]
    report = {"experiment": str(path), "description": exp.get("description", ""), "scale": scale, "scale_note": note,
              "data": str(data), "device": device, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "seeds": list(range(seeds)), "runs": runs, "summary": summarize(runs, [a["name"] for a in arms], teacher["name"]),
              "paired": paired(runs, [a["name"] for a in arms]),
              "seconds": timer.seconds, "commands": commands}
    atomic_write_json(out / "results.json", report)
    (out / "results.md").write_text(markdown(report, teacher["name"]))
    return report


def _extract_sets(exp: dict, data: Path, out: Path, device: str, workers: int, timer: Timer, commands: list,
                  log) -> dict[str, Path]:
    """Stage 1, once for every arm and seed: the kmeans tokenizer, then the train and test sets."""
    tok, teacher = option_names(exp["tokenizer"]), exp["teacher"]
    codebook = out / "kmeans-codebook.safetensors"
    if not codebook.exists():
        timer("tokenizer fit", fit_tokenizer, str(data), str(codebook), workers=workers, log=log, **tok)
    commands.append(f"arra-pipe tokenizer fit {data} --out {codebook} {_flags(tok)}")
    sets = {}
    for split in ("train", "test"):
        sets[split] = out / split
        timer(f"extract {split}", extract, ExtractOptions(
            source=str(data), out=str(sets[split]), source_options=SourceOptions(split=split), tokenizer_path=str(codebook),
            teachers=(teacher["name"],), teacher_resolution=teacher["resolution"], workers=workers, device=device), log=log)
        commands.append(f"arra-pipe extract {data} --split {split} --out {sets[split]} --tokenizer-path {codebook} "
                        f"--teacher {teacher['name']} --teacher-resolution {teacher['resolution']} --device {device}")
    return sets


def _run_arm(exp: dict, arm: dict, seed: int, conf: dict, sets: dict[str, Path], out: Path, device: str, timer: Timer,
             commands: list, log) -> dict:
    """Stage 2 onwards for one arm and seed: train, export, sample, evaluate against the test set."""
    per_class, fid_reference = conf["samples_per_class"], conf["fid_reference"]
    sampling = option_names(exp["sample"])
    arm_opts = option_names({k: v for k, v in arm.items() if k != "name"})
    train_conf = {k: v for k, v in conf.items() if k not in ("samples_per_class", "fid_reference")}
    options = {**option_names(exp["train"]), **train_conf, **arm_opts, "seed": seed, "device": device}
    tag = f"{arm['name']}-seed{seed}"
    run_dir, samples_dir = out / "runs" / tag, out / "samples" / tag
    log(f"== {tag}: {_flags(arm_opts)}")
    timer(f"train {tag}", train, TrainOptions(sets=[str(sets["train"])], run=str(run_dir), save_every=options["steps"],
                                               progress=False, **options), log=log)
    model = timer(f"export {tag}", export, str(run_dir), str(out / "models" / tag))
    timer(f"sample {tag}", sample, str(model), str(samples_dir), n=per_class, seed=1000 * seed,
          sampling=Sampling(**sampling), device=device, batch_size=200, progress=False)
    result = timer(f"eval {tag}", evaluate, str(samples_dir), str(sets["test"]), train_set=str(sets["train"]),
                   device=device, fid_reference=fid_reference)
    clipping = clip_rate(run_dir / "metrics.jsonl", options.get("clip", TrainOptions.clip))
    metrics = {m["metric"]: m for m in result["metrics"]}
    if clipping:
        metrics[CLIPPED] = {"metric": CLIPPED, "value": clipping["share"], "space": clipping["space"],
                            "n_generated": "–", "n_reference": "–"}
    commands += [f"arra-pipe train {sets['train']} --out {run_dir} {_flags(options)} --save-every {options['steps']}",
                 f"arra-pipe export {run_dir} --out {model}",
                 f"arra-pipe sample {model} --out {samples_dir} --n {per_class} --seed {1000 * seed} {_flags(sampling)}",
                 f"arra-pipe eval --generated {samples_dir} --reference {sets['test']} --train-set {sets['train']} "
                 f"--fid-reference {fid_reference} --device {device}"]
    run = {"arm": arm["name"], "seed": seed, "options": options, "metrics": metrics, "clipping": clipping,
           "seconds": {k: v for k, v in timer.seconds.items() if tag in k}}
    log(summary_line(run, exp["teacher"]["name"]))
    return run


CLIPPED = "steps clipped (share, training)"


def clip_rate(metrics_jsonl: Path, clip: float | None) -> dict | None:
    """How often global-norm clipping acted in a run: the share of optimizer steps whose gradient
    norm (before clipping, as metrics.jsonl logs it) exceeded `clip`, with the norm's median. The
    clip covers the LM and the projector together, so an arm whose alignment loss adds gradient
    can have its CE step cut more often: reported per arm so the comparison shows it."""
    if not clip or not metrics_jsonl.is_file():
        return None
    norms = [row["grad_norm"] for row in map(json.loads, metrics_jsonl.read_text().splitlines())
             if row.get("grad_norm") is not None]
    if not norms:
        return None
    clipped = sum(n > clip for n in norms)
    return {"clip": clip, "steps": len(norms), "clipped": clipped, "share": clipped / len(norms),
            "grad_norm_median": statistics.median(norms),
            "space": f"{clipped} of {len(norms)} steps had a global grad norm above --clip {clip}"}


def summary_line(run: dict, teacher: str) -> str:
    parts = [f"{key.format(teacher=teacher)} {run['metrics'][key.format(teacher=teacher)]['value']:.4g}"
             for key in HEADLINE if key.format(teacher=teacher) in run["metrics"]]
    return f"   {run['arm']} seed {run['seed']}: " + ", ".join(parts)


def summarize(runs: list[dict], arms: list[str], teacher: str) -> dict:
    """Mean and sd per arm and metric over seeds, and each arm's relative change against the first."""
    out = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        out[arm] = {}
        for metric in mine[0]["metrics"]:
            values = [r["metrics"][metric]["value"] for r in mine]
            out[arm][metric] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                                "n_seeds": len(values), "n_generated": mine[0]["metrics"][metric]["n_generated"],
                                "n_reference": mine[0]["metrics"][metric]["n_reference"]}
            floors = [r["metrics"][metric].get("floor") for r in mine]
            if all(f is not None for f in floors):  # the same real images every time: one value, kept as their mean
                out[arm][metric]["floor"] = statistics.fmean(floors)
    base = arms[0]
    for arm in arms[1:]:
        for metric, stats in out[arm].items():
            b = out[base][metric]["mean"]
            stats[f"change_vs_{base}"] = (stats["mean"] - b) / abs(b) if b else None
    return out


def paired(runs: list[dict], arms: list[str]) -> dict:
    """Each arm against the first, seed by seed: arms that share a seed share data order, LM init and
    sampling seeds, so the per-seed differences cancel what the seed does to both. Per metric: mean
    and sd of the differences, the paired t-test (t, two-sided p) and the 95 % t interval of their
    mean, whether it excludes zero, how many seeds would detect a true difference of the observed
    mean and sd with 80 % power at the 5 % level (None: more than 1000), and the standard errors
    of the mean difference with and without the pairing (the unpaired one from each arm's sd)."""
    base, out = arms[0], {}
    by_seed = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    for arm in arms[1:]:
        out[arm] = {}
        seeds = sorted(s for a, s in by_seed if a == arm and (base, s) in by_seed)
        for metric in by_seed[(arm, seeds[0])] if seeds else ():
            mine = [by_seed[(arm, s)][metric]["value"] for s in seeds]
            theirs = [by_seed[(base, s)][metric]["value"] for s in seeds]
            test = paired_test([a - b for a, b in zip(mine, theirs)])
            n = len(seeds)
            test["se_paired"] = test["sd_diff"] / math.sqrt(n) if n > 1 else None
            test["se_unpaired"] = (math.sqrt((statistics.variance(mine) + statistics.variance(theirs)) / n)
                                   if n > 1 else None)
            out[arm][metric] = test
    return out


def _seeds_cell(d: dict) -> str:
    if d["sd_diff"] is None:
        return "–"
    if d["seeds_to_resolve"] is not None:
        return str(d["seeds_to_resolve"])
    return "never (no difference)" if d["mean_diff"] == 0 else "> 1000"


def _table_order(metrics: list[str], teacher: str) -> list[str]:
    """The metrics in eval's order, each independent-judge figure moved to just after its teacher-space one."""
    out = [m for m in metrics if m not in BESIDE or BESIDE[m].format(teacher=teacher) not in metrics]
    for judged, anchor in BESIDE.items():
        if judged in metrics and anchor.format(teacher=teacher) in out:
            out.insert(out.index(anchor.format(teacher=teacher)) + 1, judged)
    return out


def _ceilings(summary: dict, teacher: str) -> list[str]:
    """The sentences that say what the class accuracies are and what real test images score."""
    probe = summary.get("class accuracy of real reference images (probe ceiling)")
    judge = summary.get("class accuracy of real reference images (judge ceiling)")
    lines = []
    if probe:
        lines += ["", f"Class accuracy (proxy) is a proxy for conditioning fidelity: a linear probe on {teacher} features "
                      f"of the training set; on the real test images it scores {probe['mean']:.3f}."]
    if judge or "FD judge" in summary:
        lines += ["", f"The judge rows use an independent judge: a small CNN trained on the training set's own images, "
                      f"not on {teacher} (the teacher the ARRA arm is pulled towards), so they are not true by "
                      "construction; FD judge is the Fréchet distance in its pooled feature space"
                  + (f"; its class accuracy on the real test images is {judge['mean']:.3f}." if judge else ".")]
    return lines


def markdown(report: dict, teacher: str) -> str:
    arms = list(report["summary"])
    base = arms[0]
    metrics = _table_order([m for m in report["summary"][base] if not m.startswith("class accuracy of real")], teacher)
    lines = [f"# {Path(report['experiment']).stem} — scale `{report['scale']}`", "", report["description"].strip(), "",
             f"Scale: {report['scale_note']}. Data: `{report['data']}`. Device: {report['device']} ({report['machine']}). "
             f"Seeds: {report['seeds']}.", "",
             "| metric | n_gen / n_ref | real-vs-real floor | " + " | ".join(arms) + " | "
             + " | ".join(f"{a} vs {base}" for a in arms[1:]) + " |",
             "|---|---|---|" + "---|" * (2 * len(arms) - 1)]
    for metric in metrics:
        s = report["summary"]
        cells = []
        for arm in arms:
            v = s[arm][metric]
            cells.append(f"{v['mean']:.4g}" + (f" ± {v['sd']:.2g}" if v["sd"] is not None else ""))
        changes = [f"{s[a][metric][f'change_vs_{base}']:+.1%}" if s[a][metric].get(f"change_vs_{base}") is not None else "–"
                   for a in arms[1:]]
        floor = f"{s[base][metric]['floor']:.4g}" if s[base][metric].get("floor") is not None else "–"
        lines.append(f"| {metric} | {s[base][metric]['n_generated']} / {s[base][metric]['n_reference']} | {floor} | "
                     + " | ".join(cells) + " | " + " | ".join(changes) + " |")
    lines += _ceilings(report["summary"][base], teacher)
    lines += ["", "FID uses the TF-Inception network (TF 1.x's legacy bilinear resize to 299 px, as the TF code, clean-fid "
                  "and NVIDIA's network compute it) against a class-balanced reference; with fewer than 10,000 images it "
                  "is biased upward, so compare arms only at equal sample counts, as here. The real-vs-real floor is the "
                  "same figure for held-out real images at the generated n against the same reference: what a generator "
                  "drawing real images would score, so only the distance above it is the model's. KID is the unbiased "
                  "polynomial-kernel MMD² (mean over subsets): its expectation does not grow as n shrinks."]
    if any(report.get("paired", {}).values()):
        lines += ["", f"## Paired differences (arm − {base}, seed by seed)", "",
                  "Arms sharing a seed share data order, init and sampling seeds. p: the two-sided paired t-test; a "
                  "difference is resolved when its 95 % t interval excludes zero. SE: the standard error of the mean "
                  "difference from the per-seed differences (paired) and from each arm's own sd (unpaired). The last "
                  "column is how many seeds would detect a true difference of the observed mean and sd with 80 % power "
                  "at the 5 % level (the observed values are estimates, so this is a rough guide).", "",
                  "| metric | arm | mean ± sd | 95 % interval | p | SE paired / unpaired | resolved | seeds for 80 % power |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, per_metric in report["paired"].items():
            for metric in metrics:
                d = per_metric.get(metric)
                if d is None:
                    continue
                sd = f" ± {d['sd_diff']:.2g}" if d["sd_diff"] is not None else ""
                ci = f"[{d['ci95'][0]:.3g}, {d['ci95'][1]:.3g}]" if d["ci95"] else "– (one seed)"
                p = f"{d['p_value']:.2g}" if d.get("p_value") is not None else "–"
                se = (f"{d['se_paired']:.2g} / {d['se_unpaired']:.2g}" if d.get("se_paired") is not None
                      and d.get("se_unpaired") is not None else "–")
                lines.append(f"| {metric} | {arm} | {d['mean_diff']:+.3g}{sd} | {ci} | {p} | {se} | "
                             f"{'yes' if d['resolved'] else 'no'} | {_seeds_cell(d)} |")
    lines += ["", "## Runs", "",
              "| arm | seed | " + " | ".join(metrics) + " | train s | total s |", "|---|---|" + "---|" * (len(metrics) + 2)]
    for r in report["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r['metrics'][m]['value']:.4g}" for m in metrics)
                     + f" | {sum(v for k, v in r['seconds'].items() if k.startswith('train'))} | {sum(r['seconds'].values()):.0f} |")
    lines += ["", "## Wall time (s)", "", *[f"- {k}: {v}" for k, v in report["seconds"].items()], "",
              "## Commands", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)
