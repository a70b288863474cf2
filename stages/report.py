"""`arra-pipe report`: a page a person looks at, for the demo, a training run or an experiment.

Writes `report.html` and `report.md` side by side with the PNGs they both show (curves, enlarged
and labelled sample grids, tokenizer reconstructions), so either can be opened or committed as is;
every link is relative, so the folder can be moved or served.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.errors import ArraError  # noqa: E402
from pipeline.data.sources import FASHION_MNIST_CLASSES  # noqa: E402

ZOOM = 4  # 28-32 px samples become visible at 4x; nearest neighbour keeps their pixels sharp


class Page:
    """Blocks rendered twice, to HTML and to Markdown, so both files say the same."""

    def __init__(self, title: str):
        self.title, self.blocks = title, []

    def add(self, kind: str, *args) -> None:
        self.blocks.append((kind, args))

    def html(self) -> str:
        e = html.escape
        out = [f"<!doctype html><meta charset='utf-8'><title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{background:#f4f4f4;padding:.5em;"
               "overflow-x:auto}td,th{border:1px solid #ccc;padding:.2em .5em}table{border-collapse:collapse}"
               "figure{display:inline-block;margin:.5em;vertical-align:top}img{max-width:100%}</style>", f"<h1>{e(self.title)}</h1>"]
        for kind, args in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(args[0])}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(args[0])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{e(args[0])}</pre>")
            elif kind == "images":  # [(file, caption)], shown in one row
                out.append("".join(f"<figure><img src='{e(f)}' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>"
                                   for f, c in args[0]))
            elif kind == "table":
                head, rows = args
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
                    "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
            elif kind == "links":
                out.append("<ul>" + "".join(f"<li><a href='{e(h)}'>{e(t)}</a></li>" for t, h in args[0]) + "</ul>")
        return "\n".join(out) + "\n"

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, args in self.blocks:
            if kind == "h2":
                out += [f"## {args[0]}", ""]
            elif kind == "p":
                out += [args[0], ""]
            elif kind == "pre":
                out += ["```", args[0], "```", ""]
            elif kind == "images":
                out += [" ".join(f"![{c}]({f})" for f, c in args[0]), ""]
            elif kind == "table":
                head, rows = args
                out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                        *["| " + " | ".join(str(c) for c in r) + " |" for r in rows], ""]
            elif kind == "links":
                out += [f"- [{t}]({h})" for t, h in args[0]] + [""]
        return "\n".join(out)

    def write(self, folder: Path) -> Path:
        (folder / "report.md").write_text(self.markdown(), encoding="utf-8")
        (folder / "report.html").write_text(self.html(), encoding="utf-8")
        return folder / "report.html"


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, Path], path: Path) -> Path:
    """CE and GVA against optimizer step, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, run in runs.items():
        history = read_metrics(run)
        for ax, key in zip(axes, ("ce", "gva")):
            ax.plot([h["step"] for h in history if key in h], [h[key] for h in history if key in h], label=label)
    for ax, title in zip(axes, ("CE (next image token)", "GVA (alignment to the teacher)")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=.3)
    if len(runs) > 1:
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def class_names(n: int, source_format: str | None) -> list[str]:
    return list(FASHION_MNIST_CLASSES[:n]) if source_format == "fashion-mnist" else [f"class {i}" for i in range(n)]


