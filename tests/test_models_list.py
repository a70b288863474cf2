"""`arra-pipe models` lists every teacher and tokenizer manifest in manifests/, each with what its
TOML says (loader, width and input size, or codebook and resolution)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from click.testing import CliRunner

from stages.cli import main

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def test_models_lists_every_manifest_with_its_loader_and_sizes():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    sections, kind = {}, None
    for line in result.output.splitlines():
        if not line.startswith(" "):
            kind = line.rstrip(":")
            sections[kind] = {}
        else:
            name, *rest = line.split()
            sections[kind][name] = rest
    assert set(sections) == {"teachers", "tokenizers"}
    for kind, listed in sections.items():
        files = sorted((MANIFESTS / kind).glob("*.toml"))
        assert sorted(listed) == sorted(f.stem for f in files)
        for f in files:
            spec = tomllib.loads(f.read_text())
            rest = listed[f.stem]
            assert rest[0] == f"loader={spec['loader']}"
            if kind == "teachers":
                assert rest[1:] == [f"{spec['dim']}-d", spec["aggregation"], f"@{spec['input_size']}", "px"]
            else:
                assert rest[1:] == ["codebook", str(spec["codebook_size"]), f"@{spec['resolution']}", "px"]


def test_a_new_model_family_is_one_module_in_pipeline_models_and_one_manifest(tmp_path, monkeypatch):
    import sys

    import pipeline.models
    from pipeline.models import registry
    (tmp_path / "toy_family.py").write_text(
        "from pipeline.models.registry import register\n\n"
        "@register('teachers', 'toy-family')\nclass Toy:\n    pass\n")
    (tmp_path / "toy.toml").write_text('loader = "toy-family"\ndim = 8\n')
    monkeypatch.setattr(pipeline.models, "__path__", [*pipeline.models.__path__, str(tmp_path)])
    monkeypatch.delitem(registry.LOADERS["teachers"], "toy-family", raising=False)
    monkeypatch.delitem(sys.modules, "pipeline.models.toy_family", raising=False)
    spec = registry.load_spec("teachers", str(tmp_path / "toy.toml"))
    assert spec["name"] == "toy" and registry.LOADERS["teachers"]["toy-family"].__name__ == "Toy"
    monkeypatch.delitem(registry.LOADERS["teachers"], "toy-family")
