"""Shared tiny fixtures: a kmeans codebook written in its real format, small image files, and a
helper that runs an extraction with settings fast enough for CI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import SourceOptions
from pipeline.models.image_tokenizers import save_kmeans_codebook
from stages.extract import extract
from stages.options import ExtractOptions

TEACHER_RES = 32  # EfficientNet-Lite0 on 32 px inputs keeps CPU tests fast


@pytest.fixture(scope="session")
def codebook(tmp_path_factory):
    """A 64-code, 4x4-patch, 16 px kmeans codebook (random but in the real file format)."""
    path = tmp_path_factory.mktemp("tok") / "codebook.safetensors"
    rng = np.random.default_rng(0)
    save_kmeans_codebook(path, rng.random((64, 48), dtype=np.float32), patch=4, resolution=16)
    return str(path)


def write_image(path, size=(20, 24), mode="RGB", seed=0, fmt=None):
    """A small random image file; returns its path."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _extract(codebook, source, out, overwrite=False, **kw):
    opts = dict(source=str(source), out=str(out), tokenizer_path=codebook, teacher_resolution=TEACHER_RES,
                batch_size=4, workers=0, shard_size=8, progress=False, max_reject_rate=1.0)
    if "source_options" in kw and isinstance(kw["source_options"], dict):
        kw["source_options"] = SourceOptions(**kw["source_options"])
    opts.update(kw)
    return extract(ExtractOptions(**opts), overwrite=overwrite, log=lambda m: None)


@pytest.fixture(scope="module")
def run_extract_module(codebook, tmp_path_factory):
    """Like `run_extract`, shared by a test module; returns the set's path."""
    def run(source, name="set", **kw):
        out = tmp_path_factory.mktemp(name) / "set"
        _extract(codebook, source, out, **kw)
        return out
    return run


@pytest.fixture
def run_extract(codebook, tmp_path):
    """extract(source) with test-sized settings; returns (result, out path)."""
    def run(source, out=None, overwrite=False, **kw):
        out = out or tmp_path / "set"
        return _extract(codebook, source, out, overwrite, **kw), out
    return run


@pytest.fixture
def teacher_devices(monkeypatch):
    """The devices that recorded teachers (eval, audit) are moved to, in order."""
    from pipeline.models import teachers
    moved, load = [], teachers.load_recorded_teacher

    def spy(*args, **kw):
        teacher = load(*args, **kw)
        move = teacher.to

        def to(device):
            moved.append(str(device))
            return move(device)
        teacher.to = to
        return teacher
    monkeypatch.setattr(teachers, "load_recorded_teacher", spy)
    return moved
