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
