"""Options are declared once (pipeline/options.py): the CLI's flags, defaults and ranges are the
dataclasses', the Python API refuses what the CLI refuses, naming the same flag, and --align-layer
is checked against the model's depth before any process group or model exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.data.sources import SourceOptions
from pipeline.options import OptionError, flags
from stages.cli import READING, main
from stages.options import AuditOptions, ExtractOptions, TrainOptions

# (command, options class, the fields it takes as flags or None for all, its arguments, the class's required fields)
COMMANDS = [
    (["train"], TrainOptions, None, lambda tmp: [str(tmp), "--out", str(tmp / "run")], dict(sets=[], run="")),
    (["extract"], ExtractOptions, None, lambda tmp: [str(tmp), "--out", str(tmp / "set")], dict(source=None, out="")),
    (["extract"], SourceOptions, None, lambda tmp: [str(tmp), "--out", str(tmp / "set")], {}),
    (["tokenizer", "fit"], ExtractOptions, READING, lambda tmp: [str(tmp), "--out", str(tmp / "c.safetensors")],
     dict(source=None, out="")),
    (["tokenizer", "fit"], SourceOptions, None, lambda tmp: [str(tmp), "--out", str(tmp / "c.safetensors")], {}),
    (["audit", "dedup"], AuditOptions, None, lambda tmp: [str(tmp), "--out", str(tmp / "audit")], {}),
]
DECLARED = [(cmd, cls, name, spec, default, args, required) for cmd, cls, only, args, required in COMMANDS
            for name, spec, default in flags(cls) if only is None or name in only]


def out_of_range(spec):
    """A value the flag's declaration refuses, or None when it has no bound."""
    if spec.choices is not None:
        return "no-such-choice"
    if spec.min is not None:
        return spec.min if spec.min_open else spec.min - 1
    if spec.max is not None:
        return spec.max if spec.max_open else spec.max + 1
    return None


def command(cmd):
    group = main
    for part in cmd:
        group = group.commands[part]
    return group


def test_every_declared_option_is_a_flag_of_its_commands_with_its_default():
    assert len(flags(TrainOptions)) >= 30 and len(flags(ExtractOptions)) >= 18 and len(flags(SourceOptions)) == 9
    for cmd, cls, name, spec, default, _, _ in DECLARED:
        params = {p.name: p for p in command(cmd).params}
        assert name in params, f"{spec.flag(name)} of {cls.__name__} is not a flag of `arra-pipe {' '.join(cmd)}`"
        assert spec.flag(name) in params[name].opts and params[name].help == spec.help
        assert params[name].default == default and params[name].multiple == spec.multiple


@pytest.mark.parametrize("cmd, cls, name, spec, args, required",
                         [(c, k, n, s, a, r) for c, k, n, s, _, a, r in DECLARED if out_of_range(s) is not None],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_the_cli_and_the_python_api_refuse_the_same_values_naming_the_flag(tmp_path, cmd, cls, name, spec, args, required):
    bad = out_of_range(spec)
    result = CliRunner().invoke(main, [*cmd, *args(tmp_path), spec.flag(name), str(bad)])
    assert result.exit_code == 2 and spec.flag(name) in result.output
    with pytest.raises(OptionError, match=spec.flag(name)):
        cls(**required, **{name: bad})
    cls(**required)  # the defaults themselves are allowed


def test_align_layer_deeper_than_the_model_is_refused_before_a_model_exists(run_extract, tmp_path, monkeypatch):
    import stages.train as train_stage
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr("deepspeed.init_distributed", lambda *a, **k: pytest.fail("a process group was started"))
    fs = run_extract("data/fashion-mnist-mini", source_options={"split": "test"}, shard_size=256, batch_size=64)[1]
    with pytest.raises(OptionError, match=r"--align-layer 3 is outside 0\.\.2"):   # the tiny preset has 2 blocks
        train_stage.train(TrainOptions(sets=[str(fs)], run=str(tmp_path / "run"), model="tiny", align_layer=3))
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "manifests" / "recipes").glob("*.toml")))
def test_every_shipped_recipe_sets_only_flags_of_its_command_within_their_ranges(recipe, tmp_path):
    from pipeline.lm.sampling import Sampling
    from pipeline.models.registry import load_recipe
    values = load_recipe(recipe)
    cmd = "sample" if recipe.startswith("sample") else "train"
    assert set(values) <= {p.name for p in command([cmd]).params}
    if cmd == "train":
        TrainOptions(sets=[], run="", **values)
    else:
        Sampling(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(Sampling)}})


def test_a_recipe_setting_an_unknown_flag_is_refused_naming_it(tmp_path):
    (tmp_path / "r.toml").write_text('lambda = 1.0\nresidual_dropuot = 0.1\n')
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--recipe", str(tmp_path / "r.toml")])
    assert result.exit_code == 2 and "residual-dropuot" in result.output and "--recipe" in result.output
