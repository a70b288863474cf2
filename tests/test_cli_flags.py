"""Flags that carry a value per teacher: NAME is the teacher as given or a manifest's stem."""

from __future__ import annotations

import click
import pytest

from stages.cli import per_teacher


def test_per_teacher_accepts_the_name_a_custom_manifest_is_called_by():
    teachers = ("clip-l", "my/teachers/retina.toml")
    assert per_teacher(["retina=/w/retina", "clip-l=/w/clip"], teachers, "--teacher-path") == {
        "my/teachers/retina.toml": "/w/retina", "clip-l": "/w/clip"}
    assert per_teacher(["my/teachers/retina.toml=/w/r"], teachers, "--teacher-path") == {"my/teachers/retina.toml": "/w/r"}
    assert per_teacher(["/w/only"], ("retina.toml",), "--teacher-path") == {"retina.toml": "/w/only"}


def test_per_teacher_refuses_a_name_that_is_not_a_teacher():
    with pytest.raises(click.BadParameter, match="'dinov2-s' is not a --teacher of this command"):
        per_teacher(["dinov2-s=/w"], ("clip-l",), "--teacher-path")
    with pytest.raises(click.BadParameter, match="with several --teacher, write --aggregation NAME=VALUE"):
        per_teacher(["cls"], ("clip-l", "dinov2-s"), "--aggregation")


@pytest.mark.parametrize("args,flag", [
    (["extract", ".", "--out", "x", "--batch-size", "0"], "--batch-size"),
    (["extract", ".", "--out", "x", "--shard-size", "0"], "--shard-size"),
    (["extract", ".", "--out", "x", "--teacher-resolution", "1"], "--teacher-resolution"),
    (["train", ".", "--out", "x", "--steps", "0"], "--steps"),
    (["train", ".", "--out", "x", "--steps", "-5"], "--steps"),
    (["train", ".", "--out", "x", "--lambda", "-1"], "--lambda"),
    (["train", ".", "--out", "x", "--micro-batch", "0"], "--micro-batch"),
    (["sample", ".", "--out", "x", "--cfg", "-3"], "--cfg"),
    (["sample", ".", "--out", "x", "--temperature", "-1"], "--temperature"),
    (["sample", ".", "--out", "x", "--top-k", "-5"], "--top-k"),
    (["sample", ".", "--out", "x", "--top-p", "0"], "--top-p"),
    (["sample", ".", "--out", "x", "--n", "0"], "--n"),
    (["audit", "dedup", ".", "--threshold", "2"], "--threshold"),
    (["audit", "dedup", ".", "--k", "0"], "--k"),
])
def test_out_of_range_numbers_are_refused_naming_the_flag(args, flag):
    from click.testing import CliRunner
    from stages.cli import main
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output


def test_a_refusal_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Every command goes through one wrapper: ArraError and OSError become `Error: <message>` with
    exit status 1; any other exception is a bug and reaches the caller as itself."""
    from click.testing import CliRunner

    import stages.export
    from pipeline.errors import ArraError
    from stages.cli import main
    run = tmp_path / "run"
    run.mkdir()
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "model")])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {run}: no checkpoints yet"
    monkeypatch.setenv("ARRA_DEBUG", "1")
    assert isinstance(CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "m")]).exception, ArraError)
    monkeypatch.delenv("ARRA_DEBUG")
    monkeypatch.setattr(stages.export, "export", lambda *a: {}["bug"])
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "model")])
    assert isinstance(result.exception, KeyError) and "Error:" not in result.output
