"""A non-editable install (a wheel, as in the docker image) finds the embedded Fashion-MNIST subset
that `arra-pipe demo` and `run` default to."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_finds_the_embedded_subset(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel",
                    ROOT], check=True, cwd=tmp_path)
    prefix = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True)
    wheel = next((tmp_path / "wheel").glob("arra_pipe-*.whl"))
    # --ignore-installed: without it pip would uninstall this checkout's own (editable) install first
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix", prefix, wheel],
                   check=True)
    # the new environment's own packages first (its site-packages holds our wheel), then this one's
    # dependencies: PYTHONPATH does not run this checkout's editable-install hook
    env = {**os.environ, "PYTHONPATH": sysconfig.get_path("purelib")}
    probe = ("import stages.experiment as e, stages; "
             "print(stages.__file__); print(e.EMBEDDED_FASHION_MNIST)")
    out = subprocess.run([prefix / "bin" / "python", "-c", probe], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert out[0].startswith(str(prefix)), f"imported {out[0]}, not the wheel"
    data = Path(out[1])
    assert data == prefix / "share" / "arra-pipe" / "fashion-mnist-mini"
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in (ROOT / "data" / "fashion-mnist-mini").iterdir())
