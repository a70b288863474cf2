"""The folder `arra-pipe sample` writes: PNGs listed in samples.jsonl with their condition, seed and
settings. Read by eval and the memorization audit, which also take any folder of PNGs."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES = "samples.jsonl"


def read_samples(folder: Path) -> tuple[list[Path], list[dict]]:
    """The images `sample` listed in samples.jsonl with their rows (condition, seed, settings);
    for any other folder every PNG but grid.png, with rows holding only the file name."""
    listed = folder / SAMPLES
    if listed.is_file():
        rows = [json.loads(line) for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = [{"file": p.relative_to(folder).as_posix()} for p in sorted(folder.rglob("*.png")) if p.name != "grid.png"]
    return [folder / r["file"] for r in rows], rows
