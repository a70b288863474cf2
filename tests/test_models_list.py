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