def plot_grid(grid_png: Path, names: list[str], path: Path, title: str = "") -> Path:
    """The sample grid (one row per class, as `sample` writes it) enlarged ZOOM x, rows labelled."""
    small = Image.open(grid_png).convert("RGB")
    grid = np.asarray(small.resize((small.width * ZOOM, small.height * ZOOM), Image.NEAREST))
    h, w, _ = grid.shape
    fig, ax = plt.subplots(figsize=(w / 100 + 1.5, h / 100 + .4))
    ax.imshow(grid, interpolation="none")
    ax.set_yticks([(i + .5) * h / len(names) for i in range(len(names))], names)
    ax.set_xticks([])
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_reconstructions(feature_set: Path, path: Path, n: int = 8) -> Path:
    """The first `n` images of a set above their tokenizer reconstructions: what the codes keep."""
    import torch

    from pipeline.data.featureset import FeatureSet
    from pipeline.models.image_tokenizers import load_recorded_tokenizer
    from pipeline.data.set_images import column_array, reference_images
    fs = FeatureSet.open(feature_set)
    table = fs.table()
    originals, _ = reference_images(fs, None, limit=n, workers=0, table=table)
    grid = fs.manifest["tokenizer"]["grid"]
    codes = torch.from_numpy(column_array(table, "codes")[:n].astype(np.int64)).view(-1, *grid)
    decoded = load_recorded_tokenizer(fs.manifest["tokenizer"]).decode(codes).cpu().numpy()
    fig, axes = plt.subplots(2, len(originals), figsize=(1.2 * len(originals), 2.7), squeeze=False)
    for i, (a, b) in enumerate(zip(originals, decoded)):
        for ax, img in zip(axes[:, i], (a, b)):
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
    axes[0, 0].set_title("training image", loc="left", fontsize=9)
    axes[1, 0].set_title("tokenizer reconstruction", loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rel(path: Path, folder: Path) -> str:
    return Path(path).resolve().relative_to(folder.resolve()).as_posix()


def _source_format(feature_set: Path) -> str | None:
    manifest = feature_set / "manifest.json"
    return json.loads(manifest.read_text())["source"]["format"] if manifest.is_file() else None


def _classes(samples: Path) -> int:
    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines() if line.strip()]
    return len({r["class"] for r in rows if "class" in r})


def demo_report(out: Path) -> Path:
    """The demo's page: what ran is in demo.json ({name, command, seconds} per step), the rest in `out`."""
    steps = json.loads((out / "demo.json").read_text())["steps"]
    page = Page("arra-pipe demo")
    page.add("h2", "What ran")
    page.add("table", ["step", "command", "seconds"], [[s["name"], s["command"], f"{s['seconds']:.0f}"] for s in steps])
    page.add("p", f"Total: {sum(s['seconds'] for s in steps) / 60:.1f} minutes wall.")
    _run_section(page, out / "run", out)
    samples = out / "samples"
    page.add("h2", "Samples (one row per class)")
    names = class_names(_classes(samples), _source_format(out / "train"))
    page.add("images", [(_rel(plot_grid(samples / "grid.png", names, out / "samples.png"), out), f"samples, {ZOOM}x")])
    if (out / "train").is_dir():
        page.add("h2", "What the tokenizer loses")
        page.add("images", [(_rel(plot_reconstructions(out / "train", out / "reconstructions.png"), out),
                             "first training images (top) and their tokenizer reconstructions (bottom)")])
    _eval_section(page, samples / "eval.json")
    page.add("h2", "Artifacts")
    page.add("links", [(t, p) for t, p in (
        ("train feature set", "train/manifest.json"), ("test feature set", "test/manifest.json"),
        ("training run metrics", "run/metrics.jsonl"), ("training config", "run/train_config.json"),
        ("exported model", "model/config.json"), ("samples", "samples/samples.jsonl"),
        ("evaluation", "samples/eval.json")) if (out / p).exists()])
    return page.write(out)


def _run_section(page: Page, run: Path, folder: Path) -> None:
    history = read_metrics(run)
    first, last = history[0], history[-1]
    page.add("h2", "Training")
    page.add("p", f"{last['step']} steps: CE {first['ce']:.3f} -> {last['ce']:.3f}, GVA {first['gva']:.3f} -> {last['gva']:.3f}.")
    page.add("images", [(_rel(plot_curves({run.name: run}, folder / "curves.png"), folder), "training curves")])


def _eval_section(page: Page, eval_json: Path) -> None:
    if eval_json.is_file():
        page.add("h2", "Evaluation")
        page.add("pre", format_table(json.loads(eval_json.read_text())))


