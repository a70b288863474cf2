"""Options are declared once (pipeline/options.py): the CLI's flags, defaults and ranges are the
dataclasses', the Python API refuses what the CLI refuses, naming the same flag, and --align-layer
is checked against the model's depth before any process group or model exists."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from pipeline.options import OptionError, flags
from stages.cli import main
from stages.options import TrainOptions

TRAIN_FLAGS = flags(TrainOptions)


def out_of_range(spec):
    """A value the flag's declaration refuses, or None when it has no bound."""
    if spec.choices is not None:
        return "no-such-choice"
    if spec.min is not None:
        return spec.min if spec.min_open else spec.min - 1
    if spec.max is not None:
        return spec.max if spec.max_open else spec.max + 1
    return None


def test_every_declared_option_is_a_train_flag_with_its_default():
    params = {p.name: p for p in main.commands["train"].params}
    assert len(TRAIN_FLAGS) >= 30
    for name, spec, default in TRAIN_FLAGS:
        assert name in params, f"{spec.flag(name)} is declared but not a flag of `arra-pipe train`"
        assert spec.flag(name) in params[name].opts and params[name].default == default
        assert params[name].help == spec.help


@pytest.mark.parametrize("name, spec", [(n, s) for n, s, _ in TRAIN_FLAGS if out_of_range(s) is not None],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_the_cli_and_the_python_api_refuse_the_same_values_naming_the_flag(tmp_path, name, spec):
    bad = out_of_range(spec)
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "run"), spec.flag(name), str(bad)])
    assert result.exit_code == 2 and spec.flag(name) in result.output
    with pytest.raises(OptionError, match=spec.flag(name)):
        TrainOptions(sets=[str(tmp_path)], run=str(tmp_path / "run"), **{name: bad})
    ok = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.name == name}
    TrainOptions(sets=[], run="", **ok)  # the default itself is allowed


def test_align_layer_deeper_than_the_model_is_refused_before_a_model_exists(run_extract, tmp_path, monkeypatch):
    import stages.train as train_stage
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr("deepspeed.init_distributed", lambda *a, **k: pytest.fail("a process group was started"))
    fs = run_extract("data/fashion-mnist-mini", source_options={"split": "test"}, shard_size=256, batch_size=64)[1]
    with pytest.raises(OptionError, match=r"--align-layer 3 is outside 0\.\.2"):   # the tiny preset has 2 blocks
        train_stage.train(TrainOptions(sets=[str(fs)], run=str(tmp_path / "run"), model="tiny", align_layer=3))
    assert not (tmp_path / "run" / "model").exists()