def run_report(run: Path) -> Path:
    """A training run's page: its curves and the options it was trained with."""
    page = Page(f"training run {run.name}")
    _run_section(page, run, run)
    config = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else {}
    page.add("h2", "Options")
    page.add("table", ["option", "value"], sorted((k, json.dumps(v)) for k, v in config.get("options", {}).items()))
    page.add("links", [(f, f) for f in ("metrics.jsonl", "train_config.json") if (run / f).exists()])
    return page.write(run)


def experiment_report(exp: Path) -> Path:
    """An `arra-pipe run` experiment's page: the arms side by side (mean ± sd over seeds) and their grids."""
    results = json.loads((exp / "results.json").read_text())
    arms, summary = list(results["summary"]), results["summary"]
    page = Page(f"{Path(results['experiment']).stem}, scale {results['scale']}")
    page.add("p", f"{results['description'].strip()} Data: {results['data']}. Device: {results['device']} "
                  f"({results['machine']}). Seeds: {results['seeds']}.")
    page.add("h2", "Arms")

    def cell(v):
        return f"{v['mean']:.4g}" + (f" ± {v['sd']:.2g}" if v["sd"] is not None else "")
    page.add("table", ["metric", "n_gen / n_ref", *arms],
             [[m, f"{summary[arms[0]][m]['n_generated']} / {summary[arms[0]][m]['n_reference']}",
               *[cell(summary[a][m]) for a in arms]] for m in summary[arms[0]]])
    runs = {f"{r['arm']}-seed{r['seed']}": exp / "runs" / f"{r['arm']}-seed{r['seed']}" for r in results["runs"]}
    page.add("h2", "Training curves")
    page.add("images", [(_rel(plot_curves(runs, exp / "curves.png"), exp), "every arm and seed")])
    page.add("h2", "Samples of seed 0 (one row per class)")
    grids = [exp / "samples" / f"{a}-seed0" for a in arms]
    names = class_names(_classes(grids[0]), _source_format(exp / "train"))
    page.add("images", [(_rel(plot_grid(g / "grid.png", names, exp / f"samples-{a}.png", a), exp), a)
                        for a, g in zip(arms, grids)])
    page.add("h2", "Wall time (s)")
    page.add("table", ["step", "seconds"], list(results["seconds"].items()))
    page.add("h2", "Commands")
    page.add("pre", "\n".join(results["commands"]))
    page.add("links", [("results.json", "results.json"), ("results.md", "results.md")])
    return page.write(exp)


def report(folder: str) -> Path:
    """The page for whatever `folder` holds: an experiment (results.json), the demo (demo.json) or a
    training run (metrics.jsonl)."""
    path = Path(folder)
    if (path / "demo.json").is_file():
        return demo_report(path)
    if (path / "results.json").is_file():
        return experiment_report(path)
    if (path / "metrics.jsonl").is_file():
        return run_report(path)
    raise ArraError(f"{folder}: neither an experiment (results.json), the demo (demo.json) nor a training run (metrics.jsonl)")


def format_table(result: dict) -> str:
    """`eval`'s result as the table `arra-pipe eval` and the reports print."""
    lines = [f"{'metric':44s} {'value':>10s} {'n_gen':>7s} {'n_ref':>7s}  space"]
    for m in result["metrics"]:
        lines.append(f"{m['metric']:44s} {m['value']:10.4f} {m['n_generated']:7d} {m['n_reference']:7d}  {m['space']}")
        if m.get("floor") is not None:
            lines.append(f"{'':44s} real-vs-real floor {m['floor']:.4f}: {m['floor_space']}")
        elif m.get("floor_note"):
            lines.append(f"{'':44s} {m['floor_note']}")
        if m.get("note"):
            lines.append(f"{'':44s} note: {m['note']}")
    seeds = result["generated"]["seeds"]
    lines.append(f"generated {result['generated']['path']} (seeds {seeds[0]}..{seeds[1]})" if seeds else
                 f"generated {result['generated']['path']} (seeds not recorded)")
    return "\n".join(lines)
